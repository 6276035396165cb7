//! The syncer (`--durability full`): the writer commits with
//! `synchronous=NORMAL` (no fsync) and hands each batch here; this thread
//! `fdatasync`s the WAL once for every batch queued by then, while the
//! writer already runs the next one, then marks them durable (`Gate`) and
//! passes them on to `deliver`, in commit order, to be published and
//! answered. A commit's fsync is off the writer's path, and still nothing
//! is acknowledged, published or shown to a reader before it is on disk.
//!
//! An fsync that fails ends the syncer, and with it the server: after a
//! failed fsync the kernel may have dropped the dirty pages, so nothing
//! after it can be trusted to be on disk (PostgreSQL's "fsyncgate").
//!
//! For the crash tests, `PowerLoss` stands in for a power cut: at the Nth
//! fsync it copies the store as a disk would hold it at that instant (the
//! database file and the part of the WAL the previous fsync covered) and
//! aborts the process.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::super::durable::Gate;
use super::writer::Delivery;
use crate::domain::{Error, Result};

/// Most batches covered by one fsync.
const MAX_PER_SYNC: usize = 256;

/// `--simulate-power-loss-at-sync N` (hidden; crash tests only).
#[derive(Debug, Clone)]
pub struct PowerLoss {
    /// The fsync (counting from 1) at which the power is cut.
    pub at: u64,
    /// The database file; the copy goes to `<db>.power-loss/`.
    pub db: PathBuf,
}

/// The WAL, opened on first use (it exists once the writer has committed).
struct Wal {
    path: PathBuf,
    file: Option<File>,
}

impl Wal {
    /// fsyncs the WAL; returns its length just before (all of which the
    /// fsync covered).
    fn sync(&mut self) -> Result<u64> {
        let file = match &mut self.file {
            Some(file) => file,
            None => {
                let file = File::open(&self.path).map_err(|e| io(&self.path, &e))?;
                // Its directory entry too, once: a new WAL file must
                // survive a power loss with its contents.
                let dir = super::dir_of(&self.path);
                super::fsync(dir).map_err(|e| io(dir, &e))?;
                self.file.insert(file)
            }
        };
        let len = file.metadata().map_err(|e| io(&self.path, &e))?.len();
        file.sync_data().map_err(|e| io(&self.path, &e))?;
        Ok(len)
    }
}

fn io(path: &Path, e: &std::io::Error) -> Error {
    Error::Storage(format!("fsync of {} failed: {e}", path.display()).into())
}

/// Runs until the writer is gone (its sender dropped), then ends, which
/// lets `deliver` end too.
pub(super) async fn run(
    wal_path: PathBuf,
    mut batches: mpsc::Receiver<Delivery>,
    deliver: mpsc::Sender<Delivery>,
    gate: Arc<Gate>,
    power_loss: Option<PowerLoss>,
) -> Result<()> {
    let mut wal = Wal {
        path: wal_path,
        file: None,
    };
    let (mut syncs, mut covered) = (0u64, 0u64);
    let mut pending = Vec::with_capacity(MAX_PER_SYNC);
    while batches.recv_many(&mut pending, MAX_PER_SYNC).await > 0 {
        if let Some(mark) = pending.iter().filter_map(Delivery::mark).next_back() {
            syncs += 1;
            if let Some(cut) = power_loss.as_ref().filter(|p| p.at == syncs) {
                cut.simulate(&wal.path, covered);
            }
            let started = std::time::Instant::now();
            covered = wal.sync().inspect_err(|e| {
                tracing::error!(error = %e, "the WAL could not be synced: stopping, since nothing written after this can be trusted to be on disk");
            })?;
            metrics::histogram!(crate::telemetry::WAL_SYNC_SECONDS)
                .record(started.elapsed().as_secs_f64());
            gate.synced(mark);
        }
        for delivery in pending.drain(..) {
            if deliver.send(delivery).await.is_err() {
                return Ok(()); // the store is closing
            }
        }
    }
    Ok(())
}

impl PowerLoss {
    /// Copies the database file and the first `wal_synced` bytes of the
    /// WAL (what the last fsync covered) to `<db>.power-loss/`, then aborts.
    fn simulate(&self, wal: &Path, wal_synced: u64) -> ! {
        let result = (|| -> std::io::Result<PathBuf> {
            let name = self.db.file_name().unwrap_or_default();
            let dir = PathBuf::from(format!("{}.power-loss", self.db.display()));
            std::fs::create_dir_all(&dir)?;
            std::fs::copy(&self.db, dir.join(name))?;
            let mut prefix = Vec::new();
            if let Ok(file) = File::open(wal) {
                file.take(wal_synced).read_to_end(&mut prefix)?;
            }
            let mut wal_name = name.to_owned();
            wal_name.push("-wal");
            File::create(dir.join(wal_name))?.write_all(&prefix)?;
            Ok(dir)
        })();
        match result {
            Ok(dir) => eprintln!(
                "agsync: simulated power loss at fsync {}: the store as the disk held it is in {}",
                self.at,
                dir.display()
            ),
            Err(e) => eprintln!("agsync: simulating a power loss failed: {e}"),
        }
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--db agsync.db` (a bare name): the WAL's directory is ".", not
    /// "", which cannot be opened (the first fsync failed and stopped the
    /// server).
    #[test]
    fn a_wal_beside_a_bare_file_name_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("agsync.db-wal");
        std::fs::write(&wal, b"frames").unwrap();
        assert_eq!(
            super::super::dir_of(Path::new("agsync.db-wal")),
            Path::new(".")
        );
        let mut synced = Wal {
            path: wal,
            file: None,
        };
        assert_eq!(synced.sync().unwrap(), 6);
    }
}
