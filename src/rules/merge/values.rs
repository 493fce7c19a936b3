//! rules::merge::values: what the merges do to single JSON values: a total
//! order (`compare`), max/min with null losing, exact integer sums, and set
//! union.

use std::cmp::Ordering;

use serde_json::Value;

/// A total order on JSON values: null < bool < number < string < array <
/// object; numbers by value, the rest by their text.
pub fn compare(a: &Value, b: &Value) -> Ordering {
    fn kind(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Number(_) => 2,
            Value::String(_) => 3,
            Value::Array(_) => 4,
            Value::Object(_) => 5,
        }
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i.cmp(&j),
            _ => {
                let (f, g) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
                f.total_cmp(&g)
            }
        },
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        _ => kind(a)
            .cmp(&kind(b))
            .then_with(|| a.to_string().cmp(&b.to_string())),
    }
}

/// Whether `candidate` beats `current` for max (`want = Greater`) or min: a
/// value beats null, never the reverse; values equal by [`compare`] but
/// spelled differently (1 and 1.0) are ordered by their text, so every
/// region keeps the same one.
pub(super) fn better(candidate: &Value, current: &Value, want: Ordering) -> bool {
    match (current.is_null(), candidate.is_null()) {
        (_, true) => false,
        (true, false) => true,
        _ => {
            compare(candidate, current)
                .then_with(|| candidate.to_string().cmp(&current.to_string()))
                == want
        }
    }
}

/// The larger (`want = Greater`) or smaller value; null only if both are.
#[cfg(test)]
pub(super) fn pick(a: &Value, b: &Value, want: Ordering) -> Value {
    if better(b, a, want) {
        b.clone()
    } else {
        a.clone()
    }
}

pub(super) fn number(v: &Value) -> Option<&serde_json::Number> {
    match v {
        Value::Number(n) => Some(n),
        _ => None,
    }
}

/// a + b for JSON numbers (null counts as zero): exact for integers, f64 otherwise.
pub(super) fn add(a: &Value, b: &Value) -> Value {
    arith(a, b, i64::checked_add, |x, y| x + y)
}

/// a - b, as [`add`] (the test model of capture uses it).
#[cfg(test)]
pub(super) fn sub(a: &Value, b: &Value) -> Value {
    arith(a, b, i64::checked_sub, |x, y| x - y)
}

pub(super) fn arith(
    a: &Value,
    b: &Value,
    int: fn(i64, i64) -> Option<i64>,
    float: fn(f64, f64) -> f64,
) -> Value {
    let zero = serde_json::Number::from(0);
    let (x, y) = (number(a).unwrap_or(&zero), number(b).unwrap_or(&zero));
    if let (Some(i), Some(j)) = (x.as_i64(), y.as_i64()) {
        if let Some(r) = int(i, j) {
            return Value::from(r);
        }
    }
    let r = float(x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
    serde_json::Number::from_f64(r).map_or(Value::Null, Value::Number)
}

/// Every element of both arrays once, sorted by [`compare`]; a non-array
/// counts as empty.
pub(super) fn union(a: &Value, b: &Value) -> Value {
    let mut all: Vec<Value> = [a, b]
        .into_iter()
        .filter_map(Value::as_array)
        .flatten()
        .cloned()
        .collect();
    if all.is_empty() && a.is_null() && b.is_null() {
        return Value::Null;
    }
    all.sort_by(compare);
    all.dedup();
    Value::Array(all)
}
