//! The one error type of the service, by cause. Every fallible operation in
//! `domain` and `store` returns it; `api::status` is the only place that turns
//! it into a gRPC status. Messages say what was wrong and what to do.

use super::{DocId, Document, Rev};

/// Everything that can go wrong, by cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database {0:?} does not exist; create it with CreateDatabase or check the name")]
    DatabaseNotFound(String),

    #[error("database {0:?} already exists; pick another name or use the existing database")]
    DatabaseExists(String),

    #[error("document {id:?} does not exist in database {database:?} (it is missing or deleted)")]
    DocumentNotFound { database: String, id: String },

    /// A write named a revision that is not the document's current one.
    /// `current` is the document as it is now, or `None` if it is missing or
    /// deleted; `current_rev` is its revision (the tombstone's if deleted).
    #[error(
        "Document update conflict: document {:?} in database {database:?} {}, but the request {}; read the current document (it is in the error details when live), merge, and retry with its rev",
        id.as_str(),
        current_rev.as_ref().map_or_else(|| "does not exist".to_owned(), |r| format!("is at revision {r}")),
        sent_rev.as_ref().map_or_else(|| "sent no rev".to_owned(), |r| format!("sent rev {r}"))
    )]
    Conflict {
        database: String,
        id: DocId,
        sent_rev: Option<Rev>,
        current_rev: Option<Rev>,
        current: Option<Box<Document>>,
    },

    /// A request_id that already succeeded came with another request.
    #[error(
        "request_id {request_id:?} was already used for a different request in this database (another id, body, rev or item list); a retry must send the same request, a new write needs a new request_id. Nothing was written"
    )]
    RequestIdReused { request_id: String },

    /// Malformed input: `field` names the request field, `why` the rule.
    #[error("invalid {field}: {why}")]
    Invalid { field: String, why: String },

    /// Input over a configured limit.
    #[error("{what} is {size} bytes, over the limit of {limit} bytes; make it smaller")]
    TooLarge {
        what: String,
        size: usize,
        limit: usize,
    },

    /// A subscriber asked to resume from a seq whose events were pruned.
    #[error(
        "since={since} is older than the event log's retention (the oldest event kept is seq {oldest}); resync: Subscribe without since, then reload your data with Changes from since=0"
    )]
    SinceTooOld { since: u64, oldest: u64 },

    /// A subscriber asked to resume from a seq the server has not reached.
    #[error(
        "since={since} is ahead of this server's newest event (seq {head}); the saved position belongs to another server or a lost history: resync with Subscribe without since and Changes from since=0"
    )]
    SinceAhead { since: u64, head: u64 },

    /// No valid credentials.
    #[error("{1}")]
    Unauthenticated(Credentials, String),

    /// Valid credentials without the needed grant.
    #[error("permission denied: {0}")]
    PermissionDenied(String),

    /// A server-wide or per-principal limit is reached (e.g. subscribers).
    #[error("{0}")]
    Exhausted(String),

    /// The server holds as many Subscribe streams as it allows
    /// (--max-subscribers): a retry may succeed once others close.
    #[error(
        "the server has {open} open subscriptions, its limit (--max-subscribers); retry after a delay, or subscribe through another server"
    )]
    SubscribersFull { open: usize },

    /// The disk under the store is full: writes are refused until space is
    /// freed; reads go on.
    #[error(
        "the server's disk is full ({0}): writes are refused until space is freed, reads go on; nothing of this request was applied, retry it later"
    )]
    StorageFull(String),

    /// The service cannot take the request now (e.g. it is shutting down).
    #[error("{0}; retry shortly, or against another server")]
    Unavailable(String),

    /// The server is busy (too many requests in flight, read connections all
    /// taken): retryable, the server itself is healthy.
    #[error("{0}; retry with backoff")]
    Busy(String),

    /// A Snapshot stream was not read for `secs`: it was ended to release
    /// the storage its snapshot held. The client received everything up to
    /// `since` and goes on with Changes from there.
    #[error(
        "the snapshot stream was not read for {secs} s and was ended to release the storage it held; keep the documents received and load the rest with Changes(since={since})"
    )]
    SnapshotStalled { secs: u64, since: u64 },

    /// A Subscribe stream ends because the server is shutting down; the
    /// subscriber resumes from `since` (everything up to it was delivered).
    #[error(
        "the server is shutting down; subscribe again with since={since} (here or on another server) to resume without missing anything"
    )]
    ShuttingDown { since: u64 },

    /// The token of an open stream was removed from the auth file.
    #[error("{0}")]
    Revoked(String),

    /// The server cannot start as configured (bad flag, file or address).
    #[error("{0}")]
    Config(String),

    /// The server stopped because it could not go on (never sent to clients).
    #[error("{0}")]
    Fatal(String),

    /// The storage layer failed. Logged in full; never shown to clients.
    #[error("storage failure: {0}")]
    Storage(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// The kind of a BulkPut item's failure, as `BulkPutResult.error` says it.
    pub fn item_kind(&self) -> &'static str {
        match self {
            Error::Conflict { .. } => "conflict",
            Error::Invalid { .. } | Error::RequestIdReused { .. } => "invalid",
            Error::TooLarge { .. } | Error::Exhausted(_) | Error::SubscribersFull { .. } => {
                "too_large"
            }
            Error::Unauthenticated(..) | Error::PermissionDenied(_) | Error::Revoked(_) => {
                "forbidden"
            }
            Error::DatabaseNotFound(_) | Error::DocumentNotFound { .. } => "not_found",
            Error::DatabaseExists(_) => "exists",
            Error::Unavailable(_)
            | Error::Busy(_)
            | Error::ShuttingDown { .. }
            | Error::SnapshotStalled { .. }
            | Error::StorageFull(_) => "unavailable",
            Error::SinceTooOld { .. } | Error::SinceAhead { .. } => "out_of_range",
            Error::Storage(_) | Error::Config(_) | Error::Fatal(_) => "internal",
        }
    }

    pub fn invalid(field: impl Into<String>, why: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            why: why.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a caller is not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials {
    /// None were sent.
    Missing,
    /// Some were sent, but they are not a valid token.
    Unknown,
}

impl Credentials {
    pub fn as_str(self) -> &'static str {
        match self {
            Credentials::Missing => "missing",
            Credentials::Unknown => "unknown",
        }
    }
}
