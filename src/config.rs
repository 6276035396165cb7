//! Command-line flags and the limits they set. Each flag documents its
//! default and what happens when a request hits it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::domain::BodyLimits;
use crate::hub::SubscriberLimits;
use crate::store::{Location, StoreOptions};

/// How hard a commit works to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// fsync the WAL on every commit: an acknowledged write survives power loss.
    Full,
    /// fsync only at checkpoints: survives a process crash, but the last
    /// commits may be lost on power loss, and their seqs handed out again
    /// after the restart.
    Normal,
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

const MIB: usize = 1024 * 1024;

/// agsync: revisioned JSON documents and sync notifications over gRPC.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "agsync",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Prints the hash of a token for the `--auth` file. The token is read
    /// from standard input (one line) unless `--generate` makes a new one,
    /// which is printed too.
    HashToken {
        /// Generate a new random token and print it with its hash.
        #[arg(long)]
        generate: bool,
    },
    /// Writes a consistent copy of a SQLite store to DEST while a server
    /// may run on it (SQLite's `VACUUM INTO`: one snapshot, compacted). DEST
    /// must not exist. Restore by starting a server with `--db DEST` (or
    /// by putting DEST in place of the store while no server runs).
    Backup {
        /// The store to copy (the server's `--db` file).
        #[arg(long, env = "AGSYNC_DB", default_value = "./agsync.db", value_parser = parse_location)]
        db: Location,
        /// Where to write the copy: a new file.
        dest: PathBuf,
    },
}

/// How the server runs.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to serve gRPC on. Port 0 picks a free port (logged at start).
    #[arg(long, env = "AGSYNC_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Where the data lives. A path (or `sqlite:PATH`): a SQLite file,
    /// created if missing; one process serves it. A `postgres://` (or
    /// `postgresql://`) URL: a PostgreSQL database, which several agsync
    /// nodes may share (see the README's "Run several nodes").
    #[arg(
        long,
        env = "AGSYNC_DB",
        default_value = "./agsync.db",
        value_name = "PATH|URL",
        value_parser = parse_location
    )]
    pub db: Location,

    /// PostgreSQL only: connections each node opens for requests and its
    /// writer; a node opens at most this plus 2 (the LISTEN connection and
    /// the event tailer's).
    #[arg(long, default_value_t = 8)]
    pub pg_pool_size: u32,

    /// PostgreSQL only: how often a node reads the event log for other
    /// nodes' writes when no wake-up hint (LISTEN/NOTIFY) arrived, in
    /// milliseconds. Hints make delivery prompt; this bounds the delay when
    /// one is lost.
    #[arg(long, value_parser = parse_millis, default_value = "500")]
    pub pg_poll_interval_ms: Duration,

    /// `full`: every acknowledged write is fsynced and survives power loss.
    /// `normal`: survives a crash of the process, but the last writes may be
    /// lost on power loss; faster. After such a loss the lost writes' seqs
    /// are handed out again, so a client that saw one of them may skip the
    /// new change that reuses it: with `normal`, clients should resync
    /// (Changes from since=0) after a server power loss.
    #[arg(long, value_enum, default_value_t = Durability::Full)]
    pub durability: Durability,

    /// The SQLite write-ahead log is kept under this many bytes under any
    /// sustained write load (the writer restarts it between batches) and is
    /// truncated to zero when writes pause for a second.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub wal_max_bytes: u64,

    /// Largest document body, as canonical JSON (CouchDB's max_document_size).
    /// A bigger body is refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_document_bytes: usize,

    /// Deepest nesting of objects and arrays in a body (the body is level 1).
    /// Deeper bodies are refused with INVALID_ARGUMENT. Protobuf decoding
    /// stops at 34 levels of `Struct` nesting (INVALID_ARGUMENT too), so
    /// values above 33 have no effect.
    #[arg(long, default_value_t = 32)]
    pub max_json_depth: usize,

    /// Largest gRPC request message. A bigger one is refused with
    /// RESOURCE_EXHAUSTED before it is read.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_request_bytes: usize,

    /// Most documents in one BulkPut; more is INVALID_ARGUMENT.
    #[arg(long, default_value_t = 10_000)]
    pub max_bulk_docs: usize,

    /// Most ids one NewId call hands out; more is INVALID_ARGUMENT.
    #[arg(long, default_value_t = 1000)]
    pub max_new_ids: u32,

    /// Read connections to SQLite. Gets share one connection per batch;
    /// at most all but one scans (Changes, ListDatabases, and replays, which
    /// read the log on connections of their own) run at once. A read that
    /// waits `--read-timeout-secs` for a connection fails with UNAVAILABLE
    /// (retryable).
    #[arg(long, default_value_t = 4)]
    pub read_connections: u32,

    /// How long a read waits for a free read connection.
    #[arg(long, value_parser = parse_seconds, default_value = "5")]
    pub read_timeout_secs: Duration,

    /// Write requests queued for the writer before callers wait for room.
    #[arg(long, default_value_t = 4096)]
    pub writer_queue: usize,

    /// Bytes of large write requests (over 64 KiB of document bodies,
    /// roughly) queued for the writer before callers wait for room; one
    /// request bigger than this waits until the queue is empty. Small writes
    /// never wait behind large ones: `--max-in-flight` bounds them.
    #[arg(long, default_value_t = 64 * MIB)]
    pub writer_queue_bytes: usize,

    /// Most bytes in one response of Changes: a page ends early, before the
    /// change that would pass it (it always holds at least one change).
    /// The default is the default receive limit of gRPC clients (4 MiB).
    #[arg(long, default_value_t = 4 * MIB)]
    pub max_response_bytes: usize,

    /// Snapshot streams served at once. Each holds a read transaction (and
    /// on PostgreSQL a pool connection) while it streams; more callers wait
    /// `--read-timeout-secs` for one to end, then fail with UNAVAILABLE
    /// (retryable).
    #[arg(long, default_value_t = 4)]
    pub max_snapshots: usize,

    /// A Snapshot stream whose client reads nothing for this long ends with
    /// UNAVAILABLE (ErrorInfo SNAPSHOT_STALLED, metadata `since`): an open
    /// snapshot keeps the storage from reclaiming space (SQLite's WAL cannot
    /// restart past it).
    #[arg(long, value_parser = parse_seconds, default_value = "30")]
    pub snapshot_stall_secs: Duration,

    /// Crash tests only: at this fsync of the WAL (counting from 1), copy
    /// the store as the disk holds it (the database file and the WAL up to
    /// the previous fsync) to `<db>.power-loss/` and abort, as a power cut
    /// would (SQLite, `--durability full`).
    #[arg(long, hide = true, value_name = "N")]
    pub simulate_power_loss_at_sync: Option<u64>,

    /// Most concurrent calls (HTTP/2 streams) per client connection; a
    /// client opening more holds them back until one ends (HTTP/2's
    /// SETTINGS_MAX_CONCURRENT_STREAMS). Reaching it is logged and counted
    /// (agsync_connection_streams_full_total). Default: --max-subscribers
    /// plus --max-in-flight, so one connection (a gateway's) can carry
    /// every call the server takes; those two bound memory in total.
    #[arg(long, value_name = "N")]
    pub max_concurrent_streams: Option<u32>,

    /// Most calls other than Subscribe being served at once across the
    /// server. Past it, calls fail at once with UNAVAILABLE, which standard
    /// gRPC retry policies retry; health stays SERVING.
    #[arg(long, default_value_t = 512)]
    pub max_in_flight: usize,

    /// Most bytes of large request messages (over 64 KiB each) being received
    /// and served at once across the server; a large request past it fails
    /// at once with UNAVAILABLE (retryable) before its message is read.
    /// Small requests are bounded by `--max-in-flight` alone.
    #[arg(long, default_value_t = 64 * MIB)]
    pub max_large_request_bytes: usize,

    /// Most write requests committed together in one transaction (one fsync).
    #[arg(long, default_value_t = 1024)]
    pub max_batch: usize,

    /// How many of the newest events the log keeps, so subscribers can resume
    /// with `since`. Resuming from an older seq gets OUT_OF_RANGE with the
    /// oldest seq still available. Each event takes roughly 100-200 bytes.
    #[arg(long, default_value_t = 1_000_000)]
    pub retain_events: u64,

    /// How long the reply of a Put, Delete or BulkPut sent with a
    /// `request_id` is kept (at least), so a retry within it gets the first
    /// reply instead of writing again. Older ones are deleted by the writer,
    /// up to 10,000 a minute. Each takes roughly 200 bytes plus its reply.
    #[arg(long, default_value_t = 86_400, value_name = "SECS")]
    pub request_id_retention_secs: u64,

    /// Most sync keys in one Subscribe; more is INVALID_ARGUMENT.
    #[arg(long, default_value_t = 100)]
    pub max_subscribe_keys: usize,

    /// Live events buffered per subscriber before it falls back to catching
    /// up from the durable log (it is not cut off and misses nothing, as long
    /// as it does not fall behind `--retain-events`). Buffered events are
    /// shared by all subscribers, not copied per subscriber.
    #[arg(long, default_value_t = 256)]
    pub subscriber_buffer: usize,

    /// Most bytes of events a replaying or catching-up subscriber reads from
    /// the log at a time (at least one event).
    #[arg(long, default_value_t = 64 * 1024)]
    pub subscriber_replay_bytes: usize,

    /// How often an idle Subscribe stream gets a `progress` event.
    #[arg(long, value_parser = parse_seconds, default_value = "30")]
    pub progress_interval_secs: Duration,

    /// Default page size of Changes (when `limit` is 0).
    #[arg(long, default_value_t = 1000)]
    pub changes_default_limit: u32,

    /// Largest page of Changes; a bigger `limit` is INVALID_ARGUMENT.
    #[arg(long, default_value_t = 10_000)]
    pub changes_max_limit: u32,

    /// Bearer tokens and their grants (TOML, or JSON if the name ends in
    /// `.json`); see the README's Security section. Without it the server is
    /// open to anyone who can reach it, and refuses to start on a non-loopback
    /// address unless `--insecure-open` is given.
    #[arg(long, env = "AGSYNC_AUTH")]
    pub auth: Option<PathBuf>,

    /// Allow running without `--auth` on a non-loopback address.
    #[arg(long)]
    pub insecure_open: bool,

    /// TLS certificate chain (PEM); with `--tls-key`, serve TLS only.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) for `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Let web pages served from ORIGIN (`scheme://host[:port]`, as the
    /// browser sends it) call agsync through gRPC-Web; repeat it for several
    /// origins, or give `*` for any. Default: none, so no page of another
    /// origin can call agsync. gRPC-Web itself is always served, on the same
    /// port as gRPC; see the README's "From a browser".
    #[arg(long = "cors-allow-origin", value_name = "ORIGIN", value_parser = crate::api::web::parse_origin)]
    pub cors_allow_origin: Vec<String>,

    /// Serve Prometheus metrics at `http://ADDR/metrics` (off by default).
    /// Like the API, a non-loopback address is refused without `--auth`
    /// unless `--insecure-open` is given; with `--auth`, scrapers send a
    /// token with the `metrics` grant.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// Log lines as text (for people) or JSON objects (for log pipelines).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Unary calls slower than this are logged at `warn` (milliseconds).
    #[arg(long, value_parser = parse_millis, default_value = "1000")]
    pub slow_request_ms: Duration,

    /// Most open Subscribe streams in total; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 20_000)]
    pub max_subscribers: usize,

    /// Most open Subscribe streams per principal (token); more get
    /// RESOURCE_EXHAUSTED. Without `--auth` all callers are one principal,
    /// so this is then the same as `--max-subscribers`.
    #[arg(long, default_value_t = 1_000)]
    pub max_subscribers_per_principal: usize,

    /// How long shutdown waits for in-flight requests before closing anyway.
    #[arg(long, value_parser = parse_seconds, default_value = "10")]
    pub shutdown_timeout_secs: Duration,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("{s:?} is not a whole number of seconds"))
}

fn parse_millis(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| format!("{s:?} is not a whole number of milliseconds"))
}

/// `--db`: a file or a URL, told apart here, at the edge.
fn parse_location(text: &str) -> Result<Location, String> {
    if text.is_empty() {
        return Err("give a SQLite file's path or a postgres:// URL".into());
    }
    Ok(Location::parse(text))
}

impl Config {
    /// Where the data lives, for logs: a PostgreSQL URL without its
    /// password.
    pub fn db_for_logs(&self) -> String {
        self.db.for_logs()
    }

    /// The defaults, for `path` and an ephemeral loopback port (tests, examples).
    pub fn for_path(path: impl Into<PathBuf>) -> Config {
        let mut config = <Cli as clap::Parser>::parse_from(["agsync"]).config;
        config.db = Location::from(path.into());
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config
    }

    /// `--max-concurrent-streams`, or its default: every Subscribe stream
    /// and every other call the server takes at once.
    pub fn streams_per_connection(&self) -> u32 {
        let default = self.max_subscribers.saturating_add(self.max_in_flight);
        self.max_concurrent_streams
            .unwrap_or_else(|| u32::try_from(default).unwrap_or(u32::MAX))
            .max(1)
    }

    pub fn subscriber_limits(&self) -> SubscriberLimits {
        let per_principal = if self.auth.is_some() {
            self.max_subscribers_per_principal
        } else {
            self.max_subscribers
        };
        SubscriberLimits {
            total: self.max_subscribers,
            per_principal,
        }
    }

    pub fn body_limits(&self) -> BodyLimits {
        BodyLimits {
            max_bytes: self.max_document_bytes,
            max_depth: self.max_json_depth,
        }
    }

    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            location: self.db.clone(),
            durability: match self.durability {
                Durability::Full => crate::store::Durability::Full,
                Durability::Normal => crate::store::Durability::Normal,
            },
            read_connections: self.read_connections,
            writer_queue: self.writer_queue,
            max_batch: self.max_batch,
            retain_events: self.retain_events,
            request_id_retention: Duration::from_secs(self.request_id_retention_secs),
            writer_queue_bytes: self.writer_queue_bytes,
            wal_max_bytes: self.wal_max_bytes,
            read_acquire_timeout: self.read_timeout_secs,
            max_snapshots: self.max_snapshots,
            snapshot_stall: self.snapshot_stall_secs,
            pg_pool_size: self.pg_pool_size,
            pg_poll_interval: self.pg_poll_interval_ms,
            power_loss: self.simulate_power_loss_at_sync.and_then(|at| {
                Some(crate::store::PowerLoss {
                    at,
                    db: self.db.sqlite_path()?.to_owned(),
                })
            }),
        }
    }
}
