//! What an operator sees: the metric names and their descriptions, the
//! Prometheus recorder, and the `/metrics` endpoint (`endpoint`).
//!
//! - agsync's own metrics are recorded where things happen (writer, hub,
//!   status mapping) through the `metrics` facade, under the names below;
//!   gauges of state (subscribers, queue depth, seqs, pool) are read when
//!   `/metrics` is scraped ([`serve`]'s `collect`).
//! - Every gRPC call is measured once, and logged when it finishes, by
//!   `api::calls` (it sees tonic; this module does not).
//!
//! Without `--metrics-listen` no recorder is installed and every metric
//! call is a no-op; the request logs stay. Must not: see tonic (it only
//! names the gRPC metrics; `api::calls` records them).

mod endpoint;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub use endpoint::serve;

// gRPC server metrics, as go-grpc-prometheus names them.
pub const GRPC_STARTED: &str = "grpc_server_started_total";
pub const GRPC_HANDLED: &str = "grpc_server_handled_total";
pub const GRPC_HANDLING_SECONDS: &str = "grpc_server_handling_seconds";
pub const GRPC_MSG_SENT: &str = "grpc_server_msg_sent_total";
// agsync's own.
pub const WRITES_COMMITTED: &str = "agsync_writes_committed_total";
pub const CONFLICTS: &str = "agsync_conflicts_total";
pub const WRITER_BATCH_SIZE: &str = "agsync_writer_batch_size";
pub const WRITER_COMMIT_SECONDS: &str = "agsync_writer_commit_seconds";
pub const WAL_SYNC_SECONDS: &str = "agsync_wal_sync_seconds";
pub const WRITER_QUEUE_DEPTH: &str = "agsync_writer_queue_depth";
pub const READ_BATCH_SIZE: &str = "agsync_read_batch_size";
pub const HEAD_SEQ: &str = "agsync_head_seq";
pub const OLDEST_REPLAYABLE_SEQ: &str = "agsync_oldest_replayable_seq";
pub const SUBSCRIBERS: &str = "agsync_subscribers";
pub const NOTIFICATIONS_DELIVERED: &str = "agsync_notifications_delivered_total";
pub const SUBSCRIBER_OVERFLOWS: &str = "agsync_subscriber_overflows_total";
pub const SUBSCRIBER_CATCHUPS: &str = "agsync_subscriber_catchups_total";
pub const REPLAYED_EVENTS: &str = "agsync_replayed_events_total";
pub const LOG_GAPS: &str = "agsync_log_gaps_total";
pub const CONNECTION_STREAMS_FULL: &str = "agsync_connection_streams_full_total";
pub const STORAGE_WRITABLE: &str = "agsync_storage_writable";
pub const REQUESTS_DEDUPLICATED: &str = "agsync_requests_deduplicated_total";
pub const AUTH_FAILURES: &str = "agsync_auth_failures_total";
pub const PG_POOL_CONNECTIONS: &str = "agsync_pg_pool_connections";
pub const BUILD_INFO: &str = "agsync_build_info";

const SECONDS_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    300.0,
];
const COMMIT_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
const SIZE_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Installs the process-wide recorder (once: every server in the process
/// shares it) and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = [
                (GRPC_HANDLING_SECONDS, &SECONDS_BUCKETS[..]),
                (WRITER_COMMIT_SECONDS, &COMMIT_BUCKETS[..]),
                (WAL_SYNC_SECONDS, &COMMIT_BUCKETS[..]),
                (WRITER_BATCH_SIZE, &SIZE_BUCKETS[..]),
                (READ_BATCH_SIZE, &SIZE_BUCKETS[..]),
            ]
            .into_iter()
            .fold(PrometheusBuilder::new(), |builder, (name, buckets)| {
                builder
                    .set_buckets_for_metric(Matcher::Full(name.into()), buckets)
                    .expect("non-empty buckets")
            });
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed: /metrics will be empty");
            }
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            // Every series that exists from the start, at zero, so
            // dashboards and alerts see 0 rather than nothing.
            for name in [
                WRITES_COMMITTED,
                CONFLICTS,
                NOTIFICATIONS_DELIVERED,
                SUBSCRIBER_OVERFLOWS,
                SUBSCRIBER_CATCHUPS,
                REPLAYED_EVENTS,
                LOG_GAPS,
                REQUESTS_DEDUPLICATED,
                CONNECTION_STREAMS_FULL,
            ] {
                metrics::counter!(name).absolute(0);
            }
            for reason in ["missing", "unknown", "denied"] {
                metrics::counter!(AUTH_FAILURES, "reason" => reason).absolute(0);
            }
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(GRPC_STARTED, "RPCs started on the server.");
    describe_counter!(
        GRPC_HANDLED,
        "RPCs completed on the server, by status code (a stream counts when it ends)."
    );
    describe_histogram!(
        GRPC_HANDLING_SECONDS,
        Unit::Seconds,
        "Time from the start of an RPC to its status (streams: their whole life)."
    );
    describe_counter!(
        GRPC_MSG_SENT,
        "Response messages sent (streams: each event)."
    );
    describe_counter!(
        WRITES_COMMITTED,
        "Document writes committed (each Put, Delete and BulkPut item)."
    );
    describe_counter!(
        CONFLICTS,
        "Document writes refused because their rev was not the current one (Put and Delete: ABORTED; BulkPut: that item's error)."
    );
    describe_histogram!(
        WRITER_BATCH_SIZE,
        "Requests committed per transaction (group commit; a BulkPut counts once)."
    );
    describe_histogram!(
        WRITER_COMMIT_SECONDS,
        Unit::Seconds,
        "Time to apply and commit one batch of writes."
    );
    describe_gauge!(
        WRITER_QUEUE_DEPTH,
        "Writes waiting for the writer (--writer-queue is the most)."
    );
    describe_histogram!(
        WAL_SYNC_SECONDS,
        Unit::Seconds,
        "Time of one fsync of the WAL by the syncer (SQLite, --durability full): every batch committed meanwhile waits for it before it is answered."
    );
    describe_histogram!(READ_BATCH_SIZE, "Gets answered per coalesced query.");
    describe_gauge!(HEAD_SEQ, "The highest committed seq.");
    describe_gauge!(
        OLDEST_REPLAYABLE_SEQ,
        "The oldest seq still in the event log: a Subscribe with since below it minus one gets OUT_OF_RANGE."
    );
    describe_gauge!(SUBSCRIBERS, "Open Subscribe streams.");
    describe_counter!(
        NOTIFICATIONS_DELIVERED,
        "Notifications handed to subscribers' streams."
    );
    describe_counter!(
        SUBSCRIBER_OVERFLOWS,
        "Times a subscriber's live buffer was full, so it fell back to catching up from the log."
    );
    describe_counter!(
        SUBSCRIBER_CATCHUPS,
        "Catch-ups from the log started by subscribers that overflowed."
    );
    describe_counter!(
        REPLAYED_EVENTS,
        "Notifications delivered from the event log (replay after since, and catch-up)."
    );
    describe_gauge!(
        STORAGE_WRITABLE,
        "1 while writes commit; 0 while the store cannot take them (the disk is full, PostgreSQL's included, or a SQLite file is locked by another process): writes are refused with RESOURCE_EXHAUSTED or UNAVAILABLE, reads go on, and the writer retries by itself."
    );
    describe_counter!(
        CONNECTION_STREAMS_FULL,
        "Calls that brought their connection to --max-concurrent-streams open calls: its client holds further calls back until one ends."
    );
    describe_counter!(
        LOG_GAPS,
        "Times this node found events pruned from the log before it could publish them (a PostgreSQL node whose tailer fell behind --retain-events): its subscribers were told OUT_OF_RANGE instead of skipping them."
    );
    describe_counter!(
        REQUESTS_DEDUPLICATED,
        "Put, Delete and BulkPut calls answered from the record of their request_id (a retry of a request that already succeeded): nothing was written again."
    );
    describe_counter!(
        AUTH_FAILURES,
        "Calls refused by authentication or authorization, by reason: missing (no token), unknown (not a valid token), denied (no grant)."
    );
    describe_gauge!(
        PG_POOL_CONNECTIONS,
        "PostgreSQL connections of the node's pool, by state (in_use, idle); the writer and the LISTEN connection hold one each for as long as the node runs."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which agsync runs."
    );
}

/// Counts a refusal by authentication or authorization (calls and scrapes
/// alike) under its reason; other errors are not counted.
pub fn count_auth_failure(e: &crate::domain::Error) {
    use crate::domain::Error;
    let reason = match e {
        Error::Unauthenticated(credentials, _) => credentials.as_str(),
        Error::Revoked(_) => "unknown",
        Error::PermissionDenied(_) => "denied",
        _ => return,
    };
    metrics::counter!(AUTH_FAILURES, "reason" => reason).increment(1);
}
