//! Rows for `COPY ... FROM STDIN` (text format), made from the row images
//! changes carry, so new rows reach a table without being parsed as
//! `jsonb` and taken apart by `jsonb_populate_recordset` first.
//!
//! An image is `to_jsonb` of the row at its origin (see
//! [`crate::capture::image`]): every scalar column's value is its type's
//! text form, except numbers (kept exact) and booleans; `json`/`jsonb`
//! columns hold their JSON. Those map to COPY text directly. Arrays and
//! composite values are JSON arrays and objects there, whose text forms
//! would need their element types: a row holding one is not encoded (the
//! caller inserts such rows through `jsonb_populate_recordset`). A missing
//! column is NULL, as `jsonb_populate_recordset` makes it.
//!
//! Written by hand: COPY's text format is four escapes and two separators,
//! and no crate maps JSON images to it.

use crate::capture::image::{Cell, Image};

/// Appends one COPY text line for `row` with `columns` in order; `json[i]`
/// says column i is `json`/`jsonb`. Returns false (and leaves `out` as it
/// was) for a row it cannot express.
pub fn encode_row(out: &mut Vec<u8>, row: &Image, columns: &[String], json: &[bool]) -> bool {
    let start = out.len();
    for (i, column) in columns.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        let is_json = json.get(i).copied().unwrap_or(false);
        let ok = match row.get(column) {
            None | Some(Cell::Null) => {
                out.extend_from_slice(b"\\N");
                true
            }
            Some(Cell::Text(s)) if is_json => {
                escape(out, serde_json::to_string(s).expect("a string").as_bytes());
                true
            }
            Some(Cell::Text(s)) => {
                escape(out, s.as_bytes());
                true
            }
            Some(Cell::Bool(b)) if is_json => {
                out.extend_from_slice(if b { b"true" } else { b"false" });
                true
            }
            Some(Cell::Bool(b)) => {
                out.extend_from_slice(if b { b"t" } else { b"f" });
                true
            }
            Some(Cell::Number(n)) => {
                out.extend_from_slice(n.as_bytes());
                true
            }
            Some(Cell::Json(j)) if is_json => {
                escape(out, j.as_bytes());
                true
            }
            Some(Cell::Json(_)) => false,
        };
        if !ok {
            out.truncate(start);
            return false;
        }
    }
    out.push(b'\n');
    true
}

/// COPY text escapes: the backslash itself and the characters that would
/// end a field or a line.
pub fn escape(out: &mut Vec<u8>, text: &[u8]) {
    for &b in text {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn image(v: Value) -> Image {
        Image::from_value(&v).expect("an object")
    }

    /// COPY's reading of one text field (the inverse of `escape`).
    fn unescape(field: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut it = field.iter();
        while let Some(&b) = it.next() {
            if b != b'\\' {
                out.push(b);
                continue;
            }
            match it.next() {
                Some(b'n') => out.push(b'\n'),
                Some(b'r') => out.push(b'\r'),
                Some(b't') => out.push(b'\t'),
                Some(&other) => out.push(other),
                None => {}
            }
        }
        out
    }

    fn cols(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn scalars_nulls_and_json_columns_become_copy_text() {
        let row: Image = serde_json::from_str(
            r#"{"id": 1, "n": 9.6666666666666667, "t": "a\tb\\c\nd", "ok": false, "j": {"a": [1, null]}, "gone": null}"#,
        )
        .unwrap();
        let mut out = Vec::new();
        let columns = cols(&["id", "n", "t", "ok", "j", "gone", "missing"]);
        assert!(encode_row(
            &mut out,
            &row,
            &columns,
            &[false, false, false, false, true, false, false]
        ));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1\t9.6666666666666667\ta\\tb\\\\c\\nd\tf\t{\"a\":[1,null]}\t\\N\t\\N\n"
        );
    }

    #[test]
    fn arrays_and_composites_outside_json_columns_are_left_to_the_caller() {
        let mut out = b"kept".to_vec();
        let columns = cols(&["id", "arr"]);
        assert!(!encode_row(
            &mut out,
            &image(json!({"id": 1, "arr": [1, 2]})),
            &columns,
            &[false, false]
        ));
        assert!(!encode_row(
            &mut out,
            &image(json!({"id": 1, "arr": {"x": 1}})),
            &columns,
            &[false, false]
        ));
        assert_eq!(out, b"kept");
        assert!(encode_row(
            &mut out,
            &image(json!({"id": 1, "arr": [1, 2]})),
            &columns,
            &[false, true]
        ));
    }

    proptest! {
        #[test]
        fn any_text_reads_back_as_itself(text in ".*", other in ".*") {
            let row = image(json!({"a": text, "b": other}));
            let mut out = Vec::new();
            prop_assert!(encode_row(&mut out, &row, &cols(&["a", "b"]), &[false, false]));
            prop_assert_eq!(out.last(), Some(&b'\n'));
            let line = &out[..out.len() - 1];
            let fields: Vec<&[u8]> = line.split(|&b| b == b'\t').collect();
            prop_assert_eq!(fields.len(), 2);
            prop_assert_eq!(unescape(fields[0]), text.as_bytes());
            prop_assert_eq!(unescape(fields[1]), other.as_bytes());
        }
    }
}
