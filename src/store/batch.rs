//! Group commit, the part both backends share. A backend's writer takes
//! every request queued on its channel (up to `max_batch`, and a byte bound)
//! and commits them in one transaction, so N concurrent writers pay for one
//! commit, not N. Within a batch the work is in memory: the current revision
//! of every document the batch touches is read up front (`Tx::doc_states`,
//! once per database: one query on PostgreSQL, one cached statement per id
//! on SQLite), the requests are checked and applied in order against that
//! state (a later request sees an earlier one's write), and the results are
//! written at the end, or before a database is created or deleted
//! (`Tx::put_docs`, `put_events`, `finish`: multi-row statements on
//! PostgreSQL, cached per-row statements on SQLite). A backend supplies
//! those statements (`Tx`) and what happens around a commit (`Engine`); the
//! revision rules (`check`), seq assignment and counters live here once.
//!
//! Invariants: seqs are assigned in request order from `State::last_seq`,
//! and the `last_seq` counter is written in the same transaction; nothing is
//! answered before the commit returned; a storage failure fails the whole
//! batch.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::Written;
use crate::domain::{
    Alias, Body, DatabaseInfo, DbName, DocChange, DocId, DocWrite, Document, Error, Event,
    Idempotency, ItemReply, RequestId, Result, Rev, SyncKey, WriteOutcome,
};

/// Where a request's result goes: each request has its own, typed.
pub(super) type Reply<T> = oneshot::Sender<Result<T>>;

/// What the writer is asked to do; each request carries the reply of its
/// own type, so a result can only ever reach the caller that expects it.
pub(super) enum Op {
    CreateDatabase {
        name: DbName,
        sync_key: SyncKey,
        reply: Reply<DatabaseInfo>,
    },
    /// Answered with the seq of the deletion event.
    DeleteDatabase { name: DbName, reply: Reply<u64> },
    /// Answered with one result per write, in order, or, for a request_id
    /// that already succeeded, with the reply recorded then.
    Write {
        database: DbName,
        writes: Vec<DocWrite>,
        request: Option<Idempotency>,
        reply: Reply<Written>,
    },
    /// Answered with the event's seq.
    Notify {
        sync_key: SyncKey,
        aliases: Vec<Alias>,
        attributes: BTreeMap<String, String>,
        reply: Reply<u64>,
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

    /// The database the op names, if any.
    pub(super) fn database(&self) -> Option<&DbName> {
        match self {
            Op::CreateDatabase { name, .. } | Op::DeleteDatabase { name, .. } => Some(name),
            Op::Write { database, .. } => Some(database),
            Op::Notify { .. } => None,
        }
    }
}

fn aliases_len(aliases: &[Alias]) -> usize {
    aliases.iter().map(|a| a.as_str().len() + 8).sum()
}

impl Op {
    /// This op's answer when the batch failed before (or while) running it.
    pub(super) fn failed(self, error: Error) -> Answer {
        match self {
            Op::CreateDatabase { reply, .. } => Answer::Database(reply, Err(error)),
            Op::DeleteDatabase { reply, .. } => Answer::Deleted(reply, Err(error)),
            Op::Write { reply, .. } => Answer::Written(reply, Err(error)),
            Op::Notify { reply, .. } => Answer::Notified(reply, Err(error)),
        }
    }
}

/// A request's reply with its result, sent once the batch is committed and
/// its events published (on SQLite by `deliver`; on PostgreSQL once the
/// node's tailer has, at most 2 s later). Each variant pairs a reply with a
/// result of the same type: the compiler, not a run-time check, matches
/// them.
pub(super) enum Answer {
    Database(Reply<DatabaseInfo>, Result<DatabaseInfo>),
    Deleted(Reply<u64>, Result<u64>),
    Written(Reply<Written>, Result<Written>),
    Notified(Reply<u64>, Result<u64>),
}

impl Answer {
    /// Sends the result. A caller that went away (cancelled RPC) no longer
    /// needs it; the batch is committed either way.
    pub(super) fn send(self) {
        match self {
            Answer::Database(reply, result) => drop(reply.send(result)),
            Answer::Deleted(reply, result) => drop(reply.send(result)),
            Answer::Written(reply, result) => drop(reply.send(result)),
            Answer::Notified(reply, result) => drop(reply.send(result)),
        }
    }

    /// The same reply with `error` as its result: the batch did not commit.
    pub(super) fn failing(self, error: Error) -> Answer {
        match self {
            Answer::Database(reply, _) => Answer::Database(reply, Err(error)),
            Answer::Deleted(reply, _) => Answer::Deleted(reply, Err(error)),
            Answer::Written(reply, _) => Answer::Written(reply, Err(error)),
            Answer::Notified(reply, _) => Answer::Notified(reply, Err(error)),
        }
    }

    /// Takes out the request's error if it is one that loses the whole
    /// batch (storage), leaving a placeholder: the batch fails every answer.
    fn take_batch_error(&mut self) -> Option<Error> {
        fn take<T>(result: &mut Result<T>) -> Option<Error> {
            match result {
                Err(e) if aborts_batch(e) => {
                    std::mem::replace(result, Err(Error::Storage("the batch failed".into()))).err()
                }
                _ => None,
            }
        }
        match self {
            Answer::Database(_, result) => take(result),
            Answer::Deleted(_, result) => take(result),
            Answer::Written(_, result) => take(result),
            Answer::Notified(_, result) => take(result),
        }
    }
}

pub(super) enum Command {
    Run {
        op: Op,
        /// The op's share of the writer queue's byte budget (large ops only),
        /// given back once it is answered.
        permit: Option<OwnedSemaphorePermit>,
    },
    /// Commit what is queued, close, then answer.
    Shutdown { reply: oneshot::Sender<()> },
}

/// A queued op with its budget share.
pub(super) struct Queued {
    pub op: Op,
    pub permit: Option<OwnedSemaphorePermit>,
}

/// Retention of the event log.
#[derive(Debug, Clone, Copy)]
pub(super) struct Retention {
    /// Keep the newest this many events.
    pub keep: u64,
    /// Events deleted so far: every seq up to this one.
    pub pruned_through: u64,
}

#[derive(Debug, Clone)]
pub(super) struct DbRow {
    pub id: i64,
    pub sync_key: SyncKey,
}

/// What a batch starts from: the counters and the databases it may touch.
pub(super) struct State {
    pub last_seq: u64,
    /// The highest database id ever given: ids are never reused.
    pub last_db_id: i64,
    pub retention: Retention,
    /// Databases by name (SQLite: all of them; PostgreSQL: those the batch
    /// names, read under the batch's lock).
    pub databases: HashMap<DbName, DbRow>,
    /// The batch's time (unix seconds), recorded with each request_id.
    pub now_secs: i64,
    /// Delete request_ids recorded before this time (unix seconds) in this
    /// batch; the writer sets it now and then, not on every batch.
    pub expire_requests_before: Option<i64>,
}

/// When the writer expires recorded request_ids: at most once a minute,
/// those older than the retention (`--request-id-retention-secs`).
pub(super) struct RequestExpiry {
    keep: Duration,
    next: std::time::Instant,
}

impl RequestExpiry {
    const EVERY: Duration = Duration::from_secs(60);

    pub(super) fn new(keep: Duration) -> Self {
        RequestExpiry {
            keep,
            next: std::time::Instant::now(),
        }
    }

    /// Sets the batch's time, and when due what to expire with it.
    pub(super) fn stamp(&mut self, state: &mut State) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        state.now_secs = now;
        if std::time::Instant::now() >= self.next {
            self.next = std::time::Instant::now() + Self::EVERY;
            let keep = i64::try_from(self.keep.as_secs()).unwrap_or(i64::MAX);
            state.expire_requests_before = Some(now.saturating_sub(keep));
        }
    }
}

/// A recorded request_id, as the batch reads it back.
pub(super) struct StoredRequest {
    pub fingerprint: Vec<u8>,
    /// The recorded reply: `ItemReply`s as JSON.
    pub reply: String,
}

/// A request_id to record, with its reply.
pub(super) struct RequestRow {
    pub db_id: i64,
    pub principal: String,
    pub request_id: RequestId,
    pub fingerprint: [u8; 32],
    /// `ItemReply`s as JSON.
    pub reply: String,
    pub created_at: i64,
}

/// A document's state as the batch sees it.
#[derive(Debug, Clone)]
pub(super) struct Current {
    pub rev: Rev,
    pub deleted: bool,
    pub seq: u64,
    /// The live body when the batch knows it: it wrote the document (the
    /// body is not stored yet), or read it for a conflict.
    pub body: Option<Body>,
}

/// One document row to write.
pub(super) struct DocRow {
    pub db_id: i64,
    pub id: DocId,
    pub rev: Rev,
    pub deleted: bool,
    pub body: Body,
    pub seq: u64,
}

/// How a batch changed one database's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct DbCounters {
    pub db_id: i64,
    /// The change in live documents.
    pub delta: i64,
    /// The database's new `update_seq`: the batch's last write to it.
    pub update_seq: u64,
}

/// The counters a batch ends with, written with its commit.
#[derive(Default)]
pub(super) struct Tail {
    /// Per database id: the change in live documents and the new update_seq.
    pub databases: Vec<DbCounters>,
    pub last_db_id: Option<i64>,
    pub last_seq: Option<u64>,
    /// Delete events up to this seq (and record it).
    pub prune_through: Option<u64>,
    /// Delete request_ids recorded before this time (unix seconds), at most
    /// `PRUNE_CHUNK` of them.
    pub expire_requests_before: Option<i64>,
}

/// The statements of a batch, on a connection inside its transaction.
pub(super) trait Tx {
    /// The rev, deleted flag and seq of those of `ids` that exist.
    async fn doc_states(&mut self, db_id: i64, ids: &[&DocId]) -> Result<Vec<(DocId, Current)>>;
    /// The stored rows (live or not) of those of `ids` that exist.
    async fn documents(&mut self, db_id: i64, ids: &[&DocId]) -> Result<Vec<Document>>;
    /// Inserts or replaces these document rows (at most one per document).
    async fn put_docs(&mut self, rows: &[DocRow]) -> Result<()>;
    async fn put_events(&mut self, events: &[Event]) -> Result<()>;
    async fn insert_database(&mut self, id: i64, info: &DatabaseInfo) -> Result<()>;
    /// Deletes a database row, its documents and its recorded request_ids.
    async fn delete_database(&mut self, id: i64) -> Result<()>;
    /// The recorded request_id of `principal` in database `db_id`, if any.
    async fn request(
        &mut self,
        db_id: i64,
        principal: &str,
        request_id: &RequestId,
    ) -> Result<Option<StoredRequest>>;
    /// Records request_ids with their replies.
    async fn put_requests(&mut self, rows: &[RequestRow]) -> Result<()>;
    /// Writes the counters and commits.
    async fn finish(&mut self, tail: Tail) -> Result<()>;
}

/// What a backend does around the shared batching loop.
pub(super) trait Engine {
    /// Commits one batch and has its requests answered (once its events are
    /// published); how it ended.
    async fn commit(&mut self, ops: Vec<Queued>) -> Committed;
    /// The most request bytes (`Op::approx_bytes`) taken into one batch.
    fn batch_bytes(&self) -> usize;
    /// After this long without writes, `idle` runs (once per pause, until it
    /// is done).
    fn idle_after(&self) -> Option<Duration>;
    /// Returns whether it is done; if not, it runs again after another
    /// `idle_after` without writes.
    async fn idle(&mut self) -> bool;
    /// After this many batches failed in a row the writer gives up.
    fn max_failed_batches(&self) -> Option<u32>;
    /// Called once, after the last batch.
    async fn close(self);
}

/// The writer's loop: takes what is queued (up to `max_batch` commands and
/// the engine's byte bound) and commits it as one batch. On `Shutdown`
/// it refuses new commands, commits what was queued, closes the engine and
/// answers. Returns an error when the engine gave up.
pub(super) async fn serve<E: Engine>(
    mut engine: E,
    mut rx: mpsc::Receiver<Command>,
    max_batch: usize,
) -> Result<()> {
    let mut shutdown: Option<oneshot::Sender<()>> = None;
    let mut batch: Vec<Command> = Vec::with_capacity(max_batch);
    let mut failed_in_a_row = 0;
    let mut passing_in_a_row = 0;
    // A WAL left by an earlier run is truncated after the first pause too.
    let mut idle_done = false;
    loop {
        if shutdown.is_some() {
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                break;
            }
        } else if batch.is_empty() {
            let idle_after = engine.idle_after().filter(|_| !idle_done);
            tokio::select! {
                n = rx.recv_many(&mut batch, max_batch) => if n == 0 { break },
                () = tokio::time::sleep(idle_after.unwrap_or_default()), if idle_after.is_some() => {
                    idle_done = engine.idle().await;
                    continue;
                }
            }
        }
        // Commands beyond the batch's byte bound wait for the next one.
        let rest = batch.split_off(batch_end(&batch, engine.batch_bytes()));
        let mut ops = Vec::with_capacity(batch.len());
        for cmd in batch.drain(..) {
            match cmd {
                Command::Run { op, permit } => ops.push(Queued { op, permit }),
                Command::Shutdown { reply } => {
                    // Refuse new commands; queued ones are still drained.
                    rx.close();
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
        idle_done = false;
        #[allow(clippy::cast_precision_loss)] // batch sizes are small
        metrics::histogram!(crate::telemetry::WRITER_BATCH_SIZE).record(ops.len() as f64);
        let started = std::time::Instant::now();
        let committed = engine.commit(ops).await;
        metrics::histogram!(crate::telemetry::WRITER_COMMIT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        if committed == Committed::NoForNow {
            // Queued requests wait through the pause (their callers'
            // deadlines still apply), then meet the next attempt.
            tokio::time::sleep(pause_after(passing_in_a_row)).await;
            passing_in_a_row += 1;
            continue;
        }
        passing_in_a_row = 0;
        if committed == Committed::Yes {
            failed_in_a_row = 0;
        } else {
            failed_in_a_row += 1;
            if engine
                .max_failed_batches()
                .is_some_and(|max| failed_in_a_row >= max)
            {
                fail_queued(&mut rx, batch);
                return Err(Error::Storage(
                    format!("{failed_in_a_row} batches in a row failed to commit; giving up")
                        .into(),
                ));
            }
        }
    }
    engine.close().await;
    if let Some(reply) = shutdown {
        let _ = reply.send(());
    }
    Ok(())
}

/// How many of `batch`'s commands go into this batch: all, unless their
/// bytes pass `limit` (then at least one).
fn batch_end(batch: &[Command], limit: usize) -> usize {
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

/// Answers what is left when the writer gives up; the channel is closed so
/// later writes fail at once.
fn fail_queued(rx: &mut mpsc::Receiver<Command>, batch: Vec<Command>) {
    rx.close();
    let queued = std::iter::from_fn(|| rx.try_recv().ok()).collect::<Vec<_>>();
    for cmd in batch.into_iter().chain(queued) {
        match cmd {
            Command::Run { op, .. } => op
                .failed(Error::Unavailable(
                    "the server can no longer write to its database and is stopping".into(),
                ))
                .send(),
            Command::Shutdown { reply } => {
                let _ = reply.send(());
            }
        }
    }
}

/// Splits queued ops into the ops and their permits.
pub(super) fn unzip(queued: Vec<Queued>) -> (Vec<Op>, Vec<Option<OwnedSemaphorePermit>>) {
    queued.into_iter().map(|q| (q.op, q.permit)).unzip()
}

/// The answers of a batch that failed: each with `error()` instead.
pub(super) fn failing_all(answers: Vec<Answer>, error: impl Fn() -> Error) -> Vec<Answer> {
    answers.into_iter().map(|a| a.failing(error())).collect()
}

/// Most events deleted in one batch, so pruning never stalls writers.
pub(super) const PRUNE_CHUNK: u64 = 10_000;

/// Runs `ops` as one batch on `tx`, inside a transaction the caller began,
/// and commits it (`Tx::finish`). Pushes one answer per op to `answers`
/// (in order) and fills `events` with what to publish. On error nothing is
/// committed, `answers` still holds one answer per op (to be failed with
/// `failing_all`), and `state` must be thrown away (or restored) by the
/// caller.
pub(super) async fn apply<T: Tx>(
    tx: &mut T,
    state: &mut State,
    ops: Vec<Op>,
    events: &mut Vec<Event>,
    answers: &mut Vec<Answer>,
) -> Result<()> {
    let mut batch = Batch {
        tx,
        state,
        pending: Pending::default(),
        events,
    };
    let (seq_before, db_id_before) = (batch.state.last_seq, batch.state.last_db_id);
    let mut ops = ops.into_iter();
    if let Err(e) = batch.prefetch(ops.as_slice()).await {
        answers.extend(ops.map(|op| op.failed(Error::Storage("the batch failed".into()))));
        return Err(e);
    }
    while let Some(op) = ops.next() {
        let mut answer = batch.run(op).await;
        // Storage failures abort the whole batch (its transaction is rolled
        // back by the caller); everything else is the op's answer.
        let lost = answer.take_batch_error();
        answers.push(answer);
        if let Some(e) = lost {
            answers.extend(ops.map(|op| op.failed(Error::Storage("the batch failed".into()))));
            return Err(e);
        }
    }
    batch.flush().await?;
    let state = &mut *batch.state;
    let mut tail = Tail {
        databases: batch.pending.counters.values().copied().collect(),
        ..Tail::default()
    };
    tail.databases.sort_unstable_by_key(|c| c.db_id);
    if state.last_db_id != db_id_before {
        tail.last_db_id = Some(state.last_db_id);
    }
    tail.expire_requests_before = state.expire_requests_before.take();
    if state.last_seq != seq_before {
        tail.last_seq = Some(state.last_seq);
        tail.prune_through = prune_target(state);
        if let Some(through) = tail.prune_through {
            state.retention.pruned_through = through;
        }
    }
    batch.tx.finish(tail).await?;
    count_outcomes(answers);
    Ok(())
}

/// Committed document writes and conflicts, for the metrics.
fn count_outcomes(answers: &[Answer]) {
    let (mut written, mut conflicts) = (0u64, 0u64);
    for answer in answers {
        if let Answer::Written(_, Ok(Written::Applied(items))) = answer {
            for item in items {
                match item {
                    Ok(_) => written += 1,
                    Err(Error::Conflict { .. }) => conflicts += 1,
                    Err(_) => {}
                }
            }
        }
    }
    metrics::counter!(crate::telemetry::WRITES_COMMITTED).increment(written);
    metrics::counter!(crate::telemetry::CONFLICTS).increment(conflicts);
}

/// Errors of storage (not of the op): the batch's transaction is lost.
fn aborts_batch(e: &Error) -> bool {
    matches!(
        e,
        Error::Storage(_) | Error::Unavailable(_) | Error::Busy(_) | Error::StorageFull(_)
    )
}

/// How a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Committed {
    Yes,
    /// It failed for a cause that clears by itself (a full disk, a file
    /// locked by another process, an unreachable database): the writer
    /// keeps going, and tries the next batch after a pause.
    NoForNow,
    /// It failed otherwise; after `max_failed_batches` of these in a row
    /// the writer gives up.
    No,
}

impl Committed {
    /// What a batch that failed with `e` was.
    pub(super) fn failed_with(e: &Error) -> Committed {
        match e {
            Error::StorageFull(_) | Error::Busy(_) | Error::Unavailable(_) => Committed::NoForNow,
            _ => Committed::No,
        }
    }
}

/// Reports whether the store takes writes now (health's `agsync.writes`,
/// the `agsync_storage_writable` gauge), and logs each change.
pub(super) fn set_writable(writable: &tokio::sync::watch::Sender<bool>, now: bool) {
    if writable.send_if_modified(|writable| std::mem::replace(writable, now) != now) {
        if now {
            tracing::info!("the store takes writes again");
        } else {
            tracing::warn!("the store cannot take writes for now; reads go on");
        }
    }
}

/// The pause after a batch that failed for a passing cause, doubling from
/// 50 ms to at most 1 s while they go on: a full disk is not hammered.
fn pause_after(failures: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << failures.min(5)).min(1000))
}

/// Up to which seq to delete events beyond the retention now, at most
/// `PRUNE_CHUNK` per batch so pruning never stalls writers.
fn prune_target(state: &State) -> Option<u64> {
    let target = state.last_seq.checked_sub(state.retention.keep)?;
    if target <= state.retention.pruned_through {
        return None;
    }
    Some(target.min(state.retention.pruned_through + PRUNE_CHUNK))
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
    counters: HashMap<i64, DbCounters>,
    /// request_ids this batch recorded, by (database id, principal, id):
    /// their fingerprint and reply (a duplicate later in the batch finds
    /// them here).
    requests: HashMap<RequestKey, ([u8; 32], Vec<ItemReply>)>,
    request_rows: Vec<RequestRow>,
}

/// A recorded request_id's key: (database id, principal, request_id).
type RequestKey = (i64, String, RequestId);

struct Batch<'a, T> {
    tx: &'a mut T,
    state: &'a mut State,
    pending: Pending,
    events: &'a mut Vec<Event>,
}

impl<T: Tx> Batch<'_, T> {
    fn next_seq(&mut self) -> u64 {
        self.state.last_seq += 1;
        self.state.last_seq
    }

    /// Runs one op against the batch's state; its answer.
    async fn run(&mut self, op: Op) -> Answer {
        match op {
            Op::CreateDatabase {
                name,
                sync_key,
                reply,
            } => {
                let result = match self.flush().await {
                    Ok(()) => self.create_database(name, sync_key).await,
                    Err(e) => Err(e),
                };
                Answer::Database(reply, result)
            }
            Op::DeleteDatabase { name, reply } => {
                let result = match self.flush().await {
                    Ok(()) => self.delete_database(&name).await,
                    Err(e) => Err(e),
                };
                Answer::Deleted(reply, result)
            }
            Op::Write {
                database,
                writes,
                request,
                reply,
            } => Answer::Written(reply, self.write_docs(&database, writes, request).await),
            Op::Notify {
                sync_key,
                aliases,
                attributes,
                reply,
            } => {
                let seq = self.next_seq();
                self.pending.events.push(Event {
                    seq,
                    sync_key,
                    database: None,
                    id: None,
                    rev: None,
                    deleted: false,
                    aliases,
                    attributes,
                });
                Answer::Notified(reply, Ok(seq))
            }
        }
    }

    /// Reads, with one `Tx::doc_states` call per database, the current
    /// revision of every document the batch's writes touch.
    async fn prefetch(&mut self, ops: &[Op]) -> Result<()> {
        let mut wanted: HashMap<i64, Vec<&DocId>> = HashMap::new();
        for op in ops {
            if let Op::Write {
                database, writes, ..
            } = op
                && let Some(db) = self.state.databases.get(database)
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
            for id in &ids {
                self.pending.docs.insert((db_id, (*id).clone()), None);
            }
            for (id, state) in self.tx.doc_states(db_id, &ids).await? {
                self.pending.docs.insert((db_id, id), Some(state));
            }
            self.pending.prefetched.insert(db_id);
        }
        Ok(())
    }

    /// The state of one document: from the batch's map, else from storage
    /// (only for databases created within this batch, or not prefetched).
    async fn current(&mut self, db_id: i64, id: &DocId) -> Result<Option<Current>> {
        if let Some(state) = self.pending.docs.get(&(db_id, id.clone())) {
            return Ok(state.clone());
        }
        if self.pending.prefetched.contains(&db_id) {
            return Ok(None);
        }
        let state = self
            .tx
            .doc_states(db_id, &[id])
            .await?
            .pop()
            .map(|(_, state)| state);
        self.pending.docs.insert((db_id, id.clone()), state.clone());
        Ok(state)
    }

    /// Applies document writes in order, each on its own; with a
    /// request_id, answers a retry from its record instead, and records a
    /// first success.
    async fn write_docs(
        &mut self,
        database: &DbName,
        writes: Vec<DocWrite>,
        request: Option<Idempotency>,
    ) -> Result<Written> {
        let db = self
            .state
            .databases
            .get(database)
            .cloned()
            .ok_or_else(|| Error::DatabaseNotFound(database.to_string()))?;
        if let Some(request) = &request
            && let Some(items) = self.recorded(db.id, request).await?
        {
            return Ok(Written::Replayed(items));
        }
        let ids: Vec<String> = match request {
            Some(_) => writes.iter().map(|w| w.id.to_string()).collect(),
            None => Vec::new(),
        };
        let mut results = Vec::with_capacity(writes.len());
        for write in writes {
            let current = self.current(db.id, &write.id).await?;
            let result = match check(&write, current.as_ref()) {
                Ok(parent) => Ok(self.write_doc(database, &db, write, parent)),
                Err(Refused::NotFound) => Err(not_found(database, &write.id)),
                Err(Refused::Conflict) => Err(self.conflict(database, &db, write, current).await?),
            };
            results.push(result);
        }
        if let Some(request) = request {
            self.record(db.id, request, ids, &results)?;
        }
        Ok(Written::Applied(results))
    }

    /// The reply recorded for `request` (by this batch or an earlier one),
    /// if its request_id was used before in this database by this
    /// principal: a retry of it, or `RequestIdReused` if the request
    /// differs.
    async fn recorded(
        &mut self,
        db_id: i64,
        request: &Idempotency,
    ) -> Result<Option<Vec<ItemReply>>> {
        let key = (db_id, request.principal.clone(), request.request_id.clone());
        let (same, items) = match self.pending.requests.get(&key) {
            Some((fingerprint, items)) => (*fingerprint == request.fingerprint, items.clone()),
            None => {
                let stored = self
                    .tx
                    .request(db_id, &request.principal, &request.request_id)
                    .await?;
                let Some(stored) = stored else {
                    return Ok(None);
                };
                let items: Vec<ItemReply> =
                    serde_json::from_str(&stored.reply).map_err(|e| Error::Storage(Box::new(e)))?;
                (stored.fingerprint == request.fingerprint, items)
            }
        };
        if !same {
            return Err(Error::RequestIdReused {
                request_id: request.request_id.as_str().to_owned(),
            });
        }
        metrics::counter!(crate::telemetry::REQUESTS_DEDUPLICATED).increment(1);
        Ok(Some(items))
    }

    /// Records the reply of a request with a request_id, unless the call
    /// failed (a Put or Delete whose write failed): written with the batch.
    fn record(
        &mut self,
        db_id: i64,
        request: Idempotency,
        ids: Vec<String>,
        results: &[Result<WriteOutcome>],
    ) -> Result<()> {
        if request.whole_call_fails_with_an_item && results.iter().any(Result::is_err) {
            return Ok(());
        }
        let items = ItemReply::merge(request.rejected, ids.into_iter().zip(results));
        let reply = serde_json::to_string(&items).map_err(|e| Error::Storage(Box::new(e)))?;
        self.pending.request_rows.push(RequestRow {
            db_id,
            principal: request.principal.clone(),
            request_id: request.request_id.clone(),
            fingerprint: request.fingerprint,
            reply,
            created_at: self.state.now_secs,
        });
        self.pending.requests.insert(
            (db_id, request.principal, request.request_id),
            (request.fingerprint, items),
        );
        Ok(())
    }

    /// The conflict `write` ran into, with the document as it is now when
    /// it is live (read from storage once per document and batch, when this
    /// batch did not write it).
    async fn conflict(
        &mut self,
        database: &DbName,
        db: &DbRow,
        write: DocWrite,
        current: Option<Current>,
    ) -> Result<Error> {
        let mut current_doc = None;
        if let Some(c) = current.as_ref().filter(|c| !c.deleted) {
            let body = match &c.body {
                Some(body) => Some(body.clone()),
                None => {
                    let stored = self.tx.documents(db.id, &[&write.id]).await?.pop();
                    let body = stored.filter(|d| d.rev == c.rev).map(|d| d.body);
                    if let Some(body) = &body
                        && let Some(Some(known)) =
                            self.pending.docs.get_mut(&(db.id, write.id.clone()))
                    {
                        known.body = Some(body.clone());
                    }
                    body
                }
            };
            current_doc = body.map(|body| {
                Box::new(Document {
                    id: write.id.clone(),
                    rev: c.rev.clone(),
                    body,
                    seq: c.seq,
                })
            });
        }
        Ok(Error::Conflict {
            database: database.to_string(),
            id: write.id,
            sent_rev: write.rev,
            current_rev: current.map(|c| c.rev),
            current: current_doc,
        })
    }

    /// Applies one write the revision rules allowed (`parent`, and the
    /// change in live documents): assigns its seq and records the row and
    /// event to write.
    fn write_doc(
        &mut self,
        database: &DbName,
        db: &DbRow,
        write: DocWrite,
        (parent, delta): (Option<Rev>, i64),
    ) -> WriteOutcome {
        let (deleted, body) = match write.change {
            DocChange::Put(body) => (false, body),
            DocChange::Delete => (true, Body::empty()),
        };
        let rev = Rev::next(parent.as_ref(), deleted, &body);
        let seq = self.next_seq();
        self.pending.docs.insert(
            (db.id, write.id.clone()),
            Some(Current {
                rev: rev.clone(),
                deleted,
                seq,
                body: (!deleted).then(|| body.clone()),
            }),
        );
        self.pending.events.push(Event {
            seq,
            sync_key: db.sync_key.clone(),
            database: Some(database.clone()),
            id: Some(write.id.clone()),
            rev: Some(rev.clone()),
            deleted,
            aliases: write.aliases,
            attributes: BTreeMap::new(),
        });
        self.pending.rows.push(DocRow {
            db_id: db.id,
            id: write.id.clone(),
            rev: rev.clone(),
            deleted,
            body,
            seq,
        });
        let counters = self.pending.counters.entry(db.id).or_insert(DbCounters {
            db_id: db.id,
            ..DbCounters::default()
        });
        counters.delta += delta;
        counters.update_seq = seq;
        WriteOutcome {
            id: write.id,
            rev,
            seq,
        }
    }

    /// Writes the batch's pending documents and events.
    async fn flush(&mut self) -> Result<()> {
        // Only a document's last state in the batch needs writing.
        let mut rows = std::mem::take(&mut self.pending.rows);
        let mut seen = HashSet::new();
        rows.reverse();
        rows.retain(|r| seen.insert((r.db_id, r.id.clone())));
        rows.reverse();
        if !rows.is_empty() {
            self.tx.put_docs(&rows).await?;
        }
        let new_events = std::mem::take(&mut self.pending.events);
        if !new_events.is_empty() {
            self.tx.put_events(&new_events).await?;
        }
        let requests = std::mem::take(&mut self.pending.request_rows);
        if !requests.is_empty() {
            self.tx.put_requests(&requests).await?;
        }
        self.events.extend(new_events);
        Ok(())
    }

    /// Creates a database instance with a new id (never reused). Its
    /// `created_seq` is the head seq at creation: a previous instance of the
    /// name ended with a deletion event, so every seq a client can hold from
    /// it is smaller.
    async fn create_database(&mut self, name: DbName, sync_key: SyncKey) -> Result<DatabaseInfo> {
        if self.state.databases.contains_key(&name) {
            return Err(Error::DatabaseExists(name.to_string()));
        }
        self.state.last_db_id += 1;
        let id = self.state.last_db_id;
        let info = DatabaseInfo {
            name,
            sync_key,
            doc_count: 0,
            update_seq: 0,
            created_seq: self.state.last_seq,
        };
        self.tx.insert_database(id, &info).await?;
        self.state.databases.insert(
            info.name.clone(),
            DbRow {
                id,
                sync_key: info.sync_key.clone(),
            },
        );
        Ok(info)
    }

    /// Deletes a database and its documents, and logs the deletion as an
    /// event of its sync key, so subscribers learn of it (live or replayed).
    /// The batch forgets everything it knew of the database, counters
    /// included: a database created again in the same batch starts empty.
    async fn delete_database(&mut self, name: &DbName) -> Result<u64> {
        let db = self
            .state
            .databases
            .get(name)
            .cloned()
            .ok_or_else(|| Error::DatabaseNotFound(name.to_string()))?;
        self.tx.delete_database(db.id).await?;
        self.state.databases.remove(name);
        self.pending.docs.retain(|(db_id, _), _| *db_id != db.id);
        self.pending.prefetched.remove(&db.id);
        self.pending.counters.remove(&db.id);
        self.pending
            .requests
            .retain(|(db_id, _, _), _| *db_id != db.id);
        let seq = self.next_seq();
        self.pending.events.push(Event {
            seq,
            sync_key: db.sync_key,
            database: Some(name.clone()),
            id: None,
            rev: None,
            deleted: true,
            aliases: Vec::new(),
            attributes: BTreeMap::new(),
        });
        Ok(seq)
    }
}

/// The `aliases` column: a JSON array of strings (`[]`, everyone, without
/// an allocation).
pub(super) fn aliases_json(aliases: &[Alias]) -> Cow<'static, str> {
    if aliases.is_empty() {
        return Cow::Borrowed("[]");
    }
    Cow::Owned(
        serde_json::Value::from(aliases.iter().map(Alias::as_str).collect::<Vec<_>>()).to_string(),
    )
}

/// The `attributes` column: a JSON object of strings (`{}` without an
/// allocation).
pub(super) fn attributes_json(attributes: &BTreeMap<String, String>) -> Cow<'static, str> {
    if attributes.is_empty() {
        return Cow::Borrowed("{}");
    }
    let map: serde_json::Map<String, serde_json::Value> = attributes
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
        .collect();
    Cow::Owned(serde_json::Value::Object(map).to_string())
}

/// The revision rules: whether `write` may apply to the document as
/// it is (`current`), and if so its parent revision and the change in
/// live documents.
fn check(
    write: &DocWrite,
    current: Option<&Current>,
) -> std::result::Result<(Option<Rev>, i64), Refused> {
    let names = |c: &Current| write.rev.as_ref() == Some(&c.rev);
    match (&write.change, current) {
        // Create: nothing there yet.
        (DocChange::Put(_), None) if write.rev.is_none() => Ok((None, 1)),
        // Update of a live document naming its current revision.
        (DocChange::Put(_), Some(c)) if !c.deleted && names(c) => Ok((Some(c.rev.clone()), 0)),
        // Recreate over a tombstone: its generation continues.
        (DocChange::Put(_), Some(c)) if c.deleted && (write.rev.is_none() || names(c)) => {
            Ok((Some(c.rev.clone()), 1))
        }
        (DocChange::Delete, None) => Err(Refused::NotFound),
        (DocChange::Delete, Some(c)) if c.deleted => Err(Refused::NotFound),
        (DocChange::Delete, Some(c)) if names(c) => Ok((Some(c.rev.clone()), -1)),
        _ => Err(Refused::Conflict),
    }
}

/// Why the revision rules refused a write.
enum Refused {
    /// A delete of a missing or deleted document.
    NotFound,
    /// A stale, missing or unexpected rev.
    Conflict,
}

fn not_found(database: &DbName, id: &DocId) -> Error {
    Error::DocumentNotFound {
        database: database.to_string(),
        id: id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    //! The revision rules and the batch's bookkeeping, through a fake
    //! transaction: an in-memory table of documents, the events and the
    //! counters it was asked to write.

    use super::*;

    #[derive(Default)]
    struct FakeTx {
        /// Committed documents (as a real table would hold them).
        docs: HashMap<(i64, DocId), Document>,
        /// The deleted flag of each committed document.
        deleted: HashMap<(i64, DocId), bool>,
        events: Vec<Event>,
        databases: Vec<(i64, DbName)>,
        tails: Vec<Tail>,
        /// `documents` calls (conflicts reading a stored body).
        body_reads: usize,
        /// Fail `put_docs` with a storage error.
        broken: bool,
        /// Recorded request_ids: (db, principal, id) -> (fingerprint, reply).
        requests: HashMap<(i64, String, String), (Vec<u8>, String)>,
    }

    impl Tx for FakeTx {
        async fn doc_states(
            &mut self,
            db_id: i64,
            ids: &[&DocId],
        ) -> Result<Vec<(DocId, Current)>> {
            Ok(ids
                .iter()
                .filter_map(|id| {
                    let doc = self.docs.get(&(db_id, (*id).clone()))?;
                    Some((
                        doc.id.clone(),
                        Current {
                            rev: doc.rev.clone(),
                            deleted: self.deleted[&(db_id, doc.id.clone())],
                            seq: doc.seq,
                            body: None,
                        },
                    ))
                })
                .collect())
        }

        async fn documents(&mut self, db_id: i64, ids: &[&DocId]) -> Result<Vec<Document>> {
            self.body_reads += 1;
            Ok(ids
                .iter()
                .filter_map(|id| self.docs.get(&(db_id, (*id).clone())).cloned())
                .collect())
        }

        async fn put_docs(&mut self, rows: &[DocRow]) -> Result<()> {
            if self.broken {
                return Err(Error::Storage("the disk is gone".into()));
            }
            for row in rows {
                let key = (row.db_id, row.id.clone());
                self.deleted.insert(key.clone(), row.deleted);
                self.docs.insert(
                    key,
                    Document {
                        id: row.id.clone(),
                        rev: row.rev.clone(),
                        body: row.body.clone(),
                        seq: row.seq,
                    },
                );
            }
            Ok(())
        }

        async fn put_events(&mut self, events: &[Event]) -> Result<()> {
            self.events.extend_from_slice(events);
            Ok(())
        }

        async fn insert_database(&mut self, id: i64, info: &DatabaseInfo) -> Result<()> {
            self.databases.push((id, info.name.clone()));
            Ok(())
        }

        async fn delete_database(&mut self, id: i64) -> Result<()> {
            self.databases.retain(|(i, _)| *i != id);
            self.docs.retain(|(db, _), _| *db != id);
            Ok(())
        }

        async fn request(
            &mut self,
            db_id: i64,
            principal: &str,
            request_id: &RequestId,
        ) -> Result<Option<StoredRequest>> {
            let key = (db_id, principal.to_owned(), request_id.as_str().to_owned());
            Ok(self
                .requests
                .get(&key)
                .map(|(fingerprint, reply)| StoredRequest {
                    fingerprint: fingerprint.clone(),
                    reply: reply.clone(),
                }))
        }

        async fn put_requests(&mut self, rows: &[RequestRow]) -> Result<()> {
            for r in rows {
                let key = (
                    r.db_id,
                    r.principal.clone(),
                    r.request_id.as_str().to_owned(),
                );
                assert!(!self.requests.contains_key(&key), "recorded twice: {key:?}");
                self.requests
                    .insert(key, (r.fingerprint.to_vec(), r.reply.clone()));
            }
            Ok(())
        }

        async fn finish(&mut self, tail: Tail) -> Result<()> {
            self.tails.push(tail);
            Ok(())
        }
    }

    fn state() -> State {
        State {
            last_seq: 0,
            last_db_id: 1,
            retention: Retention {
                keep: 1_000_000,
                pruned_through: 0,
            },
            databases: HashMap::from([(
                db(),
                DbRow {
                    id: 1,
                    sync_key: SyncKey::parse("k", "cars").unwrap(),
                },
            )]),
            now_secs: 1_000,
            expire_requests_before: None,
        }
    }

    fn db() -> DbName {
        DbName::parse("d", "cars").unwrap()
    }

    fn body(n: i64) -> Body {
        let mut map = serde_json::Map::new();
        map.insert("n".into(), n.into());
        Body::parse(
            "body",
            map,
            crate::domain::BodyLimits {
                max_bytes: 1000,
                max_depth: 4,
            },
        )
        .unwrap()
    }

    fn put(id: &str, rev: Option<&Rev>, n: i64) -> DocWrite {
        DocWrite {
            id: DocId::parse("id", id).unwrap(),
            rev: rev.cloned(),
            change: DocChange::Put(body(n)),
            aliases: Vec::new(),
        }
    }

    fn delete(id: &str, rev: Option<&Rev>) -> DocWrite {
        DocWrite {
            id: DocId::parse("id", id).unwrap(),
            rev: rev.cloned(),
            change: DocChange::Delete,
            aliases: Vec::new(),
        }
    }

    type Items = Vec<Result<WriteOutcome>>;

    /// Runs one batch of Write ops (one per entry of `ops`, with its
    /// request_id, if any) on `tx`; each op's result.
    async fn requests(
        tx: &mut FakeTx,
        state: &mut State,
        ops: Vec<(Vec<DocWrite>, Option<Idempotency>)>,
    ) -> Vec<Result<Written>> {
        let mut receivers = Vec::new();
        let ops = ops
            .into_iter()
            .map(|(writes, request)| {
                let (reply, rx) = oneshot::channel();
                receivers.push(rx);
                Op::Write {
                    database: db(),
                    writes,
                    request,
                    reply,
                }
            })
            .collect();
        let (mut events, mut answers) = (Vec::new(), Vec::new());
        apply(tx, state, ops, &mut events, &mut answers)
            .await
            .unwrap();
        answers.into_iter().for_each(Answer::send);
        receivers
            .into_iter()
            .map(|mut rx| rx.try_recv().unwrap())
            .collect()
    }

    /// Runs one batch of Write ops without request_ids; each op's results.
    async fn writes(
        tx: &mut FakeTx,
        state: &mut State,
        ops: Vec<Vec<DocWrite>>,
    ) -> Vec<Result<Items>> {
        let ops = ops.into_iter().map(|w| (w, None)).collect();
        requests(tx, state, ops)
            .await
            .into_iter()
            .map(|r| match r? {
                Written::Applied(items) => Ok(items),
                Written::Replayed(_) => panic!("replayed without a request_id"),
            })
            .collect()
    }

    /// One op of one write; its result.
    async fn write(tx: &mut FakeTx, state: &mut State, w: DocWrite) -> Result<WriteOutcome> {
        let mut results = writes(tx, state, vec![vec![w]]).await;
        results.pop().unwrap().unwrap().pop().unwrap()
    }

    /// A short description of a result: `ok g<generation> s<seq>`,
    /// `conflict current=<generation or none> body=<n or none>`,
    /// `not found`, or the error.
    fn show(result: &Result<WriteOutcome>) -> String {
        match result {
            Ok(out) => format!("ok g{} s{}", out.rev.generation(), out.seq),
            Err(Error::Conflict {
                current_rev,
                current,
                ..
            }) => format!(
                "conflict current={} body={}",
                current_rev
                    .as_ref()
                    .map_or("none".into(), |r| format!("g{}", r.generation())),
                current
                    .as_ref()
                    .map_or("none".into(), |d| d.body.canonical_json().to_string())
            ),
            Err(Error::DocumentNotFound { .. }) => "not found".into(),
            Err(e) => e.to_string(),
        }
    }

    #[tokio::test]
    async fn create_update_and_a_stale_rev() {
        let (mut tx, mut st) = (FakeTx::default(), state());
        let first = write(&mut tx, &mut st, put("x", None, 1)).await.unwrap();
        assert_eq!(show(&Ok(first.clone())), "ok g1 s1");
        let second = write(&mut tx, &mut st, put("x", Some(&first.rev), 2)).await;
        assert_eq!(show(&second), "ok g2 s2");
        // A stale rev, and a create of an existing document: conflicts that
        // carry the current document, read from storage once per batch.
        let results = writes(
            &mut tx,
            &mut st,
            vec![vec![put("x", Some(&first.rev), 3)], vec![put("x", None, 4)]],
        )
        .await;
        let shown: Vec<String> = results
            .iter()
            .map(|r| show(&r.as_ref().unwrap()[0]))
            .collect();
        assert_eq!(shown, ["conflict current=g2 body={\"n\":2}"; 2]);
        assert_eq!(tx.body_reads, 1);
        // Nothing was written by the conflicts: no seq, no event.
        assert_eq!(st.last_seq, 2);
        assert_eq!(tx.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        // The same revision rule from identical input: revisions are
        // deterministic, so both nodes of a race compute the same rev.
        assert_eq!(first.rev, Rev::next(None, false, &body(1)));
    }

    #[tokio::test]
    async fn a_conflict_on_a_document_written_in_the_same_batch_carries_its_new_body() {
        let (mut tx, mut st) = (FakeTx::default(), state());
        let results = writes(
            &mut tx,
            &mut st,
            vec![vec![put("x", None, 1)], vec![put("x", None, 2)]],
        )
        .await;
        let shown: Vec<String> = results
            .iter()
            .map(|r| show(&r.as_ref().unwrap()[0]))
            .collect();
        assert_eq!(shown, ["ok g1 s1", "conflict current=g1 body={\"n\":1}"]);
        assert_eq!(tx.body_reads, 0, "the body was known to the batch");
    }

    #[tokio::test]
    async fn tombstone_recreate_and_generation() {
        let (mut tx, mut st) = (FakeTx::default(), state());
        let g1 = write(&mut tx, &mut st, put("x", None, 1)).await.unwrap();
        // A delete needs the current rev.
        let stale = write(&mut tx, &mut st, delete("x", None)).await;
        assert_eq!(show(&stale), "conflict current=g1 body={\"n\":1}");
        let tomb = write(&mut tx, &mut st, delete("x", Some(&g1.rev))).await;
        assert_eq!(show(&tomb), "ok g2 s2");
        let tomb = tomb.unwrap();
        assert!(tx.deleted[&(1, DocId::parse("id", "x").unwrap())]);
        // Deleting a tombstone or a missing document: not found.
        let again = write(&mut tx, &mut st, delete("x", Some(&tomb.rev))).await;
        assert_eq!(show(&again), "not found");
        let missing = write(&mut tx, &mut st, delete("nope", None)).await;
        assert_eq!(show(&missing), "not found");
        // A stale rev over a tombstone is a conflict with no live document.
        let stale = write(&mut tx, &mut st, put("x", Some(&g1.rev), 2)).await;
        assert_eq!(show(&stale), "conflict current=g2 body=none");
        // Re-created without a rev (or with the tombstone's): the
        // generation continues from the tombstone.
        let recreated = write(&mut tx, &mut st, put("x", None, 3)).await;
        assert_eq!(show(&recreated), "ok g3 s3");
        let updated = write(&mut tx, &mut st, put("x", Some(&recreated.unwrap().rev), 4)).await;
        assert_eq!(show(&updated), "ok g4 s4");
        // Live documents counted per batch: +1, -1, +1, 0.
        let deltas: Vec<i64> = tx
            .tails
            .iter()
            .filter_map(|t| t.databases.first().map(|d| d.delta))
            .collect();
        assert_eq!(deltas, [1, -1, 1, 0]);
    }

    #[tokio::test]
    async fn bulk_items_each_get_their_own_result_in_order() {
        let (mut tx, mut st) = (FakeTx::default(), state());
        let existing = write(&mut tx, &mut st, put("taken", None, 0))
            .await
            .unwrap();
        let a1 = Rev::next(None, false, &body(1));
        let results = writes(
            &mut tx,
            &mut st,
            vec![vec![
                put("a", None, 1),
                put("taken", None, 2),
                // Sees the write of the first item, in the same op.
                put("a", Some(&a1), 3),
                delete("missing", None),
                put("taken", Some(&existing.rev), 5),
                delete("a", Some(&a1)),
            ]],
        )
        .await;
        let shown: Vec<String> = results[0].as_ref().unwrap().iter().map(show).collect();
        assert_eq!(
            shown,
            [
                "ok g1 s2",
                "conflict current=g1 body={\"n\":0}",
                "ok g2 s3",
                "not found",
                "ok g2 s4",
                "conflict current=g2 body={\"n\":3}",
            ]
        );
        // One row per document (its last state), one event per success.
        assert_eq!(
            tx.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(tx.docs[&(1, DocId::parse("id", "a").unwrap())].seq, 3);
    }

    #[tokio::test]
    async fn a_missing_database_fails_the_op_and_a_storage_error_fails_the_batch() {
        let (mut tx, mut st) = (FakeTx::default(), state());
        let (reply, rx) = oneshot::channel();
        let op = Op::Write {
            database: DbName::parse("d", "boats").unwrap(),
            writes: vec![put("x", None, 1)],
            request: None,
            reply,
        };
        let (mut events, mut answers) = (Vec::new(), Vec::new());
        apply(&mut tx, &mut st, vec![op], &mut events, &mut answers)
            .await
            .unwrap();
        answers.into_iter().for_each(Answer::send);
        assert!(matches!(
            rx.await.unwrap(),
            Err(Error::DatabaseNotFound(name)) if name == "boats"
        ));

        // put_docs fails: apply fails, and every op still has its answer.
        tx.broken = true;
        let mut receivers = Vec::new();
        let ops = (0..3)
            .map(|i| {
                let (reply, rx) = oneshot::channel();
                receivers.push(rx);
                Op::Write {
                    database: db(),
                    writes: vec![put(&format!("d{i}"), None, i)],
                    request: None,
                    reply,
                }
            })
            .collect();
        let (mut events, mut answers) = (Vec::new(), Vec::new());
        let failed = apply(&mut tx, &mut st, ops, &mut events, &mut answers).await;
        assert!(matches!(failed, Err(Error::Storage(_))));
        assert_eq!(answers.len(), 3);
        failing_all(answers, || Error::Storage("rolled back".into()))
            .into_iter()
            .for_each(Answer::send);
        for rx in receivers {
            assert!(matches!(rx.await.unwrap(), Err(Error::Storage(_))));
        }
    }

    #[tokio::test]
    async fn retention_prunes_at_most_a_chunk_per_batch() {
        let (mut tx, mut st) = (FakeTx::default(), state());
        st.retention.keep = 3;
        for i in 0..5 {
            write(&mut tx, &mut st, put(&format!("d{i}"), None, i))
                .await
                .unwrap();
        }
        let pruned: Vec<Option<u64>> = tx.tails.iter().map(|t| t.prune_through).collect();
        assert_eq!(pruned, [None, None, None, Some(1), Some(2)]);
        assert_eq!(st.retention.pruned_through, 2);

        // Far behind (a retention lowered at restart): a chunk at a time.
        st.retention.keep = 1;
        st.last_seq = 3 * PRUNE_CHUNK;
        write(&mut tx, &mut st, put("late", None, 0)).await.unwrap();
        assert_eq!(
            tx.tails.last().unwrap().prune_through,
            Some(2 + PRUNE_CHUNK)
        );
    }

    #[test]
    fn a_batch_takes_commands_up_to_its_byte_bound_and_at_least_one() {
        let op = |bytes: usize| {
            let mut map = serde_json::Map::new();
            map.insert("s".into(), "x".repeat(bytes).into());
            let body = Body::parse(
                "body",
                map,
                crate::domain::BodyLimits {
                    max_bytes: 1 << 20,
                    max_depth: 4,
                },
            )
            .unwrap();
            let (reply, _) = oneshot::channel();
            Command::Run {
                op: Op::Write {
                    database: db(),
                    writes: vec![DocWrite {
                        id: DocId::parse("id", "x").unwrap(),
                        rev: None,
                        change: DocChange::Put(body),
                        aliases: Vec::new(),
                    }],
                    request: None,
                    reply,
                },
                permit: None,
            }
        };
        let batch = [op(1000), op(1000), op(1000)];
        let each = match &batch[0] {
            Command::Run { op, .. } => op.approx_bytes(),
            Command::Shutdown { .. } => unreachable!(),
        };
        assert_eq!(batch_end(&batch, 3 * each), 3);
        assert_eq!(batch_end(&batch, 2 * each), 2);
        assert_eq!(batch_end(&batch, 1), 1, "one command even over the bound");
    }

    fn request_id(id: &str, fingerprint: u8, single: bool) -> Option<Idempotency> {
        Some(Idempotency {
            principal: "alice".into(),
            request_id: RequestId::parse("request_id", id).unwrap().unwrap(),
            fingerprint: [fingerprint; 32],
            whole_call_fails_with_an_item: single,
            rejected: Vec::new(),
        })
    }

    fn applied(result: &Result<Written>) -> Vec<String> {
        match result {
            Ok(Written::Applied(items)) => items.iter().map(show).collect(),
            other => panic!("expected applied, got {other:?}"),
        }
    }

    fn replayed(result: &Result<Written>) -> Vec<String> {
        match result {
            Ok(Written::Replayed(items)) => items
                .iter()
                .map(|i| {
                    let generation = i.rev.split('-').next().unwrap_or_default();
                    format!("{} g{generation} s{} {}", i.id, i.seq, i.error)
                })
                .collect(),
            other => panic!("expected replayed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_request_id_is_executed_once_and_its_reply_replayed() {
        let (mut tx, mut st) = (FakeTx::default(), state());
        // The same Put three times in one batch: one write, two replays.
        let results = requests(
            &mut tx,
            &mut st,
            vec![
                (vec![put("x", None, 1)], request_id("r1", 7, true)),
                (vec![put("x", None, 1)], request_id("r1", 7, true)),
                (vec![put("x", None, 1)], request_id("r1", 7, true)),
            ],
        )
        .await;
        assert_eq!(applied(&results[0]), ["ok g1 s1"]);
        assert_eq!(replayed(&results[1]), ["x g1 s1 "]);
        assert_eq!(replayed(&results[2]), ["x g1 s1 "]);
        assert_eq!(tx.events.len(), 1);
        assert_eq!(tx.requests.len(), 1);
        // In a later batch, from the record; nothing written, no seq used.
        let results = requests(
            &mut tx,
            &mut st,
            vec![(vec![put("x", None, 1)], request_id("r1", 7, true))],
        )
        .await;
        assert_eq!(replayed(&results[0]), ["x g1 s1 "]);
        assert_eq!((st.last_seq, tx.events.len()), (1, 1));
        // The same id with another request: refused, nothing written.
        let results = requests(
            &mut tx,
            &mut st,
            vec![(vec![put("y", None, 2)], request_id("r1", 8, true))],
        )
        .await;
        assert!(
            matches!(&results[0], Err(Error::RequestIdReused { request_id }) if request_id == "r1"),
            "{:?}",
            results[0]
        );
        assert_eq!((st.last_seq, tx.events.len()), (1, 1));
        // Another principal's id is its own.
        let mut bobs = request_id("r1", 8, true);
        bobs.as_mut().unwrap().principal = "bob".into();
        let results = requests(&mut tx, &mut st, vec![(vec![put("y", None, 2)], bobs)]).await;
        assert_eq!(applied(&results[0]), ["ok g1 s2"]);
    }

    #[tokio::test]
    async fn a_failed_put_records_nothing_and_a_bulk_put_records_its_failed_items() {
        let (mut tx, mut st) = (FakeTx::default(), state());
        write(&mut tx, &mut st, put("x", None, 1)).await.unwrap();
        // A conflicting Put: failed, not recorded; the id stays free.
        let results = requests(
            &mut tx,
            &mut st,
            vec![(vec![put("x", None, 2)], request_id("p", 1, true))],
        )
        .await;
        assert_eq!(applied(&results[0]), ["conflict current=g1 body={\"n\":1}"]);
        assert!(tx.requests.is_empty());
        let x1 = Rev::next(None, false, &body(1));
        let results = requests(
            &mut tx,
            &mut st,
            vec![(vec![put("x", Some(&x1), 2)], request_id("p", 2, true))],
        )
        .await;
        assert_eq!(applied(&results[0]), ["ok g2 s2"]);

        // A BulkPut: its conflict and a rejected item are part of the reply.
        let mut bulk = request_id("b", 3, false);
        bulk.as_mut().unwrap().rejected = vec![(
            1,
            ItemReply::failed("bad".into(), &Error::invalid("docs[1].body", "missing")),
        )];
        let items = vec![put("new", None, 3), put("x", None, 4)];
        let results = requests(&mut tx, &mut st, vec![(items.clone(), bulk.clone())]).await;
        assert_eq!(
            applied(&results[0]),
            ["ok g1 s3", "conflict current=g2 body={\"n\":2}"]
        );
        let results = requests(&mut tx, &mut st, vec![(items, bulk)]).await;
        assert_eq!(
            replayed(&results[0]),
            ["new g1 s3 ", "bad g s0 invalid", "x g s0 conflict"]
        );
        assert_eq!(st.last_seq, 3);
    }

    #[tokio::test]
    async fn expired_request_ids_are_deleted_with_the_batch() {
        let (mut tx, mut st) = (FakeTx::default(), state());
        st.expire_requests_before = Some(500);
        write(&mut tx, &mut st, put("x", None, 1)).await.unwrap();
        assert_eq!(tx.tails[0].expire_requests_before, Some(500));
        write(&mut tx, &mut st, put("y", None, 1)).await.unwrap();
        assert_eq!(tx.tails[1].expire_requests_before, None, "once, when due");
    }
}
