//! Conversions between the wire types (prost) and the domain types.
//! `google.protobuf.Struct` bodies become JSON objects here: numbers must be
//! finite, and integral numbers are kept as integers so the canonical JSON
//! (and so the revision) does not depend on how a client encoded them.

use prost_types::value::Kind;
use serde_json::{Map, Number, Value};

use crate::domain::{self, Error, Result};
use crate::pb;

/// The largest integer a double holds exactly (2^53).
const MAX_SAFE_INT: f64 = 9_007_199_254_740_992.0;

pub fn struct_to_json(field: &str, s: prost_types::Struct) -> Result<Map<String, Value>> {
    s.fields
        .into_iter()
        .map(|(k, v)| {
            let path = format!("{field}.{k}");
            value_to_json(&path, v).map(|v| (k, v))
        })
        .collect()
}

fn value_to_json(path: &str, v: prost_types::Value) -> Result<Value> {
    Ok(match v.kind {
        None => {
            return Err(Error::invalid(
                path,
                "a google.protobuf.Value without a kind; set one of null, number, string, bool, struct or list",
            ));
        }
        Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::NumberValue(n)) => number_to_json(path, n)?,
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(path, s)?),
        Some(Kind::ListValue(l)) => Value::Array(
            l.values
                .into_iter()
                .enumerate()
                .map(|(i, v)| value_to_json(&format!("{path}[{i}]"), v))
                .collect::<Result<_>>()?,
        ),
    })
}

fn number_to_json(path: &str, n: f64) -> Result<Value> {
    if !n.is_finite() {
        return Err(Error::invalid(
            path,
            format!("{n} is not a JSON number; only finite numbers are allowed"),
        ));
    }
    if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INT {
        // Exact: |n| <= 2^53 fits an i64 without loss; -0.0 becomes 0.
        #[allow(clippy::cast_possible_truncation)]
        return Ok(Value::Number(Number::from(n as i64)));
    }
    Number::from_f64(n)
        .map(Value::Number)
        .ok_or_else(|| Error::invalid(path, format!("{n} is not a JSON number")))
}

/// A stored body as a `google.protobuf.Struct`, decoded straight from its
/// JSON text (no intermediate JSON tree: a Get allocates once per value).
pub fn body_struct(body: &domain::Body) -> Result<prost_types::Struct> {
    match serde_json::from_str::<WireValue>(body.canonical_json()) {
        Ok(WireValue(prost_types::Value {
            kind: Some(Kind::StructValue(s)),
        })) => Ok(s),
        Ok(_) => Err(Error::Storage("a stored body is not a JSON object".into())),
        Err(e) => Err(Error::Storage(Box::new(e))),
    }
}

/// A `google.protobuf.Value` deserialized from JSON text.
struct WireValue(prost_types::Value);

impl<'de> serde::Deserialize<'de> for WireValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(WireVisitor)
    }
}

struct WireVisitor;

impl<'de> serde::de::Visitor<'de> for WireVisitor {
    type Value = WireValue;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> std::result::Result<WireValue, E> {
        Ok(wire(Kind::NullValue(
            prost_types::NullValue::NullValue.into(),
        )))
    }
    fn visit_bool<E>(self, b: bool) -> std::result::Result<WireValue, E> {
        Ok(wire(Kind::BoolValue(b)))
    }
    #[allow(clippy::cast_precision_loss)]
    fn visit_i64<E>(self, n: i64) -> std::result::Result<WireValue, E> {
        Ok(wire(Kind::NumberValue(n as f64)))
    }
    #[allow(clippy::cast_precision_loss)]
    fn visit_u64<E>(self, n: u64) -> std::result::Result<WireValue, E> {
        Ok(wire(Kind::NumberValue(n as f64)))
    }
    fn visit_f64<E>(self, n: f64) -> std::result::Result<WireValue, E> {
        Ok(wire(Kind::NumberValue(n)))
    }
    fn visit_str<E>(self, s: &str) -> std::result::Result<WireValue, E> {
        Ok(wire(Kind::StringValue(s.to_owned())))
    }
    fn visit_string<E>(self, s: String) -> std::result::Result<WireValue, E> {
        Ok(wire(Kind::StringValue(s)))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<WireValue, A::Error> {
        let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(WireValue(v)) = seq.next_element()? {
            values.push(v);
        }
        Ok(wire(Kind::ListValue(prost_types::ListValue { values })))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<WireValue, A::Error> {
        let mut fields = std::collections::BTreeMap::new();
        while let Some((k, WireValue(v))) = map.next_entry::<String, WireValue>()? {
            fields.insert(k, v);
        }
        Ok(wire(Kind::StructValue(prost_types::Struct { fields })))
    }
}

fn wire(kind: Kind) -> WireValue {
    WireValue(prost_types::Value { kind: Some(kind) })
}

pub fn document(doc: domain::Document) -> Result<pb::Document> {
    Ok(pb::Document {
        body: Some(body_struct(&doc.body)?),
        id: doc.id.into_string(),
        rev: doc.rev.to_string(),
        seq: doc.seq,
    })
}

pub fn notification(event: &domain::Event) -> pb::Notification {
    pb::Notification {
        sync_key: event.sync_key.to_string(),
        seq: event.seq,
        database: event
            .database
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        id: event
            .id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        rev: event
            .rev
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        deleted: event.deleted,
        attributes: event.attributes.clone().into_iter().collect(),
        database_deleted: event.is_database_deleted(),
    }
}

/// A subscription item for `listener`. A notification of a database the
/// listener may not read keeps only its sync key and seq: subscribing to a
/// key does not reveal database names, document ids or revisions.
pub fn subscribe_item(
    item: crate::hub::Item,
    listener: &crate::auth::Principal,
) -> pb::SubscribeResponse {
    use crate::hub::Item;
    use pb::subscribe_response::Event;
    let event = match item {
        Item::Notification(event) => match &event.database {
            Some(db) if !listener.may_read(db.as_str()) => Event::Notification(pb::Notification {
                sync_key: event.sync_key.to_string(),
                seq: event.seq,
                ..Default::default()
            }),
            _ => Event::Notification(notification(&event)),
        },
        Item::Subscribed(head_seq) => Event::Subscribed(pb::Subscribed { head_seq }),
        Item::Progress(head_seq) => Event::Progress(pb::Progress { head_seq }),
    };
    pb::SubscribeResponse { event: Some(event) }
}

/// A change for the wire; with `json_bodies` its body as JSON text
/// (`body_json`) instead of a Struct.
pub fn change(c: domain::Change, json_bodies: bool) -> Result<pb::Change> {
    let (body, body_json) = match &c.body {
        Some(b) if json_bodies => (None, b.canonical_json().to_owned()),
        Some(b) => (Some(body_struct(b)?), String::new()),
        None => (None, String::new()),
    };
    Ok(pb::Change {
        body,
        body_json,
        id: c.id.into_string(),
        rev: c.rev.to_string(),
        seq: c.seq,
        deleted: c.deleted,
    })
}

pub fn database(db: domain::DatabaseInfo) -> pb::Database {
    pb::Database {
        name: db.name.into_string(),
        sync_key: db.sync_key.into_string(),
        doc_count: db.doc_count,
        update_seq: db.update_seq,
        created_seq: db.created_seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(n: f64) -> prost_types::Value {
        prost_types::Value {
            kind: Some(Kind::NumberValue(n)),
        }
    }

    #[test]
    fn integral_numbers_become_integers() {
        assert_eq!(value_to_json("n", num(1.0)).unwrap().to_string(), "1");
        assert_eq!(value_to_json("n", num(-0.0)).unwrap().to_string(), "0");
        assert_eq!(value_to_json("n", num(1.5)).unwrap().to_string(), "1.5");
        assert_eq!(
            value_to_json("n", num(1e300)).unwrap().to_string(),
            "1e+300"
        );
    }

    proptest::proptest! {
        /// However a client encodes an integer (1, 1.0), it is stored, and so
        /// hashed into the revision, the same way.
        #[test]
        fn integral_doubles_are_canonical_integers(n in -(1i64 << 53)..(1i64 << 53)) {
            #[allow(clippy::cast_precision_loss)]
            let as_double = n as f64;
            proptest::prop_assert_eq!(value_to_json("n", num(as_double)).unwrap(), serde_json::Value::from(n));
        }
    }

    #[test]
    fn non_finite_numbers_are_invalid() {
        for n in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let e = value_to_json("body.x", num(n)).unwrap_err();
            assert!(e.to_string().contains("body.x"), "{e}");
        }
    }
}
