//! `agsync backup`: a consistent copy of a live SQLite store, taken without
//! stopping the server. `VACUUM INTO` copies the database as of one read
//! transaction (one seq: every write committed before it began, nothing
//! after), compacted, into a new file next to the destination; the copy is
//! fsynced and then linked to the destination, which must not exist, so a
//! destination is never half written and never overwritten. Must not:
//! write to the source.

use std::path::{Path, PathBuf};

use rusqlite::OpenFlags;

use super::settings::{self, Role};
use crate::domain::{Error, Result};
use crate::store::{Counters, Durability, rows};

/// Copies the store at `source` to `dest` (a new file); returns the seq the
/// copy holds everything up to.
pub fn backup(source: &Path, dest: &Path) -> Result<u64> {
    if dest.exists() {
        return Err(Error::Config(format!(
            "{} already exists; a backup never overwrites a file: give a new name",
            dest.display()
        )));
    }
    if !source.exists() {
        return Err(Error::Config(format!(
            "{} does not exist; give the --db file the server runs on",
            source.display()
        )));
    }
    let partial = partial_name(dest);
    let _ = std::fs::remove_file(&partial);
    let copied = copy(source, &partial).and_then(|()| {
        // Durable before it gets its name: a crash leaves no torn backup.
        sync(&partial)?;
        std::fs::hard_link(&partial, dest)
            .map_err(|e| Error::Config(format!("cannot create {}: {e}", dest.display())))?;
        if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            sync(dir)?;
        }
        Ok(())
    });
    let _ = std::fs::remove_file(&partial);
    copied?;
    seq_of(dest)
}

/// `DEST.partial-PID`, in the destination's folder (so the link is on the
/// same file system).
fn partial_name(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(format!(".partial-{}", std::process::id()));
    PathBuf::from(name)
}

fn copy(source: &Path, into: &Path) -> Result<()> {
    // Read-only, never created: a wrong path is an error, not a new store.
    let conn = settings::rusqlite_connection(source, Role::LogReader, Durability::Full)?;
    debug_assert!(
        conn.is_readonly(rusqlite::DatabaseName::Main)
            .unwrap_or(true)
    );
    let target = into
        .to_str()
        .ok_or_else(|| Error::Config(format!("{} is not UTF-8", into.display())))?;
    conn.execute("VACUUM INTO ?1", [target]).map_err(|e| {
        Error::Config(format!(
            "cannot copy {} into {}: {e}",
            source.display(),
            into.display()
        ))
    })?;
    Ok(())
}

fn sync(path: &Path) -> Result<()> {
    super::fsync(path).map_err(|e| Error::Config(format!("cannot fsync {}: {e}", path.display())))
}

/// The last seq the copy at `path` holds.
fn seq_of(path: &Path) -> Result<u64> {
    let conn = rusqlite::Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut stmt = conn.prepare(crate::store::COUNTERS_SQL)?;
    let pairs = stmt
        .query([])?
        .mapped(|row| Ok(rows::counter(row)))
        .collect::<rusqlite::Result<Result<Vec<_>>>>()??;
    Ok(Counters::from_rows(&pairs)?.last_seq)
}
