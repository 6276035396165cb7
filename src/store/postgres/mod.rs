//! The PostgreSQL backend: several agsync nodes share one database.
//!
//! - Writes: each node's writer batches its queued requests into one
//!   transaction (`writer`), like SQLite's. Every write transaction first
//!   locks the counter rows (`last_seq` among them) and holds them until it
//!   commits, so write transactions of all nodes run one after another:
//!   revision checks see every earlier commit (no lost update across nodes),
//!   and seqs are handed out in commit order.
//! - Notifications: the durable `events` table is the only data path. Each
//!   node tails it in seq order (`tail`) and publishes what it reads to its
//!   hub. Because seqs are commit-ordered, reading `seq > last` never skips
//!   a row that becomes visible later; events pruned before the tailer read
//!   them are reported to the hub (`Publish::lost`), never skipped silently.
//!   A writer wakes its own node's tailer directly and the other nodes with
//!   a coalesced `NOTIFY` (a hint only, sent outside the write transaction);
//!   a tailer also polls every `--pg-poll-interval-ms`, so a lost hint costs
//!   latency, never an event.
//! - Reachability (`Link`): the tailer reads on a connection of its own,
//!   which doubles as a health probe; any task that finds PostgreSQL gone
//!   marks the link down. While it is down, health says NOT_SERVING and
//!   calls fail at once with UNAVAILABLE instead of queueing for a
//!   connection that cannot come; the tailer's next successful read brings
//!   it back up.

mod tail;
mod writer;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use futures_util::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::{Notify, mpsc, watch};

use super::batch::Retention;
use super::gets::{self, GetRequest, PointReads};
use super::rows;
use super::{
    COUNTERS_SQL, ChangesPage, ChangesQuery, Counters, EventPage, EventQuery, ReadPath,
    StoreOptions, TakeChange, supervise, to_i64,
};
use crate::domain::{DatabaseInfo, DbName, DocId, Document, Error, Result};
use crate::telemetry::PG_POOL_CONNECTIONS;

/// The channel of the wake-up hint.
const CHANNEL: &str = "agsync_events";

/// Whether `e` means the database could not be reached (the server is down,
/// restarting or refusing connections): retryable, not a bug.
pub(super) fn is_disconnect(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 57P01-57P03: admin shutdown, crash
            // shutdown, cannot connect now; 53300: too many connections.
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
        }),
        _ => false,
    }
}

/// Whether PostgreSQL answers, as last seen by any of the node's tasks.
#[derive(Clone)]
pub(super) struct Link {
    up: Arc<watch::Sender<bool>>,
    /// Wakes the tailer, whose read probes PostgreSQL again.
    probe: Arc<Notify>,
    /// host:port/database, for messages (never the password).
    target: Arc<str>,
}

impl Link {
    /// `Unavailable` at once while PostgreSQL is known to be down.
    fn check(&self) -> Result<()> {
        if *self.up.borrow() {
            Ok(())
        } else {
            Err(self.down())
        }
    }

    fn down(&self) -> Error {
        Error::Unavailable(format!(
            "PostgreSQL at {} cannot be reached; the call was not attempted, nothing was applied",
            self.target
        ))
    }

    /// Records what a call's outcome says about PostgreSQL: a lost
    /// connection marks the link down (and has the tailer probe it); a pool
    /// timeout while it is down is that, not overload.
    fn observe<T>(&self, result: Result<T>) -> Result<T> {
        match result {
            Err(Error::Unavailable(why)) => {
                self.set(false, &why);
                Err(Error::Unavailable(why))
            }
            Err(Error::Busy(_)) if !*self.up.borrow() => Err(self.down()),
            result => result,
        }
    }

    /// Sets the link up or down; logs and wakes the tailer on a change.
    fn set(&self, up: bool, why: &str) {
        if self
            .up
            .send_if_modified(|now| std::mem::replace(now, up) != up)
        {
            if up {
                tracing::info!(postgres = %self.target, "PostgreSQL is reachable again");
            } else {
                tracing::error!(postgres = %self.target, error = why, "PostgreSQL is unreachable: calls fail with UNAVAILABLE until it is back");
                self.probe.notify_one();
            }
        }
    }

    /// Runs a call unless the link is down, and observes its outcome.
    async fn guard<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        self.check()?;
        self.observe(call.await)
    }

    /// `guard` for a call that may be abandoned midway (a read, or the
    /// writer's wait for a connection, before it sent anything): it ends
    /// with UNAVAILABLE as soon as any task of the node sees PostgreSQL
    /// gone (the LISTEN connection breaks at once when the server stops,
    /// and the tailer's read then fails), instead of waiting out the pool's
    /// connect retries (up to --read-timeout-secs).
    async fn guard_abandonable<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        self.check()?;
        let mut up = self.up.subscribe();
        tokio::select! {
            result = call => self.observe(result),
            Ok(_) = up.wait_for(|up| !*up) => Err(self.down()),
        }
    }

    /// A connection from `pool`, or UNAVAILABLE as soon as PostgreSQL is
    /// seen gone.
    pub(super) async fn acquire(
        &self,
        pool: &PgPool,
    ) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        self.guard_abandonable(async { Ok(pool.acquire().await?) })
            .await
    }
}

/// The read side: a pool shared with the writer.
pub(super) struct Reads {
    pool: PgPool,
    link: Link,
    /// Point reads, coalesced by `gets::dispatch`.
    gets: mpsc::Sender<GetRequest>,
}

/// Connects, migrates (sqlx takes an advisory lock, so nodes starting at
/// once do not race), then starts the writer, the tailer, the listener and
/// the notifier.
pub(super) async fn open(
    url: &str,
    options: &StoreOptions,
    wiring: super::Wiring,
) -> Result<super::Opened> {
    let connect = PgConnectOptions::from_str(url)
        .map_err(|e| Error::Config(format!("--db is not a valid PostgreSQL URL: {e}")))?
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
    // Never the password: host, port and database only.
    let target = format!(
        "{}:{}/{}",
        connect.get_host(),
        connect.get_port(),
        connect.get_database().unwrap_or("")
    );
    // sslmode=require and stricter: a failure to connect is a TLS failure
    // to report as one (prefer falls back to plaintext by itself).
    let tls_required = matches!(
        connect.get_ssl_mode(),
        PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull
    );
    let unreachable = |e: sqlx::Error| {
        if tls_required || matches!(e, sqlx::Error::Tls(_)) {
            Error::Config(format!(
                "cannot connect to PostgreSQL at {target} over TLS: {e}; the server must offer TLS \
                 (ssl = on) and its certificate must verify: check the URL's sslmode (disable, \
                 prefer, require, verify-ca, verify-full) and sslrootcert (the CA certificate that \
                 signed the server's certificate; verify-full also checks the host name)"
            ))
        } else {
            Error::Config(format!(
                "cannot connect to PostgreSQL at {target}: {e}; check that it runs and that --db is right"
            ))
        }
    };
    // One connection first, for the real reason if it fails (the pool
    // would retry a refused connection until its timeout and then only
    // say it timed out).
    let probe = tokio::time::timeout(options.read_acquire_timeout, connect.connect())
        .await
        .map_err(|_| {
            Error::Config(format!(
                "cannot connect to PostgreSQL at {target}: no answer within {:?}; check that it runs and that --db is right",
                options.read_acquire_timeout
            ))
        })?
        .map_err(unreachable)?;
    let _ = probe.close().await;
    let pool = PgPoolOptions::new()
        // The listener keeps one connection; the writer and readers share the rest.
        .max_connections(options.pg_pool_size.max(2) + 1)
        .acquire_timeout(options.read_acquire_timeout)
        .connect_with(connect.clone())
        .await
        .map_err(unreachable)?;
    sqlx::migrate!("./migrations/postgres")
        .run(&pool)
        .await
        .map_err(|e| Error::Config(format!("cannot migrate PostgreSQL at {target}: {e}")))?;
    let Counters {
        last_seq,
        pruned_through,
    } = read_counters(&pool).await.map_err(|e| match e {
        Error::Storage(why) => Error::Config(format!("cannot read PostgreSQL at {target}: {why}")),
        e => e,
    })?;
    tracing::info!(postgres = %target, last_seq, "PostgreSQL backend ready");

    let (closed, failed) = (wiring.closed, wiring.failed);
    let (reachable_tx, reachable) = watch::channel(true);
    let (published_tx, published) = watch::channel(last_seq);
    let wake_local = Arc::new(Notify::new());
    let link = Link {
        up: Arc::new(reachable_tx),
        probe: wake_local.clone(),
        target: target.into(),
    };
    let wake_others = Arc::new(Notify::new());
    let (writable_tx, writable) = watch::channel(true);
    let (gets, gets_rx) = mpsc::channel(options.writer_queue.max(1));
    let writer = writer::Writer {
        pool: pool.clone(),
        retention: Retention {
            keep: options.retain_events.max(1),
            pruned_through,
        },
        wake_local: wake_local.clone(),
        wake_others: wake_others.clone(),
        published,
        link: link.clone(),
        expiry: super::batch::RequestExpiry::new(options.request_id_retention),
        writable: writable_tx,
    };
    let tailer = tail::Tailer {
        connect,
        publish: wiring.publish,
        published: published_tx,
        link: link.clone(),
        wake: wake_local.clone(),
        poll_every: options.pg_poll_interval.max(Duration::from_millis(1)),
        closed: closed.clone(),
    };
    let tasks = vec![
        supervise(
            "writer",
            failed.clone(),
            super::batch::serve(writer, wiring.writer, options.max_batch.max(1)),
        ),
        supervise("event tailer", failed.clone(), tailer.run(last_seq)),
        supervise(
            "read dispatcher",
            failed.clone(),
            gets::dispatch(PgGets(pool.clone()), gets_rx, closed.clone()),
        ),
        supervise(
            "listener",
            failed.clone(),
            tail::listen(pool.clone(), wake_local, closed.clone()),
        ),
        supervise(
            "notifier",
            failed.clone(),
            tail::notify_others(pool.clone(), wake_others, closed.clone()),
        ),
    ];
    Ok(super::Opened {
        reads: Box::new(Reads { pool, link, gets }),
        tasks,
        reachable,
        writable,
        // PostgreSQL's commit is durable when it returns.
        gate: None,
    })
}

/// The id and created_seq of `database`'s current instance, or
/// DatabaseNotFound.
async fn find_instance(conn: &mut sqlx::PgConnection, database: &DbName) -> Result<(i64, u64)> {
    let found = sqlx::query("SELECT id, created_seq FROM databases WHERE name = $1")
        .bind(database.as_str())
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| Error::DatabaseNotFound(database.to_string()))?;
    rows::instance(&found)
}

async fn read_counters<'e>(conn: impl sqlx::PgExecutor<'e>) -> Result<Counters> {
    let found = sqlx::query(COUNTERS_SQL).fetch_all(conn).await?;
    let pairs = found
        .iter()
        .map(rows::counter)
        .collect::<Result<Vec<_>>>()?;
    Counters::from_rows(&pairs)
}

impl ReadPath for Reads {
    super::read_path_delegates!();

    /// The pool's connections in use and idle.
    fn observe(&self) {
        let idle = u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX);
        let in_use = self.pool.size().saturating_sub(idle);
        metrics::gauge!(PG_POOL_CONNECTIONS, "state" => "in_use").set(f64::from(in_use));
        metrics::gauge!(PG_POOL_CONNECTIONS, "state" => "idle").set(f64::from(idle));
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.pool.close())
    }
}

impl Reads {
    /// A read-only transaction on one snapshot.
    async fn read_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// The highest committed seq, and the seq the log is pruned through.
    pub(super) async fn counters(&self) -> Result<Counters> {
        self.link
            .guard_abandonable(async move { read_counters(&self.pool).await })
            .await
    }

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
        self.link.guard_abandonable(async move {
            let mut tx = self.read_tx().await?;
            let (db_id, created_seq) = find_instance(&mut tx, database).await?;
            {
                let mut rows = sqlx::query(
                    "SELECT id, rev, seq, deleted, CASE WHEN $4 AND NOT deleted THEN body END AS body
                     FROM docs WHERE db_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                )
                .bind(db_id)
                .bind(to_i64(since))
                .bind(i64::from(limit))
                .bind(include_docs)
                .fetch(&mut *tx);
                while let Some(row) = rows.try_next().await? {
                    if take(rows::change(&row)?)?.is_break() {
                        break;
                    }
                }
            }
            tx.commit().await?;
            Ok(ChangesPage {
                created_seq,
            })
        })
        .await
    }

    /// A database's live documents as of one seq, read in one REPEATABLE
    /// READ transaction by a task of its own.
    pub(super) async fn snapshot(
        &self,
        database: &DbName,
        stall: Duration,
    ) -> Result<super::Snapshot> {
        let mut tx = self
            .link
            .guard_abandonable(async { self.read_tx().await })
            .await?;
        let name = database.clone();
        super::snapshot::start(stall, move |mut feed| {
            super::snapshot::task(tokio::spawn(async move {
                let head = read_counters(&mut *tx).await?.last_seq;
                let (db_id, created_seq) = find_instance(&mut tx, &name).await?;
                feed.head(super::SnapshotHead {
                    seq: head,
                    created_seq,
                });
                {
                    let mut rows = sqlx::query(
                        "SELECT id, rev, seq, deleted, body FROM docs
                         WHERE db_id = $1 AND NOT deleted ORDER BY seq",
                    )
                    .bind(db_id)
                    .fetch(&mut *tx);
                    while let Some(row) = rows.try_next().await? {
                        if feed.push(rows::change(&row)?) {
                            feed.flush().await?;
                        }
                    }
                }
                feed.flush().await?;
                tx.commit().await?;
                Ok(())
            }))
        })
        .await
    }

    pub(super) async fn read_events(&self, query: EventQuery<'_>) -> Result<EventPage> {
        let EventQuery {
            keys,
            after,
            limit,
            max_bytes,
        } = query;
        self.link
            .guard_abandonable(async move {
                let mut tx = self.read_tx().await?;
                let Counters {
                    last_seq: head,
                    pruned_through,
                } = read_counters(&mut *tx).await?;
                let keys: Vec<String> = keys.iter().map(ToString::to_string).collect();
                let mut events = Vec::new();
                {
                    let mut rows = sqlx::query(
                        "SELECT seq, sync_key, database, doc_id, rev, deleted, aliases, attributes
                     FROM events WHERE seq > $1 AND sync_key = ANY($2) ORDER BY seq LIMIT $3",
                    )
                    .bind(to_i64(after))
                    .bind(&keys)
                    .bind(i64::from(limit))
                    .fetch(&mut *tx);
                    let mut bytes = 0;
                    while let Some(row) = rows.try_next().await? {
                        let event = rows::event(&row)?;
                        bytes += event.approx_bytes();
                        events.push(event);
                        if bytes >= max_bytes {
                            break;
                        }
                    }
                }
                tx.commit().await?;
                Ok(EventPage {
                    events,
                    head,
                    pruned_through,
                })
            })
            .await
    }

    pub(super) async fn list_databases(&self) -> Result<Vec<DatabaseInfo>> {
        self.link.guard_abandonable(async move {
            let rows = sqlx::query(
                "SELECT name, sync_key, doc_count, update_seq, created_seq FROM databases ORDER BY name",
            )
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(rows::database).collect()
        })
        .await
    }

    pub(super) async fn get(&self, database: &DbName, id: &DocId) -> Result<Document> {
        self.link
            .guard_abandonable(gets::get(&self.gets, database, id))
            .await
    }
}

/// Coalesced Gets on the pool (see `gets`): one statement for a batch,
/// whatever its size (the requests travel as two arrays).
#[derive(Clone)]
struct PgGets(PgPool);

impl PointReads for PgGets {
    type Conn = sqlx::pool::PoolConnection<sqlx::Postgres>;

    async fn acquire(&self) -> Result<Self::Conn> {
        Ok(self.0.acquire().await?)
    }

    async fn read(conn: &mut Self::Conn, requests: &[GetRequest]) -> Result<Vec<Result<Document>>> {
        let names: Vec<&str> = requests.iter().map(|r| r.database.as_str()).collect();
        let ids: Vec<&str> = requests.iter().map(|r| r.id.as_str()).collect();
        // Each lookup is a LATERAL subquery with LIMIT, which the planner
        // cannot flatten into a join: one primary-key probe per request
        // whatever the statistics say. (The plain join, on a table not yet
        // analyzed, probed docs by db_id alone and filtered on id: every
        // Get read the whole database; measured 0.28x the Gets/s of one
        // query per Get.)
        let found = sqlx::query(
            "SELECT req.n - 1 AS n, db.id AS db_id, d.rev, d.deleted, d.body, d.seq \
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS req (name, id, n) \
             LEFT JOIN LATERAL (SELECT id FROM databases WHERE name = req.name LIMIT 1) db ON true \
             LEFT JOIN LATERAL (SELECT rev, deleted, body, seq FROM docs \
                                WHERE docs.db_id = db.id AND docs.id = req.id LIMIT 1) d ON true",
        )
        .bind(names)
        .bind(ids)
        .fetch_all(&mut **conn)
        .await?;
        gets::results(requests, &found)
    }
}
