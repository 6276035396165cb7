//! One integration-test binary (so the crate links once), one module per area.

mod helpers;
mod pg;
mod scrape;

/// This binary runs the suite against SQLite; `tests/api_postgres` runs
/// the same modules against PostgreSQL.
pub const POSTGRES: bool = false;

mod backup;
mod bulk;
mod databases;
mod documents;
mod durability;
mod hostile;
mod idempotency;
mod lifecycle;
mod limits;
mod metrics;
mod security;
mod server;
mod snapshot;
mod sync;
mod watermark;
mod web;
