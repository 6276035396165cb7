//! The single writer: the only task that writes to SQLite. It takes every
//! request queued on its channel (up to `max_batch`) and commits them in one
//! transaction, so N concurrent writers pay for one fsync, not N (group
//! commit). Each request runs inside its own savepoint, so a storage failure
//! in one request undoes only that request. Replies are sent only after the
//! commit succeeded: nothing is acknowledged before it is durable.
//!
//! Invariant: seqs are assigned here, in commit order, from `last_seq`, and
//! `counters.last_seq` is written in the same transaction.

use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection, Row};
use tokio::sync::{mpsc, oneshot};

use super::{parse_stored_rev, to_i64, to_u64};
use crate::domain::{
    Body, DatabaseInfo, DbName, DocChange, DocWrite, Document, Error, Result, Rev, SyncKey,
    WriteOutcome,
};

pub(super) enum Command {
    CreateDatabase {
        name: DbName,
        sync_key: SyncKey,
        reply: oneshot::Sender<Result<DatabaseInfo>>,
    },
    DeleteDatabase {
        name: DbName,
        reply: oneshot::Sender<Result<()>>,
    },
    Write {
        database: DbName,
        writes: Vec<DocWrite>,
        reply: oneshot::Sender<Result<Vec<Result<WriteOutcome>>>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// A command's result, waiting for the batch to commit.
enum Pending {
    Database(oneshot::Sender<Result<DatabaseInfo>>, Result<DatabaseInfo>),
    Deleted(oneshot::Sender<Result<()>>, Result<()>),
    Written(
        oneshot::Sender<Result<Vec<Result<WriteOutcome>>>>,
        Result<Vec<Result<WriteOutcome>>>,
    ),
}

impl Pending {
    /// Sends the result, or `err()` instead if the batch failed to commit.
    fn send(self, failed: Option<&dyn Fn() -> Error>) {
        // A caller that went away (cancelled RPC) no longer needs the reply;
        // the write itself is committed either way.
        match self {
            Pending::Database(tx, r) => drop(tx.send(failed.map_or(r, |f| Err(f())))),
            Pending::Deleted(tx, r) => drop(tx.send(failed.map_or(r, |f| Err(f())))),
            Pending::Written(tx, r) => drop(tx.send(failed.map_or(r, |f| Err(f())))),
        }
    }
}

pub(super) struct Writer {
    conn: SqliteConnection,
    rx: mpsc::Receiver<Command>,
    last_seq: u64,
    max_batch: usize,
}

struct DbRow {
    id: i64,
    name: DbName,
    sync_key: SyncKey,
}

impl Writer {
    pub(super) fn new(
        conn: SqliteConnection,
        rx: mpsc::Receiver<Command>,
        last_seq: u64,
        max_batch: usize,
    ) -> Self {
        Writer {
            conn,
            rx,
            last_seq,
            max_batch,
        }
    }

    pub(super) async fn run(mut self) {
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        let mut batch = Vec::with_capacity(self.max_batch);
        loop {
            if shutdown.is_some() {
                // Commit what was queued before the shutdown, then stop.
                while batch.len() < self.max_batch {
                    match self.rx.try_recv() {
                        Ok(Command::Shutdown { reply }) => drop(reply.send(())),
                        Ok(cmd) => batch.push(cmd),
                        Err(_) => break,
                    }
                }
                if batch.is_empty() {
                    break;
                }
            } else {
                let received = self.rx.recv_many(&mut batch, self.max_batch).await;
                if received == 0 {
                    break;
                }
            }
            let mut commands = Vec::with_capacity(batch.len());
            for cmd in batch.drain(..) {
                match cmd {
                    Command::Shutdown { reply } => {
                        self.rx.close();
                        shutdown.get_or_insert(reply);
                    }
                    other => commands.push(other),
                }
            }
            if !commands.is_empty() {
                self.commit_batch(commands).await;
            }
        }
        self.checkpoint_and_close().await;
        if let Some(reply) = shutdown {
            let _ = reply.send(());
        }
    }

    async fn commit_batch(&mut self, commands: Vec<Command>) {
        let seq_before = self.last_seq;
        let mut pending = Vec::with_capacity(commands.len());
        match self.run_batch(commands, &mut pending, seq_before).await {
            Ok(()) => pending.into_iter().for_each(|p| p.send(None)),
            Err(e) => {
                tracing::error!(error = %e, "commit failed; the whole batch is rolled back");
                if let Err(e) = execute(&mut self.conn, "ROLLBACK").await {
                    tracing::error!(error = %e, "rollback failed");
                }
                self.last_seq = seq_before;
                let failed = || Error::Storage("the transaction failed to commit".into());
                pending.into_iter().for_each(|p| p.send(Some(&failed)));
            }
        }
    }

    async fn run_batch(
        &mut self,
        commands: Vec<Command>,
        pending: &mut Vec<Pending>,
        seq_before: u64,
    ) -> Result<()> {
        execute(&mut self.conn, "BEGIN").await?;
        for cmd in commands {
            pending.push(apply(&mut self.conn, &mut self.last_seq, cmd).await);
        }
        if self.last_seq != seq_before {
            sqlx::query("UPDATE counters SET value = ?1 WHERE name = 'last_seq'")
                .bind(to_i64(self.last_seq))
                .execute(&mut self.conn)
                .await?;
        }
        execute(&mut self.conn, "COMMIT").await
    }

    fn fail(cmd: Command, e: Error) -> Pending {
        tracing::error!(error = %e, "could not start a savepoint");
        match cmd {
            Command::CreateDatabase { reply, .. } => Pending::Database(reply, Err(e)),
            Command::DeleteDatabase { reply, .. } => Pending::Deleted(reply, Err(e)),
            Command::Write { reply, .. } => Pending::Written(reply, Err(e)),
            Command::Shutdown { .. } => unreachable!("filtered out by run()"),
        }
    }

    async fn checkpoint_and_close(self) {
        let mut conn = self.conn;
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut conn)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint at shutdown failed");
        }
        if let Err(e) = conn.close().await {
            tracing::warn!(error = %e, "closing the write connection failed");
        }
    }
}

impl Pending {
    /// The same reply, answering a storage failure (the command was rolled back).
    fn into_failed(self) -> Pending {
        let err = || Error::Storage("the write was rolled back".into());
        match self {
            Pending::Database(tx, _) => Pending::Database(tx, Err(err())),
            Pending::Deleted(tx, _) => Pending::Deleted(tx, Err(err())),
            Pending::Written(tx, _) => Pending::Written(tx, Err(err())),
        }
    }
}

/// Runs one command inside a savepoint; its storage failure rolls back just
/// this command (and its seqs).
async fn apply(conn: &mut SqliteConnection, last_seq: &mut u64, cmd: Command) -> Pending {
    let seq_before = *last_seq;
    if let Err(e) = execute(conn, "SAVEPOINT command").await {
        return Writer::fail(cmd, e);
    }
    let pending = match cmd {
        Command::CreateDatabase {
            name,
            sync_key,
            reply,
        } => Pending::Database(reply, create_database(conn, name, sync_key).await),
        Command::DeleteDatabase { name, reply } => {
            Pending::Deleted(reply, delete_database(conn, &name).await)
        }
        Command::Write {
            database,
            writes,
            reply,
        } => Pending::Written(reply, write_docs(conn, last_seq, &database, writes).await),
        Command::Shutdown { .. } => unreachable!("filtered out by run()"),
    };
    let storage_failed = match &pending {
        Pending::Database(_, r) => matches!(r, Err(Error::Storage(_))),
        Pending::Deleted(_, r) => matches!(r, Err(Error::Storage(_))),
        Pending::Written(_, r) => {
            matches!(r, Err(Error::Storage(_)))
                || r.as_ref()
                    .is_ok_and(|v| v.iter().any(|item| matches!(item, Err(Error::Storage(_)))))
        }
    };
    let finished = if storage_failed {
        // ROLLBACK TO undoes the command; RELEASE then ends the savepoint.
        match execute(conn, "ROLLBACK TO command").await {
            Ok(()) => execute(conn, "RELEASE command").await,
            Err(e) => Err(e),
        }
    } else {
        execute(conn, "RELEASE command").await
    };
    match (storage_failed, finished) {
        (false, Ok(())) => pending,
        (_, finished) => {
            *last_seq = seq_before;
            if let Err(e) = finished {
                tracing::error!(error = %e, "savepoint failed");
            }
            pending.into_failed()
        }
    }
}

/// Runs a statement that returns nothing (transaction control).
async fn execute(conn: &mut SqliteConnection, sql: &'static str) -> Result<()> {
    sqlx::query(sql).execute(&mut *conn).await?;
    Ok(())
}

async fn find_database(conn: &mut SqliteConnection, name: &DbName) -> Result<DbRow> {
    let row = sqlx::query("SELECT id, sync_key FROM databases WHERE name = ?1")
        .bind(name.as_str())
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| Error::DatabaseNotFound(name.to_string()))?;
    Ok(DbRow {
        id: row.try_get("id")?,
        name: name.clone(),
        sync_key: SyncKey::parse("stored sync_key", row.try_get("sync_key")?)?,
    })
}

async fn create_database(
    conn: &mut SqliteConnection,
    name: DbName,
    sync_key: SyncKey,
) -> Result<DatabaseInfo> {
    let inserted = sqlx::query(
        "INSERT INTO databases (name, sync_key) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name.as_str())
    .bind(sync_key.as_str())
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(Error::DatabaseExists(name.to_string()));
    }
    Ok(DatabaseInfo {
        name,
        sync_key,
        doc_count: 0,
        update_seq: 0,
    })
}

async fn delete_database(conn: &mut SqliteConnection, name: &DbName) -> Result<()> {
    let db = find_database(conn, name).await?;
    sqlx::query("DELETE FROM docs WHERE db_id = ?1")
        .bind(db.id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM databases WHERE id = ?1")
        .bind(db.id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Applies document writes in order; each fails or succeeds on its own.
async fn write_docs(
    conn: &mut SqliteConnection,
    last_seq: &mut u64,
    database: &DbName,
    writes: Vec<DocWrite>,
) -> Result<Vec<Result<WriteOutcome>>> {
    let db = find_database(conn, database).await?;
    let mut results = Vec::with_capacity(writes.len());
    let mut live_delta: i64 = 0;
    let seq_before = *last_seq;
    for write in writes {
        let result = write_doc(conn, last_seq, &db, write).await;
        if let Ok((_, delta)) = &result {
            live_delta += delta;
        }
        let failed_in_storage = matches!(result, Err(Error::Storage(_)));
        results.push(result.map(|(outcome, _)| outcome));
        if failed_in_storage {
            // The savepoint around this command is rolled back by the caller.
            return Ok(results);
        }
    }
    if *last_seq != seq_before {
        sqlx::query(
            "UPDATE databases SET doc_count = doc_count + ?1, update_seq = ?2 WHERE id = ?3",
        )
        .bind(live_delta)
        .bind(to_i64(*last_seq))
        .bind(db.id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(results)
}

/// One document write: checks the revision, stores the new one and logs the
/// event. Returns the outcome and the change in live documents (-1, 0, 1).
async fn write_doc(
    conn: &mut SqliteConnection,
    last_seq: &mut u64,
    db: &DbRow,
    write: DocWrite,
) -> Result<(WriteOutcome, i64)> {
    let current = sqlx::query("SELECT rev, deleted FROM docs WHERE db_id = ?1 AND id = ?2")
        .bind(db.id)
        .bind(write.id.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    let current: Option<(Rev, bool)> = match current {
        Some(row) => Some((
            parse_stored_rev(row.try_get("rev")?)?,
            row.try_get("deleted")?,
        )),
        None => None,
    };
    let (parent, delta) = match (&write.change, current) {
        // Create: nothing there yet.
        (DocChange::Put(_), None) if write.rev.is_none() => (None, 1),
        // Update of a live document naming its current revision.
        (DocChange::Put(_), Some((cur, false))) if write.rev.as_ref() == Some(&cur) => {
            (Some(cur), 0)
        }
        // Recreate over a tombstone: its generation continues.
        (DocChange::Put(_), Some((cur, true)))
            if write.rev.is_none() || write.rev.as_ref() == Some(&cur) =>
        {
            (Some(cur), 1)
        }
        (DocChange::Delete, None | Some((_, true))) => {
            return Err(Error::DocumentNotFound {
                database: db.name.to_string(),
                id: write.id.to_string(),
            });
        }
        (DocChange::Delete, Some((cur, false))) if write.rev.as_ref() == Some(&cur) => {
            (Some(cur), -1)
        }
        (_, current) => return Err(conflict(conn, db, write, current).await),
    };
    let (deleted, body) = match write.change {
        DocChange::Put(body) => (false, body),
        DocChange::Delete => (true, Body::empty()),
    };
    let rev = Rev::next(parent.as_ref(), deleted, &body);
    *last_seq += 1;
    let seq = to_i64(*last_seq);
    let rev_str = rev.to_string();
    sqlx::query(
        "INSERT INTO docs (db_id, id, rev, deleted, body, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (db_id, id) DO UPDATE
         SET rev = excluded.rev, deleted = excluded.deleted, body = excluded.body, seq = excluded.seq",
    )
    .bind(db.id)
    .bind(write.id.as_str())
    .bind(&rev_str)
    .bind(deleted)
    .bind(body.canonical_json())
    .bind(seq)
    .execute(&mut *conn)
    .await?;
    let aliases =
        serde_json::to_string(&write.aliases.iter().map(|a| a.as_str()).collect::<Vec<_>>())
            .map_err(|e| Error::Storage(Box::new(e)))?;
    sqlx::query(
        "INSERT INTO events (seq, sync_key, database, doc_id, rev, deleted, aliases)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .bind(seq)
    .bind(db.sync_key.as_str())
    .bind(db.name.as_str())
    .bind(write.id.as_str())
    .bind(&rev_str)
    .bind(deleted)
    .bind(aliases)
    .execute(&mut *conn)
    .await?;
    Ok((
        WriteOutcome {
            id: write.id,
            rev,
            seq: *last_seq,
        },
        delta,
    ))
}

/// The conflict error for `write`, carrying the current document if it is live.
async fn conflict(
    conn: &mut SqliteConnection,
    db: &DbRow,
    write: DocWrite,
    current: Option<(Rev, bool)>,
) -> Error {
    let current_doc = match &current {
        Some((rev, false)) => {
            match sqlx::query("SELECT body, seq FROM docs WHERE db_id = ?1 AND id = ?2")
                .bind(db.id)
                .bind(write.id.as_str())
                .fetch_one(&mut *conn)
                .await
            {
                Ok(row) => {
                    let body = row
                        .try_get("body")
                        .map_err(Error::from)
                        .and_then(Body::from_canonical_json);
                    let seq: Result<i64> = row.try_get("seq").map_err(Error::from);
                    match (body, seq) {
                        (Ok(body), Ok(seq)) => Some(Box::new(Document {
                            id: write.id.clone(),
                            rev: rev.clone(),
                            body,
                            seq: to_u64(seq),
                        })),
                        (Err(e), _) | (_, Err(e)) => return e,
                    }
                }
                Err(e) => return e.into(),
            }
        }
        _ => None,
    };
    Error::Conflict {
        database: db.name.to_string(),
        id: write.id,
        sent_rev: write.rev,
        current_rev: current.map(|(rev, _)| rev),
        current: current_doc,
    }
}
