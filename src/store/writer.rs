//! The single writer: the only task that writes to SQLite. It takes every
//! request queued on its channel (up to `max_batch`) and commits them in one
//! transaction, so N concurrent writers pay for one fsync, not N (group
//! commit). Each request runs inside its own savepoint, so a storage failure
//! in one request undoes only that request. Replies are sent, and events
//! published, only after the commit succeeded: nothing is acknowledged or
//! announced before it is durable.
//!
//! Invariants: seqs are assigned here, in commit order, from `last_seq`, and
//! `counters.last_seq` is written in the same transaction; events are
//! published in seq order, one batch after another.

use std::collections::BTreeMap;

use sqlx::Row;
use sqlx::sqlite::SqliteConnection;
use tokio::sync::{mpsc, oneshot};

use super::{Publisher, parse_stored_rev, to_i64, to_u64};
use crate::domain::{
    Alias, Body, DatabaseInfo, DbName, DocChange, DocWrite, Document, Error, Event, Result, Rev,
    SyncKey, WriteOutcome,
};

/// What the writer is asked to do.
pub(super) enum Op {
    CreateDatabase {
        name: DbName,
        sync_key: SyncKey,
    },
    DeleteDatabase {
        name: DbName,
    },
    Write {
        database: DbName,
        writes: Vec<DocWrite>,
    },
    Notify {
        sync_key: SyncKey,
        aliases: Vec<Alias>,
        attributes: BTreeMap<String, String>,
    },
}

/// What an `Op` produced.
pub(super) enum Outcome {
    Database(DatabaseInfo),
    Deleted,
    Written(Vec<Result<WriteOutcome>>),
    Notified(u64),
}

pub(super) enum Command {
    Run {
        op: Op,
        reply: oneshot::Sender<Result<Outcome>>,
    },
    /// Commit what is queued, checkpoint, close, then answer.
    Shutdown { reply: oneshot::Sender<()> },
}

/// Retention of the event log.
#[derive(Debug, Clone, Copy)]
pub(super) struct Retention {
    /// Keep the newest this many events.
    pub keep: u64,
    /// Events deleted so far: every seq up to this one.
    pub pruned_through: u64,
}

/// Most events deleted in one batch, so pruning never stalls writers.
const PRUNE_CHUNK: u64 = 10_000;

pub(super) struct Writer {
    conn: SqliteConnection,
    rx: mpsc::Receiver<Command>,
    last_seq: u64,
    max_batch: usize,
    retention: Retention,
    publish: Publisher,
}

struct DbRow {
    id: i64,
    name: DbName,
    sync_key: SyncKey,
}

/// The current state of a document, as the writer checks revisions.
struct Current {
    rev: Rev,
    deleted: bool,
}

impl Writer {
    pub(super) fn new(
        conn: SqliteConnection,
        rx: mpsc::Receiver<Command>,
        last_seq: u64,
        max_batch: usize,
        retention: Retention,
        publish: Publisher,
    ) -> Self {
        Writer {
            conn,
            rx,
            last_seq,
            max_batch,
            retention,
            publish,
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
                        Ok(cmd) => batch.push(cmd),
                        Err(_) => break,
                    }
                }
                if batch.is_empty() {
                    break;
                }
            } else if self.rx.recv_many(&mut batch, self.max_batch).await == 0 {
                break;
            }
            let mut ops = Vec::with_capacity(batch.len());
            for cmd in batch.drain(..) {
                match cmd {
                    Command::Run { op, reply } => ops.push((op, reply)),
                    Command::Shutdown { reply } => {
                        // Refuse new commands; queued ones are still drained.
                        self.rx.close();
                        if let Some(earlier) = shutdown.replace(reply) {
                            let _ = earlier.send(());
                        }
                    }
                }
            }
            if !ops.is_empty() {
                self.commit_batch(ops).await;
            }
        }
        self.checkpoint_and_close().await;
        if let Some(reply) = shutdown {
            let _ = reply.send(());
        }
    }

    async fn commit_batch(&mut self, ops: Vec<(Op, oneshot::Sender<Result<Outcome>>)>) {
        let before = (self.last_seq, self.retention);
        let mut results = Vec::with_capacity(ops.len());
        let mut events = Vec::new();
        match self.run_batch(ops, &mut results, &mut events).await {
            Ok(()) => {
                if !events.is_empty() {
                    (self.publish)(&events);
                }
                // A caller that went away (cancelled RPC) no longer needs the
                // reply; the write is committed either way.
                for (reply, result) in results {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "commit failed; the whole batch is rolled back");
                if let Err(e) = execute(&mut self.conn, "ROLLBACK").await {
                    tracing::error!(error = %e, "rollback failed");
                }
                (self.last_seq, self.retention) = before;
                for (reply, _) in results {
                    let _ = reply.send(Err(Error::Storage(
                        "the transaction failed to commit".into(),
                    )));
                }
            }
        }
    }

    async fn run_batch(
        &mut self,
        ops: Vec<(Op, oneshot::Sender<Result<Outcome>>)>,
        results: &mut Vec<(oneshot::Sender<Result<Outcome>>, Result<Outcome>)>,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let seq_before = self.last_seq;
        execute(&mut self.conn, "BEGIN").await?;
        for (op, reply) in ops {
            let result = apply(&mut self.conn, &mut self.last_seq, events, op).await;
            results.push((reply, result));
        }
        if self.last_seq != seq_before {
            sqlx::query("UPDATE counters SET value = ?1 WHERE name = 'last_seq'")
                .bind(to_i64(self.last_seq))
                .execute(&mut self.conn)
                .await?;
            self.prune().await?;
        }
        execute(&mut self.conn, "COMMIT").await
    }

    /// Deletes events beyond the retention, at most `PRUNE_CHUNK` per batch.
    async fn prune(&mut self) -> Result<()> {
        let Some(target) = self.last_seq.checked_sub(self.retention.keep) else {
            return Ok(());
        };
        if target <= self.retention.pruned_through {
            return Ok(());
        }
        let through = target.min(self.retention.pruned_through + PRUNE_CHUNK);
        sqlx::query("DELETE FROM events WHERE seq <= ?1")
            .bind(to_i64(through))
            .execute(&mut self.conn)
            .await?;
        sqlx::query("UPDATE counters SET value = ?1 WHERE name = 'pruned_through'")
            .bind(to_i64(through))
            .execute(&mut self.conn)
            .await?;
        self.retention.pruned_through = through;
        Ok(())
    }

    async fn checkpoint_and_close(self) {
        let mut conn = self.conn;
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut conn)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint at shutdown failed");
        }
        if let Err(e) = sqlx::Connection::close(conn).await {
            tracing::warn!(error = %e, "closing the write connection failed");
        }
    }
}

/// Runs one op inside a savepoint. A storage failure rolls back just this op,
/// its seqs and its events, and answers it with the error.
async fn apply(
    conn: &mut SqliteConnection,
    last_seq: &mut u64,
    events: &mut Vec<Event>,
    op: Op,
) -> Result<Outcome> {
    let (seq_before, events_before) = (*last_seq, events.len());
    execute(conn, "SAVEPOINT op").await?;
    let result = match op {
        Op::CreateDatabase { name, sync_key } => create_database(conn, name, sync_key)
            .await
            .map(Outcome::Database),
        Op::DeleteDatabase { name } => delete_database(conn, &name)
            .await
            .map(|()| Outcome::Deleted),
        Op::Write { database, writes } => write_docs(conn, last_seq, events, &database, writes)
            .await
            .map(Outcome::Written),
        Op::Notify {
            sync_key,
            aliases,
            attributes,
        } => {
            *last_seq += 1;
            let event = Event {
                seq: *last_seq,
                sync_key,
                database: None,
                id: None,
                rev: None,
                deleted: false,
                aliases,
                attributes,
            };
            insert_event(conn, &event).await.map(|()| {
                events.push(event);
                Outcome::Notified(*last_seq)
            })
        }
    };
    let storage_failed = match &result {
        Err(Error::Storage(_)) => true,
        Ok(Outcome::Written(items)) => items.iter().any(|i| matches!(i, Err(Error::Storage(_)))),
        _ => false,
    };
    if storage_failed {
        *last_seq = seq_before;
        events.truncate(events_before);
        // ROLLBACK TO undoes the op; RELEASE then ends the savepoint.
        execute(conn, "ROLLBACK TO op").await?;
        execute(conn, "RELEASE op").await?;
        return Err(Error::Storage("the write was rolled back".into()));
    }
    execute(conn, "RELEASE op").await?;
    result
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
    events: &mut Vec<Event>,
    database: &DbName,
    writes: Vec<DocWrite>,
) -> Result<Vec<Result<WriteOutcome>>> {
    let db = find_database(conn, database).await?;
    let mut results = Vec::with_capacity(writes.len());
    let mut live_delta: i64 = 0;
    let seq_before = *last_seq;
    for write in writes {
        match write_doc(conn, last_seq, &db, write).await {
            Ok((outcome, delta, event)) => {
                live_delta += delta;
                events.push(event);
                results.push(Ok(outcome));
            }
            // The savepoint around this op is rolled back by `apply`.
            Err(e @ Error::Storage(_)) => return Err(e),
            Err(e) => results.push(Err(e)),
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
/// event. Returns the outcome, the change in live documents (-1, 0, 1) and
/// the event to publish after commit.
async fn write_doc(
    conn: &mut SqliteConnection,
    last_seq: &mut u64,
    db: &DbRow,
    write: DocWrite,
) -> Result<(WriteOutcome, i64, Event)> {
    let current = sqlx::query("SELECT rev, deleted FROM docs WHERE db_id = ?1 AND id = ?2")
        .bind(db.id)
        .bind(write.id.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    let current = match current {
        Some(row) => Some(Current {
            rev: parse_stored_rev(row.try_get("rev")?)?,
            deleted: row.try_get("deleted")?,
        }),
        None => None,
    };
    let names_current = |c: &Current| write.rev.as_ref() == Some(&c.rev);
    let (parent, delta) = match (&write.change, current) {
        // Create: nothing there yet.
        (DocChange::Put(_), None) if write.rev.is_none() => (None, 1),
        // Update of a live document naming its current revision.
        (DocChange::Put(_), Some(c)) if !c.deleted && names_current(&c) => (Some(c.rev), 0),
        // Recreate over a tombstone: its generation continues.
        (DocChange::Put(_), Some(c)) if c.deleted && (write.rev.is_none() || names_current(&c)) => {
            (Some(c.rev), 1)
        }
        (DocChange::Delete, None) => return Err(not_found(db, &write)),
        (DocChange::Delete, Some(c)) if c.deleted => return Err(not_found(db, &write)),
        (DocChange::Delete, Some(c)) if names_current(&c) => (Some(c.rev), -1),
        (_, current) => return Err(conflict(conn, db, write, current).await),
    };
    let (deleted, body) = match write.change {
        DocChange::Put(body) => (false, body),
        DocChange::Delete => (true, Body::empty()),
    };
    let rev = Rev::next(parent.as_ref(), deleted, &body);
    *last_seq += 1;
    sqlx::query(
        "INSERT INTO docs (db_id, id, rev, deleted, body, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (db_id, id) DO UPDATE
         SET rev = excluded.rev, deleted = excluded.deleted, body = excluded.body, seq = excluded.seq",
    )
    .bind(db.id)
    .bind(write.id.as_str())
    .bind(rev.to_string())
    .bind(deleted)
    .bind(body.canonical_json())
    .bind(to_i64(*last_seq))
    .execute(&mut *conn)
    .await?;
    let event = Event {
        seq: *last_seq,
        sync_key: db.sync_key.clone(),
        database: Some(db.name.clone()),
        id: Some(write.id.clone()),
        rev: Some(rev.clone()),
        deleted,
        aliases: write.aliases,
        attributes: BTreeMap::new(),
    };
    insert_event(conn, &event).await?;
    let outcome = WriteOutcome {
        id: write.id,
        rev,
        seq: *last_seq,
    };
    Ok((outcome, delta, event))
}

async fn insert_event(conn: &mut SqliteConnection, event: &Event) -> Result<()> {
    let aliases =
        serde_json::Value::from(event.aliases.iter().map(Alias::as_str).collect::<Vec<_>>());
    let attributes: serde_json::Map<String, serde_json::Value> = event
        .attributes
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
        .collect();
    sqlx::query(
        "INSERT INTO events (seq, sync_key, database, doc_id, rev, deleted, aliases, attributes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .bind(to_i64(event.seq))
    .bind(event.sync_key.as_str())
    .bind(event.database.as_ref().map_or("", DbName::as_str))
    .bind(event.id.as_ref().map_or("", crate::domain::DocId::as_str))
    .bind(event.rev.as_ref().map(Rev::to_string).unwrap_or_default())
    .bind(event.deleted)
    .bind(aliases.to_string())
    .bind(serde_json::Value::Object(attributes).to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn not_found(db: &DbRow, write: &DocWrite) -> Error {
    Error::DocumentNotFound {
        database: db.name.to_string(),
        id: write.id.to_string(),
    }
}

/// The conflict error for `write`, carrying the current document if it is live.
async fn conflict(
    conn: &mut SqliteConnection,
    db: &DbRow,
    write: DocWrite,
    current: Option<Current>,
) -> Error {
    let current_doc = match &current {
        Some(c) if !c.deleted => match read_live_doc(conn, db, &write, &c.rev).await {
            Ok(doc) => Some(Box::new(doc)),
            Err(e) => return e,
        },
        _ => None,
    };
    Error::Conflict {
        database: db.name.to_string(),
        id: write.id,
        sent_rev: write.rev,
        current_rev: current.map(|c| c.rev),
        current: current_doc,
    }
}

async fn read_live_doc(
    conn: &mut SqliteConnection,
    db: &DbRow,
    write: &DocWrite,
    rev: &Rev,
) -> Result<Document> {
    let row = sqlx::query("SELECT body, seq FROM docs WHERE db_id = ?1 AND id = ?2")
        .bind(db.id)
        .bind(write.id.as_str())
        .fetch_one(&mut *conn)
        .await?;
    Ok(Document {
        id: write.id.clone(),
        rev: rev.clone(),
        body: Body::from_canonical_json(row.try_get("body")?)?,
        seq: to_u64(row.try_get("seq")?),
    })
}
