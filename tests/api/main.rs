//! One integration-test binary (so the crate links once), one module per area.

mod helpers;

mod bulk;
mod databases;
mod documents;
mod durability;
mod hostile;
mod lifecycle;
mod limits;
mod security;
mod server;
mod sync;
