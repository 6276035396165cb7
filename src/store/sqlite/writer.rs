//! The SQLite writer: the only task that writes to the file. It owns the one
//! write connection and runs the shared batching loop (`batch::serve`), so
//! concurrent writers share one transaction and one fsync. Each SQL round
//! trip costs two thread switches (sqlx runs SQLite on a worker thread), so a
//! batch costs a handful of them, not several per write. Replies are sent,
//! and events published, only after the commit succeeded. It also keeps the
//! WAL under its bound (`WalBound`).
//!
//! Invariants: only this task writes, so revision checks and seq assignment
//! need no locks (they run in commit order); `State` mirrors what is
//! committed, and is restored when a batch fails.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use sqlx::sqlite::SqliteConnection;
use sqlx::{QueryBuilder, Row, Sqlite};

use super::super::batch::{
    self, Current, DbRow, Engine, Queued, Retention, State, Tail, Tx, aliases_json, attributes_json,
};
use super::super::{Publisher, parse_stored_rev, to_i64, to_u64};
use crate::domain::{Body, DatabaseInfo, DbName, DocId, Document, Error, Event, Result, SyncKey};

/// The bound on the WAL file. SQLite only restarts the WAL from its start
/// when a checkpoint has copied all of it back and no writer is appending;
/// a checkpointer on another connection never sees that moment under
/// sustained writes, so the WAL would grow for ever. The writer therefore
/// checkpoints (TRUNCATE) between two batches once the file passes half the
/// bound, and cuts batches to a quarter of it, so the file stays under the
/// bound; and it truncates the WAL when writes pause.
pub(super) struct WalBound {
    pub path: PathBuf,
    pub max_bytes: u64,
    /// Wakes the PASSIVE checkpointer (see `store::checkpointer`).
    pub nudge: std::sync::Arc<tokio::sync::Notify>,
}

impl WalBound {
    fn len(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// The most request bytes (`Op::approx_bytes`) taken into one batch.
    fn batch_bytes(&self) -> usize {
        usize::try_from(self.max_bytes / 4)
            .unwrap_or(usize::MAX)
            .max(1)
    }
}

/// How long writes must pause before the writer truncates the WAL.
const IDLE_TRUNCATE_AFTER: Duration = Duration::from_secs(1);
/// After this many batches failed in a row, the writer gives up: the
/// database cannot be written (disk full, I/O errors), and the process
/// should stop so that an orchestrator restarts or replaces it.
const MAX_FAILED_BATCHES: u32 = 3;
/// Rows per multi-row statement (SQLite allows 32766 bound values).
const ROWS_PER_STATEMENT: usize = 1000;

pub(super) struct Writer {
    conn: SqliteConnection,
    state: State,
    wal: WalBound,
    /// When the writer last warned that the WAL is over its bound.
    over_bound_warned: Option<std::time::Instant>,
    publish: Publisher,
}

impl Writer {
    pub(super) async fn new(
        mut conn: SqliteConnection,
        last_seq: u64,
        retention: Retention,
        wal: WalBound,
        publish: Publisher,
    ) -> Result<Self> {
        let databases = load_databases(&mut conn).await?;
        let last_db_id: i64 =
            sqlx::query_scalar("SELECT value FROM counters WHERE name = 'last_db_id'")
                .fetch_one(&mut conn)
                .await?;
        Ok(Writer {
            conn,
            state: State {
                last_seq,
                last_db_id,
                retention,
                databases,
            },
            wal,
            over_bound_warned: None,
            publish,
        })
    }

    /// Checkpoints on the writer's own connection, between batches: copies
    /// the WAL back into the database and empties the file (TRUNCATE).
    /// Returns whether the WAL was reset.
    async fn truncate_wal(&mut self) -> bool {
        let started = std::time::Instant::now();
        let result = sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&mut self.conn)
            .await;
        let took = started.elapsed();
        if took > Duration::from_millis(200) {
            tracing::warn!(?took, "restarting the WAL paused the writer");
        }
        if !matches!(result, Ok((0, _, _))) && self.wal.len() > self.wal.max_bytes {
            let now = std::time::Instant::now();
            if self
                .over_bound_warned
                .is_none_or(|at| now.duration_since(at) > Duration::from_secs(10))
            {
                self.over_bound_warned = Some(now);
                tracing::warn!(
                    wal_bytes = self.wal.len(),
                    max_bytes = self.wal.max_bytes,
                    "the WAL is over --wal-max-bytes and could not be restarted: a long read holds an old snapshot"
                );
            }
        }
        match result {
            // busy = 0: the whole WAL was copied back and reset.
            Ok((0, _, _)) => true,
            Ok(_) => {
                tracing::debug!(
                    "WAL checkpoint could not finish (a reader or the checkpointer holds an older snapshot); retrying later"
                );
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "WAL checkpoint failed; retrying later");
                false
            }
        }
    }

    /// Restores the state a failed batch started from: its creates and
    /// deletes of databases were rolled back too.
    async fn restore(&mut self, last_seq: u64, last_db_id: i64, retention: Retention) {
        if let Err(e) = sqlx::query("ROLLBACK").execute(&mut self.conn).await {
            tracing::error!(error = %e, "rollback failed");
        }
        self.state.last_seq = last_seq;
        self.state.last_db_id = last_db_id;
        self.state.retention = retention;
        match load_databases(&mut self.conn).await {
            Ok(dbs) => self.state.databases = dbs,
            Err(e) => tracing::error!(error = %e, "cannot reload databases"),
        }
    }
}

impl Engine for Writer {
    async fn commit(&mut self, queued: Vec<Queued>) -> bool {
        let (ops, replies, _permits) = batch::unzip(queued);
        let before = (
            self.state.last_seq,
            self.state.last_db_id,
            self.state.retention,
        );
        let mut events = Vec::new();
        let started = std::time::Instant::now();
        let outcome = match sqlx::query("BEGIN").execute(&mut self.conn).await {
            Ok(_) => batch::apply(&mut self.conn, &mut self.state, ops, &mut events).await,
            Err(e) => Err(e.into()),
        };
        let took = started.elapsed();
        if took > Duration::from_millis(500) {
            tracing::warn!(
                ?took,
                requests = replies.len(),
                "a batch took long to commit"
            );
        }
        let committed = match outcome {
            Ok(results) => {
                if !events.is_empty() {
                    (self.publish)(&events);
                }
                // A caller that went away (cancelled RPC) no longer needs the
                // reply; the write is committed either way.
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "batch failed; it is rolled back");
                self.restore(before.0, before.1, before.2).await;
                batch::fail_all(replies, || {
                    Error::Storage(
                        "the transaction failed to commit; nothing of this request was applied"
                            .into(),
                    )
                });
                false
            }
        };
        if committed {
            let wal = self.wal.len();
            if wal > self.wal.max_bytes / 2 {
                self.truncate_wal().await;
            } else if wal > self.wal.max_bytes / 4 {
                self.wal.nudge.notify_one();
            }
        }
        committed
    }

    fn batch_bytes(&self) -> usize {
        self.wal.batch_bytes()
    }

    fn idle_after(&self) -> Option<Duration> {
        Some(IDLE_TRUNCATE_AFTER)
    }

    async fn idle(&mut self) -> bool {
        self.truncate_wal().await
    }

    fn max_failed_batches(&self) -> Option<u32> {
        Some(MAX_FAILED_BATCHES)
    }

    async fn close(self) {
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

impl Tx for SqliteConnection {
    async fn doc_states(&mut self, db_id: i64, ids: &[&DocId]) -> Result<Vec<(DocId, Current)>> {
        let mut out = Vec::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut query = select_docs("id, rev, deleted, seq", db_id, chunk.iter().copied());
            for row in query
                .build()
                .persistent(false)
                .fetch_all(&mut *self)
                .await?
            {
                out.push((
                    DocId::parse("stored id", row.try_get("id")?)?,
                    Current {
                        rev: parse_stored_rev(row.try_get("rev")?)?,
                        deleted: row.try_get("deleted")?,
                        seq: to_u64(row.try_get("seq")?),
                        body: None,
                    },
                ));
            }
        }
        Ok(out)
    }

    async fn documents(&mut self, db_id: i64, ids: &[&DocId]) -> Result<Vec<Document>> {
        let mut out = Vec::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut query = select_docs("id, rev, body, seq", db_id, chunk.iter().copied());
            for row in query
                .build()
                .persistent(false)
                .fetch_all(&mut *self)
                .await?
            {
                out.push(Document {
                    id: DocId::parse("stored id", row.try_get("id")?)?,
                    rev: parse_stored_rev(row.try_get("rev")?)?,
                    body: Body::from_canonical_json(row.try_get("body")?)?,
                    seq: to_u64(row.try_get("seq")?),
                });
            }
        }
        Ok(out)
    }

    async fn put_docs(&mut self, rows: &[batch::DocRow]) -> Result<()> {
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO docs (db_id, id, rev, deleted, body, seq) ",
            );
            query.push_values(chunk, |mut b, row| {
                b.push_bind(row.db_id)
                    .push_bind(row.id.as_str())
                    .push_bind(row.rev.to_string())
                    .push_bind(row.deleted)
                    .push_bind(row.body.canonical_json())
                    .push_bind(to_i64(row.seq));
            });
            query.push(
                " ON CONFLICT (db_id, id) DO UPDATE SET rev = excluded.rev, \
                 deleted = excluded.deleted, body = excluded.body, seq = excluded.seq",
            );
            query.build().persistent(false).execute(&mut *self).await?;
        }
        Ok(())
    }

    async fn put_events(&mut self, events: &[Event]) -> Result<()> {
        for chunk in events.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO events (seq, sync_key, database, doc_id, rev, deleted, aliases, attributes) ",
            );
            query.push_values(chunk, |mut b, event| {
                b.push_bind(to_i64(event.seq))
                    .push_bind(event.sync_key.as_str())
                    .push_bind(event.database.as_ref().map_or("", DbName::as_str))
                    .push_bind(event.id.as_ref().map_or("", DocId::as_str))
                    .push_bind(
                        event
                            .rev
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_default(),
                    )
                    .push_bind(event.deleted)
                    .push_bind(aliases_json(&event.aliases))
                    .push_bind(attributes_json(&event.attributes));
            });
            query.build().persistent(false).execute(&mut *self).await?;
        }
        Ok(())
    }

    async fn insert_database(&mut self, id: i64, info: &DatabaseInfo) -> Result<()> {
        sqlx::query(
            "INSERT INTO databases (id, name, sync_key, created_seq) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(id)
        .bind(info.name.as_str())
        .bind(info.sync_key.as_str())
        .bind(to_i64(info.created_seq))
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn delete_database(&mut self, id: i64) -> Result<()> {
        sqlx::query("DELETE FROM docs WHERE db_id = ?1")
            .bind(id)
            .execute(&mut *self)
            .await?;
        sqlx::query("DELETE FROM databases WHERE id = ?1")
            .bind(id)
            .execute(&mut *self)
            .await?;
        Ok(())
    }

    /// Counters, pruning and the commit in one round trip. Every value is an
    /// integer the writer computed, so writing them into the SQL text is safe.
    async fn finish(&mut self, tail: Tail) -> Result<()> {
        use std::fmt::Write as _;
        let mut sql = String::new();
        for (db_id, delta, update_seq) in tail.databases {
            let _ = writeln!(
                sql,
                "UPDATE databases SET doc_count = doc_count + {delta}, update_seq = {} WHERE id = {db_id};",
                to_i64(update_seq)
            );
        }
        if let Some(id) = tail.last_db_id {
            let _ = writeln!(
                sql,
                "UPDATE counters SET value = {id} WHERE name = 'last_db_id';"
            );
        }
        if let Some(seq) = tail.last_seq {
            let _ = writeln!(
                sql,
                "UPDATE counters SET value = {} WHERE name = 'last_seq';",
                to_i64(seq)
            );
        }
        if let Some(through) = tail.prune_through {
            let through = to_i64(through);
            let _ = writeln!(
                sql,
                "DELETE FROM events WHERE seq <= {through};\n\
                 UPDATE counters SET value = {through} WHERE name = 'pruned_through';"
            );
        }
        sql.push_str("COMMIT;");
        sqlx::query(&sql)
            .persistent(false)
            .execute(&mut *self)
            .await?;
        Ok(())
    }
}

/// `SELECT {columns} FROM docs WHERE db_id = ? AND id IN (?, ...)`: one
/// round trip for a chunk of documents of one database.
fn select_docs<'a>(
    columns: &str,
    db_id: i64,
    ids: impl Iterator<Item = &'a DocId>,
) -> QueryBuilder<'a, Sqlite> {
    let mut query = QueryBuilder::new(format!("SELECT {columns} FROM docs WHERE db_id = "));
    query.push_bind(db_id).push(" AND id IN (");
    let mut list = query.separated(", ");
    for id in ids {
        list.push_bind(id.as_str());
    }
    query.push(")");
    query
}

async fn load_databases(conn: &mut SqliteConnection) -> Result<HashMap<DbName, DbRow>> {
    let rows = sqlx::query("SELECT id, name, sync_key FROM databases")
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|row| {
            Ok((
                DbName::parse("stored name", row.try_get("name")?)?,
                DbRow {
                    id: row.try_get("id")?,
                    sync_key: SyncKey::parse("stored sync_key", row.try_get("sync_key")?)?,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sqlx::ConnectOptions;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
    use tokio::sync::{Semaphore, oneshot};

    use super::*;
    use crate::domain::{DocChange, DocWrite};
    use crate::store::batch::{Op, Outcome};

    async fn writer(dir: &std::path::Path) -> Writer {
        let path = dir.join("agsync.db");
        let mut conn = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .connect()
            .await
            .unwrap();
        sqlx::migrate!("./migrations/sqlite")
            .run_direct(&mut conn)
            .await
            .unwrap();
        let retention = Retention {
            keep: 1000,
            pruned_through: 0,
        };
        let wal = WalBound {
            path: path.with_extension("db-wal"),
            max_bytes: 1 << 26,
            nudge: Arc::default(),
        };
        Writer::new(conn, 0, retention, wal, Arc::new(|_| {}))
            .await
            .unwrap()
    }

    /// Commits `ops` as one batch; returns each op's outcome.
    async fn batch(w: &mut Writer, ops: Vec<Op>) -> Vec<Result<Outcome>> {
        let budget = Arc::new(Semaphore::new(1 << 20));
        let mut waiting = Vec::new();
        let mut queued = Vec::new();
        for op in ops {
            let (reply, rx) = oneshot::channel();
            let permit = budget.clone().try_acquire_owned().ok();
            queued.push((op, reply, permit));
            waiting.push(rx);
        }
        assert!(w.commit(queued).await);
        let mut outcomes = Vec::new();
        for rx in waiting {
            outcomes.push(rx.await.unwrap());
        }
        outcomes
    }

    fn put(db: &str, id: &str) -> Op {
        let body = Body::parse(
            "body",
            serde_json::Map::new(),
            crate::domain::BodyLimits {
                max_bytes: 100,
                max_depth: 4,
            },
        )
        .unwrap();
        Op::Write {
            database: DbName::parse("db", db).unwrap(),
            writes: vec![DocWrite {
                id: DocId::parse("id", id).unwrap(),
                rev: None,
                change: DocChange::Put(body),
                aliases: vec![],
            }],
        }
    }

    fn name(db: &str) -> DbName {
        DbName::parse("db", db).unwrap()
    }

    /// [Put cars/x, DeleteDatabase cars, CreateDatabase cars, Put cars/y]
    /// in one batch: the new instance holds only y, with its own counters
    /// and an id the old one never had.
    #[tokio::test]
    async fn a_database_deleted_and_created_again_in_one_batch_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path()).await;
        let create = || Op::CreateDatabase {
            name: name("cars"),
            sync_key: SyncKey::parse("k", "cars").unwrap(),
        };
        batch(&mut w, vec![create()]).await;
        let old_id = w.state.databases[&name("cars")].id;
        let outcomes = batch(
            &mut w,
            vec![
                put("cars", "x"),
                Op::DeleteDatabase { name: name("cars") },
                create(),
                put("cars", "y"),
            ],
        )
        .await;
        let mut outcomes = outcomes.into_iter();
        assert!(
            matches!(outcomes.next(), Some(Ok(Outcome::Written(r))) if r[0].as_ref().unwrap().seq == 1)
        );
        assert!(matches!(outcomes.next(), Some(Ok(Outcome::Deleted(2)))));
        assert!(matches!(outcomes.next(), Some(Ok(Outcome::Database(db))) if db.created_seq == 2));
        assert!(
            matches!(outcomes.next(), Some(Ok(Outcome::Written(r))) if r[0].as_ref().unwrap().seq == 3)
        );

        let (id, doc_count, update_seq, created_seq): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT id, doc_count, update_seq, created_seq FROM databases WHERE name = 'cars'",
        )
        .fetch_one(&mut w.conn)
        .await
        .unwrap();
        assert_ne!(id, old_id);
        assert_eq!((doc_count, update_seq, created_seq), (1, 3, 2));
        let ids: Vec<(i64, String)> = sqlx::query_as("SELECT db_id, id FROM docs")
            .fetch_all(&mut w.conn)
            .await
            .unwrap();
        assert_eq!(ids, [(id, "y".to_owned())]);
        // The deletion is logged for replay: database set, no document.
        let logged: Vec<(i64, String, String, bool)> =
            sqlx::query_as("SELECT seq, database, doc_id, deleted FROM events ORDER BY seq")
                .fetch_all(&mut w.conn)
                .await
                .unwrap();
        assert_eq!(
            logged,
            [
                (1, "cars".to_owned(), "x".to_owned(), false),
                (2, "cars".to_owned(), String::new(), true),
                (3, "cars".to_owned(), "y".to_owned(), false)
            ]
        );
    }
}
