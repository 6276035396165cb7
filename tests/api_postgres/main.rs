//! The whole integration suite again, each server backed by a PostgreSQL
//! database (see `../api/pg.rs`), plus the tests of several nodes sharing
//! one database (`cluster`). Tests that check SQLite's own files or limits
//! end early here (`sqlite_only!`).

#[path = "../api/helpers.rs"]
mod helpers;
#[path = "../api/pg.rs"]
mod pg;
#[path = "../api/scrape.rs"]
mod scrape;

/// Servers in this binary run on PostgreSQL.
pub const POSTGRES: bool = true;

#[path = "../api/bulk.rs"]
mod bulk;
#[path = "../api/databases.rs"]
mod databases;
#[path = "../api/documents.rs"]
mod documents;
#[path = "../api/durability.rs"]
mod durability;
#[path = "../api/hostile.rs"]
mod hostile;
#[path = "../api/idempotency.rs"]
mod idempotency;
#[path = "../api/lifecycle.rs"]
mod lifecycle;
#[path = "../api/limits.rs"]
mod limits;
#[path = "../api/security.rs"]
mod security;
#[path = "../api/server.rs"]
mod server;
#[path = "../api/snapshot.rs"]
mod snapshot;
#[path = "../api/sync.rs"]
mod sync;

mod cluster;
mod full_disk;
mod idempotent_nodes;
mod linearizable;
mod nemesis;
mod restore;
mod retention;
mod tls;
