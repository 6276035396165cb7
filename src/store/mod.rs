//! Durable storage on SQLite: a pool of read-only connections for reads and
//! one writer task (see `writer`) that owns the only write connection. All SQL
//! lives in this module; no sqlx type leaves it. Another sqlx backend
//! (PostgreSQL) would replace this module behind the same `Store` methods.

mod reader;
mod writer;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use futures_util::TryStreamExt;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row};
use tokio::sync::{Mutex, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use crate::domain::{
    Alias, Body, Change, DatabaseInfo, DbName, DocId, DocWrite, Document, Error, Event, Result,
    Rev, SyncKey, WriteOutcome,
};
use writer::{Command, Op, Outcome, Retention, WalBound, Writer};

/// Called by the writer with the events of each committed batch, in seq
/// order, before the writes are acknowledged. Must not block.
pub type Publisher = Arc<dyn Fn(&[Event]) + Send + Sync>;

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

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The SQLite file; created if missing.
    pub path: PathBuf,
    pub durability: Durability,
    /// Read connections in the pool.
    pub read_connections: u32,
    /// Write requests that may wait for the writer before callers block.
    pub writer_queue: usize,
    /// The most write requests committed in one transaction.
    pub max_batch: usize,
    /// How many of the newest events the log keeps for replay.
    pub retain_events: u64,
    /// Bytes of write requests (bodies, roughly) queued for or being
    /// committed by the writer; more callers wait for room.
    pub writer_queue_bytes: usize,
    /// The WAL is kept under this size: the writer restarts it between
    /// batches once it passes half of it, and batches are cut to a quarter.
    pub wal_max_bytes: u64,
    /// How long a read waits for a free connection before it fails with
    /// UNAVAILABLE (retryable).
    pub read_acquire_timeout: Duration,
}

/// The start of a Changes page: which instance of the database it reads.
#[derive(Debug, Clone, Copy)]
pub struct ChangesPage {
    /// The `created_seq` of the database instance.
    pub created_seq: u64,
}

/// Rows a read connection computes ahead of the task consuming them.
const READ_ROW_BUFFER: usize = 16;

/// The store: cheap to share behind an `Arc`.
pub struct Store {
    reader: SqlitePool,
    /// Scans (Changes, event replay, ListDatabases) hold one of these while
    /// they use a read connection: at most `read_connections - 1` at once
    /// (at least 1), so point reads are not queued behind scans (they still
    /// wait for `--read-timeout-secs` at most when every connection is busy).
    scans: Semaphore,
    /// Point reads, coalesced by `reader::dispatch`.
    gets: mpsc::Sender<reader::GetRequest>,
    /// Cancelled by `close`: stops the read dispatcher and the checkpointer.
    closed: CancellationToken,
    /// Cancelled when an essential task (writer, read dispatcher,
    /// checkpointer) died: the store can no longer serve.
    failed: CancellationToken,
    writer: mpsc::Sender<Command>,
    /// Bytes of requests queued for the writer (`writer_queue_bytes`).
    writer_bytes: Arc<Semaphore>,
    writer_queue_bytes: usize,
    /// Every task the store started, joined by `close`.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut => Error::Busy(
                "every read connection stayed busy (--read-connections); the server is overloaded"
                    .into(),
            ),
            sqlx::Error::PoolClosed => Error::Unavailable("the server is shutting down".into()),
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
    /// writer task.
    pub async fn open(options: StoreOptions, publish: Publisher) -> Result<Store> {
        let synchronous = match options.durability {
            Durability::Full => SqliteSynchronous::Full,
            Durability::Normal => SqliteSynchronous::Normal,
        };
        let base = SqliteConnectOptions::new()
            .filename(&options.path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(Duration::from_secs(10))
            // A 64 MiB page cache per connection, and reads through mmap:
            // fewer syscalls and copies on large databases.
            .pragma("cache_size", "-65536")
            .pragma("mmap_size", "268435456")
            .pragma("temp_store", "memory")
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));

        // No automatic checkpoints inside commits: the checkpointer task
        // copies the WAL back off the write path, and the writer restarts the
        // WAL itself between batches only when it passes its bound (see
        // `writer::WalBound`).
        let mut write_conn = base
            .clone()
            .create_if_missing(true)
            .pragma("wal_autocheckpoint", "0")
            .connect()
            .await?;
        sqlx::migrate!("./migrations")
            .run_direct(&mut write_conn)
            .await?;
        let (last_seq, pruned_through) = read_counters(&mut write_conn).await?;

        let reader = SqlitePoolOptions::new()
            .max_connections(options.read_connections.max(1))
            .min_connections(1)
            .acquire_timeout(options.read_acquire_timeout)
            .connect_with(
                // A scan's rows wait in this buffer while the handler
                // encodes: 16 rows of up to a document each, not sqlx's 50.
                base.clone()
                    .read_only(true)
                    .row_buffer_size(READ_ROW_BUFFER),
            )
            .await?;

        let (tx, rx) = mpsc::channel(options.writer_queue.max(1));
        let retention = Retention {
            keep: options.retain_events.max(1),
            pruned_through,
        };
        let wal = WalBound {
            path: wal_path(&options.path),
            max_bytes: options.wal_max_bytes.max(1),
            nudge: Arc::new(tokio::sync::Notify::new()),
        };
        let nudge = wal.nudge.clone();
        let writer = Writer::new(
            write_conn,
            rx,
            last_seq,
            options.max_batch.max(1),
            retention,
            wal,
            publish,
        )
        .await?;
        let (gets, gets_rx) = mpsc::channel(options.writer_queue.max(1));
        let closed = CancellationToken::new();
        let failed = CancellationToken::new();
        let checkpoint_conn = base.connect().await?;
        let tasks = vec![
            supervise("writer", failed.clone(), writer.run()),
            supervise(
                "checkpointer",
                failed.clone(),
                checkpointer(checkpoint_conn, nudge, closed.clone()),
            ),
            supervise(
                "read dispatcher",
                failed.clone(),
                reader::dispatch(reader.clone(), gets_rx, closed.clone()),
            ),
        ];
        let writer_queue_bytes = options.writer_queue_bytes.max(1);
        Ok(Store {
            reader,
            scans: Semaphore::new(options.read_connections.saturating_sub(1).max(1) as usize),
            gets,
            closed,
            failed,
            writer: tx,
            writer_bytes: Arc::new(Semaphore::new(writer_queue_bytes)),
            writer_queue_bytes,
            tasks: Mutex::new(tasks),
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

    /// Stops taking writes, lets the writer commit what is queued, checkpoints
    /// the WAL, joins every task of the store and closes every connection.
    /// Idempotent.
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
        self.reader.close().await;
    }

    /// A scan permit and a read connection in a read transaction.
    async fn scan(
        &self,
    ) -> Result<(
        tokio::sync::SemaphorePermit<'_>,
        sqlx::Transaction<'static, sqlx::Sqlite>,
    )> {
        let permit = self
            .scans
            .acquire()
            .await
            .map_err(|_| Error::Unavailable("the server is shutting down".into()))?;
        Ok((permit, self.reader.begin().await?))
    }

    /// Queues `op` for the writer, once its bytes fit in the writer queue's
    /// byte budget, and waits for the outcome.
    ///
    /// Only large ops (over `SMALL_OP` bytes) take from the byte budget: the
    /// budget is first come, first served, and a small Put must not wait
    /// behind a 16 MiB BulkPut for room it barely needs. Small ops are bounded
    /// by the calls in flight (`--max-in-flight`) and `--writer-queue`.
    async fn run(&self, op: Op) -> Result<Outcome> {
        const SMALL_OP: usize = 64 * 1024;
        let shutting_down = || {
            if self.failed.is_cancelled() {
                Error::Unavailable("the server cannot write any more and is stopping".into())
            } else {
                Error::Unavailable("the server is shutting down".into())
            }
        };
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
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Command::Run { op, reply, permit })
            .await
            .map_err(|_| shutting_down())?;
        rx.await.map_err(|_| shutting_down())?
    }

    pub async fn create_database(&self, name: DbName, sync_key: SyncKey) -> Result<DatabaseInfo> {
        match self.run(Op::CreateDatabase { name, sync_key }).await? {
            Outcome::Database(db) => Ok(db),
            _ => Err(unexpected()),
        }
    }

    /// Deletes a database; returns the seq of its deletion event.
    pub async fn delete_database(&self, name: DbName) -> Result<u64> {
        match self.run(Op::DeleteDatabase { name }).await? {
            Outcome::Deleted(seq) => Ok(seq),
            _ => Err(unexpected()),
        }
    }

    /// Writes one document.
    pub async fn write(&self, database: DbName, write: DocWrite) -> Result<WriteOutcome> {
        let mut results = self.write_many(database, vec![write]).await?;
        results.pop().unwrap_or_else(|| Err(unexpected()))
    }

    /// Writes several documents in one transaction, each independently: one
    /// result per write, in order.
    pub async fn write_many(
        &self,
        database: DbName,
        writes: Vec<DocWrite>,
    ) -> Result<Vec<Result<WriteOutcome>>> {
        match self.run(Op::Write { database, writes }).await? {
            Outcome::Written(results) => Ok(results),
            _ => Err(unexpected()),
        }
    }

    /// Logs an application's own notification; returns its seq.
    pub async fn notify(
        &self,
        sync_key: SyncKey,
        aliases: Vec<Alias>,
        attributes: BTreeMap<String, String>,
    ) -> Result<u64> {
        let op = Op::Notify {
            sync_key,
            aliases,
            attributes,
        };
        match self.run(op).await? {
            Outcome::Notified(seq) => Ok(seq),
            _ => Err(unexpected()),
        }
    }

    /// The highest committed seq.
    pub async fn last_seq(&self) -> Result<u64> {
        let (_permit, mut tx) = self.scan().await?;
        let (last_seq, _) = read_counters(&mut tx).await?;
        tx.commit().await?;
        Ok(last_seq)
    }

    /// The changes feed: documents changed after `since`, each once at its
    /// latest seq, in seq order, at most `limit`, handed one by one to
    /// `take`, which returns `Break` to end the page early (a response budget):
    /// rows are streamed, so a page never sits in memory twice.
    pub async fn changes(
        &self,
        database: &DbName,
        since: u64,
        limit: u32,
        include_docs: bool,
        mut take: impl FnMut(Change) -> Result<ControlFlow<()>>,
    ) -> Result<ChangesPage> {
        let (_permit, mut conn) = self.scan().await?;
        let (db_id, created_seq): (i64, i64) =
            sqlx::query_as("SELECT id, created_seq FROM databases WHERE name = ?1")
                .bind(database.as_str())
                .fetch_optional(&mut *conn)
                .await?
                .ok_or_else(|| Error::DatabaseNotFound(database.to_string()))?;
        {
            let mut rows = sqlx::query(
                "SELECT id, rev, seq, deleted, CASE WHEN ?4 AND NOT deleted THEN body END AS body
                 FROM docs WHERE db_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )
            .bind(db_id)
            .bind(to_i64(since))
            .bind(i64::from(limit))
            .bind(include_docs)
            .fetch(&mut *conn);
            while let Some(row) = rows.try_next().await? {
                let body: Option<&str> = row.try_get("body")?;
                let change = Change {
                    id: DocId::parse("stored id", row.try_get("id")?)?,
                    rev: parse_stored_rev(row.try_get("rev")?)?,
                    seq: to_u64(row.try_get("seq")?),
                    deleted: row.try_get("deleted")?,
                    body: body.map(Body::from_canonical_json).transpose()?,
                };
                if take(change)?.is_break() {
                    break;
                }
            }
        }
        conn.commit().await?;
        Ok(ChangesPage {
            created_seq: to_u64(created_seq),
        })
    }

    /// Reads up to `limit` logged events with seq > `after` for `keys`, and
    /// no more than `max_bytes` of them (`Event::approx_bytes`; at least one
    /// event), with the head and retention as of the same snapshot.
    pub async fn read_events(
        &self,
        keys: &[SyncKey],
        after: u64,
        limit: u32,
        max_bytes: usize,
    ) -> Result<EventPage> {
        let (_permit, mut conn) = self.scan().await?;
        let (head, pruned_through) = read_counters(&mut conn).await?;
        let mut query = sqlx::QueryBuilder::new(
            "SELECT seq, sync_key, database, doc_id, rev, deleted, aliases, attributes
             FROM events WHERE seq > ",
        );
        query.push_bind(to_i64(after)).push(" AND sync_key IN (");
        let mut keys_list = query.separated(", ");
        for key in keys {
            keys_list.push_bind(key.as_str());
        }
        query
            .push(") ORDER BY seq LIMIT ")
            .push_bind(i64::from(limit));
        let mut events = Vec::new();
        {
            let mut rows = query.build().fetch(&mut *conn);
            let mut bytes = 0;
            while let Some(row) = rows.try_next().await? {
                let event = event_from_row(&row)?;
                bytes += event.approx_bytes();
                events.push(event);
                if bytes >= max_bytes {
                    break;
                }
            }
        }
        conn.commit().await?;
        Ok(EventPage {
            events,
            head,
            pruned_through,
        })
    }

    pub async fn list_databases(&self) -> Result<Vec<DatabaseInfo>> {
        let (_permit, mut conn) = self.scan().await?;
        let rows = sqlx::query(
            "SELECT name, sync_key, doc_count, update_seq, created_seq FROM databases ORDER BY name",
        )
        .fetch_all(&mut *conn)
        .await?;
        conn.commit().await?;
        rows.iter().map(database_from_row).collect()
    }

    /// The current revision of a live document.
    pub async fn get(&self, database: &DbName, id: &DocId) -> Result<Document> {
        let (reply, rx) = oneshot::channel();
        let request = reader::GetRequest {
            database: database.clone(),
            id: id.clone(),
            reply,
        };
        let closing = || Error::Unavailable("the server is shutting down".into());
        self.gets.send(request).await.map_err(|_| closing())?;
        rx.await.map_err(|_| closing())?
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

/// The WAL file of the database at `path`, as SQLite names it.
fn wal_path(path: &std::path::Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// Copies committed WAL pages into the database file every second, on its
/// own connection, so the writer's own checkpoints (see `WalBound`) have
/// little left to copy. PASSIVE never blocks the writer or readers; pages
/// still in use by a reader are left for the next round.
/// The writer nudges it (`nudge`) after each batch while the WAL is past a
/// quarter of its bound: it then checkpoints back to back. Under sustained
/// writes that lets SQLite itself restart the WAL from its start whenever a
/// checkpoint catches up between two commits, and when the writer must
/// restart it (at half the bound) there is little left to copy, so its pause
/// is short. (Measured: with a 50 ms gap between checkpoints the writer's
/// pauses put update-64's p99 at 20 ms instead of 9.)
async fn checkpointer(
    mut conn: sqlx::SqliteConnection,
    nudge: Arc<tokio::sync::Notify>,
    closed: CancellationToken,
) -> Result<()> {
    const EVERY: Duration = Duration::from_secs(1);
    loop {
        tokio::select! {
            () = closed.cancelled() => break,
            () = tokio::time::sleep(EVERY) => {}
            () = nudge.notified() => {}
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut conn)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint failed; retrying in a second");
        }
    }
    let _ = sqlx::Connection::close(conn).await;
    Ok(())
}

fn unexpected() -> Error {
    Error::Storage("the writer answered with the wrong outcome".into())
}

async fn read_counters(conn: &mut sqlx::SqliteConnection) -> Result<(u64, u64)> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT name, value FROM counters WHERE name IN ('last_seq', 'pruned_through')",
    )
    .fetch_all(&mut *conn)
    .await?;
    let get = |name: &str| {
        rows.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| to_u64(*v))
            .ok_or_else(|| Error::Storage(format!("counter {name} is missing").into()))
    };
    Ok((get("last_seq")?, get("pruned_through")?))
}

fn event_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Event> {
    let optional = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let database: &str = row.try_get("database")?;
    let doc_id: &str = row.try_get("doc_id")?;
    let rev: &str = row.try_get("rev")?;
    let aliases: Vec<String> =
        serde_json::from_str(row.try_get("aliases")?).map_err(|e| Error::Storage(Box::new(e)))?;
    let attributes: BTreeMap<String, String> = serde_json::from_str(row.try_get("attributes")?)
        .map_err(|e| Error::Storage(Box::new(e)))?;
    Ok(Event {
        seq: to_u64(row.try_get("seq")?),
        sync_key: SyncKey::parse("stored sync_key", row.try_get("sync_key")?)?,
        database: optional(database)
            .map(|d| DbName::parse("stored database", &d))
            .transpose()?,
        id: optional(doc_id)
            .map(|d| DocId::parse("stored id", &d))
            .transpose()?,
        rev: optional(rev).map(|r| parse_stored_rev(&r)).transpose()?,
        deleted: row.try_get("deleted")?,
        aliases: Alias::parse_list("stored aliases", &aliases)?,
        attributes,
    })
}

fn database_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<DatabaseInfo> {
    let name: &str = row.try_get("name")?;
    let sync_key: &str = row.try_get("sync_key")?;
    Ok(DatabaseInfo {
        name: DbName::parse("stored name", name)?,
        sync_key: SyncKey::parse("stored sync_key", sync_key)?,
        doc_count: to_u64(row.try_get("doc_count")?),
        update_seq: to_u64(row.try_get("update_seq")?),
        created_seq: to_u64(row.try_get("created_seq")?),
    })
}

fn parse_stored_rev(s: &str) -> Result<Rev> {
    Rev::from_str(s).map_err(|why| Error::Storage(format!("stored revision: {why}").into()))
}

/// SQLite integers are i64; seqs and counts are never negative.
fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
