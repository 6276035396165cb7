//! Validated names: each newtype can only be built by `parse`, which says
//! exactly which rule the input broke.

use std::fmt;
use std::sync::Arc;

use super::{Error, Result};

// Each is an `Arc<str>`: a batch clones ids and names into its rows, events
// and lookup keys, and a clone is then a reference count, not a copy.
macro_rules! string_newtype {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
            pub fn into_string(self) -> String {
                self.0.to_string()
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

/// A database name: CouchDB's rule `^[a-z][a-z0-9_$()+/-]*$`, at most 238 chars.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DbName(Arc<str>);
string_newtype!(DbName);

impl DbName {
    pub const MAX_LEN: usize = 238;

    pub fn parse(field: &str, s: &str) -> Result<Self> {
        let mut chars = s.chars();
        match chars.next() {
            None => return Err(Error::invalid(field, "a database name is required")),
            Some('a'..='z') => {}
            Some(_) => {
                return Err(Error::invalid(
                    field,
                    format!("database name {s:?} must start with a lowercase letter (a-z)"),
                ));
            }
        }
        if let Some(bad) = chars
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '$' | '(' | ')' | '+' | '/' | '-'))
        {
            return Err(Error::invalid(
                field,
                format!(
                    "database name {s:?} contains {bad:?}; only a-z, 0-9 and _ $ ( ) + / - are allowed"
                ),
            ));
        }
        if s.len() > Self::MAX_LEN {
            return Err(Error::invalid(
                field,
                format!(
                    "database name is {} characters long; the maximum is {}",
                    s.len(),
                    Self::MAX_LEN
                ),
            ));
        }
        Ok(DbName(s.into()))
    }
}

/// A document id: non-empty UTF-8, at most 1024 bytes, not starting with `_`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocId(Arc<str>);
string_newtype!(DocId);

impl DocId {
    pub const MAX_BYTES: usize = 1024;

    pub fn parse(field: &str, s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(Error::invalid(field, "a document id is required"));
        }
        if s.len() > Self::MAX_BYTES {
            return Err(Error::invalid(
                field,
                format!(
                    "document id is {} bytes long; the maximum is {} bytes",
                    s.len(),
                    Self::MAX_BYTES
                ),
            ));
        }
        if s.starts_with('_') {
            return Err(Error::invalid(
                field,
                format!("document id {s:?} starts with '_', which is reserved; choose another id"),
            ));
        }
        Ok(DocId(s.into()))
    }

    /// An id the server just generated (see [`new_ids`]); always valid.
    fn generated(s: String) -> Self {
        DocId(s.into())
    }
}

/// A sync key naming a kind of data, e.g. `org.devnexus.sync.UserCalendar`:
/// 1 to 256 bytes of printable ASCII without spaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SyncKey(Arc<str>);
string_newtype!(SyncKey);

impl SyncKey {
    pub const MAX_BYTES: usize = 256;

    pub fn parse(field: &str, s: &str) -> Result<Self> {
        printable_token(field, "sync key", s, Self::MAX_BYTES).map(|()| SyncKey(s.into()))
    }

    /// The default sync key of a database: its name (always a valid key).
    pub fn from_db_name(name: &DbName) -> Self {
        SyncKey(name.0.clone())
    }
}

/// An alias (a user) a notification is addressed to: 1 to 256 bytes of
/// printable ASCII without spaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Alias(Arc<str>);
string_newtype!(Alias);

impl Alias {
    pub const MAX_BYTES: usize = 256;
    /// The most aliases one notification may be addressed to.
    pub const MAX_PER_NOTIFICATION: usize = 1000;

    pub fn parse(field: &str, s: &str) -> Result<Self> {
        printable_token(field, "alias", s, Self::MAX_BYTES).map(|()| Alias(s.into()))
    }

    /// Parses an audience list, sorted and without duplicates.
    pub fn parse_list(field: &str, list: &[String]) -> Result<Vec<Self>> {
        if list.len() > Self::MAX_PER_NOTIFICATION {
            return Err(Error::invalid(
                field,
                format!(
                    "{} aliases given; at most {} are allowed per notification",
                    list.len(),
                    Self::MAX_PER_NOTIFICATION
                ),
            ));
        }
        let mut out = list
            .iter()
            .enumerate()
            .map(|(i, a)| Alias::parse(&format!("{field}[{i}]"), a))
            .collect::<Result<Vec<_>>>()?;
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// Notify attributes: at most [`MAX_ATTRIBUTES`] entries with non-empty keys,
/// [`MAX_ATTRIBUTES_BYTES`] bytes in all.
pub fn parse_attributes(
    field: &str,
    attributes: impl IntoIterator<Item = (String, String)>,
) -> Result<std::collections::BTreeMap<String, String>> {
    let map: std::collections::BTreeMap<String, String> = attributes.into_iter().collect();
    if map.len() > MAX_ATTRIBUTES {
        return Err(Error::invalid(
            field,
            format!(
                "{} attributes given; at most {MAX_ATTRIBUTES} are allowed",
                map.len()
            ),
        ));
    }
    if map.contains_key("") {
        return Err(Error::invalid(field, "attribute keys must not be empty"));
    }
    let bytes: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_ATTRIBUTES_BYTES {
        return Err(Error::TooLarge {
            what: field.to_owned(),
            size: bytes,
            limit: MAX_ATTRIBUTES_BYTES,
        });
    }
    Ok(map)
}

/// The most attributes one Notify may carry.
pub const MAX_ATTRIBUTES: usize = 256;
/// The most bytes (keys plus values) of one Notify's attributes.
pub const MAX_ATTRIBUTES_BYTES: usize = 64 * 1024;

fn printable_token(field: &str, what: &str, s: &str, max: usize) -> Result<()> {
    if s.is_empty() {
        return Err(Error::invalid(
            field,
            format!("the {what} must not be empty"),
        ));
    }
    if s.len() > max {
        return Err(Error::invalid(
            field,
            format!(
                "{what} is {} bytes long; the maximum is {max} bytes",
                s.len()
            ),
        ));
    }
    if let Some(bad) = s.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(Error::invalid(
            field,
            format!(
                "{what} {s:?} contains {bad:?}; only printable ASCII without spaces is allowed"
            ),
        ));
    }
    Ok(())
}

/// `count` new document ids: UUIDv7 as 32 lowercase hex characters, unique
/// and increasing (the v7 generator keeps a monotonic counter within a
/// millisecond), so they index well.
pub fn new_ids(count: usize) -> Vec<DocId> {
    (0..count)
        .map(|_| DocId::generated(uuid::Uuid::now_v7().simple().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_names_follow_couchdb_rule() {
        for ok in ["a", "cars", "a0_$()+/-", &"a".repeat(238)] {
            assert!(DbName::parse("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "0a", "_users", "a b", "aé", &"a".repeat(239)] {
            assert!(DbName::parse("name", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn doc_ids() {
        assert!(DocId::parse("id", "car").is_ok());
        assert!(DocId::parse("id", "é/ü x").is_ok());
        assert!(DocId::parse("id", &"x".repeat(1024)).is_ok());
        for bad in ["", "_design", &"x".repeat(1025)] {
            assert!(DocId::parse("id", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn new_ids_are_hex_unique_and_ordered() {
        let ids = new_ids(1000);
        assert!(ids.iter().all(|id| {
            id.as_str().len() == 32
                && id
                    .as_str()
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        }));
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }
}
