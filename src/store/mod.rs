//! Durable storage on SQLite: a pool of read-only connections for reads and
//! one writer task (see `writer`) that owns the only write connection. All SQL
//! lives in this module; no sqlx type leaves it. Another sqlx backend
//! (PostgreSQL) would replace this module behind the same `Store` methods.

mod reader;
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

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::domain::{
    Alias, Body, Change, DatabaseInfo, DbName, DocId, DocWrite, Document, Error, Event, Result,
    Rev, SyncKey, WriteOutcome,
};
use writer::{Command, Op, Outcome, Retention, Writer};

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
    /// How many of the newest events the log keeps for replay.
    pub retain_events: u64,
}

/// The store: cheap to share behind an `Arc`.
pub struct Store {
    reader: SqlitePool,
    /// Point reads, coalesced by `reader::dispatch`.
    gets: mpsc::Sender<reader::GetRequest>,
    /// Cancelled by `close`: stops the read dispatcher.
    closed: tokio_util::sync::CancellationToken,
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

        // The writer never checkpoints: the checkpointer task does, off the
        // write path (see `checkpointer`).
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
            .connect_with(base.clone().read_only(true))
            .await?;

        let (tx, rx) = mpsc::channel(options.writer_queue.max(1));
        let retention = Retention {
            keep: options.retain_events.max(1),
            pruned_through,
        };
        let writer = Writer::new(
            write_conn,
            rx,
            last_seq,
            options.max_batch.max(1),
            retention,
            publish,
        )
        .await?;
        let writer_task = tokio::spawn(writer.run());
        let (gets, gets_rx) = mpsc::channel(options.writer_queue.max(1));
        let closed = tokio_util::sync::CancellationToken::new();
        let checkpoint_conn = base.connect().await?;
        tokio::spawn(checkpointer(checkpoint_conn, closed.clone()));
        tokio::spawn(reader::dispatch(reader.clone(), gets_rx, closed.clone()));
        Ok(Store {
            reader,
            gets,
            closed,
            writer: tx,
            writer_task: Mutex::new(Some(writer_task)),
        })
    }

    /// Stops taking writes, lets the writer commit what is queued, checkpoints
    /// the WAL and closes every connection. Idempotent.
    pub async fn close(&self) {
        self.closed.cancel();
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

    async fn run(&self, op: Op) -> Result<Outcome> {
        let (reply, rx) = oneshot::channel();
        let shutting_down = || Error::Unavailable("the server is shutting down".into());
        self.writer
            .send(Command::Run { op, reply })
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

    pub async fn delete_database(&self, name: DbName) -> Result<()> {
        match self.run(Op::DeleteDatabase { name }).await? {
            Outcome::Deleted => Ok(()),
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
        let mut conn = self.reader.acquire().await?;
        Ok(read_counters(&mut conn).await?.0)
    }

    /// The changes feed: documents changed after `since`, each once at its
    /// latest seq, in seq order, at most `limit`.
    pub async fn changes(
        &self,
        database: &DbName,
        since: u64,
        limit: u32,
        include_docs: bool,
    ) -> Result<Vec<Change>> {
        let mut conn = self.reader.begin().await?;
        let db_id: i64 = sqlx::query_scalar("SELECT id FROM databases WHERE name = ?1")
            .bind(database.as_str())
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| Error::DatabaseNotFound(database.to_string()))?;
        let rows = sqlx::query(
            "SELECT id, rev, seq, deleted, CASE WHEN ?4 AND NOT deleted THEN body END AS body
             FROM docs WHERE db_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )
        .bind(db_id)
        .bind(to_i64(since))
        .bind(i64::from(limit))
        .bind(include_docs)
        .fetch_all(&mut *conn)
        .await?;
        conn.commit().await?;
        rows.iter()
            .map(|row| {
                let body: Option<&str> = row.try_get("body")?;
                Ok(Change {
                    id: DocId::parse("stored id", row.try_get("id")?)?,
                    rev: parse_stored_rev(row.try_get("rev")?)?,
                    seq: to_u64(row.try_get("seq")?),
                    deleted: row.try_get("deleted")?,
                    body: body.map(Body::from_canonical_json).transpose()?,
                })
            })
            .collect()
    }

    /// Reads up to `limit` logged events with seq > `after` for `keys`, with
    /// the head and retention as of the same snapshot.
    pub async fn read_events(&self, keys: &[SyncKey], after: u64, limit: u32) -> Result<EventPage> {
        let mut conn = self.reader.begin().await?;
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
        let rows = query.build().fetch_all(&mut *conn).await?;
        conn.commit().await?;
        let events = rows.iter().map(event_from_row).collect::<Result<_>>()?;
        Ok(EventPage {
            events,
            head,
            pruned_through,
        })
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

/// Copies committed WAL pages into the database file every second, on its
/// own connection, so the writer's commits never wait for a checkpoint.
/// PASSIVE never blocks the writer or readers; pages still in use by a reader
/// are left for the next round.
async fn checkpointer(
    mut conn: sqlx::SqliteConnection,
    closed: tokio_util::sync::CancellationToken,
) {
    const EVERY: Duration = Duration::from_secs(1);
    loop {
        tokio::select! {
            () = closed.cancelled() => break,
            () = tokio::time::sleep(EVERY) => {}
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut conn)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint failed; retrying in a second");
        }
    }
    let _ = sqlx::Connection::close(conn).await;
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
