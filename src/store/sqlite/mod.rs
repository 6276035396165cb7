//! The SQLite backend: a pool of read-only connections for reads (point
//! reads coalesced by `gets`), kept read-only rusqlite connections for
//! pages of the event log (`log`), and one writer thread (`writer`) that
//! owns the only write connection, with `deliver`, the task that publishes
//! and answers each committed batch, plus a PASSIVE checkpointer. Every
//! connection's settings come from `settings`. No sqlx or rusqlite type
//! leaves this module.

pub(super) mod backup;
mod log;
mod settings;
pub(super) mod syncer;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use futures_util::future::BoxFuture;
use sqlx::ConnectOptions;
use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::Durability;
use super::batch::{self, Retention};
use super::durable::Gate;
use super::gets::{self, GetRequest, PointReads};
use super::{
    COUNTERS_SQL, ChangesPage, ChangesQuery, Counters, EventPage, EventQuery, ReadPath,
    StoreOptions, TakeChange, rows, supervise, to_i64,
};
use crate::domain::{DatabaseInfo, DbName, DocId, Document, Error, Result};
use settings::Role;
use writer::{WalBound, Writer};

/// Rows a read connection computes ahead of the task consuming them.
const READ_ROW_BUFFER: usize = 16;

/// The read side: the pool, the scan permits and the Get dispatcher.
pub(super) struct Reads {
    reader: SqlitePool,
    /// Scans (Changes, event replay, ListDatabases, the counters) hold one
    /// of these while they read (on a pool connection, or a log reader for
    /// replay): at most `read_connections - 1` at once (at least 1), so point
    /// reads are not queued behind scans (they still wait for
    /// `--read-timeout-secs` at most when every connection is busy).
    scans: Semaphore,
    /// Point reads, coalesced by `gets::dispatch`.
    gets: mpsc::Sender<GetRequest>,
    /// Event pages for replay (under a scan permit).
    log: Arc<log::LogReaders>,
}

/// Opens (creating if needed) and migrates the file, then starts the
/// writer (on a thread of its own), the delivery task, the checkpointer and
/// the read dispatcher.
pub(super) async fn open(
    path: &std::path::Path,
    options: &StoreOptions,
    wiring: super::Wiring,
) -> Result<super::Opened> {
    // The file is created and migrated through sqlx; the writer then opens
    // its own connection (rusqlite). Every connection's PRAGMAs come from
    // `settings`.
    let durability = options.durability;
    let mut setup_conn = settings::sqlx_options(path, Role::Maintenance, durability)
        .connect()
        .await?;
    sqlx::migrate!("./migrations/sqlite")
        .run_direct(&mut setup_conn)
        .await?;
    let Counters {
        last_seq,
        pruned_through,
    } = read_counters(&mut setup_conn).await?;
    sqlx::Connection::close(setup_conn).await?;
    let write_conn = settings::rusqlite_connection(path, Role::Writer, durability)?;
    // Every statement of a batch stays prepared (about sixteen of them).
    write_conn.set_prepared_statement_cache_capacity(32);

    let reader = SqlitePoolOptions::new()
        .max_connections(options.read_connections.max(1))
        .min_connections(1)
        .acquire_timeout(options.read_acquire_timeout)
        .connect_with(
            // A scan's rows wait in this buffer while the handler encodes:
            // 16 rows of up to a document each, not sqlx's 50.
            settings::sqlx_options(path, Role::Reader, durability).row_buffer_size(READ_ROW_BUFFER),
        )
        .await?;

    let retention = Retention {
        keep: options.retain_events.max(1),
        pruned_through,
    };
    let long_reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let wal = WalBound {
        path: wal_path(path),
        max_bytes: options.wal_max_bytes.max(1),
        nudge: Arc::new(tokio::sync::Notify::new()),
        long_reads: long_reads.clone(),
    };
    let nudge = wal.nudge.clone();
    let (deliveries, deliveries_rx) = mpsc::channel(writer::DELIVERY_QUEUE);
    // With full durability the writer commits without an fsync and its
    // batches go through the syncer, which fsyncs the WAL before passing
    // them on to `deliver` (see `syncer`).
    let (gate, to_syncer) = match durability {
        Durability::Full => {
            sync_files(path)?;
            let (tx, rx) = mpsc::channel(writer::DELIVERY_QUEUE);
            (Some(Arc::new(Gate::new(last_seq))), Some((tx, rx)))
        }
        Durability::Normal => (None, None),
    };
    let (writer_deliveries, syncer_input) = match to_syncer {
        Some((tx, rx)) => (tx, Some(rx)),
        None => (deliveries.clone(), None),
    };
    let expiry = batch::RequestExpiry::new(options.request_id_retention);
    let (writable_tx, writable) = tokio::sync::watch::channel(true);
    let writer = Writer::new(
        write_conn,
        last_seq,
        retention,
        wal,
        writer::Outlet {
            deliveries: writer_deliveries,
            gate: gate.clone(),
        },
        expiry,
        writable_tx,
    )?;
    let (gets, gets_rx) = mpsc::channel(options.writer_queue.max(1));
    let (closed, failed) = (wiring.closed, wiring.failed);
    let checkpoint_conn = settings::sqlx_options(path, Role::Maintenance, durability)
        .connect()
        .await?;
    let mut tasks = vec![
        supervise(
            "writer",
            failed.clone(),
            super::on_own_thread(
                "agsync-writer",
                batch::serve(writer, wiring.writer, options.max_batch.max(1)),
            ),
        ),
        supervise(
            "delivery",
            failed.clone(),
            writer::deliver(deliveries_rx, wiring.publish),
        ),
        supervise(
            "checkpointer",
            failed.clone(),
            checkpointer(checkpoint_conn, nudge, closed.clone()),
        ),
        supervise(
            "read dispatcher",
            failed.clone(),
            gets::dispatch(SqliteGets(reader.clone()), gets_rx, closed.clone()),
        ),
    ];
    if let (Some(gate), Some(batches)) = (&gate, syncer_input) {
        tasks.push(supervise(
            "syncer",
            failed.clone(),
            super::on_own_thread(
                "agsync-syncer",
                syncer::run(
                    wal_path(path),
                    batches,
                    deliveries,
                    gate.clone(),
                    options.power_loss.clone(),
                ),
            ),
        ));
    } else {
        drop(deliveries);
    }
    let (_, reachable) = tokio::sync::watch::channel(true);
    Ok(super::Opened {
        reads: Box::new(Reads {
            reader,
            scans: Semaphore::new(options.read_connections.saturating_sub(1).max(1) as usize),
            gets,
            log: log::LogReaders::new(path.to_owned(), durability, long_reads),
        }),
        tasks,
        reachable,
        writable,
        gate,
    })
}

impl Reads {
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

    /// The highest committed seq, and the seq the log is pruned through.
    pub(super) async fn counters(&self) -> Result<Counters> {
        let (_permit, mut tx) = self.scan().await?;
        let counters = read_counters(&mut tx).await?;
        tx.commit().await?;
        Ok(counters)
    }

    /// The changes feed: documents changed after `since`, each once at its
    /// latest seq, in seq order, at most `limit`, handed one by one to
    /// `take`, which returns `Break` to end the page early (a response budget):
    /// rows are streamed, so a page never sits in memory twice.
    pub(super) async fn changes(
        &self,
        ChangesQuery {
            database,
            since,
            limit,
            include_docs,
        }: ChangesQuery<'_>,
        take: &mut TakeChange<'_>,
    ) -> Result<ChangesPage> {
        let (_permit, mut conn) = self.scan().await?;
        let found = sqlx::query("SELECT id, created_seq FROM databases WHERE name = ?1")
            .bind(database.as_str())
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| Error::DatabaseNotFound(database.to_string()))?;
        let (db_id, created_seq) = rows::instance(&found)?;
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
                if take(rows::change(&row)?)?.is_break() {
                    break;
                }
            }
        }
        conn.commit().await?;
        Ok(ChangesPage { created_seq })
    }

    /// Reads up to `limit` logged events with seq > `after` for `keys`, and
    /// no more than `max_bytes` of them (`Event::approx_bytes`; at least one
    /// event), with the head and retention as of the same snapshot.
    pub(super) async fn read_events(&self, query: EventQuery<'_>) -> Result<EventPage> {
        let EventQuery {
            keys,
            after,
            limit,
            max_bytes,
        } = query;
        let _permit = self
            .scans
            .acquire()
            .await
            .map_err(|_| Error::Unavailable("the server is shutting down".into()))?;
        let (log, keys) = (self.log.clone(), keys.to_vec());
        tokio::task::spawn_blocking(move || log.read_events(&keys, after, limit, max_bytes))
            .await
            .map_err(|e| Error::Storage(Box::new(e)))?
    }

    /// A database's live documents as of one seq, read in one read
    /// transaction on a connection of its own (rusqlite), on a thread of its
    /// own at a lower CPU priority (`log::LogReaders::snapshot`). Not under
    /// a scan permit: `Store` bounds snapshots itself.
    pub(super) async fn snapshot(
        &self,
        database: &DbName,
        stall: Duration,
    ) -> Result<super::Snapshot> {
        let (log, name) = (self.log.clone(), database.clone());
        let runtime = tokio::runtime::Handle::current();
        super::snapshot::start(stall, move |feed| {
            let (done, outcome) = tokio::sync::oneshot::channel();
            let spawned = std::thread::Builder::new()
                .name("agsync-snapshot".into())
                .spawn(move || {
                    let _ = done.send(log.snapshot(&name, feed, &runtime));
                });
            Box::pin(async move {
                spawned.map_err(|e| Error::Storage(Box::new(e)))?;
                outcome
                    .await
                    .unwrap_or_else(|_| Err(Error::Storage("the snapshot thread panicked".into())))
            })
        })
        .await
    }

    pub(super) async fn list_databases(&self) -> Result<Vec<DatabaseInfo>> {
        let (_permit, mut conn) = self.scan().await?;
        let rows = sqlx::query(
            "SELECT name, sync_key, doc_count, update_seq, created_seq FROM databases ORDER BY name",
        )
        .fetch_all(&mut *conn)
        .await?;
        conn.commit().await?;
        rows.iter().map(rows::database).collect()
    }

    /// The current revision of a live document.
    pub(super) async fn get(&self, database: &DbName, id: &DocId) -> Result<Document> {
        gets::get(&self.gets, database, id).await
    }
}

impl ReadPath for Reads {
    super::read_path_delegates!();

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.reader.close())
    }
}

/// SQLite's own errors (the writer's and the replay reader's connections),
/// like sqlx's (`store`): a storage failure.
impl From<rusqlite::Error> for Error {
    /// By cause: a full disk and a file locked by another process clear by
    /// themselves (the writer retries, the node stays up); the rest is a
    /// storage failure.
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode;
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => Error::StorageFull(format!("SQLite: {e}")),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Error::Busy(format!(
                "the database file is locked by another process (a backup or an sqlite3 shell?): {e}"
            )),
            Some(ErrorCode::SystemIoFailure) => Error::Unavailable(format!(
                "the server cannot write to its storage (I/O error: {e}); nothing of this request was applied"
            )),
            _ => Error::Storage(Box::new(e)),
        }
    }
}

/// fsyncs a file or directory (contents and metadata).
fn fsync(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// fsyncs the database file, its WAL and their directory: whatever a crash
/// left in the page cache is durable before anyone reads it. A file that
/// does not exist yet is skipped.
fn sync_files(path: &std::path::Path) -> Result<()> {
    let sync = |p: &std::path::Path| match fsync(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Storage(
            format!("fsync of {} failed: {e}", p.display()).into(),
        )),
        _ => Ok(()),
    };
    sync(path)?;
    sync(&wal_path(path))?;
    sync(dir_of(path))
}

/// The directory holding `path` ("." for a bare file name).
fn dir_of(path: &std::path::Path) -> &std::path::Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    }
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

async fn read_counters(conn: &mut sqlx::SqliteConnection) -> Result<Counters> {
    let found = sqlx::query(COUNTERS_SQL).fetch_all(&mut *conn).await?;
    let pairs = found
        .iter()
        .map(rows::counter)
        .collect::<Result<Vec<_>>>()?;
    Counters::from_rows(&pairs)
}

/// Coalesced Gets on the read pool (see `gets`).
#[derive(Clone)]
struct SqliteGets(SqlitePool);

impl PointReads for SqliteGets {
    type Conn = sqlx::pool::PoolConnection<sqlx::Sqlite>;

    async fn acquire(&self) -> Result<Self::Conn> {
        Ok(self.0.acquire().await?)
    }

    async fn read(conn: &mut Self::Conn, requests: &[GetRequest]) -> Result<Vec<Result<Document>>> {
        let mut query = sqlx::QueryBuilder::<sqlx::Sqlite>::new("WITH req (n, name, id) AS (");
        if requests.len() == 1 {
            // The common light-load case: a fixed text, so a cached statement.
            query.push("SELECT 0, ");
            query.push_bind(requests[0].database.as_str());
            query.push(", ");
            query.push_bind(requests[0].id.as_str());
        } else {
            query.push("VALUES ");
            let mut rows = query.separated(", ");
            for (n, request) in requests.iter().enumerate() {
                rows.push("(")
                    .push_bind_unseparated(i64::try_from(n).unwrap_or(i64::MAX))
                    .push_unseparated(", ")
                    .push_bind_unseparated(request.database.as_str())
                    .push_unseparated(", ")
                    .push_bind_unseparated(request.id.as_str())
                    .push_unseparated(")");
            }
        }
        query.push(
            ") SELECT req.n, db.id AS db_id, d.rev, d.deleted, d.body, d.seq FROM req \
             LEFT JOIN databases db ON db.name = req.name \
             LEFT JOIN docs d ON d.db_id = db.id AND d.id = req.id",
        );
        let found = query
            .build()
            .persistent(requests.len() == 1)
            .fetch_all(&mut **conn)
            .await?;
        gets::results(requests, &found)
    }
}
