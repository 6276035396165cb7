//! How a node learns of every node's writes: it tails the `events` table in
//! seq order and publishes each event to its hub, once, in order. Wake-ups
//! come from this node's writer (after each commit), from the other nodes'
//! coalesced `NOTIFY` hints (`listen`), from `Link` when a call found
//! PostgreSQL gone (the tailer's read is the probe), and from a poll every
//! `--pg-poll-interval-ms`, so a hint lost while the listener reconnects only
//! delays events. The data itself is always read from the table.
//!
//! Invariant: `published` only grows, and every seq up to it was published
//! once (seqs are commit-ordered and gap-free, see the module above), or
//! was pruned before this node read it and reported with `Publish::lost`.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::super::rows::{self, Columns};
use super::super::{Publisher, to_i64, to_u64};
use super::{CHANNEL, Link};
use crate::domain::{Error, Result};

/// Events read per query.
const PAGE: i64 = 1000;
/// How long the tailer waits before retrying after PostgreSQL failed.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// How long the tailer waits for a connection before it calls PostgreSQL
/// unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads on a connection of its own, not the pool's: a pool full of busy
/// requests does not delay notifications, and a failed read or connect
/// means PostgreSQL is unreachable, not that the node is busy.
pub(super) struct Tailer {
    pub connect: PgConnectOptions,
    pub publish: Publisher,
    pub published: watch::Sender<u64>,
    /// Set up after each successful read, down after a failed one.
    pub link: Link,
    pub wake: Arc<Notify>,
    pub poll_every: Duration,
    pub closed: CancellationToken,
}

impl Tailer {
    pub(super) async fn run(self, mut last: u64) -> Result<()> {
        let mut conn = None;
        loop {
            let read = tokio::select! {
                () = self.closed.cancelled() => return Ok(()),
                read = self.read_after(&mut conn, last) => read,
            };
            match read {
                Ok((new_last, full)) => {
                    self.link.set(true, "");
                    last = new_last;
                    if full {
                        continue;
                    }
                    tokio::select! {
                        () = self.closed.cancelled() => return Ok(()),
                        () = self.wake.notified() => {}
                        () = tokio::time::sleep(self.poll_every) => {}
                    }
                }
                Err(e) => {
                    // A broken or unknown connection is never reused.
                    if let Some(conn) = conn.take() {
                        let _ = tokio::time::timeout(RETRY_AFTER, conn.close_hard()).await;
                    }
                    self.link.set(false, &e.to_string());
                    tokio::select! {
                        () = self.closed.cancelled() => return Ok(()),
                        () = tokio::time::sleep(RETRY_AFTER) => {}
                    }
                }
            }
        }
    }

    /// Publishes the events after `last`, one page, connecting first if
    /// `conn` is None, and reports a hole the retention left (`lost`);
    /// returns the new last seq and whether the page was full (more may be
    /// waiting).
    async fn read_after(&self, conn: &mut Option<PgConnection>, last: u64) -> Result<(u64, bool)> {
        let conn = match conn {
            Some(conn) => conn,
            None => {
                let connected = tokio::time::timeout(CONNECT_TIMEOUT, self.connect.connect())
                    .await
                    .map_err(|_| {
                        Error::Unavailable(format!("no connection within {CONNECT_TIMEOUT:?}"))
                    })??;
                conn.insert(connected)
            }
        };
        // One statement, so one snapshot: the pruning mark and the events
        // after `last` agree (the writer prunes and moves the mark in one
        // transaction). A mark past `last` means events this node never
        // published are gone: a hole its subscribers must hear of.
        let rows = sqlx::query(
            "SELECT c.value AS pruned_through,
                    e.seq, e.sync_key, e.database, e.doc_id, e.rev, e.deleted, e.aliases, e.attributes
             FROM counters c
             LEFT JOIN LATERAL (
                 SELECT seq, sync_key, database, doc_id, rev, deleted, aliases, attributes
                 FROM events WHERE seq > $1 ORDER BY seq LIMIT $2
             ) e ON true
             WHERE c.name = 'pruned_through'
             ORDER BY e.seq",
        )
        .bind(to_i64(last))
        .bind(PAGE)
        .fetch_all(&mut *conn)
        .await?;
        let pruned_through = match rows.first() {
            Some(row) => to_u64(row.int("pruned_through")?),
            None => return Err(Error::Storage("counter pruned_through is missing".into())),
        };
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.opt_int("seq")?.is_some() {
                events.push(rows::event(row)?);
            }
        }
        let full = events.len() as i64 == PAGE;
        let mut new_last = last;
        if pruned_through > last {
            tracing::warn!(
                published = last,
                pruned_through,
                "this node fell behind the event log's retention (--retain-events): events {}..={} were pruned before it published them; its subscribers end with OUT_OF_RANGE and resync",
                last + 1,
                pruned_through
            );
            self.publish.lost(pruned_through);
            new_last = pruned_through;
        }
        if let Some(seq) = events.last().map(|e| e.seq) {
            self.publish.publish(&events);
            new_last = seq;
        }
        if new_last != last {
            self.published.send_replace(new_last);
        }
        Ok((new_last, full))
    }
}

/// Listens for the other nodes' hints and wakes the tailer on each, and
/// after every reconnection (hints sent meanwhile are lost).
pub(super) async fn listen(
    pool: PgPool,
    wake: Arc<Notify>,
    closed: CancellationToken,
) -> Result<()> {
    loop {
        let mut listener = loop {
            let attempt = async {
                let mut listener = PgListener::connect_with(&pool).await?;
                listener.listen(CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            tokio::select! {
                () = closed.cancelled() => return Ok(()),
                result = attempt => match result {
                    Ok(listener) => break listener,
                    Err(_) => tokio::select! {
                        () = closed.cancelled() => return Ok(()),
                        () = tokio::time::sleep(RETRY_AFTER) => {}
                    },
                },
            }
        };
        wake.notify_one();
        loop {
            tokio::select! {
                () = closed.cancelled() => return Ok(()),
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => wake.notify_one(),
                    // The connection was lost (and re-established): what
                    // was sent meanwhile is gone, so look at the table.
                    Ok(None) => wake.notify_one(),
                    Err(_) => break,
                },
            }
        }
    }
}

/// Sends one `NOTIFY` per wake-up, outside any write transaction; wake-ups
/// that arrive while one is being sent are coalesced into the next.
pub(super) async fn notify_others(
    pool: PgPool,
    wake: Arc<Notify>,
    closed: CancellationToken,
) -> Result<()> {
    loop {
        tokio::select! {
            () = closed.cancelled() => return Ok(()),
            () = wake.notified() => {}
        }
        if let Err(e) = sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&pool)
            .await
        {
            tracing::debug!(error = %e, "NOTIFY failed; the other nodes will poll");
        }
    }
}
