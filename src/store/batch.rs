//! Group commit, the part both backends share. A backend's writer takes
//! every request queued on its channel (up to `max_batch`, and a byte bound)
//! and commits them in one transaction, so N concurrent writers pay for one
//! commit, not N. Within a batch the work is in memory: one query reads the
//! current revision of every document the batch touches, the requests are
//! checked and applied in order against that state (a later request sees an
//! earlier one's write), and the results are written with a few multi-row
//! statements. A backend supplies those statements (`Tx`) and what happens
//! around a commit (`Engine`); the revision rules, seq assignment and
//! counters live here once.
//!
//! Invariants: seqs are assigned in request order from `State::last_seq`,
//! and the `last_seq` counter is written in the same transaction; nothing is
//! answered before the commit returned; a storage failure fails the whole
//! batch.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

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

    /// The database the op names, if any.
    pub(super) fn database(&self) -> Option<&DbName> {
        match self {
            Op::CreateDatabase { name, .. } | Op::DeleteDatabase { name } => Some(name),
            Op::Write { database, .. } => Some(database),
            Op::Notify { .. } => None,
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

pub(super) type Reply = oneshot::Sender<Result<Outcome>>;

pub(super) enum Command {
    Run {
        op: Op,
        reply: Reply,
        /// The op's share of the writer queue's byte budget (large ops only),
        /// given back once it is answered.
        permit: Option<OwnedSemaphorePermit>,
    },
    /// Commit what is queued, close, then answer.
    Shutdown { reply: oneshot::Sender<()> },
}

/// A queued op with its reply and budget share.
pub(super) type Queued = (Op, Reply, Option<OwnedSemaphorePermit>);

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
}

/// A document's state as the batch sees it.
#[derive(Debug, Clone)]
pub(super) struct Current {
    pub rev: Rev,
    pub deleted: bool,
    pub seq: u64,
    /// Set when this batch wrote the document (the body is not stored yet).
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

/// The counters a batch ends with, written with its commit.
#[derive(Default)]
pub(super) struct Tail {
    /// Per database id: the change in live documents and the new update_seq.
    pub databases: Vec<(i64, i64, u64)>,
    pub last_db_id: Option<i64>,
    pub last_seq: Option<u64>,
    /// Delete events up to this seq (and record it).
    pub prune_through: Option<u64>,
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
    /// Deletes a database row and its documents.
    async fn delete_database(&mut self, id: i64) -> Result<()>;
    /// Writes the counters and commits.
    async fn finish(&mut self, tail: Tail) -> Result<()>;
}

/// What a backend does around the shared batching loop.
pub(super) trait Engine {
    /// Commits one batch and answers its requests; false if it failed.
    async fn commit(&mut self, ops: Vec<Queued>) -> bool;
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
                Command::Run { op, reply, permit } => ops.push((op, reply, permit)),
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
        if committed {
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

/// Splits queued ops into the ops, their replies and their permits.
pub(super) fn unzip(
    queued: Vec<Queued>,
) -> (Vec<Op>, Vec<Reply>, Vec<Option<OwnedSemaphorePermit>>) {
    let mut ops = Vec::with_capacity(queued.len());
    let mut replies = Vec::with_capacity(queued.len());
    let mut permits = Vec::with_capacity(queued.len());
    for (op, reply, permit) in queued {
        ops.push(op);
        replies.push(reply);
        permits.push(permit);
    }
    (ops, replies, permits)
}

/// Answers every request of a batch that failed.
pub(super) fn fail_all(replies: Vec<Reply>, error: impl Fn() -> Error) {
    for reply in replies {
        let _ = reply.send(Err(error()));
    }
}

/// Most events deleted in one batch, so pruning never stalls writers.
const PRUNE_CHUNK: u64 = 10_000;

/// Runs `ops` as one batch on `tx`, inside a transaction the caller began,
/// and commits it (`Tx::finish`). Returns one result per op and fills
/// `events` with what to publish. On error nothing is committed and `state`
/// must be thrown away (or restored) by the caller.
pub(super) async fn apply<T: Tx>(
    tx: &mut T,
    state: &mut State,
    ops: Vec<Op>,
    events: &mut Vec<Event>,
) -> Result<Vec<Result<Outcome>>> {
    let mut batch = Batch {
        tx,
        state,
        pending: Pending::default(),
        events,
    };
    let (seq_before, db_id_before) = (batch.state.last_seq, batch.state.last_db_id);
    batch.prefetch(&ops).await?;
    let mut results = Vec::with_capacity(ops.len());
    for (index, op) in ops.into_iter().enumerate() {
        let result = match op {
            Op::CreateDatabase { name, sync_key } => {
                batch.flush().await?;
                batch.create_database(name, sync_key).await
            }
            Op::DeleteDatabase { name } => {
                batch.flush().await?;
                batch.delete_database(&name).await
            }
            Op::Write { database, writes } => batch.write_docs(index, &database, writes).await,
            Op::Notify {
                sync_key,
                aliases,
                attributes,
            } => {
                let seq = batch.next_seq();
                batch.pending.events.push(Event {
                    seq,
                    sync_key,
                    database: None,
                    id: None,
                    rev: None,
                    deleted: false,
                    aliases,
                    attributes,
                });
                Ok(Outcome::Notified(seq))
            }
        };
        // Storage failures abort the whole batch (its transaction is rolled
        // back by the caller); everything else is the op's answer.
        match result {
            Err(e) if aborts_batch(&e) => return Err(e),
            other => results.push(other),
        }
    }
    batch.fill_conflicts(&mut results).await?;
    batch.flush().await?;
    let state = &mut *batch.state;
    let mut tail = Tail {
        databases: batch
            .pending
            .counters
            .iter()
            .map(|(id, (delta, seq))| (*id, *delta, *seq))
            .collect(),
        ..Tail::default()
    };
    tail.databases.sort_unstable_by_key(|(id, _, _)| *id);
    if state.last_db_id != db_id_before {
        tail.last_db_id = Some(state.last_db_id);
    }
    if state.last_seq != seq_before {
        tail.last_seq = Some(state.last_seq);
        tail.prune_through = prune_target(state);
        if let Some(through) = tail.prune_through {
            state.retention.pruned_through = through;
        }
    }
    batch.tx.finish(tail).await?;
    count_outcomes(&results);
    Ok(results)
}

/// Committed document writes and conflicts, for the metrics.
fn count_outcomes(results: &[Result<Outcome>]) {
    let (mut written, mut conflicts) = (0u64, 0u64);
    for result in results {
        if let Ok(Outcome::Written(items)) = result {
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
        Error::Storage(_) | Error::Unavailable(_) | Error::Busy(_)
    )
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
    counters: HashMap<i64, (i64, u64)>,
    /// Conflicts whose current document must be read after the batch:
    /// (op index, item index, database id).
    conflicts: Vec<(usize, usize, i64)>,
}

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

    /// Reads, in one query per database, the current revision of every
    /// document the batch's writes touch.
    async fn prefetch(&mut self, ops: &[Op]) -> Result<()> {
        let mut wanted: HashMap<i64, Vec<&DocId>> = HashMap::new();
        for op in ops {
            if let Op::Write { database, writes } = op
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

    /// Applies document writes in order, each on its own.
    async fn write_docs(
        &mut self,
        op_index: usize,
        database: &DbName,
        writes: Vec<DocWrite>,
    ) -> Result<Outcome> {
        let db = self
            .state
            .databases
            .get(database)
            .cloned()
            .ok_or_else(|| Error::DatabaseNotFound(database.to_string()))?;
        let mut results = Vec::with_capacity(writes.len());
        for (item, write) in writes.into_iter().enumerate() {
            let current = self.current(db.id, &write.id).await?;
            results.push(self.write_doc((op_index, item), database, &db, write, current));
        }
        Ok(Outcome::Written(results))
    }

    /// One document write against the batch's state: checks the revision,
    /// assigns the seq and records the row and event to write.
    fn write_doc(
        &mut self,
        (op_index, item): (usize, usize),
        database: &DbName,
        db: &DbRow,
        write: DocWrite,
        current: Option<Current>,
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
                    // The live body is in storage: read it after the batch.
                    self.pending.conflicts.push((op_index, item, db.id));
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
        let counters = self.pending.counters.entry(db.id).or_default();
        counters.0 += delta;
        counters.1 = seq;
        Ok(WriteOutcome {
            id: write.id,
            rev,
            seq,
        })
    }

    /// Puts the current live document into conflicts whose body is in
    /// storage (documents this batch did not write), reading them in one
    /// query per database.
    async fn fill_conflicts(&mut self, results: &mut [Result<Outcome>]) -> Result<()> {
        let conflicts = std::mem::take(&mut self.pending.conflicts);
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
            let ids: Vec<&DocId> = ids.iter().collect();
            for doc in self.tx.documents(db_id, &ids).await? {
                found.insert((db_id, doc.id.clone()), doc);
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
        self.events.extend(new_events);
        Ok(())
    }

    /// Creates a database instance with a new id (never reused). Its
    /// `created_seq` is the head seq at creation: a previous instance of the
    /// name ended with a deletion event, so every seq a client can hold from
    /// it is smaller.
    async fn create_database(&mut self, name: DbName, sync_key: SyncKey) -> Result<Outcome> {
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
        Ok(Outcome::Database(info))
    }

    /// Deletes a database and its documents, and logs the deletion as an
    /// event of its sync key, so subscribers learn of it (live or replayed).
    /// The batch forgets everything it knew of the database, counters
    /// included: a database created again in the same batch starts empty.
    async fn delete_database(&mut self, name: &DbName) -> Result<Outcome> {
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
        Ok(Outcome::Deleted(seq))
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

fn not_found(database: &DbName, id: &DocId) -> Error {
    Error::DocumentNotFound {
        database: database.to_string(),
        id: id.to_string(),
    }
}
