//! Command-line flags and the limits they set. Each flag documents its
//! default and what happens when a request hits it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::domain::BodyLimits;
use crate::store::{Durability, StoreOptions};

/// agsync: revisioned JSON documents and sync notifications over gRPC.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "agsync", version, about)]
pub struct Config {
    /// Address to serve gRPC on. Port 0 picks a free port (logged at start).
    #[arg(long, env = "AGSYNC_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// The SQLite database file; created if missing.
    #[arg(long, env = "AGSYNC_DB", default_value = "./agsync.db")]
    pub db: PathBuf,

    /// `full`: every acknowledged write is fsynced and survives power loss.
    /// `normal`: survives a crash of the process, but the last writes may be
    /// lost on power loss; faster.
    #[arg(long, value_enum, default_value_t = Durability::Full)]
    pub durability: Durability,

    /// Largest document body, as canonical JSON (CouchDB's max_document_size).
    /// A bigger body is refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_document_bytes: usize,

    /// Deepest nesting of objects and arrays in a body (the body is level 1).
    /// Deeper bodies are refused with INVALID_ARGUMENT. Protobuf decoding
    /// stops at about 50 levels of `Struct` nesting whatever this says.
    #[arg(long, default_value_t = 32)]
    pub max_json_depth: usize,

    /// Largest gRPC request message. A bigger one is refused by the transport
    /// with RESOURCE_EXHAUSTED before it is decoded.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_request_bytes: usize,

    /// Most documents in one BulkPut; more is INVALID_ARGUMENT.
    #[arg(long, default_value_t = 10_000)]
    pub max_bulk_docs: usize,

    /// Read connections to SQLite (Get, ListDatabases).
    #[arg(long, default_value_t = 4)]
    pub read_connections: u32,

    /// Write requests queued for the writer before callers wait for room.
    #[arg(long, default_value_t = 4096)]
    pub writer_queue: usize,

    /// Most write requests committed together in one transaction (one fsync).
    #[arg(long, default_value_t = 1024)]
    pub max_batch: usize,

    /// How many of the newest events the log keeps, so subscribers can resume
    /// with `since`. Resuming from an older seq gets OUT_OF_RANGE with the
    /// oldest seq still available. Each event takes roughly 100-200 bytes.
    #[arg(long, default_value_t = 1_000_000)]
    pub retain_events: u64,

    /// Most sync keys in one Subscribe; more is INVALID_ARGUMENT.
    #[arg(long, default_value_t = 100)]
    pub max_subscribe_keys: usize,

    /// Events buffered per subscriber before it falls back to catching up
    /// from the durable log (it is never cut off and misses nothing).
    #[arg(long, default_value_t = 256)]
    pub subscriber_buffer: usize,

    /// How often an idle Subscribe stream gets a `progress` event.
    #[arg(long, value_parser = parse_seconds, default_value = "30")]
    pub progress_interval_secs: Duration,

    /// Default page size of Changes (when `limit` is 0).
    #[arg(long, default_value_t = 1000)]
    pub changes_default_limit: u32,

    /// Largest page of Changes; a bigger `limit` is INVALID_ARGUMENT.
    #[arg(long, default_value_t = 10_000)]
    pub changes_max_limit: u32,

    /// How long shutdown waits for in-flight requests before closing anyway.
    #[arg(long, value_parser = parse_seconds, default_value = "10")]
    pub shutdown_timeout_secs: Duration,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("{s:?} is not a whole number of seconds"))
}

impl Config {
    /// The defaults, for `path` and an ephemeral loopback port (tests, examples).
    pub fn for_path(path: impl Into<PathBuf>) -> Config {
        let mut config = <Config as clap::Parser>::parse_from(["agsync"]);
        config.db = path.into();
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config
    }

    pub fn body_limits(&self) -> BodyLimits {
        BodyLimits {
            max_bytes: self.max_document_bytes,
            max_depth: self.max_json_depth,
        }
    }

    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            path: self.db.clone(),
            durability: self.durability,
            read_connections: self.read_connections,
            writer_queue: self.writer_queue,
            max_batch: self.max_batch,
            retain_events: self.retain_events,
        }
    }
}
