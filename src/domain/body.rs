//! Document bodies: JSON objects kept as their canonical serialization
//! (keys sorted, integral numbers without a fraction), which is what is
//! stored, what the size limit applies to, and what revisions hash. Bodies
//! read back from storage are not parsed here: the API layer decodes the
//! text straight into its wire type.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::{Error, Result};

/// Limits a body must respect.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// The most bytes the canonical JSON may take.
    pub max_bytes: usize,
    /// The deepest nesting of objects and arrays (the body itself is depth 1).
    pub max_depth: usize,
}

/// A validated JSON object body, as canonical JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    /// Shared: a batch keeps the body it writes as the document's state too.
    canonical: Arc<str>,
}

impl Body {
    /// Validates a body given by a client: no reserved (`_`-prefixed)
    /// top-level keys, nesting and size within `limits`.
    pub fn parse(field: &str, map: Map<String, Value>, limits: BodyLimits) -> Result<Self> {
        if let Some(key) = map.keys().find(|k| k.starts_with('_')) {
            return Err(Error::invalid(
                field,
                format!("top-level key {key:?} starts with '_', which is reserved; rename it"),
            ));
        }
        let depth = depth(&map);
        if depth > limits.max_depth {
            return Err(Error::invalid(
                field,
                format!(
                    "the body nests {depth} levels deep; at most {} levels are allowed",
                    limits.max_depth
                ),
            ));
        }
        let body = Self::from_map(map);
        if body.canonical.len() > limits.max_bytes {
            return Err(Error::TooLarge {
                what: format!("{field} (as canonical JSON)"),
                size: body.canonical.len(),
                limit: limits.max_bytes,
            });
        }
        Ok(body)
    }

    /// A body read back from storage, where it was stored in canonical
    /// form by [`Body::parse`]; not parsed again.
    pub fn from_canonical_json(json: &str) -> Result<Self> {
        if !json.starts_with('{') {
            return Err(Error::Storage("stored body is not a JSON object".into()));
        }
        Ok(Body {
            canonical: json.into(),
        })
    }

    /// The empty body of a tombstone.
    pub fn empty() -> Self {
        Self::from_map(Map::new())
    }

    fn from_map(map: Map<String, Value>) -> Self {
        // serde_json's Map is a BTreeMap (the `preserve_order` feature is
        // off), so serialization sorts keys: this is the canonical form.
        Body {
            canonical: Value::Object(map).to_string().into(),
        }
    }

    pub fn canonical_json(&self) -> &str {
        &self.canonical
    }
}

/// Nesting depth of an object: 1 for a flat one. Iterative, so hostile
/// input cannot overflow the stack.
fn depth(map: &Map<String, Value>) -> usize {
    let mut max = 1;
    let mut stack: Vec<(&Value, usize)> = map.values().map(|v| (v, 1)).collect();
    while let Some((value, level)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match value {
            Value::Object(m) => Box::new(m.values()),
            Value::Array(a) => Box::new(a.iter()),
            _ => continue,
        };
        max = max.max(level + 1);
        stack.extend(children.map(|c| (c, level + 1)));
    }
    max
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const LIMITS: BodyLimits = BodyLimits {
        max_bytes: 100,
        max_depth: 3,
    };

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn canonical_form_sorts_keys() {
        let b = Body::parse("body", obj(json!({"b": 1, "a": [true, null]})), LIMITS).unwrap();
        assert_eq!(b.canonical_json(), r#"{"a":[true,null],"b":1}"#);
    }

    #[test]
    fn rejects_reserved_keys_depth_and_size() {
        let e = Body::parse("body", obj(json!({"_id": 1})), LIMITS).unwrap_err();
        assert!(e.to_string().contains("\"_id\""), "{e}");
        assert!(Body::parse("body", obj(json!({"a": {"b": [1]}})), LIMITS).is_ok());
        let e = Body::parse("body", obj(json!({"a": {"b": [[1]]}})), LIMITS).unwrap_err();
        assert!(e.to_string().contains("4 levels"), "{e}");
        let e = Body::parse("body", obj(json!({"a": "x".repeat(100)})), LIMITS).unwrap_err();
        assert!(matches!(e, Error::TooLarge { limit: 100, .. }), "{e}");
    }
}
