//! The durable watermark: how far the store's writes are on disk, for
//! readers to wait on. With `--durability full` on SQLite the writer
//! commits without an fsync and a syncer thread `fdatasync`s the WAL while
//! the writer runs the next batch (`sqlite::syncer`); a batch is answered
//! and published only after the fsync that covers it, and every read waits
//! until what it saw is durable. So no client ever sees a write that a
//! power loss can still take back, and no seq a client saw is ever handed
//! out again.
//!
//! Two marks, both only growing:
//! - `announced`: batches the writer started (numbered before anything of
//!   them is visible to a reader, which SQLite makes it at COMMIT);
//! - `durable`: the batches (and the highest seq among them) covered by an
//!   fsync.
//!
//! A read that knows the seq of what it saw (a document, a Changes page)
//! waits for that seq; one that does not (a missing document, the list of
//! databases) waits for every batch started when it finished.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use crate::domain::{Error, Result};

/// What an fsync covered: batches through `batch`, seqs through `seq`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Mark {
    pub batch: u64,
    pub seq: u64,
}

pub(super) struct Gate {
    announced: AtomicU64,
    durable: watch::Sender<Mark>,
}

impl Gate {
    /// Everything already in the store (`seq` its last) is durable.
    pub(super) fn new(seq: u64) -> Gate {
        Gate {
            announced: AtomicU64::new(0),
            durable: watch::channel(Mark { batch: 0, seq }).0,
        }
    }

    /// The writer starts one more batch (before its COMMIT); returns its
    /// number. Every number announced is marked synced later, whether the
    /// batch committed or not.
    pub(super) fn announce(&self) -> u64 {
        self.announced.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The syncer's fsync covered everything up to `mark`.
    pub(super) fn synced(&self, mark: Mark) {
        self.durable.send_if_modified(|now| {
            let moved = mark.batch > now.batch;
            if moved {
                *now = mark;
            }
            moved
        });
    }

    /// The highest durable seq.
    pub(super) fn durable_seq(&self) -> u64 {
        self.durable.borrow().seq
    }

    /// Waits until `seq` is durable.
    pub(super) async fn until_seq(&self, seq: u64) -> Result<()> {
        self.until(|mark| mark.seq >= seq).await
    }

    /// Waits until every batch started by now (so every one whose data a
    /// read may have seen) is durable.
    pub(super) async fn until_now(&self) -> Result<()> {
        let announced = self.announced.load(Ordering::Acquire);
        self.until(|mark| mark.batch >= announced).await
    }

    async fn until(&self, done: impl FnMut(&Mark) -> bool) -> Result<()> {
        self.durable
            .subscribe()
            .wait_for(done)
            .await
            .map(|_| ())
            .map_err(|_| Error::Unavailable("the server is shutting down".into()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn reads_wait_for_the_fsync_that_covers_them() {
        let gate = Arc::new(Gate::new(10));
        // Already durable: no wait.
        gate.until_seq(10).await.unwrap();
        gate.until_now().await.unwrap();
        // Batch 1 (seqs 11-12) started, not yet synced.
        assert_eq!(gate.announce(), 1);
        let waiting_seq = tokio::spawn({
            let gate = gate.clone();
            async move { gate.until_seq(12).await }
        });
        let waiting_now = tokio::spawn({
            let gate = gate.clone();
            async move { gate.until_now().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting_seq.is_finished() && !waiting_now.is_finished());
        // A batch started later is not waited for by the reads that
        // started before it.
        assert_eq!(gate.announce(), 2);
        gate.synced(Mark { batch: 1, seq: 12 });
        waiting_seq.await.unwrap().unwrap();
        waiting_now.await.unwrap().unwrap();
        assert_eq!(gate.durable_seq(), 12);
        // Marks never move back.
        gate.synced(Mark { batch: 1, seq: 12 });
        gate.synced(Mark { batch: 0, seq: 3 });
        assert_eq!(gate.durable_seq(), 12);
        let after = tokio::spawn({
            let gate = gate.clone();
            async move { gate.until_now().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!after.is_finished(), "batch 2 is not synced yet");
        gate.synced(Mark { batch: 2, seq: 12 });
        after.await.unwrap().unwrap();
    }
}
