//! A database's live documents as of one seq, streamed (the Snapshot RPC):
//! a backend reads them in one read transaction, on a thread or task of its
//! own, and hands them over in chunks through a small bounded channel, so
//! reading, encoding and the client's decoding overlap and a snapshot holds
//! a few chunks in memory whatever the database's size.
//!
//! The read transaction pins the storage at the snapshot's seq (SQLite
//! cannot restart its WAL past it, PostgreSQL cannot vacuum), so a
//! consumer that stops taking chunks for `stall` ends the snapshot: the
//! reader gives up, and the consumer gets [`Error::SnapshotStalled`] once it reads
//! again.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::domain::{Change, Error, Result};

/// Bytes of documents (ids, revisions, bodies) in one chunk, roughly.
const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks read ahead of the consumer.
const CHUNKS_AHEAD: usize = 2;

/// Where the snapshot was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHead {
    /// The highest seq committed when the snapshot was taken: every change
    /// up to it is in the snapshot, none after it.
    pub seq: u64,
    /// The `created_seq` of the database instance.
    pub created_seq: u64,
}

/// An open snapshot: its head, then its documents chunk by chunk.
pub struct Snapshot {
    pub head: SnapshotHead,
    chunks: mpsc::Receiver<Vec<Change>>,
    /// The seq of the last document handed out.
    handed: u64,
    /// The reader's outcome once it sent its last chunk; `None` once taken.
    reader: Option<Reader>,
    /// The store's `--max-snapshots` slot, held while the snapshot is open.
    _slot: Option<OwnedSemaphorePermit>,
}

impl Snapshot {
    /// The next live documents, in seq order; `None` once every document
    /// was handed out (and after an error).
    pub async fn next(&mut self) -> Result<Option<Vec<Change>>> {
        if let Some(chunk) = self.chunks.recv().await {
            self.handed = chunk.last().map_or(self.handed, |c| c.seq);
            return Ok(Some(chunk));
        }
        let Some(reader) = self.reader.take() else {
            return Ok(None);
        };
        match reader.await {
            Ok(()) => Ok(None),
            // Everything handed out reaches the client before this error:
            // it resumes after the last of it.
            Err(Error::SnapshotStalled { secs, .. }) => Err(Error::SnapshotStalled {
                secs,
                since: self.handed,
            }),
            Err(e) => Err(e),
        }
    }

    pub(super) fn hold(mut self, slot: OwnedSemaphorePermit) -> Self {
        self._slot = Some(slot);
        self
    }
}

/// A reader's end: where it reports the head, then sends its chunks.
pub(super) struct Feed {
    head: Option<oneshot::Sender<SnapshotHead>>,
    chunks: mpsc::Sender<Vec<Change>>,
    stall: Duration,
    pending: Vec<Change>,
    pending_bytes: usize,
}

impl Feed {
    /// Reports where the snapshot was taken; before any `push`.
    pub(super) fn head(&mut self, head: SnapshotHead) {
        if let Some(tx) = self.head.take() {
            let _ = tx.send(head);
        }
    }

    /// Adds one document; true when a chunk is full: `flush` it then.
    pub(super) fn push(&mut self, change: Change) -> bool {
        self.pending_bytes += change.id.as_str().len()
            + 48
            + change.body.as_ref().map_or(0, |b| b.canonical_json().len());
        self.pending.push(change);
        self.pending_bytes >= CHUNK_BYTES
    }

    /// Sends the documents pushed so far as one chunk (after the last
    /// `push` too). Fails when the consumer went away, or took no chunk for
    /// `stall`.
    pub(super) async fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        match tokio::time::timeout(self.stall, self.chunks.send(chunk)).await {
            Ok(Ok(())) => Ok(()),
            // The consumer is gone (the call ended): nobody hears this.
            Ok(Err(_)) => Err(Error::Unavailable(
                "the snapshot's consumer went away".into(),
            )),
            Err(_) => Err(Error::SnapshotStalled {
                secs: self.stall.as_secs(),
                since: 0,
            }),
        }
    }
}

/// A backend's reader: its outcome once it sent its last chunk.
pub(super) type Reader = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// A reader run as a tokio task.
pub(super) fn task(handle: JoinHandle<Result<()>>) -> Reader {
    Box::pin(async move {
        handle.await.unwrap_or_else(|e| {
            Err(Error::Storage(
                format!("the snapshot reader stopped: {e}").into(),
            ))
        })
    })
}

/// Starts a backend's reader with `spawn`, giving it the feed, and waits
/// for the head it reports; if it fails before that, its error.
pub(super) async fn start(stall: Duration, spawn: impl FnOnce(Feed) -> Reader) -> Result<Snapshot> {
    let (head_tx, head_rx) = oneshot::channel();
    let (chunks_tx, chunks) = mpsc::channel(CHUNKS_AHEAD);
    let mut reader = spawn(Feed {
        head: Some(head_tx),
        chunks: chunks_tx,
        stall,
        pending: Vec::new(),
        pending_bytes: 0,
    });
    match head_rx.await {
        Ok(head) => Ok(Snapshot {
            head,
            chunks,
            handed: 0,
            reader: Some(reader),
            _slot: None,
        }),
        Err(_) => match (&mut reader).await {
            Err(e) => Err(e),
            Ok(()) => Err(Error::Storage(
                "the snapshot reader ended without reporting its head".into(),
            )),
        },
    }
}
