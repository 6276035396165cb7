//! Every SQLite connection's settings, in one place, for both drivers: sqlx
//! (migrations, the read pool, the checkpointer) and rusqlite (the writer
//! and the replay readers). A connection is opened for a `Role`, and its
//! PRAGMAs come from `pragmas`, whichever driver opens it. Must not: set a
//! PRAGMA anywhere else (the checkpoints `writer` and the checkpointer run
//! are commands, not settings).

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;

use crate::domain::Result;
use crate::store::Durability;

/// How long a connection waits for a lock (a checkpoint, a backup, an
/// operator's `sqlite3` shell) before its statement fails.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// The writer's one connection: no automatic checkpoints (the writer
    /// and the checkpointer bound the WAL, see `writer::WalBound`).
    Writer,
    /// Creating and migrating the file, and the PASSIVE checkpointer.
    Maintenance,
    /// The read pool (sqlx, read-only): Gets, Changes, ListDatabases, the
    /// counters.
    Reader,
    /// A replay reader (rusqlite, read-only): reads the log in order, so a
    /// small page cache is enough.
    LogReader,
    /// A Snapshot stream's reader (rusqlite, read-only): reads a whole
    /// database once, so a small page cache and no mmap (mapped pages stay
    /// in the server's RSS: up to the map's 256 MiB per connection).
    SnapshotReader,
}

impl Role {
    fn read_only(self) -> bool {
        matches!(self, Role::Reader | Role::LogReader | Role::SnapshotReader)
    }
}

/// The PRAGMAs of a connection for `role`, in the order they are set.
pub(super) fn pragmas(role: Role, durability: Durability) -> Vec<(&'static str, &'static str)> {
    let synchronous = match (durability, role) {
        // The writer's commits are not fsynced by SQLite: with full
        // durability the syncer fsyncs the WAL off the writer's path, and a
        // batch is answered only after that (see `syncer`).
        (_, Role::Writer) | (Durability::Normal, _) => "NORMAL",
        (Durability::Full, _) => "FULL",
    };
    let mut pragmas = Vec::new();
    // WAL is a property of the file, set by the connections that may write
    // it; a read-only connection cannot set it (a file never served, such as
    // a fresh backup, is not in WAL mode yet, and reading it must work).
    if !role.read_only() {
        pragmas.push(("journal_mode", "WAL"));
    }
    pragmas.extend([
        ("synchronous", synchronous),
        ("foreign_keys", "ON"),
        // A 64 MiB page cache per connection (2 MiB for a replay or
        // snapshot reader, which read in order), and reads through mmap:
        // fewer syscalls and copies on large databases.
        (
            "cache_size",
            if matches!(role, Role::LogReader | Role::SnapshotReader) {
                "-2048"
            } else {
                "-65536"
            },
        ),
        (
            "mmap_size",
            if role == Role::SnapshotReader {
                "0"
            } else {
                "268435456"
            },
        ),
        ("temp_store", "MEMORY"),
    ]);
    if role == Role::Writer {
        pragmas.push(("wal_autocheckpoint", "0"));
    }
    pragmas
}

/// sqlx's options for a connection to `path` in `role`.
pub(super) fn sqlx_options(
    path: &Path,
    role: Role,
    durability: Durability,
) -> SqliteConnectOptions {
    use sqlx::ConnectOptions;
    let mut options = SqliteConnectOptions::new()
        .filename(path)
        .busy_timeout(BUSY_TIMEOUT)
        .read_only(role.read_only())
        .create_if_missing(role == Role::Maintenance)
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
    for (name, value) in pragmas(role, durability) {
        options = options.pragma(name, value);
    }
    options
}

/// A rusqlite connection to `path` in `role` (the file exists and is
/// migrated).
pub(super) fn rusqlite_connection(
    path: &Path,
    role: Role,
    durability: Durability,
) -> Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    let flags = if role.read_only() {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = rusqlite::Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let sql: String = pragmas(role, durability)
        .into_iter()
        .map(|(name, value)| format!("PRAGMA {name} = {value};"))
        .collect();
    conn.execute_batch(&sql)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sqlx and rusqlite link one SQLite library (libsqlite3-sys, bundled,
    /// one version in Cargo.lock), and a connection gets the same settings
    /// whichever driver opens it.
    #[tokio::test]
    async fn both_drivers_run_one_sqlite_with_the_same_settings() {
        use sqlx::{ConnectOptions, Row};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("settings.db");
        let mut by_sqlx = sqlx_options(&path, Role::Maintenance, Durability::Normal)
            .connect()
            .await
            .unwrap();
        let by_rusqlite =
            rusqlite_connection(&path, Role::Maintenance, Durability::Normal).unwrap();

        let version = "SELECT sqlite_version() AS v, sqlite_source_id() AS s";
        let row = sqlx::query(version).fetch_one(&mut by_sqlx).await.unwrap();
        let sqlx_library: (String, String) = (row.get("v"), row.get("s"));
        let rusqlite_library: (String, String) = by_rusqlite
            .query_row(version, [], |r| Ok((r.get("v")?, r.get("s")?)))
            .unwrap();
        assert_eq!(sqlx_library, rusqlite_library);
        assert_eq!(rusqlite_library.0, rusqlite::version());

        for pragma in [
            "journal_mode",
            "synchronous",
            "foreign_keys",
            "cache_size",
            "mmap_size",
            "temp_store",
            "wal_autocheckpoint",
            "busy_timeout",
        ] {
            let sql = format!("PRAGMA {pragma}");
            let by_sqlx: String = {
                let row = sqlx::query(&sql).fetch_one(&mut by_sqlx).await.unwrap();
                row.try_get::<String, _>(0)
                    .or_else(|_| row.try_get::<i64, _>(0).map(|v| v.to_string()))
                    .unwrap()
            };
            let by_rusqlite: String = by_rusqlite
                .query_row(&sql, [], |r| {
                    r.get::<_, String>(0)
                        .or_else(|_| r.get::<_, i64>(0).map(|v| v.to_string()))
                })
                .unwrap();
            assert_eq!(by_sqlx, by_rusqlite, "PRAGMA {pragma}");
        }
        // The values asked for (synchronous NORMAL = 1, temp_store MEMORY = 2).
        let synchronous: i64 = by_rusqlite
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(synchronous, 1);
        let writer = rusqlite_connection(&path, Role::Writer, Durability::Full).unwrap();
        let (synchronous, autocheckpoint): (i64, i64) = (
            writer
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .unwrap(),
            writer
                .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
                .unwrap(),
        );
        // NORMAL even with full durability: the syncer fsyncs for it.
        assert_eq!((synchronous, autocheckpoint), (1, 0));
        let reader = rusqlite_connection(&path, Role::Reader, Durability::Full).unwrap();
        let synchronous: i64 = reader
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(synchronous, 2);
    }
}
