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

pub fn json_to_struct(map: Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(v: Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(prost_types::NullValue::NullValue.into()),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(json_to_value).collect(),
        }),
        Value::Object(m) => Kind::StructValue(json_to_struct(m)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn document(doc: domain::Document) -> pb::Document {
    pb::Document {
        id: doc.id.into_string(),
        rev: doc.rev.to_string(),
        body: Some(json_to_struct(doc.body.into_map())),
        seq: doc.seq,
    }
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
    }
}

pub fn subscribe_item(item: crate::hub::Item) -> pb::SubscribeResponse {
    use crate::hub::Item;
    use pb::subscribe_response::Event;
    let event = match item {
        Item::Notification(event) => Event::Notification(notification(&event)),
        Item::Subscribed(head_seq) => Event::Subscribed(pb::Subscribed { head_seq }),
        Item::Progress(head_seq) => Event::Progress(pb::Progress { head_seq }),
    };
    pb::SubscribeResponse { event: Some(event) }
}

pub fn change(c: domain::Change) -> pb::Change {
    pb::Change {
        id: c.id.into_string(),
        rev: c.rev.to_string(),
        seq: c.seq,
        deleted: c.deleted,
        body: c.body.map(|b| json_to_struct(b.into_map())),
    }
}

pub fn database(db: domain::DatabaseInfo) -> pb::Database {
    pb::Database {
        name: db.name.into_string(),
        sync_key: db.sync_key.into_string(),
        doc_count: db.doc_count,
        update_seq: db.update_seq,
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
