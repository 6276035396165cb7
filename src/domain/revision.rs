//! Revisions `N-<32 lowercase hex>`: N is the generation, the hash is the
//! first 128 bits of SHA-256 over the parent revision, the deleted flag and
//! the canonical body, so the same edit from the same parent gives the same
//! revision on any server.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use super::{Body, Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rev {
    generation: u64,
    hash: String,
}

impl Rev {
    pub fn parse(field: &str, s: &str) -> Result<Self> {
        s.parse().map_err(|why: String| Error::invalid(field, why))
    }

    /// The revision produced by writing `body` (deleted or not) on top of
    /// `parent` (`None` for a brand-new document).
    pub fn next(parent: Option<&Rev>, deleted: bool, body: &Body) -> Rev {
        let mut hasher = Sha256::new();
        let parent_str = parent.map(Rev::to_string).unwrap_or_default();
        hasher.update(parent_str.as_bytes());
        hasher.update([0, u8::from(deleted), 0]);
        hasher.update(body.canonical_json().as_bytes());
        let digest = hasher.finalize();
        Rev {
            generation: parent.map_or(1, |p| p.generation + 1),
            hash: hex::encode(&digest[..16]),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl FromStr for Rev {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{s:?} is not a revision; expected \"N-<32 lowercase hex>\", as returned by the last write"
            )
        };
        let (gen_str, hash) = s.split_once('-').ok_or_else(bad)?;
        let generation: u64 = gen_str.parse().map_err(|_| bad())?;
        let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if generation == 0
            || gen_str.starts_with('0')
            || hash.len() != 32
            || !hash.bytes().all(lower_hex)
        {
            return Err(bad());
        }
        Ok(Rev {
            generation,
            hash: hash.to_owned(),
        })
    }
}

impl fmt::Display for Rev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.generation, self.hash)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::domain::BodyLimits;

    fn body(v: serde_json::Value) -> Body {
        let serde_json::Value::Object(m) = v else {
            panic!()
        };
        Body::parse(
            "body",
            m,
            BodyLimits {
                max_bytes: 1 << 20,
                max_depth: 64,
            },
        )
        .unwrap()
    }

    #[test]
    fn deterministic_and_sensitive() {
        let r1 = Rev::next(None, false, &body(json!({"a": 1, "b": 2})));
        assert_eq!(r1, Rev::next(None, false, &body(json!({"b": 2, "a": 1}))));
        assert_eq!(r1.generation(), 1);
        assert_ne!(r1, Rev::next(None, false, &body(json!({"a": 2, "b": 2}))));
        let r2 = Rev::next(Some(&r1), false, &body(json!({"a": 1})));
        assert_eq!(r2.generation(), 2);
        assert_ne!(r2, Rev::next(Some(&r1), true, &body(json!({"a": 1}))));
        assert_eq!(r2.to_string().parse::<Rev>().unwrap(), r2);
        assert_eq!(r2.to_string().len(), 2 + 32);
    }

    #[test]
    fn parse_rejects_malformed() {
        let hash = "0123456789abcdef0123456789abcdef";
        assert!(format!("1-{hash}").parse::<Rev>().is_ok());
        for bad in [
            "",
            "1",
            "0-0123456789abcdef0123456789abcdef",
            "01-0123456789abcdef0123456789abcdef",
            "x-0123456789abcdef0123456789abcdef",
            "1-0123456789ABCDEF0123456789abcdef",
            "1-0123",
        ] {
            assert!(bad.parse::<Rev>().is_err(), "{bad}");
        }
    }
}
