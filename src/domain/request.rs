//! Idempotent writes (Google AIP-155, request identification): the
//! `request_id` a client sends with a Put, Delete or BulkPut, what makes two
//! requests with one id the same request, and the reply recorded for it.
//! Pure values: the writer records and finds them (`store`), `api` computes
//! the fingerprint from the request message.

use serde::{Deserialize, Serialize};

use super::{Error, Result, WriteOutcome};

/// A client's id for one logical write, sent again on every retry of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    /// Longest accepted id, in bytes (a UUID is 36).
    pub const MAX_BYTES: usize = 128;

    /// `None` for an empty id (no deduplication).
    pub fn parse(field: &str, s: &str) -> Result<Option<RequestId>> {
        if s.is_empty() {
            return Ok(None);
        }
        if s.len() > Self::MAX_BYTES {
            return Err(Error::invalid(
                field,
                format!(
                    "is {} bytes long; at most {} (a UUID, for example); nothing was written",
                    s.len(),
                    Self::MAX_BYTES
                ),
            ));
        }
        Ok(Some(RequestId(s.to_owned())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A write request that carries a request_id: whose it is, and what it
/// asked for.
#[derive(Debug, Clone)]
pub struct Idempotency {
    /// The caller's principal ("" without --auth: every caller is one).
    pub principal: String,
    pub request_id: RequestId,
    /// A hash of the whole request but its request_id: a retry has the
    /// same one; another request under the same id does not.
    pub fingerprint: [u8; 32],
    /// Put and Delete: recorded only if the write succeeded (a failed call
    /// records nothing). BulkPut: recorded whenever the call succeeded, with
    /// every item's result, failed items included.
    pub whole_call_fails_with_an_item: bool,
    /// BulkPut items refused before they reached the writer (invalid, too
    /// large), by index in the request: part of the recorded reply.
    pub rejected: Vec<(usize, ItemReply)>,
}

/// One item of a recorded reply: the fields of a BulkPutResult (a Put's or
/// Delete's response is its one item).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemReply {
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rev: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seq: u64,
    /// "" on success, else the kind of failure (`Error::item_kind`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ItemReply {
    pub fn written(out: &WriteOutcome) -> ItemReply {
        ItemReply {
            id: out.id.to_string(),
            rev: out.rev.to_string(),
            seq: out.seq,
            error: String::new(),
            reason: String::new(),
        }
    }

    /// A failed item: its kind and what to do, as a client reads it.
    pub fn failed(id: String, e: &Error) -> ItemReply {
        ItemReply {
            id,
            rev: String::new(),
            seq: 0,
            error: e.item_kind().to_owned(),
            reason: match e {
                Error::Storage(_) => "the server failed to store this document; retry it".into(),
                _ => e.to_string(),
            },
        }
    }

    /// Each item's reply, in request order: the writer's results for the
    /// items that reached it, `rejected` at their indexes.
    pub fn merge<'a>(
        mut rejected: Vec<(usize, ItemReply)>,
        results: impl IntoIterator<Item = (String, &'a Result<WriteOutcome>)>,
    ) -> Vec<ItemReply> {
        rejected.sort_by_key(|(i, _)| *i);
        let mut rejected = rejected.into_iter().peekable();
        let mut results = results.into_iter();
        let mut items = Vec::new();
        loop {
            if let Some((_, item)) = rejected.next_if(|(i, _)| *i == items.len()) {
                items.push(item);
                continue;
            }
            match results.next() {
                Some((_, Ok(out))) => items.push(ItemReply::written(out)),
                Some((id, Err(e))) => items.push(ItemReply::failed(id, e)),
                None => break,
            }
        }
        items.extend(rejected.map(|(_, item)| item));
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_up_to_128_bytes() {
        assert_eq!(RequestId::parse("request_id", "").unwrap(), None);
        let max = "é".repeat(64);
        assert_eq!(
            RequestId::parse("request_id", &max)
                .unwrap()
                .unwrap()
                .as_str(),
            max
        );
        let err = RequestId::parse("request_id", &format!("{max}x")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid request_id: is 129 bytes long; at most 128 (a UUID, for example); nothing was written"
        );
    }

    #[test]
    fn merged_replies_keep_request_order() {
        let rejected = |i: usize, id: &str| {
            (
                i,
                ItemReply {
                    id: id.into(),
                    error: "invalid".into(),
                    ..ItemReply::failed(String::new(), &Error::invalid("x", "y"))
                },
            )
        };
        let missing = |id: &str| {
            (
                id.to_owned(),
                Err(Error::DocumentNotFound {
                    database: "d".into(),
                    id: id.into(),
                }),
            )
        };
        let results = [missing("a"), missing("b")];
        let items = ItemReply::merge(
            vec![rejected(3, "r3"), rejected(0, "r0")],
            results.iter().map(|(id, r)| (id.clone(), r)),
        );
        let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["r0", "a", "b", "r3"]);
        assert_eq!(items[1].error, "not_found");
    }
}
