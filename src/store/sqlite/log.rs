//! Pages of the event log for replay, read through SQLite's own API
//! (rusqlite) on a blocking thread: one hand-off per page. Through sqlx each
//! row crossed from its worker thread to the task (a channel send and, every
//! few rows, a wake-up), which measured as most of a replay's time.
//!
//! The connections are read-only and kept for reuse; there are at most as
//! many as scans run at once (`Reads::scans`), and each has a small page
//! cache: the log is read in order, through mmap.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use super::settings::{self, Role};

use super::super::rows::{self};
use super::super::snapshot::{Feed, SnapshotHead};
use super::super::{Durability, EventPage, to_i64};
use crate::domain::{DbName, Error, Result, SyncKey};

pub(super) struct LogReaders {
    path: PathBuf,
    durability: Durability,
    /// Connections not in use.
    idle: Mutex<Vec<Connection>>,
    /// Snapshots streaming now (the writer's checkpoints wait less for
    /// readers meanwhile, see `writer::WalBound`).
    long_reads: Arc<AtomicUsize>,
}

/// Counts a snapshot in `LogReaders::long_reads` while it lives.
struct LongRead<'a>(&'a AtomicUsize);

impl Drop for LongRead<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl LogReaders {
    pub(super) fn new(
        path: PathBuf,
        durability: Durability,
        long_reads: Arc<AtomicUsize>,
    ) -> Arc<Self> {
        Arc::new(LogReaders {
            path,
            durability,
            idle: Mutex::new(Vec::new()),
            long_reads,
        })
    }

    /// Up to `limit` events with seq > `after` for `keys`, and no more than
    /// `max_bytes` of them (at least one), with the head and retention as of
    /// the same snapshot. Blocks: call it on a blocking thread.
    pub(super) fn read_events(
        &self,
        keys: &[SyncKey],
        after: u64,
        limit: u32,
        max_bytes: usize,
    ) -> Result<EventPage> {
        let conn = self.take()?;
        let page = read_page(&conn, keys, after, limit, max_bytes);
        // A failed read leaves no transaction open (see `read_page`); the
        // connection is fine to reuse.
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
        page
    }

    /// Streams the live documents of `database` into `feed`, from one read
    /// transaction (see `store::snapshot`), on a connection of its own
    /// (`Role::SnapshotReader`: no mmap, a small cache; closed after, so a
    /// snapshot leaves nothing behind in memory). Blocks, and lowers the
    /// calling thread's CPU priority for good: call it on a thread of its
    /// own. `runtime` runs the feed's sends.
    pub(super) fn snapshot(
        &self,
        database: &DbName,
        feed: Feed,
        runtime: &tokio::runtime::Handle,
    ) -> Result<()> {
        self.long_reads.fetch_add(1, Ordering::AcqRel);
        let _counted = LongRead(&self.long_reads);
        lower_thread_priority();
        let conn =
            settings::rusqlite_connection(&self.path, Role::SnapshotReader, self.durability)?;
        conn.execute_batch("BEGIN")?;
        let streamed = stream_snapshot(&conn, database, feed, runtime);
        let end = conn.execute_batch("COMMIT");
        streamed?;
        end?;
        Ok(())
    }

    fn take(&self) -> Result<Connection> {
        let reused = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match reused {
            Some(conn) => Ok(conn),
            None => settings::rusqlite_connection(&self.path, Role::LogReader, self.durability),
        }
    }
}

fn read_page(
    conn: &Connection,
    keys: &[SyncKey],
    after: u64,
    limit: u32,
    max_bytes: usize,
) -> Result<EventPage> {
    conn.execute_batch("BEGIN")?;
    let page = read_in_snapshot(conn, keys, after, limit, max_bytes);
    // A read transaction: ending it cannot lose anything.
    let end = conn.execute_batch("COMMIT");
    let page = page?;
    end?;
    Ok(page)
}

fn read_in_snapshot(
    conn: &Connection,
    keys: &[SyncKey],
    after: u64,
    limit: u32,
    max_bytes: usize,
) -> Result<EventPage> {
    let counters = conn
        .prepare_cached(crate::store::COUNTERS_SQL)?
        .query([])?
        .mapped(|row| Ok(rows::counter(row)))
        .collect::<rusqlite::Result<Result<Vec<_>>>>()??;
    let crate::store::Counters {
        last_seq: head,
        pruned_through,
    } = crate::store::Counters::from_rows(&counters)?;

    // One statement per key count, kept prepared. (Not padded to a few
    // sizes: with one key, `IN (?)` is an equality and the key index gives
    // seq order; a padded list made SQLite sort every page.)
    let placeholders = (0..keys.len())
        .map(|i| format!("?{}", i + 3))
        .collect::<Vec<_>>()
        .join(", ");
    let mut select = conn.prepare_cached(&format!(
        "SELECT seq, sync_key, database, doc_id, rev, deleted, aliases, attributes
         FROM events WHERE seq > ?1 AND sync_key IN ({placeholders}) ORDER BY seq LIMIT ?2"
    ))?;
    select.raw_bind_parameter(1, to_i64(after))?;
    select.raw_bind_parameter(2, i64::from(limit))?;
    for (i, key) in keys.iter().enumerate() {
        select.raw_bind_parameter(i + 3, key.as_str())?;
    }
    let mut events = Vec::new();
    let mut bytes = 0;
    // Column names resolved once per page, not once per value.
    let columns = rows::ColumnMap::of(&select);
    let mut rows = select.raw_query();
    while let Some(row) = rows.next()? {
        let event = rows::event(&columns.on(row))?;
        bytes += event.approx_bytes();
        events.push(event);
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(EventPage {
        events,
        head,
        pruned_through,
    })
}

fn stream_snapshot(
    conn: &Connection,
    database: &DbName,
    mut feed: Feed,
    runtime: &tokio::runtime::Handle,
) -> Result<()> {
    let counters = conn
        .prepare_cached(crate::store::COUNTERS_SQL)?
        .query([])?
        .mapped(|row| Ok(rows::counter(row)))
        .collect::<rusqlite::Result<Result<Vec<_>>>>()??;
    let head = crate::store::Counters::from_rows(&counters)?.last_seq;
    let mut find = conn.prepare_cached("SELECT id, created_seq FROM databases WHERE name = ?1")?;
    let (db_id, created_seq) = find
        .query([database.as_str()])?
        .mapped(|row| Ok(rows::instance(row)))
        .next()
        .transpose()?
        .ok_or_else(|| Error::DatabaseNotFound(database.to_string()))??;
    feed.head(SnapshotHead {
        seq: head,
        created_seq,
    });
    let mut select = conn.prepare_cached(
        "SELECT id, rev, seq, deleted, body FROM docs
         WHERE db_id = ?1 AND NOT deleted ORDER BY seq",
    )?;
    select.raw_bind_parameter(1, db_id)?;
    let columns = rows::ColumnMap::of(&select);
    let mut rows = select.raw_query();
    while let Some(row) = rows.next()? {
        if feed.push(rows::change(&columns.on(row))?) {
            runtime.block_on(feed.flush())?;
        }
    }
    runtime.block_on(feed.flush())
}

/// Gives the calling thread a nice value of 10: a snapshot reading a large
/// database on a busy machine then takes the CPU the request threads leave,
/// instead of sharing it with small writes and reads equally. (Linux: a
/// nice value is a thread's own; an unprivileged thread cannot raise it
/// back, so the thread must be one of its own.) Best effort.
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take plain integers and touch no memory.
    unsafe {
        let tid = libc::gettid();
        #[allow(clippy::cast_sign_loss)] // a thread id is positive
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}
