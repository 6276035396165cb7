//! The SQLite writer: the only thread that writes to the file. It owns the
//! one write connection and runs the shared batching loop (`batch::serve`)
//! on a thread of its own, so concurrent writers share one transaction and
//! one fsync. The connection is SQLite's own API (rusqlite), called on that
//! same thread with cached prepared statements: a batch runs start to
//! commit without a thread switch (sqlx would run each statement on a
//! worker thread of its own and wake the writer after each, which measured
//! as most of a batch's time). Replies are sent, and events published, only
//! after the commit succeeded, by `deliver`, a task on the request runtime:
//! waking thousands of subscribers and the batch's callers from a worker of
//! that runtime is several times cheaper than from a foreign thread
//! (measured: a Put's publish to 5,000 subscribers took 11 ms on the writer
//! thread). It also keeps the WAL under its bound (`WalBound`).
//!
//! Invariants: only this thread writes, so revision checks and seq
//! assignment need no locks (they run in commit order); `State` mirrors
//! what is committed, and is restored when a batch fails.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::super::batch::{
    self, Answer, Committed, Current, DbRow, Engine, Queued, RequestExpiry, RequestRow, Retention,
    State, StoredRequest, Tail, Tx, aliases_json, attributes_json,
};
use super::super::durable::{Gate, Mark};
use super::super::{Publisher, rows, to_i64};
use crate::domain::{DatabaseInfo, DbName, DocId, Document, Error, Event, RequestId, Result, Rev};

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
    /// Wakes the PASSIVE checkpointer (see `sqlite::checkpointer`).
    pub nudge: std::sync::Arc<tokio::sync::Notify>,
    /// Snapshot streams open on the file, each holding a read transaction
    /// for as long as it streams (`log::LogReaders::snapshot`).
    pub long_reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
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

/// How long one try of the writer's TRUNCATE checkpoint waits for readers
/// on older snapshots; it tries again until the busy timeout, unless a
/// Snapshot stream is open.
const TRUNCATE_BUSY_TIMEOUT: Duration = Duration::from_millis(50);
/// After a TRUNCATE checkpoint that could not finish while a Snapshot
/// stream was open, the next one after a batch waits this long, doubled
/// after each failure up to `TRUNCATE_BACKOFF_MAX`: the stream then costs a
/// few writes `TRUNCATE_BUSY_TIMEOUT` each, not every write. (The WAL grows
/// past `--wal-max-bytes` meanwhile: nothing can restart it under an open
/// snapshot.)
const TRUNCATE_BACKOFF: Duration = Duration::from_millis(100);
const TRUNCATE_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// After this many batches failed in a row, the writer gives up: the
/// database cannot be written (disk full, I/O errors), and the process
/// should stop so that an orchestrator restarts or replaces it.
const MAX_FAILED_BATCHES: u32 = 3;

pub(super) struct Writer {
    conn: Connection,
    state: State,
    wal: WalBound,
    /// When the writer last warned that the WAL is over its bound.
    over_bound_warned: Option<std::time::Instant>,
    /// When the last TRUNCATE checkpoint failed, and how long the writer
    /// waits after it before the next one after a batch.
    truncate_after: Option<(std::time::Instant, Duration)>,
    deliveries: mpsc::Sender<Delivery>,
    expiry: RequestExpiry,
    /// Whether the last batch committed (health's `agsync.writes`).
    writable: tokio::sync::watch::Sender<bool>,
    /// With `--durability full`: the durable watermark, and `deliveries`
    /// goes to the syncer, which fsyncs before passing batches on.
    gate: Option<std::sync::Arc<Gate>>,
}

/// Where committed batches go: to `deliver`, or with full durability to
/// the syncer, which fsyncs them first and moves `gate`.
pub(super) struct Outlet {
    pub deliveries: mpsc::Sender<Delivery>,
    pub gate: Option<std::sync::Arc<Gate>>,
}

/// What a batch hands to `deliver`: its events to publish, then the answers.
pub(super) struct Delivery {
    events: Vec<Event>,
    answers: Vec<Answer>,
    /// Given back once the requests are answered.
    permits: Vec<Option<OwnedSemaphorePermit>>,
    /// Answered once everything before it was delivered (at close).
    flushed: Option<oneshot::Sender<()>>,
    /// For a committed batch when there is a syncer: what it must make
    /// durable before the batch goes on.
    mark: Option<Mark>,
}

impl Delivery {
    pub(super) fn mark(&self) -> Option<Mark> {
        self.mark
    }
}

/// Hands a batch's answers to `deliver`. If it is gone (the server is
/// failing), the answers are dropped: the callers see the writer gone.
/// (Not a method: the future must not borrow the connection, which is not
/// `Sync`.)
async fn hand_over(deliveries: &mpsc::Sender<Delivery>, delivery: Delivery) {
    if deliveries.send(delivery).await.is_err() {
        tracing::error!("the delivery task is gone; a batch's answers are lost");
    }
}

/// Batches a delivery may be behind the writer; the writer waits beyond.
pub(super) const DELIVERY_QUEUE: usize = 16;

/// Publishes each committed batch's events, in commit order, then answers
/// its requests. Ends when the writer is gone.
pub(super) async fn deliver(mut rx: mpsc::Receiver<Delivery>, publish: Publisher) -> Result<()> {
    while let Some(delivery) = rx.recv().await {
        if !delivery.events.is_empty() {
            publish.publish(&delivery.events);
        }
        for answer in delivery.answers {
            answer.send();
        }
        drop(delivery.permits);
        if let Some(flushed) = delivery.flushed {
            let _ = flushed.send(());
        }
    }
    Ok(())
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        last_seq: u64,
        retention: Retention,
        wal: WalBound,
        outlet: Outlet,
        expiry: RequestExpiry,
        writable: tokio::sync::watch::Sender<bool>,
    ) -> Result<Self> {
        let Outlet { deliveries, gate } = outlet;
        let databases = load_databases(&conn)?;
        let last_db_id = conn
            .query_row(
                "SELECT name, value FROM counters WHERE name = 'last_db_id'",
                [],
                |row| Ok(rows::counter(row)),
            )??
            .1;
        Ok(Writer {
            conn,
            state: State {
                last_seq,
                last_db_id,
                retention,
                databases,
                now_secs: 0,
                expire_requests_before: None,
            },
            expiry,
            writable,
            gate,
            wal,
            over_bound_warned: None,
            truncate_after: None,
            deliveries,
        })
    }

    /// Checkpoints on the writer's own connection, between batches: copies
    /// the WAL back into the database and empties the file (TRUNCATE).
    /// Returns whether the WAL was reset.
    fn truncate_wal(&mut self) -> bool {
        let started = std::time::Instant::now();
        // A TRUNCATE checkpoint waits (busy handler) for every reader on an
        // older snapshot. Readers are short, except a Snapshot stream, which
        // holds its snapshot for as long as it streams: so the checkpoint
        // waits in slices of TRUNCATE_BUSY_TIMEOUT, up to the busy timeout
        // in all, and gives up (backing off, `truncate_after`) as soon as a
        // Snapshot stream is open, also one that began during the wait.
        let _ = self.conn.busy_timeout(TRUNCATE_BUSY_TIMEOUT);
        let (result, long_read) = loop {
            let result = self
                .conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                    row.get::<_, i64>(0)
                });
            let long_read = self.wal.long_reads.load(Ordering::Acquire) > 0;
            match result {
                Ok(busy)
                    if busy != 0
                        && !long_read
                        && started.elapsed() < super::settings::BUSY_TIMEOUT => {}
                result => break (result, long_read),
            }
        };
        let _ = self.conn.busy_timeout(super::settings::BUSY_TIMEOUT);
        let took = started.elapsed();
        if took > Duration::from_millis(200) {
            tracing::warn!(?took, "restarting the WAL paused the writer");
        }
        if !matches!(result, Ok(0)) && self.wal.len() > self.wal.max_bytes {
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
        self.truncate_after = match (&result, self.truncate_after) {
            (Ok(0), _) => None,
            _ if !long_read => None,
            (_, None) => Some((std::time::Instant::now(), TRUNCATE_BACKOFF)),
            (_, Some((_, backoff))) => Some((
                std::time::Instant::now(),
                (backoff * 2).min(TRUNCATE_BACKOFF_MAX),
            )),
        };
        match result {
            // busy = 0: the whole WAL was copied back and reset.
            Ok(0) => true,
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
    fn restore(&mut self, last_seq: u64, last_db_id: i64, retention: Retention) {
        // Not an error when the failed statement already ended the
        // transaction (SQLite rolls back on some errors, like a full disk).
        if !self.conn.is_autocommit()
            && let Err(e) = self.conn.execute_batch("ROLLBACK")
        {
            tracing::error!(error = %e, "rollback failed");
        }
        self.state.last_seq = last_seq;
        self.state.last_db_id = last_db_id;
        self.state.retention = retention;
        match load_databases(&self.conn) {
            Ok(dbs) => self.state.databases = dbs,
            Err(e) => tracing::error!(error = %e, "cannot reload databases"),
        }
    }
}

impl Engine for Writer {
    async fn commit(&mut self, queued: Vec<Queued>) -> Committed {
        let (ops, permits) = batch::unzip(queued);
        let before = (
            self.state.last_seq,
            self.state.last_db_id,
            self.state.retention,
        );
        let mut events = Vec::new();
        let mut answers = Vec::with_capacity(ops.len());
        self.expiry.stamp(&mut self.state);
        // Numbered before anything of it can be visible to a reader: a read
        // that saw it then waits for its fsync. A batch that fails is
        // marked all the same (the syncer passes it, nothing to wait for).
        let batch_no = self.gate.as_ref().map(|gate| gate.announce());
        let started = std::time::Instant::now();
        // The statements run on this thread and return at once: `apply`
        // never waits, it is async only because the trait is shared with
        // PostgreSQL.
        let outcome = match self
            .conn
            .prepare_cached("BEGIN")
            .and_then(|mut s| s.execute([]))
        {
            Ok(_) => {
                batch::apply(
                    &mut self.conn,
                    &mut self.state,
                    ops,
                    &mut events,
                    &mut answers,
                )
                .await
            }
            Err(e) => {
                answers.extend(
                    ops.into_iter()
                        .map(|op| op.failed(Error::Storage("the batch failed".into()))),
                );
                Err(e.into())
            }
        };
        let took = started.elapsed();
        if took > Duration::from_millis(500) {
            tracing::warn!(
                ?took,
                requests = answers.len(),
                "a batch took long to commit"
            );
        }
        let committed = match outcome {
            Ok(()) => Committed::Yes,
            Err(e) => {
                let committed = Committed::failed_with(&e);
                if committed == Committed::NoForNow {
                    tracing::warn!(error = %e, "batch failed; it is rolled back, and the writer will try again");
                } else {
                    tracing::error!(error = %e, "batch failed; it is rolled back");
                }
                self.restore(before.0, before.1, before.2);
                events.clear();
                answers = batch::failing_all(answers, || match &e {
                    Error::StorageFull(m) => Error::StorageFull(m.clone()),
                    Error::Busy(m) => Error::Busy(m.clone()),
                    Error::Unavailable(m) => Error::Unavailable(m.clone()),
                    _ => Error::Storage(
                        "the transaction failed to commit; nothing of this request was applied"
                            .into(),
                    ),
                });
                committed
            }
        };
        batch::set_writable(&self.writable, committed == Committed::Yes);
        let mark = batch_no.map(|batch| Mark {
            batch,
            seq: self.state.last_seq,
        });
        hand_over(
            &self.deliveries,
            Delivery {
                events,
                answers,
                permits,
                flushed: None,
                mark,
            },
        )
        .await;
        if committed == Committed::Yes {
            let wal = self.wal.len();
            // While a Snapshot stream is open, a failed try backs off (see
            // `truncate_after`): the stream holds its snapshot until it ends.
            if wal > self.wal.max_bytes / 2
                && (self.wal.long_reads.load(Ordering::Acquire) == 0
                    || self
                        .truncate_after
                        .is_none_or(|(failed, backoff)| failed.elapsed() >= backoff))
            {
                self.truncate_wal();
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
        self.truncate_wal()
    }

    fn max_failed_batches(&self) -> Option<u32> {
        Some(MAX_FAILED_BATCHES)
    }

    async fn close(self) {
        // Every answer is out before the writer reports itself closed.
        let (flushed, done) = oneshot::channel();
        hand_over(
            &self.deliveries,
            Delivery {
                events: Vec::new(),
                answers: Vec::new(),
                permits: Vec::new(),
                flushed: Some(flushed),
                mark: None,
            },
        )
        .await;
        let _ = done.await;
        let conn = self.conn;
        if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
            tracing::warn!(error = %e, "WAL checkpoint at shutdown failed");
        }
        if let Err((_, e)) = conn.close() {
            tracing::warn!(error = %e, "closing the write connection failed");
        }
    }
}

/// Runs `sql` (`?1` the database id, `?2` a document id) once per id, in
/// order, with one cached statement, and maps the row of each id found.
fn each_found<T>(
    conn: &Connection,
    sql: &str,
    db_id: i64,
    ids: &[&DocId],
    map: impl Fn(&DocId, &rows::Mapped<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(ids.len());
    let mut stmt = conn.prepare_cached(sql)?;
    let columns = rows::ColumnMap::of(&stmt);
    for id in ids {
        let mut found = stmt.query((db_id, id.as_str()))?;
        if let Some(row) = found.next()? {
            out.push(map(id, &columns.on(row))?);
        }
    }
    Ok(out)
}

impl Tx for Connection {
    async fn doc_states(&mut self, db_id: i64, ids: &[&DocId]) -> Result<Vec<(DocId, Current)>> {
        each_found(
            self,
            "SELECT rev, deleted, seq FROM docs WHERE db_id = ?1 AND id = ?2",
            db_id,
            ids,
            |id, row| rows::doc_state(id.clone(), row),
        )
    }

    async fn documents(&mut self, db_id: i64, ids: &[&DocId]) -> Result<Vec<Document>> {
        each_found(
            self,
            "SELECT rev, body, seq FROM docs WHERE db_id = ?1 AND id = ?2",
            db_id,
            ids,
            |id, row| rows::document(id.clone(), row),
        )
    }

    async fn put_docs(&mut self, rows: &[batch::DocRow]) -> Result<()> {
        let mut stmt = self.prepare_cached(
            "INSERT INTO docs (db_id, id, rev, deleted, body, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
             ON CONFLICT (db_id, id) DO UPDATE SET rev = excluded.rev, \
             deleted = excluded.deleted, body = excluded.body, seq = excluded.seq",
        )?;
        for row in rows {
            stmt.execute((
                row.db_id,
                row.id.as_str(),
                row.rev.as_str(),
                row.deleted,
                row.body.canonical_json(),
                to_i64(row.seq),
            ))?;
        }
        Ok(())
    }

    async fn put_events(&mut self, events: &[Event]) -> Result<()> {
        let mut stmt = self.prepare_cached(
            "INSERT INTO events (seq, sync_key, database, doc_id, rev, deleted, aliases, attributes) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for event in events {
            stmt.execute((
                to_i64(event.seq),
                event.sync_key.as_str(),
                event.database.as_ref().map_or("", DbName::as_str),
                event.id.as_ref().map_or("", DocId::as_str),
                event.rev.as_ref().map_or("", Rev::as_str),
                event.deleted,
                aliases_json(&event.aliases).as_ref(),
                attributes_json(&event.attributes).as_ref(),
            ))?;
        }
        Ok(())
    }

    async fn insert_database(&mut self, id: i64, info: &DatabaseInfo) -> Result<()> {
        self.prepare_cached(
            "INSERT INTO databases (id, name, sync_key, created_seq) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute((
            id,
            info.name.as_str(),
            info.sync_key.as_str(),
            to_i64(info.created_seq),
        ))?;
        Ok(())
    }

    async fn delete_database(&mut self, id: i64) -> Result<()> {
        self.prepare_cached("DELETE FROM docs WHERE db_id = ?1")?
            .execute([id])?;
        self.prepare_cached("DELETE FROM requests WHERE db_id = ?1")?
            .execute([id])?;
        self.prepare_cached("DELETE FROM databases WHERE id = ?1")?
            .execute([id])?;
        Ok(())
    }

    async fn request(
        &mut self,
        db_id: i64,
        principal: &str,
        request_id: &RequestId,
    ) -> Result<Option<StoredRequest>> {
        let mut stmt = self.prepare_cached(
            "SELECT fingerprint, reply FROM requests \
             WHERE db_id = ?1 AND principal = ?2 AND request_id = ?3",
        )?;
        let mut rows = stmt.query((db_id, principal, request_id.as_str()))?;
        rows.next()?.map(rows::request).transpose()
    }

    async fn put_requests(&mut self, requests: &[RequestRow]) -> Result<()> {
        let mut stmt = self.prepare_cached(
            "INSERT INTO requests (db_id, principal, request_id, fingerprint, reply, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for r in requests {
            stmt.execute((
                r.db_id,
                &r.principal,
                r.request_id.as_str(),
                &r.fingerprint[..],
                &r.reply,
                r.created_at,
            ))?;
        }
        Ok(())
    }

    /// Counters, pruning and the commit.
    async fn finish(&mut self, tail: Tail) -> Result<()> {
        if !tail.databases.is_empty() {
            let mut stmt = self.prepare_cached(
                "UPDATE databases SET doc_count = doc_count + ?1, update_seq = ?2 WHERE id = ?3",
            )?;
            for c in tail.databases {
                stmt.execute((c.delta, to_i64(c.update_seq), c.db_id))?;
            }
        }
        let mut counter = self.prepare_cached("UPDATE counters SET value = ?2 WHERE name = ?1")?;
        if let Some(id) = tail.last_db_id {
            counter.execute(("last_db_id", id))?;
        }
        if let Some(seq) = tail.last_seq {
            counter.execute(("last_seq", to_i64(seq)))?;
        }
        if let Some(through) = tail.prune_through {
            let through = to_i64(through);
            self.prepare_cached("DELETE FROM events WHERE seq <= ?1")?
                .execute([through])?;
            counter.execute(("pruned_through", through))?;
        }
        if let Some(before) = tail.expire_requests_before {
            self.prepare_cached(
                "DELETE FROM requests WHERE (db_id, principal, request_id) IN \
                 (SELECT db_id, principal, request_id FROM requests WHERE created_at < ?1 LIMIT ?2)",
            )?
            .execute((before, to_i64(batch::PRUNE_CHUNK)))?;
        }
        self.prepare_cached("COMMIT")?.execute([])?;
        Ok(())
    }
}

fn load_databases(conn: &Connection) -> Result<HashMap<DbName, DbRow>> {
    let mut stmt = conn.prepare("SELECT id, name, sync_key FROM databases")?;
    let mut rows = stmt.query([])?;
    let mut out = HashMap::new();
    while let Some(row) = rows.next()? {
        let (name, db) = rows::db_row(row)?;
        out.insert(name, db);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sqlx::ConnectOptions;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
    use tokio::sync::Semaphore;

    use super::*;
    use crate::domain::{Body, DocChange, DocWrite, SyncKey};
    use crate::store::Durability;
    use crate::store::batch::Op;

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
        sqlx::Connection::close(conn).await.unwrap();
        let retention = Retention {
            keep: 1000,
            pruned_through: 0,
        };
        let wal = WalBound {
            path: path.with_extension("db-wal"),
            max_bytes: 1 << 26,
            nudge: Arc::default(),
            long_reads: Arc::default(),
        };
        let conn = super::super::settings::rusqlite_connection(
            &path,
            super::super::settings::Role::Writer,
            Durability::Full,
        )
        .unwrap();
        let (deliveries, rx) = mpsc::channel(DELIVERY_QUEUE);
        let hub = crate::hub::Hub::new(
            0,
            crate::hub::SubscriberLimits {
                total: 1,
                per_principal: 1,
            },
        );
        tokio::spawn(deliver(rx, hub));
        let expiry = RequestExpiry::new(Duration::from_secs(86_400));
        let (writable, _) = tokio::sync::watch::channel(true);
        let outlet = Outlet {
            deliveries,
            gate: None,
        };
        Writer::new(conn, 0, retention, wal, outlet, expiry, writable).unwrap()
    }

    /// Commits `ops` as one batch.
    async fn batch(w: &mut Writer, ops: Vec<Op>) {
        let budget = Arc::new(Semaphore::new(1 << 20));
        let queued = ops
            .into_iter()
            .map(|op| Queued {
                op,
                permit: budget.clone().try_acquire_owned().ok(),
            })
            .collect();
        assert_eq!(w.commit(queued).await, Committed::Yes);
    }

    type Written = oneshot::Receiver<Result<crate::store::Written>>;

    fn put(db: &str, id: &str) -> (Op, Written) {
        let body = Body::parse(
            "body",
            serde_json::Map::new(),
            crate::domain::BodyLimits {
                max_bytes: 100,
                max_depth: 4,
            },
        )
        .unwrap();
        let (reply, rx) = oneshot::channel();
        let op = Op::Write {
            database: DbName::parse("db", db).unwrap(),
            writes: vec![DocWrite {
                id: DocId::parse("id", id).unwrap(),
                rev: None,
                change: DocChange::Put(body),
                aliases: vec![],
            }],
            request: None,
            reply,
        };
        (op, rx)
    }

    /// The seq of the one write `rx` answers.
    async fn seq(rx: Written) -> u64 {
        match rx.await.unwrap().unwrap() {
            crate::store::Written::Applied(mut results) => results.pop().unwrap().unwrap().seq,
            crate::store::Written::Replayed(_) => panic!("replayed"),
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
        let create = || {
            let (reply, rx) = oneshot::channel();
            let op = Op::CreateDatabase {
                name: name("cars"),
                sync_key: SyncKey::parse("k", "cars").unwrap(),
                reply,
            };
            (op, rx)
        };
        batch(&mut w, vec![create().0]).await;
        let old_id = w.state.databases[&name("cars")].id;
        let (put_x, x) = put("cars", "x");
        let (deleted_tx, deleted) = oneshot::channel();
        let (create_again, created) = create();
        let (put_y, y) = put("cars", "y");
        batch(
            &mut w,
            vec![
                put_x,
                Op::DeleteDatabase {
                    name: name("cars"),
                    reply: deleted_tx,
                },
                create_again,
                put_y,
            ],
        )
        .await;
        assert_eq!(seq(x).await, 1);
        assert_eq!(deleted.await.unwrap().unwrap(), 2);
        assert_eq!(created.await.unwrap().unwrap().created_seq, 2);
        assert_eq!(seq(y).await, 3);

        let (id, doc_count, update_seq, created_seq): (i64, i64, i64, i64) = w
            .conn
            .query_row(
                "SELECT id, doc_count, update_seq, created_seq FROM databases WHERE name = 'cars'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_ne!(id, old_id);
        assert_eq!((doc_count, update_seq, created_seq), (1, 3, 2));
        let ids: Vec<(i64, String)> = w
            .conn
            .prepare("SELECT db_id, id FROM docs")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(ids, [(id, "y".to_owned())]);
        // The deletion is logged for replay: database set, no document.
        let logged: Vec<(i64, String, String, bool)> = w
            .conn
            .prepare("SELECT seq, database, doc_id, deleted FROM events ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
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
