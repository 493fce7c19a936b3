//! capture::image: a row image, the columns of one row by name. A change
//! carries its key, its new row, the old values of counters and the rule
//! engine's column versions as images, from the log to the apply.
//!
//! An image is what `to_jsonb(row)` gives at the origin (a JSON object of
//! the row's columns), kept flat: names and values in one buffer, each value
//! a scalar's text or the JSON text of a nested array or object. Decoding
//! batches into `serde_json::Value` trees cost 6-7 µs per change of the
//! catch-up benchmark's 10-column table (a map node and a string per
//! column, and MessagePack was no faster: the trees are the cost); an image
//! is one allocation, is read by column without parsing, and is written to
//! COPY text, to JSON for SQL and to the peer protocol as it is. The rule
//! engine, which merges columns, asks for the tree ([`Image::to_value`]).
//!
//! Written by hand: no crate keeps a JSON object flat and readable by key.
//! The layout, per column: name length (u32 LE), name, kind (u8), value
//! length (u32 LE), value. Only [`Image::from_bytes`] takes bytes from
//! outside, and it checks every entry.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// One row's columns, in the order they were written.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Image {
    buf: Vec<u8>,
}

/// One column's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell<'a> {
    Null,
    Bool(bool),
    /// A JSON number's text, exact.
    Number(&'a str),
    /// A string: a scalar column's text form.
    Text(&'a str),
    /// JSON text of an array or object (arrays, composites, json columns).
    Json(&'a str),
}

const NULL: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
const NUMBER: u8 = 3;
const TEXT: u8 = 4;
const JSON: u8 = 5;

/// The token `serde_json` (with `arbitrary_precision`) hands a number to a
/// visitor under, as a one-entry map.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ImageError {
    #[error("row image truncated")]
    Truncated,
    #[error("row image: unknown value kind {0}")]
    Kind(u8),
    #[error("row image: text is not UTF-8")]
    Utf8,
    #[error("row image: {0:?} is not a JSON number")]
    NotNumber(String),
    #[error("row image: {0:?} is not JSON")]
    NotJson(String),
}

impl Image {
    pub fn new() -> Image {
        Image::default()
    }

    /// Appends a column.
    pub fn push(&mut self, name: &str, cell: Cell<'_>) {
        let (kind, text) = match cell {
            Cell::Null => (NULL, ""),
            Cell::Bool(false) => (FALSE, ""),
            Cell::Bool(true) => (TRUE, ""),
            Cell::Number(n) => (NUMBER, n),
            Cell::Text(t) => (TEXT, t),
            Cell::Json(j) => (JSON, j),
        };
        put_str(&mut self.buf, name);
        self.buf.push(kind);
        put_str(&mut self.buf, text);
    }

    pub fn iter(&self) -> Entries<'_> {
        Entries { rest: &self.buf }
    }

    pub fn get(&self, name: &str) -> Option<Cell<'_>> {
        self.iter().find(|(n, _)| *n == name).map(|(_, c)| c)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The image's bytes, as [`Image::from_bytes`] takes them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// An image from bytes that came from elsewhere: every entry checked.
    pub fn from_bytes(buf: Vec<u8>) -> Result<Image, ImageError> {
        let mut rest = &buf[..];
        while !rest.is_empty() {
            let ((_, cell), after) = split_entry(rest)?;
            match cell {
                Cell::Number(n) if serde_json::from_str::<serde_json::Number>(n).is_err() => {
                    return Err(ImageError::NotNumber(n.to_string()))
                }
                Cell::Json(j) if serde_json::from_str::<de::IgnoredAny>(j).is_err() => {
                    return Err(ImageError::NotJson(j.to_string()))
                }
                _ => {}
            }
            rest = after;
        }
        Ok(Image { buf })
    }

    /// The image of a JSON object; `None` for anything else.
    pub fn from_value(value: &Value) -> Option<Image> {
        let Value::Object(map) = value else {
            return None;
        };
        let mut image = Image::new();
        for (name, v) in map {
            let text;
            let cell = match v {
                Value::Null => Cell::Null,
                Value::Bool(b) => Cell::Bool(*b),
                Value::Number(n) => {
                    text = n.to_string();
                    Cell::Number(&text)
                }
                Value::String(s) => Cell::Text(s),
                Value::Array(_) | Value::Object(_) => {
                    text = v.to_string();
                    Cell::Json(&text)
                }
            };
            image.push(name, cell);
        }
        Some(image)
    }

    /// The image as a JSON object.
    pub fn to_value(&self) -> Value {
        let map = self
            .iter()
            .map(|(name, cell)| {
                let v = match cell {
                    Cell::Null => Value::Null,
                    Cell::Bool(b) => Value::Bool(b),
                    Cell::Text(t) => Value::String(t.to_string()),
                    Cell::Number(t) | Cell::Json(t) => {
                        serde_json::from_str(t).expect("checked when the image was made")
                    }
                };
                (name.to_string(), v)
            })
            .collect();
        Value::Object(map)
    }

    /// Appends the image as JSON text.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, (name, cell)) in self.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_string(out, name);
            out.push(b':');
            match cell {
                Cell::Null => out.extend_from_slice(b"null"),
                Cell::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
                Cell::Text(t) => json_string(out, t),
                Cell::Number(t) | Cell::Json(t) => out.extend_from_slice(t.as_bytes()),
            }
        }
        out.push(b'}');
    }

    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(self.buf.len() + 16);
        self.write_json(&mut out);
        String::from_utf8(out).expect("JSON of UTF-8 text")
    }
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_json())
    }
}

/// The columns of an [`Image`].
pub struct Entries<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Entries<'a> {
    type Item = (&'a str, Cell<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let (entry, rest) = split_entry(self.rest).expect("checked when the image was made");
        self.rest = rest;
        Some(entry)
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).expect("a column is under 4 GiB");
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn take_str(b: &[u8]) -> Result<(&str, &[u8]), ImageError> {
    let (len, b) = b.split_first_chunk::<4>().ok_or(ImageError::Truncated)?;
    let len = u32::from_le_bytes(*len) as usize;
    if b.len() < len {
        return Err(ImageError::Truncated);
    }
    let (s, b) = b.split_at(len);
    Ok((std::str::from_utf8(s).map_err(|_| ImageError::Utf8)?, b))
}

type Entry<'a> = (&'a str, Cell<'a>);

fn split_entry(b: &[u8]) -> Result<(Entry<'_>, &[u8]), ImageError> {
    let (name, b) = take_str(b)?;
    let (&kind, b) = b.split_first().ok_or(ImageError::Truncated)?;
    let (text, b) = take_str(b)?;
    let cell = match kind {
        NULL => Cell::Null,
        FALSE => Cell::Bool(false),
        TRUE => Cell::Bool(true),
        NUMBER => Cell::Number(text),
        TEXT => Cell::Text(text),
        JSON => Cell::Json(text),
        k => return Err(ImageError::Kind(k)),
    };
    Ok(((name, cell), b))
}

fn json_string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to memory");
}

impl Serialize for Image {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let mut map = serializer.serialize_map(None)?;
        for (name, cell) in self.iter() {
            match cell {
                Cell::Null => map.serialize_entry(name, &())?,
                Cell::Bool(b) => map.serialize_entry(name, &b)?,
                Cell::Text(t) => map.serialize_entry(name, t)?,
                Cell::Number(t) => {
                    let n: serde_json::Number = t.parse().map_err(S::Error::custom)?;
                    map.serialize_entry(name, &n)?
                }
                Cell::Json(t) => {
                    let v: Value = serde_json::from_str(t).map_err(S::Error::custom)?;
                    map.serialize_entry(name, &v)?
                }
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Image {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Image, D::Error> {
        deserializer.deserialize_map(ImageVisitor)
    }
}

struct ImageVisitor;

impl<'de> Visitor<'de> for ImageVisitor {
    type Value = Image;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a row image (a JSON object of columns)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Image, A::Error> {
        let mut image = Image::new();
        while let Some(Text(name)) = map.next_key::<Text<'de>>()? {
            let cell = map.next_value_seed(OwnedCell)?;
            image.push(&name, cell.as_cell());
        }
        Ok(image)
    }
}

/// A string, borrowed from the input where it can be.
struct Text<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A column's value while an image is decoded.
enum Parsed<'de> {
    Null,
    Bool(bool),
    Number(String),
    Text(Cow<'de, str>),
    Json(String),
}

impl Parsed<'_> {
    fn as_cell(&self) -> Cell<'_> {
        match self {
            Parsed::Null => Cell::Null,
            Parsed::Bool(b) => Cell::Bool(*b),
            Parsed::Number(n) => Cell::Number(n),
            Parsed::Text(t) => Cell::Text(t),
            Parsed::Json(j) => Cell::Json(j),
        }
    }
}

struct OwnedCell;

impl<'de> DeserializeSeed<'de> for OwnedCell {
    type Value = Parsed<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Parsed<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for OwnedCell {
    type Value = Parsed<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a column's JSON value")
    }
    fn visit_unit<E>(self) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Null)
    }
    fn visit_none<E>(self) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Parsed<'de>, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Number(n.to_string()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Number(n.to_string()))
    }
    fn visit_i128<E>(self, n: i128) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Number(n.to_string()))
    }
    fn visit_u128<E>(self, n: u128) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Number(n.to_string()))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Parsed<'de>, E> {
        serde_json::Number::from_f64(n)
            .map(|n| Parsed::Number(n.to_string()))
            .ok_or_else(|| E::custom("a number JSON cannot hold"))
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Text(Cow::Borrowed(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Text(Cow::Owned(s.to_string())))
    }
    fn visit_string<E>(self, s: String) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Text(Cow::Owned(s)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Parsed<'de>, A::Error> {
        let v = Value::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
        Ok(Parsed::Json(v.to_string()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parsed<'de>, A::Error> {
        // serde_json hands an exact number over as a map of one token.
        let mut object = serde_json::Map::new();
        if let Some(Text(first)) = map.next_key::<Text<'de>>()? {
            if first == NUMBER_TOKEN {
                let Text(n) = map.next_value::<Text<'de>>()?;
                return Ok(Parsed::Number(n.into_owned()));
            }
            object.insert(first.into_owned(), map.next_value()?);
        }
        while let Some((k, v)) = map.next_entry::<String, Value>()? {
            object.insert(k, v);
        }
        Ok(Parsed::Json(Value::Object(object).to_string()))
    }
}

/// As `json`/`jsonb` parameters and results, written and read without a
/// `serde_json::Value` in between.
mod sql {
    use bytes::BufMut;
    use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};

    use super::Image;

    type BoxError = Box<dyn std::error::Error + Sync + Send>;

    impl ToSql for Image {
        fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, BoxError> {
            if *ty == Type::JSONB {
                out.put_u8(1); // jsonb's binary format version
            }
            let mut text = Vec::with_capacity(self.buf.len() + 16);
            self.write_json(&mut text);
            out.put_slice(&text);
            Ok(IsNull::No)
        }

        fn accepts(ty: &Type) -> bool {
            *ty == Type::JSONB || *ty == Type::JSON
        }

        to_sql_checked!();
    }

    impl<'a> FromSql<'a> for Image {
        fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Image, BoxError> {
            let raw = match (*ty == Type::JSONB, raw.split_first()) {
                (true, Some((1, rest))) => rest,
                (true, _) => return Err("unsupported jsonb format version".into()),
                (false, _) => raw,
            };
            Ok(serde_json::from_slice(raw)?)
        }

        fn accepts(ty: &Type) -> bool {
            *ty == Type::JSONB || *ty == Type::JSON
        }
    }
}

#[cfg(test)]
mod tests;
