//! The single writer: the only task that writes to SQLite. It takes every
//! request queued on its channel (up to `max_batch`) and commits them in one
//! transaction, so N concurrent writers pay for one fsync, not N (group
//! commit). Within a batch it works in memory: one query reads the current
//! revision of every document the batch touches, the requests are checked
//! and applied in order against that state, and the results are written with
//! a few multi-row statements. Each SQL round trip costs two thread switches
//! (sqlx runs SQLite on a worker thread), so a batch costs a handful of them,
//! not several per write. Replies are sent, and events published, only after
//! the commit succeeded: nothing is acknowledged or announced before it is
//! durable. A failed commit fails every request of its batch.
//!
//! Invariants: seqs are assigned here, in request order, from `last_seq`,
//! and `counters.last_seq` is written in the same transaction; events are
//! published in seq order, one batch after another.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use sqlx::sqlite::SqliteConnection;
use sqlx::{QueryBuilder, Row, Sqlite};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::{Publisher, parse_stored_rev, to_i64, to_u64};
use crate::domain::{
    Alias, Body, DatabaseInfo, DbName, DocChange, DocId, DocWrite, Document, Error, Event, Result,
    Rev, SyncKey, WriteOutcome,
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

impl Op {
    /// Roughly the bytes the op holds: what the writer queue's byte budget
    /// and the batch size bound count.
    pub(super) fn approx_bytes(&self) -> usize {
        const FIXED: usize = 256;
        match self {
            Op::Write { writes, .. } => writes
                .iter()
                .map(|w| {
                    let body = match &w.change {
                        DocChange::Put(body) => body.canonical_json().len(),
                        DocChange::Delete => 0,
                    };
                    FIXED + w.id.as_str().len() + body + aliases_len(&w.aliases)
                })
                .sum(),
            Op::Notify {
                attributes,
                aliases,
                ..
            } => {
                FIXED
                    + aliases_len(aliases)
                    + attributes
                        .iter()
                        .map(|(k, v)| k.len() + v.len())
                        .sum::<usize>()
            }
            Op::CreateDatabase { .. } | Op::DeleteDatabase { .. } => FIXED,
        }
    }
}

fn aliases_len(aliases: &[Alias]) -> usize {
    aliases.iter().map(|a| a.as_str().len() + 8).sum()
}

/// What an `Op` produced.
pub(super) enum Outcome {
    Database(DatabaseInfo),
    /// The seq of the deletion event.
    Deleted(u64),
    Written(Vec<Result<WriteOutcome>>),
    Notified(u64),
}

pub(super) enum Command {
    Run {
        op: Op,
        reply: oneshot::Sender<Result<Outcome>>,
        /// The op's share of the writer queue's byte budget (large ops only),
        /// given back once it is answered.
        permit: Option<OwnedSemaphorePermit>,
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

/// Most events deleted in one batch, so pruning never stalls writers.
const PRUNE_CHUNK: u64 = 10_000;
/// Rows per multi-row statement (SQLite allows 32766 bound values).
const ROWS_PER_STATEMENT: usize = 1000;

type Reply = oneshot::Sender<Result<Outcome>>;

pub(super) struct Writer {
    conn: SqliteConnection,
    rx: mpsc::Receiver<Command>,
    last_seq: u64,
    /// The highest database id ever given: ids are never reused.
    last_db_id: i64,
    max_batch: usize,
    retention: Retention,
    wal: WalBound,
    /// Something was committed since the WAL was last truncated.
    wal_dirty: bool,
    /// When the writer last warned that the WAL is over its bound.
    over_bound_warned: Option<std::time::Instant>,
    publish: Publisher,
    /// Every database, by name: only the writer creates and deletes them.
    databases: HashMap<DbName, DbRow>,
}

#[derive(Debug, Clone)]
struct DbRow {
    id: i64,
    sync_key: SyncKey,
}

/// A document's state as the batch sees it.
#[derive(Debug, Clone)]
struct Current {
    rev: Rev,
    deleted: bool,
    seq: u64,
    /// Set when this batch wrote the document (the body is not in SQLite yet).
    body: Option<Body>,
}

/// One document row to write.
struct DocRow {
    db_id: i64,
    id: DocId,
    rev: Rev,
    deleted: bool,
    body: Body,
    seq: u64,
}

/// What a batch has decided and not yet written.
#[derive(Default)]
struct Pending {
    /// Current state of documents, keyed by (database id, document id);
    /// `None`: known not to exist.
    docs: HashMap<(i64, DocId), Option<Current>>,
    /// Databases whose touched documents were all read into `docs`.
    prefetched: HashSet<i64>,
    rows: Vec<DocRow>,
    events: Vec<Event>,
    /// Per database: the change in live documents and the highest seq.
    counters: HashMap<i64, (i64, u64)>,
    /// Conflicts whose current document must be read after the batch:
    /// (op index, item index, database id).
    conflicts: Vec<(usize, usize, i64)>,
}

impl Writer {
    pub(super) async fn new(
        mut conn: SqliteConnection,
        rx: mpsc::Receiver<Command>,
        last_seq: u64,
        max_batch: usize,
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
            rx,
            last_seq,
            last_db_id,
            max_batch,
            retention,
            wal,
            wal_dirty: true,
            over_bound_warned: None,
            publish,
            databases,
        })
    }

    /// Commits batches until shut down. Returns an error if it gave up
    /// because the database can no longer be written.
    pub(super) async fn run(mut self) -> Result<()> {
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        let mut batch: Vec<Command> = Vec::with_capacity(self.max_batch);
        let mut failed_in_a_row = 0;
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
            } else if batch.is_empty() {
                tokio::select! {
                    n = self.rx.recv_many(&mut batch, self.max_batch) => if n == 0 { break },
                    () = tokio::time::sleep(IDLE_TRUNCATE_AFTER), if self.wal_dirty => {
                        self.truncate_wal().await;
                        continue;
                    }
                }
            }
            // Commands beyond the batch's byte bound wait for the next one.
            let rest = batch.split_off(self.batch_end(&batch));
            let mut ops = Vec::with_capacity(batch.len());
            for cmd in batch.drain(..) {
                match cmd {
                    Command::Run { op, reply, permit } => ops.push((op, reply, permit)),
                    Command::Shutdown { reply } => {
                        // Refuse new commands; queued ones are still drained.
                        self.rx.close();
                        if let Some(earlier) = shutdown.replace(reply) {
                            let _ = earlier.send(());
                        }
                    }
                }
            }
            batch = rest;
            if ops.is_empty() {
                continue;
            }
            if self.commit_batch(ops).await {
                failed_in_a_row = 0;
                let wal = self.wal.len();
                if wal > self.wal.max_bytes / 2 {
                    self.truncate_wal().await;
                } else if wal > self.wal.max_bytes / 4 {
                    self.wal.nudge.notify_one();
                }
            } else {
                failed_in_a_row += 1;
                if failed_in_a_row >= MAX_FAILED_BATCHES {
                    self.fail_queued(batch);
                    return Err(Error::Storage(
                        format!("{failed_in_a_row} batches in a row failed to commit; giving up")
                            .into(),
                    ));
                }
            }
        }
        self.checkpoint_and_close().await;
        if let Some(reply) = shutdown {
            let _ = reply.send(());
        }
        Ok(())
    }

    /// How many of `batch`'s commands go into this batch: all, unless their
    /// bytes pass the WAL-derived bound (then at least one).
    fn batch_end(&self, batch: &[Command]) -> usize {
        let limit = self.wal.batch_bytes();
        let mut bytes = 0;
        for (i, cmd) in batch.iter().enumerate() {
            if let Command::Run { op, .. } = cmd {
                bytes += op.approx_bytes();
                if bytes > limit && i > 0 {
                    return i;
                }
            }
        }
        batch.len()
    }

    /// Answers what is left when the writer gives up; the channel is closed
    /// so later writes fail at once.
    fn fail_queued(&mut self, batch: Vec<Command>) {
        self.rx.close();
        let queued = std::iter::from_fn(|| self.rx.try_recv().ok());
        for cmd in batch.into_iter().chain(queued.collect::<Vec<_>>()) {
            match cmd {
                Command::Run { reply, .. } => {
                    let _ = reply.send(Err(Error::Unavailable(
                        "the server can no longer write to its database and is stopping".into(),
                    )));
                }
                Command::Shutdown { reply } => {
                    let _ = reply.send(());
                }
            }
        }
    }

    /// Checkpoints on the writer's own connection, between batches: copies
    /// the WAL back into the database and empties the file (TRUNCATE).
    async fn truncate_wal(&mut self) {
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
            Ok((0, _, _)) => self.wal_dirty = false,
            Ok(_) => tracing::debug!(
                "WAL checkpoint could not finish (a reader or the checkpointer holds an older snapshot); retrying later"
            ),
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; retrying later"),
        }
    }

    /// Commits one batch and answers its requests; false if it failed.
    async fn commit_batch(&mut self, ops: Vec<(Op, Reply, Option<OwnedSemaphorePermit>)>) -> bool {
        let before = (self.last_seq, self.last_db_id, self.retention);
        let mut replies = Vec::with_capacity(ops.len());
        let mut permits = Vec::with_capacity(ops.len());
        let ops = ops
            .into_iter()
            .map(|(op, reply, permit)| {
                replies.push(reply);
                permits.push(permit);
                op
            })
            .collect();
        let mut events = Vec::new();
        self.wal_dirty = true;
        let started = std::time::Instant::now();
        let outcome = self.run_batch(ops, &mut events).await;
        let took = started.elapsed();
        if took > Duration::from_millis(500) {
            tracing::warn!(
                ?took,
                requests = replies.len(),
                "a batch took long to commit"
            );
        }
        match outcome {
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
                if let Err(e) = execute(&mut self.conn, "ROLLBACK").await {
                    tracing::error!(error = %e, "rollback failed");
                }
                (self.last_seq, self.last_db_id, self.retention) = before;
                // Database creates/deletes of the batch were rolled back too.
                match load_databases(&mut self.conn).await {
                    Ok(dbs) => self.databases = dbs,
                    Err(e) => tracing::error!(error = %e, "cannot reload databases"),
                }
                for reply in replies {
                    let _ = reply.send(Err(Error::Storage(
                        "the transaction failed to commit; nothing of this request was applied"
                            .into(),
                    )));
                }
                false
            }
        }
    }

    /// Runs the batch in one transaction; returns one result per op and
    /// fills `events` with what to publish after the commit.
    async fn run_batch(
        &mut self,
        ops: Vec<Op>,
        events: &mut Vec<Event>,
    ) -> Result<Vec<Result<Outcome>>> {
        let (seq_before, db_id_before) = (self.last_seq, self.last_db_id);
        execute(&mut self.conn, "BEGIN").await?;
        let mut pending = Pending::default();
        self.prefetch(&ops, &mut pending).await?;
        let mut results = Vec::with_capacity(ops.len());
        for (index, op) in ops.into_iter().enumerate() {
            let result = match op {
                Op::CreateDatabase { name, sync_key } => {
                    self.flush(&mut pending, events).await?;
                    self.create_database(name, sync_key).await
                }
                Op::DeleteDatabase { name } => {
                    self.flush(&mut pending, events).await?;
                    self.delete_database(&name, &mut pending).await
                }
                Op::Write { database, writes } => {
                    self.write_docs(index, &database, writes, &mut pending)
                        .await
                }
                Op::Notify {
                    sync_key,
                    aliases,
                    attributes,
                } => {
                    self.last_seq += 1;
                    pending.events.push(Event {
                        seq: self.last_seq,
                        sync_key,
                        database: None,
                        id: None,
                        rev: None,
                        deleted: false,
                        aliases,
                        attributes,
                    });
                    Ok(Outcome::Notified(self.last_seq))
                }
            };
            // Storage failures abort the whole batch (its transaction is
            // rolled back by the caller); everything else is the op's answer.
            match result {
                Err(e @ Error::Storage(_)) => return Err(e),
                other => results.push(other),
            }
        }
        self.fill_conflicts(&mut pending, &mut results).await?;
        self.flush(&mut pending, events).await?;
        // Counters, pruning and the commit in one round trip. Every value is
        // an integer the writer computed, so writing them into the SQL text is
        // safe.
        let mut tail = String::new();
        for (db_id, (delta, update_seq)) in std::mem::take(&mut pending.counters) {
            tail.push_str(&format!(
                "UPDATE databases SET doc_count = doc_count + {delta}, update_seq = {} WHERE id = {db_id};\n",
                to_i64(update_seq)
            ));
        }
        if self.last_db_id != db_id_before {
            tail.push_str(&format!(
                "UPDATE counters SET value = {} WHERE name = 'last_db_id';\n",
                self.last_db_id
            ));
        }
        if self.last_seq != seq_before {
            tail.push_str(&format!(
                "UPDATE counters SET value = {} WHERE name = 'last_seq';\n",
                to_i64(self.last_seq)
            ));
            if let Some(through) = self.prune_target() {
                tail.push_str(&format!(
                    "DELETE FROM events WHERE seq <= {through};\n\
                     UPDATE counters SET value = {through} WHERE name = 'pruned_through';\n"
                ));
                self.retention.pruned_through = u64::try_from(through).unwrap_or(0);
            }
        }
        tail.push_str("COMMIT;");
        sqlx::query(&tail)
            .persistent(false)
            .execute(&mut self.conn)
            .await?;
        Ok(results)
    }

    /// Reads, in one query per database, the current revision of every
    /// document the batch's writes touch.
    async fn prefetch(&mut self, ops: &[Op], pending: &mut Pending) -> Result<()> {
        let mut wanted: HashMap<i64, Vec<&DocId>> = HashMap::new();
        for op in ops {
            if let Op::Write { database, writes } = op
                && let Some(db) = self.databases.get(database)
            {
                wanted
                    .entry(db.id)
                    .or_default()
                    .extend(writes.iter().map(|w| &w.id));
            }
        }
        for (db_id, mut ids) in wanted {
            ids.sort_unstable();
            ids.dedup();
            for chunk in ids.chunks(ROWS_PER_STATEMENT) {
                let mut query = select_docs("id, rev, deleted, seq", db_id, chunk.iter().copied());
                for id in chunk {
                    pending.docs.insert((db_id, (*id).clone()), None);
                }
                let rows = query
                    .build()
                    .persistent(false)
                    .fetch_all(&mut self.conn)
                    .await?;
                for row in rows {
                    let id = DocId::parse("stored id", row.try_get("id")?)?;
                    pending.docs.insert(
                        (db_id, id),
                        Some(Current {
                            rev: parse_stored_rev(row.try_get("rev")?)?,
                            deleted: row.try_get("deleted")?,
                            seq: to_u64(row.try_get("seq")?),
                            body: None,
                        }),
                    );
                }
            }
            pending.prefetched.insert(db_id);
        }
        Ok(())
    }

    /// The state of one document: from the batch's map, else from SQLite
    /// (only for databases created within this batch, or not prefetched).
    async fn current(
        &mut self,
        pending: &mut Pending,
        db_id: i64,
        id: &DocId,
    ) -> Result<Option<Current>> {
        if let Some(state) = pending.docs.get(&(db_id, id.clone())) {
            return Ok(state.clone());
        }
        if pending.prefetched.contains(&db_id) {
            return Ok(None);
        }
        let row = sqlx::query("SELECT rev, deleted, seq FROM docs WHERE db_id = ?1 AND id = ?2")
            .bind(db_id)
            .bind(id.as_str())
            .fetch_optional(&mut self.conn)
            .await?;
        let state = match row {
            Some(row) => Some(Current {
                rev: parse_stored_rev(row.try_get("rev")?)?,
                deleted: row.try_get("deleted")?,
                seq: to_u64(row.try_get("seq")?),
                body: None,
            }),
            None => None,
        };
        pending.docs.insert((db_id, id.clone()), state.clone());
        Ok(state)
    }

    /// Applies document writes in order, each on its own.
    async fn write_docs(
        &mut self,
        op_index: usize,
        database: &DbName,
        writes: Vec<DocWrite>,
        pending: &mut Pending,
    ) -> Result<Outcome> {
        let db = self
            .databases
            .get(database)
            .cloned()
            .ok_or_else(|| Error::DatabaseNotFound(database.to_string()))?;
        let mut results = Vec::with_capacity(writes.len());
        for (item, write) in writes.into_iter().enumerate() {
            let current = self.current(pending, db.id, &write.id).await?;
            results.push(self.write_doc(op_index, item, database, &db, write, current, pending));
        }
        Ok(Outcome::Written(results))
    }

    /// One document write against the batch's state: checks the revision,
    /// assigns the seq and records the row and event to write.
    #[allow(clippy::too_many_arguments)]
    fn write_doc(
        &mut self,
        op_index: usize,
        item: usize,
        database: &DbName,
        db: &DbRow,
        write: DocWrite,
        current: Option<Current>,
        pending: &mut Pending,
    ) -> Result<WriteOutcome> {
        let names = |c: &Current| write.rev.as_ref() == Some(&c.rev);
        let (parent, delta) = match (&write.change, &current) {
            // Create: nothing there yet.
            (DocChange::Put(_), None) if write.rev.is_none() => (None, 1),
            // Update of a live document naming its current revision.
            (DocChange::Put(_), Some(c)) if !c.deleted && names(c) => (Some(c.rev.clone()), 0),
            // Recreate over a tombstone: its generation continues.
            (DocChange::Put(_), Some(c)) if c.deleted && (write.rev.is_none() || names(c)) => {
                (Some(c.rev.clone()), 1)
            }
            (DocChange::Delete, None) => return Err(not_found(database, &write.id)),
            (DocChange::Delete, Some(c)) if c.deleted => {
                return Err(not_found(database, &write.id));
            }
            (DocChange::Delete, Some(c)) if names(c) => (Some(c.rev.clone()), -1),
            (_, current) => {
                let current_doc = current.as_ref().and_then(|c| match (&c.body, c.deleted) {
                    (Some(body), false) => Some(Box::new(Document {
                        id: write.id.clone(),
                        rev: c.rev.clone(),
                        body: body.clone(),
                        seq: c.seq,
                    })),
                    _ => None,
                });
                if current
                    .as_ref()
                    .is_some_and(|c| !c.deleted && c.body.is_none())
                {
                    // The live body is in SQLite: read it after the batch.
                    pending.conflicts.push((op_index, item, db.id));
                }
                return Err(Error::Conflict {
                    database: database.to_string(),
                    id: write.id,
                    sent_rev: write.rev,
                    current_rev: current.as_ref().map(|c| c.rev.clone()),
                    current: current_doc,
                });
            }
        };
        let (deleted, body) = match write.change {
            DocChange::Put(body) => (false, body),
            DocChange::Delete => (true, Body::empty()),
        };
        let rev = Rev::next(parent.as_ref(), deleted, &body);
        self.last_seq += 1;
        let seq = self.last_seq;
        pending.docs.insert(
            (db.id, write.id.clone()),
            Some(Current {
                rev: rev.clone(),
                deleted,
                seq,
                body: (!deleted).then(|| body.clone()),
            }),
        );
        pending.events.push(Event {
            seq,
            sync_key: db.sync_key.clone(),
            database: Some(database.clone()),
            id: Some(write.id.clone()),
            rev: Some(rev.clone()),
            deleted,
            aliases: write.aliases,
            attributes: BTreeMap::new(),
        });
        pending.rows.push(DocRow {
            db_id: db.id,
            id: write.id.clone(),
            rev: rev.clone(),
            deleted,
            body,
            seq,
        });
        let counters = pending.counters.entry(db.id).or_default();
        counters.0 += delta;
        counters.1 = seq;
        Ok(WriteOutcome {
            id: write.id,
            rev,
            seq,
        })
    }

    /// Puts the current live document into conflicts whose body is in SQLite
    /// (documents this batch did not write), reading them in one query per
    /// database.
    async fn fill_conflicts(
        &mut self,
        pending: &mut Pending,
        results: &mut [Result<Outcome>],
    ) -> Result<()> {
        let conflicts = std::mem::take(&mut pending.conflicts);
        let mut wanted: HashMap<i64, Vec<DocId>> = HashMap::new();
        for (op_index, item, db_id) in &conflicts {
            if let Some(Ok(Outcome::Written(items))) = results.get(*op_index)
                && let Some(Err(Error::Conflict { id, .. })) = items.get(*item)
            {
                wanted.entry(*db_id).or_default().push(id.clone());
            }
        }
        let mut found: HashMap<(i64, DocId), Document> = HashMap::new();
        for (db_id, mut ids) in wanted {
            ids.sort_unstable();
            ids.dedup();
            for chunk in ids.chunks(ROWS_PER_STATEMENT) {
                let mut query = select_docs("id, rev, body, seq", db_id, chunk.iter());
                for row in query
                    .build()
                    .persistent(false)
                    .fetch_all(&mut self.conn)
                    .await?
                {
                    let id = DocId::parse("stored id", row.try_get("id")?)?;
                    let doc = Document {
                        id: id.clone(),
                        rev: parse_stored_rev(row.try_get("rev")?)?,
                        body: Body::from_canonical_json(row.try_get("body")?)?,
                        seq: to_u64(row.try_get("seq")?),
                    };
                    found.insert((db_id, id), doc);
                }
            }
        }
        for (op_index, item, db_id) in conflicts {
            if let Some(Ok(Outcome::Written(items))) = results.get_mut(op_index)
                && let Some(Err(Error::Conflict {
                    id,
                    current_rev: Some(rev),
                    current,
                    ..
                })) = items.get_mut(item)
                && let Some(doc) = found.get(&(db_id, id.clone()))
                && doc.rev == *rev
            {
                *current = Some(Box::new(doc.clone()));
            }
        }
        Ok(())
    }

    /// Writes the batch's pending documents, events and counters.
    async fn flush(&mut self, pending: &mut Pending, events: &mut Vec<Event>) -> Result<()> {
        // Only a document's last state in the batch needs writing.
        let mut rows = std::mem::take(&mut pending.rows);
        let mut seen = HashSet::new();
        rows.reverse();
        rows.retain(|r| seen.insert((r.db_id, r.id.clone())));
        rows.reverse();
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
            query
                .build()
                .persistent(false)
                .execute(&mut self.conn)
                .await?;
        }
        let new_events = std::mem::take(&mut pending.events);
        for chunk in new_events.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO events (seq, sync_key, database, doc_id, rev, deleted, aliases, attributes) ",
            );
            query.push_values(chunk, |mut b, event| {
                b.push_bind(to_i64(event.seq))
                    .push_bind(event.sync_key.as_str())
                    .push_bind(event.database.as_ref().map_or("", DbName::as_str))
                    .push_bind(event.id.as_ref().map_or("", DocId::as_str))
                    .push_bind(event.rev.as_ref().map(Rev::to_string).unwrap_or_default())
                    .push_bind(event.deleted)
                    .push_bind(aliases_json(&event.aliases))
                    .push_bind(attributes_json(&event.attributes));
            });
            query
                .build()
                .persistent(false)
                .execute(&mut self.conn)
                .await?;
        }
        events.extend(new_events);
        Ok(())
    }

    /// Creates a database instance with a new id (never reused). Its
    /// `created_seq` is the head seq at creation: a previous instance of the
    /// name ended with a deletion event, so every seq a client can hold from
    /// it is smaller.
    async fn create_database(&mut self, name: DbName, sync_key: SyncKey) -> Result<Outcome> {
        if self.databases.contains_key(&name) {
            return Err(Error::DatabaseExists(name.to_string()));
        }
        self.last_db_id += 1;
        let (id, created_seq) = (self.last_db_id, self.last_seq);
        sqlx::query(
            "INSERT INTO databases (id, name, sync_key, created_seq) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(id)
        .bind(name.as_str())
        .bind(sync_key.as_str())
        .bind(to_i64(created_seq))
        .execute(&mut self.conn)
        .await?;
        self.databases.insert(
            name.clone(),
            DbRow {
                id,
                sync_key: sync_key.clone(),
            },
        );
        Ok(Outcome::Database(DatabaseInfo {
            name,
            sync_key,
            doc_count: 0,
            update_seq: 0,
            created_seq,
        }))
    }

    /// Deletes a database and its documents, and logs the deletion as an
    /// event of its sync key, so subscribers learn of it (live or replayed).
    /// The batch forgets everything it knew of the database, counters
    /// included: a database created again in the same batch starts empty.
    async fn delete_database(&mut self, name: &DbName, pending: &mut Pending) -> Result<Outcome> {
        let db = self
            .databases
            .get(name)
            .cloned()
            .ok_or_else(|| Error::DatabaseNotFound(name.to_string()))?;
        sqlx::query("DELETE FROM docs WHERE db_id = ?1")
            .bind(db.id)
            .execute(&mut self.conn)
            .await?;
        sqlx::query("DELETE FROM databases WHERE id = ?1")
            .bind(db.id)
            .execute(&mut self.conn)
            .await?;
        self.databases.remove(name);
        pending.docs.retain(|(db_id, _), _| *db_id != db.id);
        pending.prefetched.remove(&db.id);
        pending.counters.remove(&db.id);
        self.last_seq += 1;
        pending.events.push(Event {
            seq: self.last_seq,
            sync_key: db.sync_key,
            database: Some(name.clone()),
            id: None,
            rev: None,
            deleted: true,
            aliases: Vec::new(),
            attributes: BTreeMap::new(),
        });
        Ok(Outcome::Deleted(self.last_seq))
    }

    /// Up to which seq to delete events beyond the retention now, at most
    /// `PRUNE_CHUNK` per batch so pruning never stalls writers.
    fn prune_target(&self) -> Option<i64> {
        let target = self.last_seq.checked_sub(self.retention.keep)?;
        if target <= self.retention.pruned_through {
            return None;
        }
        Some(to_i64(
            target.min(self.retention.pruned_through + PRUNE_CHUNK),
        ))
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

/// Runs a statement that returns nothing (transaction control).
async fn execute(conn: &mut SqliteConnection, sql: &'static str) -> Result<()> {
    sqlx::query(sql).execute(&mut *conn).await?;
    Ok(())
}

fn aliases_json(aliases: &[Alias]) -> String {
    serde_json::Value::from(aliases.iter().map(Alias::as_str).collect::<Vec<_>>()).to_string()
}

fn attributes_json(attributes: &BTreeMap<String, String>) -> String {
    let map: serde_json::Map<String, serde_json::Value> = attributes
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
        .collect();
    serde_json::Value::Object(map).to_string()
}

fn not_found(database: &DbName, id: &DocId) -> Error {
    Error::DocumentNotFound {
        database: database.to_string(),
        id: id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sqlx::ConnectOptions;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
    use tokio::sync::Semaphore;

    use super::*;

    async fn writer(dir: &std::path::Path) -> Writer {
        let path = dir.join("agsync.db");
        let mut conn = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .connect()
            .await
            .unwrap();
        sqlx::migrate!("./migrations")
            .run_direct(&mut conn)
            .await
            .unwrap();
        let (_tx, rx) = mpsc::channel(1);
        let retention = Retention {
            keep: 1000,
            pruned_through: 0,
        };
        let wal = WalBound {
            path: path.with_extension("db-wal"),
            max_bytes: 1 << 26,
            nudge: Arc::default(),
        };
        Writer::new(conn, rx, 0, 100, retention, wal, Arc::new(|_| {}))
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
        assert!(w.commit_batch(queued).await);
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
        let old_id = w.databases[&name("cars")].id;
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
