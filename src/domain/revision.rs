//! Revisions `N-<32 lowercase hex>`: N is the generation, the hash is the
//! first 128 bits of SHA-256 over the parent revision, the deleted flag and
//! the canonical body, so the same edit from the same parent gives the same
//! revision on any server.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{Body, Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rev {
    generation: u64,
    /// The whole `N-<hash>` text, shared: a write's revision goes into its
    /// row, its event and its answer, and is bound to SQL as it is.
    text: Arc<str>,
}

impl Rev {
    pub fn parse(field: &str, s: &str) -> Result<Self> {
        s.parse().map_err(|why: String| Error::invalid(field, why))
    }

    /// The revision produced by writing `body` (deleted or not) on top of
    /// `parent` (`None` for a brand-new document).
    pub fn next(parent: Option<&Rev>, deleted: bool, body: &Body) -> Rev {
        let mut hasher = Sha256::new();
        hasher.update(parent.map_or("", Rev::as_str).as_bytes());
        hasher.update([0, u8::from(deleted), 0]);
        hasher.update(body.canonical_json().as_bytes());
        let digest = hasher.finalize();
        let generation = parent.map_or(1, |p| p.generation + 1);
        let mut text = generation.to_string();
        text.push('-');
        text.push_str(&hex::encode(&digest[..16]));
        Rev {
            generation,
            text: text.into(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// `N-<hash>`, as stored and sent.
    pub fn as_str(&self) -> &str {
        &self.text
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
            text: s.into(),
        })
    }
}

impl fmt::Display for Rev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
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

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::*;
    use crate::domain::BodyLimits;

    const LIMITS: BodyLimits = BodyLimits {
        max_bytes: 1 << 20,
        max_depth: 64,
    };

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[a-zé\"\\\\ ]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// JSON text with every object's keys in an order chosen by `seed`.
    fn shuffled_text(v: &Value, seed: u64) -> String {
        match v {
            Value::Object(m) => {
                let mut entries: Vec<_> = m.iter().collect();
                let n = entries.len();
                if n > 1 {
                    entries.rotate_left((seed as usize) % n);
                    if seed % 2 == 1 {
                        entries.reverse();
                    }
                }
                let fields: Vec<String> = entries
                    .iter()
                    .map(|(k, v)| {
                        format!(
                            "{}:{}",
                            Value::String((*k).clone()),
                            shuffled_text(v, seed / 3 + 1)
                        )
                    })
                    .collect();
                format!("{{{}}}", fields.join(","))
            }
            Value::Array(a) => {
                let items: Vec<String> = a.iter().map(|v| shuffled_text(v, seed / 5 + 2)).collect();
                format!("[{}]", items.join(","))
            }
            other => other.to_string(),
        }
    }

    proptest! {
        /// Equal JSON in any key order gives the same revision.
        #[test]
        fn key_order_does_not_change_the_revision(
            fields in prop::collection::btree_map("[a-z]{1,4}", json_value(), 0..8),
            seed in any::<u64>(),
            deleted in any::<bool>(),
        ) {
            let value = Value::Object(fields.into_iter().collect());
            let parse = |text: &str| -> Body {
                let map: Map<String, Value> = serde_json::from_str(text).unwrap();
                Body::parse("body", map, LIMITS).unwrap()
            };
            let a = parse(&value.to_string());
            let b = parse(&shuffled_text(&value, seed));
            prop_assert_eq!(a.canonical_json(), b.canonical_json());
            let parent = Rev::next(None, false, &Body::empty());
            prop_assert_eq!(Rev::next(Some(&parent), deleted, &a), Rev::next(Some(&parent), deleted, &b));
        }

        /// A different body gives a different revision.
        #[test]
        fn different_bodies_give_different_revisions(a in json_value(), b in json_value()) {
            prop_assume!(a != b);
            let wrap = |v: Value| {
                let mut m = Map::new();
                m.insert("v".into(), v);
                Body::parse("body", m, LIMITS).unwrap()
            };
            let (a, b) = (wrap(a), wrap(b));
            prop_assume!(a.canonical_json() != b.canonical_json());
            prop_assert_ne!(Rev::next(None, false, &a), Rev::next(None, false, &b));
        }
    }
}
