//! The service's vocabulary: validated names and ids (`parse()` is the only
//! way in), revisions and their hashing, JSON bodies in canonical form, and
//! the one error type. Pure logic: no I/O, no tonic/prost, no sqlx.

mod body;
mod error;
mod names;
mod request;
mod revision;

pub use body::{Body, BodyLimits};
pub use error::{Credentials, Error, Result};
pub use names::{Alias, DbName, DocId, SyncKey, new_ids, parse_attributes};
pub use request::{Idempotency, ItemReply, RequestId};
pub use revision::Rev;

/// A live document at its current revision.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub id: DocId,
    pub rev: Rev,
    pub body: Body,
    pub seq: u64,
}

/// A database and its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseInfo {
    pub name: DbName,
    pub sync_key: SyncKey,
    pub doc_count: u64,
    pub update_seq: u64,
    /// The seq at which this instance was created (0: before it was recorded).
    pub created_seq: u64,
}

/// One document write: a create or update (`body` set) or a delete.
#[derive(Debug, Clone)]
pub struct DocWrite {
    pub id: DocId,
    /// The revision the writer believes is current; `None` for a create.
    pub rev: Option<Rev>,
    pub change: DocChange,
    /// The audience of the resulting notification; empty: everyone.
    pub aliases: Vec<Alias>,
}

#[derive(Debug, Clone)]
pub enum DocChange {
    Put(Body),
    Delete,
}

/// What a successful document write produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOutcome {
    pub id: DocId,
    pub rev: Rev,
    pub seq: u64,
}

/// One entry of the durable notification log: a document write, a Notify,
/// or the deletion of a database (`database` set, `id` unset, `deleted`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub sync_key: SyncKey,
    /// The database written to (or deleted); `None` for Notify.
    pub database: Option<DbName>,
    pub id: Option<DocId>,
    pub rev: Option<Rev>,
    pub deleted: bool,
    /// Who the event is for; empty: every subscriber of the key.
    pub aliases: Vec<Alias>,
    pub attributes: std::collections::BTreeMap<String, String>,
}

impl Event {
    /// Whether a subscriber listening as `alias` (or as nobody) may see this
    /// event: events without aliases are for everyone, others only for the
    /// listed aliases.
    pub fn is_for(&self, alias: Option<&Alias>) -> bool {
        self.aliases.is_empty() || alias.is_some_and(|a| self.aliases.binary_search(a).is_ok())
    }

    /// Whether this event is the deletion of its database.
    pub fn is_database_deleted(&self) -> bool {
        self.database.is_some() && self.id.is_none()
    }

    /// Roughly the bytes this event holds in memory: what replay buffers
    /// are bounded by.
    pub fn approx_bytes(&self) -> usize {
        const FIXED: usize = 160; // the struct, the Arc and allocator slack
        FIXED
            + self.sync_key.as_str().len()
            + self.database.as_ref().map_or(0, |d| d.as_str().len())
            + self.id.as_ref().map_or(0, |d| d.as_str().len())
            + self.rev.as_ref().map_or(0, |_| 40)
            + self
                .aliases
                .iter()
                .map(|a| a.as_str().len() + 24)
                .sum::<usize>()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.len() + 64)
                .sum::<usize>()
    }
}

/// One document in the changes feed, at its latest change.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub id: DocId,
    pub rev: Rev,
    pub seq: u64,
    pub deleted: bool,
    /// The body of a live document, when asked for.
    pub body: Option<Body>,
}
