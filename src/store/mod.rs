//! Durable storage on SQLite: a pool of read-only connections for reads and
//! one writer task (see `writer`) that owns the only write connection. All SQL
//! lives in this module; no sqlx type leaves it. Another sqlx backend
//! (PostgreSQL) would replace this module behind the same `Store` methods.

mod writer;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::domain::{
    Body, DatabaseInfo, DbName, DocId, DocWrite, Document, Error, Result, Rev, SyncKey,
    WriteOutcome,
};
use writer::{Command, Writer};

/// How hard a commit works to reach the disk (SQLite's `synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
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
}

/// The store: cheap to share behind an `Arc`.
pub struct Store {
    reader: SqlitePool,
    writer: mpsc::Sender<Command>,
    writer_task: Mutex<Option<JoinHandle<()>>>,
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Storage(Box::new(e))
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
    pub async fn open(options: StoreOptions) -> Result<Store> {
        let synchronous = match options.durability {
            Durability::Full => SqliteSynchronous::Full,
            Durability::Normal => SqliteSynchronous::Normal,
        };
        let base = SqliteConnectOptions::new()
            .filename(&options.path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(Duration::from_secs(10))
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));

        let mut write_conn = base.clone().create_if_missing(true).connect().await?;
        sqlx::migrate!("./migrations")
            .run_direct(&mut write_conn)
            .await?;
        let last_seq: i64 =
            sqlx::query_scalar("SELECT value FROM counters WHERE name = 'last_seq'")
                .fetch_one(&mut write_conn)
                .await?;

        let reader = SqlitePoolOptions::new()
            .max_connections(options.read_connections.max(1))
            .min_connections(1)
            .connect_with(base.read_only(true))
            .await?;

        let (tx, rx) = mpsc::channel(options.writer_queue.max(1));
        let writer = Writer::new(write_conn, rx, to_u64(last_seq), options.max_batch.max(1));
        let writer_task = tokio::spawn(writer.run());
        Ok(Store {
            reader,
            writer: tx,
            writer_task: Mutex::new(Some(writer_task)),
        })
    }

    /// Stops taking writes, lets the writer commit what is queued, checkpoints
    /// the WAL and closes every connection. Idempotent.
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.writer.send(Command::Shutdown { reply }).await.is_ok() {
            let _ = done.await;
        }
        let task = self.writer_task.lock().await.take();
        if let Some(task) = task
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "writer task failed");
        }
        self.reader.close().await;
    }

    async fn send<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Command) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let shutting_down = || Error::Unavailable("the server is shutting down".into());
        self.writer
            .send(make(reply))
            .await
            .map_err(|_| shutting_down())?;
        rx.await.map_err(|_| shutting_down())?
    }

    pub async fn create_database(&self, name: DbName, sync_key: SyncKey) -> Result<DatabaseInfo> {
        self.send(|reply| Command::CreateDatabase {
            name,
            sync_key,
            reply,
        })
        .await
    }

    pub async fn delete_database(&self, name: DbName) -> Result<()> {
        self.send(|reply| Command::DeleteDatabase { name, reply })
            .await
    }

    /// Writes one document.
    pub async fn write(&self, database: DbName, write: DocWrite) -> Result<WriteOutcome> {
        let mut results = self.write_many(database, vec![write]).await?;
        results
            .pop()
            .unwrap_or_else(|| Err(Error::Storage("the writer returned no result".into())))
    }

    /// Writes several documents in one transaction, each independently: one
    /// result per write, in order.
    pub async fn write_many(
        &self,
        database: DbName,
        writes: Vec<DocWrite>,
    ) -> Result<Vec<Result<WriteOutcome>>> {
        self.send(|reply| Command::Write {
            database,
            writes,
            reply,
        })
        .await
    }

    pub async fn list_databases(&self) -> Result<Vec<DatabaseInfo>> {
        let rows = sqlx::query(
            "SELECT name, sync_key, doc_count, update_seq FROM databases ORDER BY name",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(database_from_row).collect()
    }

    /// The current revision of a live document.
    pub async fn get(&self, database: &DbName, id: &DocId) -> Result<Document> {
        let row = sqlx::query(
            "SELECT d.rev, d.deleted, d.body, d.seq
             FROM databases db LEFT JOIN docs d ON d.db_id = db.id AND d.id = ?2
             WHERE db.name = ?1",
        )
        .bind(database.as_str())
        .bind(id.as_str())
        .fetch_optional(&self.reader)
        .await?
        .ok_or_else(|| Error::DatabaseNotFound(database.to_string()))?;
        let rev: Option<String> = row.try_get("rev")?;
        let deleted: Option<bool> = row.try_get("deleted")?;
        match (rev, deleted) {
            (Some(rev), Some(false)) => Ok(Document {
                id: id.clone(),
                rev: parse_stored_rev(&rev)?,
                body: Body::from_canonical_json(row.try_get("body")?)?,
                seq: to_u64(row.try_get("seq")?),
            }),
            _ => Err(Error::DocumentNotFound {
                database: database.to_string(),
                id: id.to_string(),
            }),
        }
    }
}

fn database_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<DatabaseInfo> {
    let name: &str = row.try_get("name")?;
    let sync_key: &str = row.try_get("sync_key")?;
    Ok(DatabaseInfo {
        name: DbName::parse("stored name", name)?,
        sync_key: SyncKey::parse("stored sync_key", sync_key)?,
        doc_count: to_u64(row.try_get("doc_count")?),
        update_seq: to_u64(row.try_get("update_seq")?),
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
