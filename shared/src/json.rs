//! Conversions between `google.protobuf.Struct`/`Value` and `serde_json::Value`
//! (jsonb in Postgres), with the depth bound that keeps hostile payloads out.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};
use serde_json::{Map, Number};

/// Nesting deeper than this is rejected (and never recursed into further).
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JsonError {
    #[error("nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("contains a number that is not finite")]
    NonFinite,
    /// Postgres jsonb cannot store U+0000 in strings or keys.
    #[error("contains a NUL character")]
    Nul,
}

/// A Struct as a JSON object.
pub fn struct_to_json(s: &Struct) -> Result<serde_json::Value, JsonError> {
    fields_to_json(s, 1)
}

fn fields_to_json(s: &Struct, depth: usize) -> Result<serde_json::Value, JsonError> {
    if depth > MAX_DEPTH {
        return Err(JsonError::TooDeep);
    }
    let mut map = Map::with_capacity(s.fields.len());
    for (k, v) in &s.fields {
        if k.contains('\0') {
            return Err(JsonError::Nul);
        }
        map.insert(k.clone(), value_to_json(v, depth + 1)?);
    }
    Ok(serde_json::Value::Object(map))
}

fn value_to_json(v: &Value, depth: usize) -> Result<serde_json::Value, JsonError> {
    if depth > MAX_DEPTH {
        return Err(JsonError::TooDeep);
    }
    Ok(match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => serde_json::Value::Number(number(*n)?),
        Some(Kind::StringValue(s)) if s.contains('\0') => return Err(JsonError::Nul),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::StructValue(s)) => fields_to_json(s, depth + 1)?,
        Some(Kind::ListValue(l)) => serde_json::Value::Array(
            l.values
                .iter()
                .map(|v| value_to_json(v, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// A Struct number as JSON. Struct numbers are doubles, so `{"n": 1}` arrives
/// as 1.0; like the protobuf JSON mapping, a whole number is written as a JSON
/// integer (`1`, not `1.0`) whenever an i64 holds it exactly, and any other
/// finite number as a float.
fn number(n: f64) -> Result<Number, JsonError> {
    // 2^63: the first whole double an i64 cannot hold.
    const I64_END: f64 = 9_223_372_036_854_775_808.0;
    if n.fract() == 0.0 && (-I64_END..I64_END).contains(&n) {
        return Ok(Number::from(n as i64));
    }
    Number::from_f64(n).ok_or(JsonError::NonFinite)
}

/// A JSON value as a Struct; a non-object becomes `{"value": ...}`.
pub fn json_to_struct(v: &serde_json::Value) -> Struct {
    match v {
        serde_json::Value::Object(map) => Struct {
            fields: map
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        },
        other => Struct {
            fields: [("value".to_string(), json_to_value(other))].into(),
        },
    }
}

pub fn json_to_value(v: &serde_json::Value) -> Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(_) => Kind::StructValue(json_to_struct(v)),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_nested_values() {
        let json = serde_json::json!({"n": 1.5, "s": "x'; DROP TABLE jobs;--", "l": [true, null, {"a": []}]});
        let back = struct_to_json(&json_to_struct(&json)).unwrap();
        assert_eq!(back, json);
    }

    #[test]
    fn whole_numbers_become_json_integers() {
        let value = json_to_struct(&serde_json::json!({
            "one": 1, "float_one": 1.0, "neg": -42, "zero": -0.0, "half": 0.5,
            "big": 9007199254740993u64, "huge": 1e300, "list": [3, 2.25],
        }));
        let json = struct_to_json(&value).unwrap();
        let text = |key: &str| serde_json::to_string(&json[key]).unwrap();
        assert_eq!(text("one"), "1");
        assert_eq!(text("float_one"), "1");
        assert_eq!(text("neg"), "-42");
        assert_eq!(text("zero"), "0");
        assert_eq!(text("half"), "0.5");
        // Beyond 2^53 the double already rounded: the nearest one is printed.
        assert_eq!(text("big"), "9007199254740992");
        assert_eq!(text("huge"), "1e+300");
        assert_eq!(text("list"), "[3,2.25]");
        assert!(json["one"].is_i64() && json["half"].is_f64());
        let n = |n: f64| {
            struct_to_json(&json_to_struct(&serde_json::json!({ "n": n }))).unwrap()["n"].clone()
        };
        assert!(n(i64::MIN as f64).is_i64());
        assert!(n(-(i64::MIN as f64)).is_f64(), "2^63 does not fit an i64");
        let non_finite = Struct {
            fields: [(
                "n".to_string(),
                Value {
                    kind: Some(Kind::NumberValue(f64::NAN)),
                },
            )]
            .into(),
        };
        assert_eq!(struct_to_json(&non_finite), Err(JsonError::NonFinite));
    }

    #[test]
    fn rejects_nul_in_strings_and_keys() {
        let value = json_to_struct(&serde_json::json!({"a": ["x\u{0}y"]}));
        assert_eq!(struct_to_json(&value), Err(JsonError::Nul));
        let key = json_to_struct(&serde_json::json!({"l": [{"x\u{0}": 1}]}));
        assert_eq!(struct_to_json(&key), Err(JsonError::Nul));
    }

    #[test]
    fn rejects_deep_nesting() {
        let mut v = serde_json::json!(1);
        for _ in 0..(MAX_DEPTH + 1) {
            v = serde_json::json!({ "a": v });
        }
        assert_eq!(struct_to_json(&json_to_struct(&v)), Err(JsonError::TooDeep));
    }
}
