//! A request's JSON data (an array, flat in row-major order or nested, or one value) read
//! straight into a flat vector of its datatype. No value tree is built (serde_json's would take
//! some 30 times the body for an array of numbers), at most the shape's count of values is
//! kept, and a shape larger than the data could hold is refused before anything is read.

use std::fmt;

use anyhow::{anyhow, ensure, Result};
use serde::de::{self, DeserializeSeed, SeqAccess, Unexpected, Visitor};
use serde_json::value::RawValue;

/// A value of a tensor's datatype, from what JSON holds.
pub trait Leaf: Sized {
    fn from_bool(_: bool) -> Option<Self> {
        None
    }
    fn from_i64(_: i64) -> Option<Self> {
        None
    }
    fn from_u64(_: u64) -> Option<Self> {
        None
    }
    fn from_f64(_: f64) -> Option<Self> {
        None
    }
}

impl Leaf for bool {
    fn from_bool(v: bool) -> Option<Self> {
        Some(v)
    }
}

impl Leaf for i64 {
    fn from_i64(v: i64) -> Option<Self> {
        Some(v)
    }
    fn from_u64(v: u64) -> Option<Self> {
        i64::try_from(v).ok()
    }
}

impl Leaf for f64 {
    fn from_i64(v: i64) -> Option<Self> {
        Some(v as f64)
    }
    fn from_u64(v: u64) -> Option<Self> {
        Some(v as f64)
    }
    fn from_f64(v: f64) -> Option<Self> {
        Some(v)
    }
}

/// The `expected` values of `data` in row-major order. `what` names the tensor in errors
/// (`input "input" of shape [2, 3]`), `datatype` the values it takes.
pub fn read<T: Leaf>(
    data: &RawValue,
    expected: usize,
    what: &str,
    datatype: &str,
) -> Result<Vec<T>> {
    let text = data.get();
    // A value takes a byte at least.
    ensure!(
        expected <= text.len(),
        "{what} takes {expected} values; its data holds {} bytes",
        text.len()
    );
    let mut leaves = Leaves {
        values: Vec::with_capacity(expected),
        expected,
        count: 0,
    };
    let mut json = serde_json::Deserializer::from_str(text);
    Seed {
        leaves: &mut leaves,
        datatype,
    }
    .deserialize(&mut json)
    .map_err(|e| anyhow!("{what}: {e}"))?;
    ensure!(
        leaves.count == expected,
        "{what} takes {expected} values, not {}",
        leaves.count
    );
    Ok(leaves.values)
}

/// The values read so far (at most `expected`), and how many were seen.
struct Leaves<T> {
    values: Vec<T>,
    expected: usize,
    count: usize,
}

/// Reads one JSON value (an array's elements in turn) into [`Leaves`].
struct Seed<'a, T> {
    leaves: &'a mut Leaves<T>,
    datatype: &'a str,
}

impl<T: Leaf> Seed<'_, T> {
    fn push<E: de::Error>(self, value: Option<T>, seen: Unexpected) -> Result<(), E> {
        let Some(value) = value else {
            return Err(E::invalid_type(seen, &self));
        };
        let leaves = self.leaves;
        leaves.count += 1;
        if leaves.values.len() < leaves.expected {
            leaves.values.push(value);
        }
        Ok(())
    }
}

impl<'de, T: Leaf> DeserializeSeed<'de> for Seed<'_, T> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, json: D) -> Result<(), D::Error> {
        json.deserialize_any(self)
    }
}

impl<'de, T: Leaf> Visitor<'de> for Seed<'_, T> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "values of datatype {}", self.datatype)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        let Seed { leaves, datatype } = self;
        while items
            .next_element_seed(Seed {
                leaves: &mut *leaves,
                datatype,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.push(T::from_bool(v), Unexpected::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.push(T::from_i64(v), Unexpected::Signed(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.push(T::from_u64(v), Unexpected::Unsigned(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.push(T::from_f64(v), Unexpected::Float(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    #[test]
    fn flat_nested_and_single_values_read_alike() {
        let flat: Vec<f64> = read(&raw("[1, 2.5, -3, 4]"), 4, "x", "FP32").unwrap();
        let nested: Vec<f64> = read(&raw("[[1, 2.5], [-3, 4]]"), 4, "x", "FP32").unwrap();
        assert_eq!(flat, [1.0, 2.5, -3.0, 4.0]);
        assert_eq!(nested, flat);
        assert_eq!(read::<i64>(&raw("7"), 1, "x", "INT32").unwrap(), [7]);
        assert_eq!(
            read::<bool>(&raw("[true, false]"), 2, "x", "BOOL").unwrap(),
            [true, false]
        );
    }

    #[test]
    fn wrong_values_and_counts_are_refused_in_words() {
        let error = |json: &str, expected: usize| {
            format!(
                "{:#}",
                read::<i64>(&raw(json), expected, "input \"input\"", "INT32").unwrap_err()
            )
        };
        assert!(error("[1, \"a\"]", 2)
            .contains("invalid type: string \"a\", expected values of datatype INT32"));
        assert!(error("[1, 2.5]", 2).contains("floating point `2.5`"));
        assert!(error("[1, 2, 3]", 2).contains("takes 2 values, not 3"));
        assert!(error("[[1], []]", 2).contains("takes 2 values, not 1"));
        assert!(error("{\"a\": 1}", 1).contains("invalid type: map"));
    }

    /// A shape of 10^12 values with a few bytes of data is refused before anything is
    /// allocated for it; more values than the shape are counted, not kept.
    #[test]
    fn a_shape_larger_than_its_data_is_refused_before_reading() {
        let err =
            read::<f64>(&raw("[1, 2]"), 1_000_000_000_000, "input \"input\"", "FP64").unwrap_err();
        assert_eq!(
            err.to_string(),
            "input \"input\" takes 1000000000000 values; its data holds 6 bytes"
        );
        let many = format!("[{}]", vec!["1"; 10_000].join(","));
        let err = read::<f64>(&raw(&many), 2, "x", "FP64").unwrap_err();
        assert!(
            err.to_string().contains("takes 2 values, not 10000"),
            "{err}"
        );
    }
}
