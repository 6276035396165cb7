//! Durable storage behind one interface, on one of two backends chosen by
//! `--db`: SQLite (a path or `sqlite:` URL, the embedded default) or
//! PostgreSQL (a `postgres://` URL, shared by several nodes). Writes go
//! through one writer per process (a thread of its own on SQLite, a task on
//! PostgreSQL), which batches queued requests into one transaction
//! (`batch`); reads go to the backend's `ReadPath`. The boundary is this
//! file: `Store` with its typed queries, `EventLog` (what the hub reads)
//! and `Publish` (where committed events go); `Store::open` is the only
//! place that picks a backend. No sqlx or rusqlite type leaves this module,
//! and nothing above it knows which backend it talks to.

mod batch;
mod durable;
mod gets;
mod postgres;
mod rows;
mod snapshot;
mod sqlite;

pub use snapshot::{Snapshot, SnapshotHead};
pub use sqlite::syncer::PowerLoss;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{Mutex, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::{
    Alias, Change, DatabaseInfo, DbName, DocId, DocWrite, Document, Error, Event, Idempotency,
    ItemReply, Result, Rev, SyncKey, WriteOutcome,
};
use batch::{Command, Op, Reply};

/// Where committed events go (the hub). Must not block.
pub trait Publish: Send + Sync {
    /// Called with committed events, in seq order, each once, before the
    /// writes are acknowledged (on SQLite a batch's events; on PostgreSQL
    /// what the tailer read, which a node's writer waits for, at most 2 s).
    fn publish(&self, events: &[Event]);
    /// Events up to `through` were pruned from the log before this node
    /// could publish them (a PostgreSQL node whose tailer fell behind the
    /// retention): they will never be published here, so nobody may be told
    /// that everything up to a seq in that range was delivered.
    fn lost(&self, through: u64);
}

/// The store's handle on the [`Publish`] side.
pub type Publisher = Arc<dyn Publish>;

/// What the hub asks of the event log: a page of events after a seq.
#[derive(Debug, Clone, Copy)]
pub struct EventQuery<'a> {
    /// Only events of these sync keys.
    pub keys: &'a [SyncKey],
    /// Only events with a seq above this one.
    pub after: u64,
    /// At most this many events...
    pub limit: u32,
    /// ...and no more than these bytes of them (`Event::approx_bytes`; at
    /// least one event).
    pub max_bytes: usize,
}

/// The durable event log as the hub reads it: replay after a `since`, and
/// catch-up after a subscriber's buffer overflowed. Its other half, the
/// live tail, is [`Publish`]. `Store` implements it; `hub`'s unit tests
/// drive `Subscription` with a fake one.
pub trait EventLog: Send + Sync + 'static {
    /// Reads up to `query.limit` logged events with seq > `query.after`
    /// for `query.keys`, in seq order, with the head and the retention as of
    /// the same snapshot.
    fn read_events(
        &self,
        query: EventQuery<'_>,
    ) -> impl std::future::Future<Output = Result<EventPage>> + Send;
}

/// The log's two counters, read in one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// The highest committed seq.
    pub last_seq: u64,
    /// Events up to this seq have been pruned.
    pub pruned_through: u64,
}

/// What a Changes page asks for.
#[derive(Debug, Clone, Copy)]
pub struct ChangesQuery<'a> {
    pub database: &'a DbName,
    /// Documents changed after this seq...
    pub since: u64,
    /// ...at most this many...
    pub limit: u32,
    /// ...with their bodies (live documents only) if set.
    pub include_docs: bool,
}

/// Takes the changes of a page one by one; `Break` ends the page early.
pub type TakeChange<'a> = dyn FnMut(Change) -> Result<ControlFlow<()>> + Send + 'a;

/// The read side of a backend: everything `Store` reads, implemented once
/// by SQLite and once by PostgreSQL. Writes go through the writer the
/// backend's `open` started (`batch::Engine` and `batch::Tx` are the write
/// side's traits); the live tail goes to [`Publish`]. Boxed futures, so
/// `Store` holds either backend behind one `Box<dyn ReadPath>`.
trait ReadPath: Send + Sync {
    /// The current revision of a live document.
    fn get<'a>(&'a self, database: &'a DbName, id: &'a DocId) -> BoxFuture<'a, Result<Document>>;
    /// The changes feed (see `Store::changes`).
    fn changes<'a>(
        &'a self,
        query: ChangesQuery<'a>,
        take: &'a mut TakeChange<'a>,
    ) -> BoxFuture<'a, Result<ChangesPage>>;
    /// A database's live documents as of one seq, streamed (see
    /// `snapshot`); a consumer that takes no chunk for `stall` ends it.
    fn snapshot<'a>(
        &'a self,
        database: &'a DbName,
        stall: Duration,
    ) -> BoxFuture<'a, Result<Snapshot>>;
    fn list_databases(&self) -> BoxFuture<'_, Result<Vec<DatabaseInfo>>>;
    fn counters(&self) -> BoxFuture<'_, Result<Counters>>;
    /// A page of the event log (see [`EventLog`]).
    fn read_events<'a>(&'a self, query: EventQuery<'a>) -> BoxFuture<'a, Result<EventPage>>;
    /// Sets the backend's own gauges for a metrics scrape.
    fn observe(&self) {}
    /// Closes every connection.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// The `ReadPath` methods every backend implements as its `Reads`'
/// inherent async methods of the same names, boxed (written once here).
macro_rules! read_path_delegates {
    () => {
        fn get<'a>(
            &'a self,
            database: &'a DbName,
            id: &'a DocId,
        ) -> BoxFuture<'a, Result<Document>> {
            Box::pin(Reads::get(self, database, id))
        }

        fn changes<'a>(
            &'a self,
            query: ChangesQuery<'a>,
            take: &'a mut TakeChange<'a>,
        ) -> BoxFuture<'a, Result<ChangesPage>> {
            Box::pin(Reads::changes(self, query, take))
        }

        fn snapshot<'a>(
            &'a self,
            database: &'a DbName,
            stall: Duration,
        ) -> BoxFuture<'a, Result<$crate::store::Snapshot>> {
            Box::pin(Reads::snapshot(self, database, stall))
        }

        fn list_databases(&self) -> BoxFuture<'_, Result<Vec<DatabaseInfo>>> {
            Box::pin(Reads::list_databases(self))
        }

        fn counters(&self) -> BoxFuture<'_, Result<Counters>> {
            Box::pin(Reads::counters(self))
        }

        fn read_events<'a>(&'a self, query: EventQuery<'a>) -> BoxFuture<'a, Result<EventPage>> {
            Box::pin(Reads::read_events(self, query))
        }
    };
}
use read_path_delegates;

/// What a write call got.
#[derive(Debug)]
pub enum Written {
    /// Executed now: one result per write sent, in order.
    Applied(Vec<Result<WriteOutcome>>),
    /// A retry of a request (same request_id, same request) that already
    /// succeeded: its reply as recorded then, one item per item of the
    /// request, rejected ones included. Nothing was written.
    Replayed(Vec<ItemReply>),
}

/// A page of the event log, read in one snapshot.
#[derive(Debug)]
pub struct EventPage {
    /// Events with seq > the requested one, for the requested keys, in seq order.
    pub events: Vec<Event>,
    /// The highest seq committed when the page was read.
    pub head: u64,
    /// Events up to this seq have been pruned.
    pub pruned_through: u64,
}

/// How hard a commit works to reach the disk (SQLite's `synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the WAL on every commit: an acknowledged write survives power loss.
    Full,
    /// fsync only at checkpoints: survives a process crash, but the last
    /// commits may be lost on power loss.
    Normal,
}

/// Where the data lives, from `--db`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file (created if missing).
    Sqlite(PathBuf),
    /// A PostgreSQL URL (`postgres://` or `postgresql://`).
    Postgres(String),
}

impl Location {
    /// `postgres://…` and `postgresql://…` are PostgreSQL; `sqlite:PATH`,
    /// `sqlite://PATH` and anything else is a SQLite file.
    pub fn parse(db: &str) -> Location {
        if db.starts_with("postgres://") || db.starts_with("postgresql://") {
            return Location::Postgres(db.to_owned());
        }
        let path = db
            .strip_prefix("sqlite://")
            .or_else(|| db.strip_prefix("sqlite:"))
            .unwrap_or(db);
        Location::Sqlite(PathBuf::from(path))
    }

    /// The SQLite file, if the data is in one.
    pub fn sqlite_path(&self) -> Option<&std::path::Path> {
        match self {
            Location::Sqlite(path) => Some(path),
            Location::Postgres(_) => None,
        }
    }

    /// Where the data lives, for logs: a PostgreSQL URL without its
    /// password.
    pub fn for_logs(&self) -> String {
        match self {
            Location::Sqlite(path) => path.display().to_string(),
            Location::Postgres(url) => match url.split_once('@') {
                Some((credentials, rest)) => {
                    let scheme_end = credentials.find("://").map_or(0, |i| i + 3);
                    let user = credentials[scheme_end..]
                        .split(':')
                        .next()
                        .unwrap_or_default();
                    format!("{}{user}@{rest}", &credentials[..scheme_end])
                }
                None => url.clone(),
            },
        }
    }
}

/// A path is parsed like the flag's text (a path may hold a URL).
impl From<PathBuf> for Location {
    fn from(path: PathBuf) -> Self {
        Location::parse(&path.to_string_lossy())
    }
}

impl From<String> for Location {
    fn from(text: String) -> Self {
        Location::parse(&text)
    }
}

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub location: Location,
    pub durability: Durability,
    /// Read connections in the pool (SQLite).
    pub read_connections: u32,
    /// Write requests that may wait for the writer before callers block.
    pub writer_queue: usize,
    /// The most write requests committed in one transaction.
    pub max_batch: usize,
    /// How many of the newest events the log keeps for replay.
    pub retain_events: u64,
    /// Bytes of large write requests (over 64 KiB, bodies roughly) queued
    /// for or being committed by the writer; more callers wait for room.
    pub writer_queue_bytes: usize,
    /// The WAL is kept under this size (SQLite): the writer restarts it
    /// between batches once it passes half of it, and batches are cut to a
    /// quarter.
    pub wal_max_bytes: u64,
    /// How long a read waits for a free connection before it fails with
    /// UNAVAILABLE (retryable).
    pub read_acquire_timeout: Duration,
    /// Connections to PostgreSQL (reads and the writer).
    pub pg_pool_size: u32,
    /// How often a PostgreSQL node reads the event log when no wake-up hint
    /// arrived (the fallback for a missed NOTIFY).
    pub pg_poll_interval: Duration,
    /// How long a request_id's reply is kept (at least); older ones are
    /// deleted by the writer, a chunk at a time.
    pub request_id_retention: Duration,
    /// Snapshot streams served at once; more wait `read_acquire_timeout`
    /// for one to end, then fail with UNAVAILABLE.
    pub max_snapshots: usize,
    /// A snapshot whose consumer takes nothing for this long is ended.
    pub snapshot_stall: Duration,
    /// Crash tests only: cut the power at an fsync (SQLite, full durability).
    pub power_loss: Option<sqlite::syncer::PowerLoss>,
}

/// The start of a Changes page: which instance of the database it reads.
#[derive(Debug, Clone, Copy)]
pub struct ChangesPage {
    /// The `created_seq` of the database instance.
    pub created_seq: u64,
}

/// The store: cheap to share behind an `Arc`.
pub struct Store {
    reads: Box<dyn ReadPath>,
    /// Cancelled by `close`: stops the store's background tasks.
    closed: CancellationToken,
    /// Cancelled when an essential task died: the store can no longer serve.
    failed: CancellationToken,
    /// Whether the database answers (PostgreSQL can go away and come back;
    /// SQLite always does).
    reachable: watch::Receiver<bool>,
    /// Whether the writer's last batch committed (false while the disk is
    /// full or the file is locked by another process).
    writable: watch::Receiver<bool>,
    /// The durable watermark reads wait on (SQLite, full durability).
    gate: Option<Arc<durable::Gate>>,
    writer: mpsc::Sender<Command>,
    /// Bytes of large requests queued for the writer (`writer_queue_bytes`;
    /// see `run`).
    writer_bytes: Arc<Semaphore>,
    writer_queue_bytes: usize,
    /// Slots of `--max-snapshots`.
    snapshots: Arc<Semaphore>,
    max_snapshots: usize,
    snapshot_stall: Duration,
    read_acquire_timeout: Duration,
    /// Every task the store started, joined by `close`.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// What a backend's `open` hands back.
struct Opened {
    reads: Box<dyn ReadPath>,
    tasks: Vec<JoinHandle<()>>,
    reachable: watch::Receiver<bool>,
    writable: watch::Receiver<bool>,
    /// When commits become durable after they are visible (SQLite with
    /// full durability, see `durable`): what every read waits on.
    gate: Option<Arc<durable::Gate>>,
}

/// What every backend's `open` is given.
struct Wiring {
    writer: mpsc::Receiver<Command>,
    publish: Publisher,
    closed: CancellationToken,
    failed: CancellationToken,
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut => Error::Busy(
                "no database connection became free in time (--read-connections, --pg-pool-size); the server is overloaded"
                    .into(),
            ),
            sqlx::Error::PoolClosed => Error::Unavailable("the server is shutting down".into()),
            // PostgreSQL's disk_full: writes fail until its disk has room.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("53100") => {
                Error::StorageFull(format!("PostgreSQL: {}", db.message()))
            }
            e if postgres::is_disconnect(&e) => Error::Unavailable(format!(
                "the database cannot be reached ({e})"
            )),
            e => Error::Storage(Box::new(e)),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Error::Storage(Box::new(e))
    }
}

impl Store {
    /// Opens (creating if needed) and migrates the database, then starts the
    /// writer and the backend's other tasks: the one place that picks a
    /// backend. `publish` receives every committed event, in seq order.
    pub async fn open(options: StoreOptions, publish: Publisher) -> Result<Store> {
        let (tx, rx) = mpsc::channel(options.writer_queue.max(1));
        let wiring = Wiring {
            writer: rx,
            publish,
            closed: CancellationToken::new(),
            failed: CancellationToken::new(),
        };
        let (closed, failed) = (wiring.closed.clone(), wiring.failed.clone());
        let opened = match &options.location {
            Location::Sqlite(path) => sqlite::open(path, &options, wiring).await?,
            Location::Postgres(url) => postgres::open(url, &options, wiring).await?,
        };
        let writer_queue_bytes = options.writer_queue_bytes.max(1);
        Ok(Store {
            reads: opened.reads,
            closed,
            failed,
            reachable: opened.reachable,
            writable: opened.writable,
            gate: opened.gate,
            writer: tx,
            writer_bytes: Arc::new(Semaphore::new(writer_queue_bytes)),
            writer_queue_bytes,
            snapshots: Arc::new(Semaphore::new(options.max_snapshots.max(1))),
            max_snapshots: options.max_snapshots.max(1),
            snapshot_stall: options.snapshot_stall,
            read_acquire_timeout: options.read_acquire_timeout,
            tasks: Mutex::new(opened.tasks),
        })
    }

    /// Completes when an essential task of the store died (the writer could
    /// no longer commit, or a task panicked): the process should stop.
    pub async fn failed(&self) {
        self.failed.cancelled().await;
    }

    /// Whether an essential task died (see `failed`).
    pub fn has_failed(&self) -> bool {
        self.failed.is_cancelled()
    }

    /// Whether the database answers, updated as it goes away and comes
    /// back (health reports NOT_SERVING meanwhile).
    pub fn reachable(&self) -> watch::Receiver<bool> {
        self.reachable.clone()
    }

    /// Whether writes commit, updated as the disk fills and frees (health's
    /// `agsync.writes`, the `agsync_storage_writable` gauge).
    pub fn writable(&self) -> watch::Receiver<bool> {
        self.writable.clone()
    }

    /// Stops taking writes, lets the writer commit what is queued, joins
    /// every task of the store and closes every connection. Idempotent.
    pub async fn close(&self) {
        self.closed.cancel();
        let (reply, done) = oneshot::channel();
        if self.writer.send(Command::Shutdown { reply }).await.is_ok() {
            let _ = done.await;
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().await);
        for task in tasks {
            let _ = task.await;
        }
        self.reads.close().await;
    }

    /// Queues the op `make` builds around its reply for the writer, once its
    /// bytes fit in the writer queue's byte budget, and waits for the
    /// result.
    ///
    /// Only large ops (over `SMALL_OP` bytes) take from the byte budget: the
    /// budget is first come, first served, and a small Put must not wait
    /// behind a 16 MiB BulkPut for room it barely needs. Small ops are bounded
    /// by the calls in flight (`--max-in-flight`) and `--writer-queue`.
    async fn run<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T> {
        const SMALL_OP: usize = 64 * 1024;
        let shutting_down = || {
            if self.failed.is_cancelled() {
                Error::Unavailable("the server cannot write any more and is stopping".into())
            } else {
                Error::Unavailable("the server is shutting down".into())
            }
        };
        let (reply, rx) = oneshot::channel();
        let op = make(reply);
        let bytes = op.approx_bytes();
        let permit = if bytes > SMALL_OP {
            // A request bigger than the whole budget waits for all of it.
            let wanted = bytes.min(self.writer_queue_bytes);
            let permit = self
                .writer_bytes
                .clone()
                .acquire_many_owned(u32::try_from(wanted).unwrap_or(u32::MAX))
                .await
                .map_err(|_| shutting_down())?;
            Some(permit)
        } else {
            None
        };
        self.writer
            .send(Command::Run { op, permit })
            .await
            .map_err(|_| shutting_down())?;
        rx.await.map_err(|_| shutting_down())?
    }

    pub async fn create_database(&self, name: DbName, sync_key: SyncKey) -> Result<DatabaseInfo> {
        self.run(|reply| Op::CreateDatabase {
            name,
            sync_key,
            reply,
        })
        .await
    }

    /// Deletes a database; returns the seq of its deletion event.
    pub async fn delete_database(&self, name: DbName) -> Result<u64> {
        self.run(|reply| Op::DeleteDatabase { name, reply }).await
    }

    /// Writes one document (a Put or a Delete); with a request_id, a retry
    /// of a write that succeeded gets its recorded reply.
    pub async fn write(
        &self,
        database: DbName,
        write: DocWrite,
        request: Option<Idempotency>,
    ) -> Result<ItemReply> {
        let one = |n: usize| {
            Error::Storage(format!("the writer answered one write with {n} results").into())
        };
        match self.write_many(database, vec![write], request).await? {
            Written::Applied(mut results) if results.len() == 1 => results
                .pop()
                .ok_or_else(|| one(0))?
                .map(|out| ItemReply::written(&out)),
            Written::Replayed(mut items) if items.len() == 1 => items.pop().ok_or_else(|| one(0)),
            Written::Applied(r) => Err(one(r.len())),
            Written::Replayed(r) => Err(one(r.len())),
        }
    }

    /// Writes several documents in one transaction, each independently: one
    /// result per write, in order (or a retry's recorded reply).
    pub async fn write_many(
        &self,
        database: DbName,
        writes: Vec<DocWrite>,
        request: Option<Idempotency>,
    ) -> Result<Written> {
        self.run(|reply| Op::Write {
            database,
            writes,
            request,
            reply,
        })
        .await
    }

    /// Logs an application's own notification; returns its seq.
    pub async fn notify(
        &self,
        sync_key: SyncKey,
        aliases: Vec<Alias>,
        attributes: BTreeMap<String, String>,
    ) -> Result<u64> {
        self.run(|reply| Op::Notify {
            sync_key,
            aliases,
            attributes,
            reply,
        })
        .await
    }

    /// The highest committed seq.
    pub async fn last_seq(&self) -> Result<u64> {
        Ok(self.reads.counters().await?.last_seq)
    }

    /// The changes feed: documents changed after `since`, each once at its
    /// latest seq, in seq order, at most `limit`, handed one by one to
    /// `take`, which returns `Break` to end the page early (a response budget):
    /// rows are streamed, so a page never sits in memory twice.
    pub async fn changes(
        &self,
        query: ChangesQuery<'_>,
        mut take: impl FnMut(Change) -> Result<ControlFlow<()>> + Send,
    ) -> Result<ChangesPage> {
        let mut newest = None;
        let mut take = |change: Change| {
            newest = newest.max(Some(change.seq));
            take(change)
        };
        let page = self.reads.changes(query, &mut take).await;
        // The page is answered once everything in it is durable (an empty
        // one, or a missing database: once what was committed is).
        if let Some(gate) = &self.gate {
            match newest {
                Some(seq) => gate.until_seq(seq).await?,
                None => gate.until_now().await?,
            }
        }
        page
    }

    /// Every document live in `database` at one seq, the snapshot's head,
    /// streamed in chunks (in seq order) from one read transaction, once
    /// everything up to that seq is durable. At most `--max-snapshots` are
    /// open at once; a caller waits `--read-timeout-secs` for a slot, then
    /// gets UNAVAILABLE.
    pub async fn snapshot(&self, database: &DbName) -> Result<Snapshot> {
        let slot = tokio::time::timeout(
            self.read_acquire_timeout,
            self.snapshots.clone().acquire_owned(),
        )
        .await
        .map_err(|_| {
            Error::Busy(format!(
                "the server already streams {} snapshots, its limit (--max-snapshots), and none ended within --read-timeout-secs",
                self.max_snapshots
            ))
        })?
        .map_err(|_| Error::Unavailable("the server is shutting down".into()))?;
        let snapshot = self.reads.snapshot(database, self.snapshot_stall).await?;
        if let Some(gate) = &self.gate {
            gate.until_seq(snapshot.head.seq).await?;
        }
        Ok(snapshot.hold(slot))
    }

    /// Sets the store's gauges (queue depth, oldest replayable seq, pool
    /// connections) for a metrics scrape.
    pub async fn observe(&self) {
        use crate::telemetry::{OLDEST_REPLAYABLE_SEQ, STORAGE_WRITABLE, WRITER_QUEUE_DEPTH};
        let queued = self.writer.max_capacity() - self.writer.capacity();
        #[allow(clippy::cast_precision_loss)] // gauges of counts well below 2^52
        {
            metrics::gauge!(WRITER_QUEUE_DEPTH).set(queued as f64);
            metrics::gauge!(STORAGE_WRITABLE).set(f64::from(u8::from(*self.writable.borrow())));
            if let Ok(counters) = self.reads.counters().await {
                metrics::gauge!(OLDEST_REPLAYABLE_SEQ).set((counters.pruned_through + 1) as f64);
            }
        }
        self.reads.observe();
    }

    pub async fn list_databases(&self) -> Result<Vec<DatabaseInfo>> {
        let listed = self.reads.list_databases().await;
        if let Some(gate) = &self.gate {
            gate.until_now().await?;
        }
        listed
    }

    /// The current revision of a live document, once it is durable.
    pub async fn get(&self, database: &DbName, id: &DocId) -> Result<Document> {
        let found = self.reads.get(database, id).await;
        if let Some(gate) = &self.gate {
            match &found {
                Ok(doc) => gate.until_seq(doc.seq).await?,
                // Missing (or deleted) may be news a crash can take back.
                Err(Error::DocumentNotFound { .. } | Error::DatabaseNotFound(_)) => {
                    gate.until_now().await?;
                }
                Err(_) => {}
            }
        }
        found
    }
}

impl EventLog for Store {
    /// Events up to the durable watermark only: a replay never shows an
    /// event a crash can take back (those after it reach a subscriber live,
    /// once published).
    async fn read_events(&self, query: EventQuery<'_>) -> Result<EventPage> {
        let mut page = self.reads.read_events(query).await?;
        if let Some(gate) = &self.gate {
            let durable = gate.durable_seq();
            if let Some(past) = page.events.iter().position(|e| e.seq > durable) {
                page.events.truncate(past);
            }
            page.head = page.head.min(durable);
        }
        Ok(page)
    }
}

/// `agsync backup`: a consistent copy of the SQLite store at `location`
/// into `dest` (which must not exist), taken while a server runs on it;
/// returns the seq the copy holds everything up to. PostgreSQL has its own
/// tools (pg_dump), which the error names.
pub fn backup(location: &Location, dest: &std::path::Path) -> Result<u64> {
    match location {
        Location::Sqlite(path) => sqlite::backup::backup(path, dest),
        Location::Postgres(_) => Err(Error::Config(
            "agsync backup copies a SQLite store; back up PostgreSQL with pg_dump (see the README's \"Backup and restore\")".into(),
        )),
    }
}

/// Runs an essential task of the store: if it panics or fails, the store
/// is marked failed (the server then stops) instead of limping on.
fn supervise(
    name: &'static str,
    failed: CancellationToken,
    task: impl std::future::Future<Output = Result<()>> + Send + 'static,
) -> JoinHandle<()> {
    let inner = tokio::spawn(task);
    tokio::spawn(async move {
        let why = match inner.await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("the task panicked or was cancelled: {e}"),
        };
        tracing::error!(task = name, error = %why, "an essential task of the store died");
        failed.cancel();
    })
}

/// Runs `task` on a thread of its own, in a single-threaded runtime: for a
/// task that calls blocking code (the SQLite writer), so that it blocks no
/// request handler and never waits behind them for a worker.
async fn on_own_thread(
    name: &'static str,
    task: impl std::future::Future<Output = Result<()>> + Send + 'static,
) -> Result<()> {
    let (done, outcome) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .map_err(|e| Error::Storage(Box::new(e)))
                .and_then(|runtime| runtime.block_on(task));
            let _ = done.send(outcome);
        })
        .map_err(|e| Error::Storage(Box::new(e)))?;
    outcome
        .await
        .unwrap_or_else(|_| Err(Error::Storage(format!("the {name} thread panicked").into())))
}

/// Reads the `counters` rows [`Counters::from_rows`] takes (both backends).
const COUNTERS_SQL: &str =
    "SELECT name, value FROM counters WHERE name IN ('last_seq', 'pruned_through')";

impl Counters {
    /// From the `(name, value)` rows of `COUNTERS_SQL`.
    fn from_rows(rows: &[(String, i64)]) -> Result<Counters> {
        let get = |name: &str| {
            rows.iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| to_u64(*v))
                .ok_or_else(|| Error::Storage(format!("counter {name} is missing").into()))
        };
        Ok(Counters {
            last_seq: get("last_seq")?,
            pruned_through: get("pruned_through")?,
        })
    }
}

fn parse_stored_rev(s: &str) -> Result<Rev> {
    Rev::from_str(s).map_err(|why| Error::Storage(format!("stored revision: {why}").into()))
}

/// Stored integers are i64; seqs and counts are never negative.
fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
