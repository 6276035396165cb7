//! agsync: a data-sync service for mobile and web apps. JSON documents in
//! named databases with CouchDB's revision model, and sync notifications,
//! served over gRPC.
//!
//! # Layout
//! - [`config`]: command-line flags and the limits they set.
//! - [`domain`]: validated names, revisions, bodies and the one [`Error`]
//!   type; pure logic, no I/O.
//! - [`store`]: durable storage behind one interface (`Store`), on SQLite
//!   (the embedded default: a read pool, and the single writer on a thread
//!   of its own, group commit) or PostgreSQL (several nodes). All SQL lives
//!   there. `api` and `hub` see that interface, never a backend: `Store`,
//!   its typed queries and pages, `EventLog` (what the hub reads) and
//!   `Publish` (the live tail, which the hub implements).
//! - [`hub`]: fan-out of committed events to live subscribers, and each
//!   subscriber's replay and catch-up from the durable log.
//! - [`api`]: the gRPC service; with [`server`]'s wiring, the only code that
//!   sees tonic/prost, and the one place an [`Error`] becomes a
//!   `tonic::Status`. Its `guard` is the gate every call passes first
//!   (authentication, access rules, budgets), `calls` measures and logs
//!   every call, `web` serves gRPC-Web and CORS, `codec` is the generated
//!   code's codec.
//! - [`auth`]: bearer tokens (hashed in the `--auth` file), grants, and
//!   the live configuration that `SIGHUP` reloads.
//! - [`server`]: wiring, health, reflection, keepalive and shutdown.
//! - [`telemetry`]: the metric names, the Prometheus recorder and the
//!   `/metrics` endpoint.
//! - [`pb`]: code generated from `proto/agsync/v1/sync.proto`.

pub mod api;
pub mod auth;
pub mod config;
pub mod domain;
pub mod hub;
pub mod server;
pub mod store;
pub mod telemetry;

pub use domain::Error;

/// Generated from `proto/agsync/v1/sync.proto`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("agsync.v1");

    /// The encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/agsync_descriptor.bin"));
}
