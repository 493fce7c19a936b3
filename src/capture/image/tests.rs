use super::*;
use proptest::prelude::*;
use serde_json::json;

fn sample() -> Value {
    json!({
        "id": 7,
        "big": 123456789012345678901234567890_u128,
        "price": 12.50,
        "name": "tab\there \"quoted\" \\ é",
        "flag": true,
        "gone": null,
        "tags": ["a", "b"],
        "doc": {"k": [1, 2.5, null]}
    })
}

#[test]
fn an_image_reads_by_column_and_keeps_numbers_exact() {
    let text = r#"{"id": 7, "n": 1.50, "t": "x", "j": {"a": 1}, "z": null, "b": false}"#;
    let image: Image = serde_json::from_str(text).unwrap();
    assert_eq!(image.get("id"), Some(Cell::Number("7")));
    assert_eq!(image.get("n"), Some(Cell::Number("1.50")));
    assert_eq!(image.get("t"), Some(Cell::Text("x")));
    assert_eq!(image.get("j"), Some(Cell::Json(r#"{"a":1}"#)));
    assert_eq!(image.get("z"), Some(Cell::Null));
    assert_eq!(image.get("b"), Some(Cell::Bool(false)));
    assert_eq!(image.get("nope"), None);
    assert_eq!(image.len(), 6);
    assert_eq!(
        image.to_json(),
        r#"{"id":7,"n":1.50,"t":"x","j":{"a":1},"z":null,"b":false}"#
    );
}

#[test]
fn json_text_values_and_bytes_agree() {
    let v = sample();
    let from_value = Image::from_value(&v).unwrap();
    let from_text: Image = serde_json::from_str(&v.to_string()).unwrap();
    let through_value: Image = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(from_value.to_value(), v);
    assert_eq!(from_text.to_value(), v);
    assert_eq!(through_value.to_value(), v);
    assert_eq!(serde_json::to_value(&from_text).unwrap(), v);
    let again = Image::from_bytes(from_text.as_bytes().to_vec()).unwrap();
    assert_eq!(again, from_text);
}

#[test]
fn only_objects_are_images() {
    assert!(Image::from_value(&json!([1])).is_none());
    assert!(serde_json::from_str::<Image>("[1]").is_err());
    assert!(serde_json::from_str::<Image>("\"x\"").is_err());
    assert!(serde_json::from_str::<Option<Image>>("null")
        .unwrap()
        .is_none());
}

#[test]
fn bytes_from_elsewhere_are_checked() {
    let mut good = Image::new();
    good.push("n", Cell::Number("1e5"));
    assert!(Image::from_bytes(good.as_bytes().to_vec()).is_ok());
    let mut bad = Image::new();
    bad.push("n", Cell::Number("1e"));
    assert!(matches!(
        Image::from_bytes(bad.buf),
        Err(ImageError::NotNumber(_))
    ));
    let mut bad = Image::new();
    bad.push("j", Cell::Json("{"));
    assert!(matches!(
        Image::from_bytes(bad.buf),
        Err(ImageError::NotJson(_))
    ));
    let cut = &good.as_bytes()[..good.as_bytes().len() - 1];
    assert_eq!(Image::from_bytes(cut.to_vec()), Err(ImageError::Truncated));
    let mut kind = good.as_bytes().to_vec();
    kind[5] = 9;
    assert_eq!(Image::from_bytes(kind), Err(ImageError::Kind(9)));
}

fn json_scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e12f64..1e12).prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_scalar().prop_recursive(3, 12, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn any_object_survives_every_form(
        row in proptest::collection::btree_map(".{0,8}", json_value(), 0..8)
    ) {
        let v = Value::Object(row.into_iter().collect());
        let image = Image::from_value(&v).unwrap();
        prop_assert_eq!(image.to_value(), v.clone());
        let parsed: Image = serde_json::from_slice(&{
            let mut out = Vec::new();
            image.write_json(&mut out);
            out
        }).unwrap();
        prop_assert_eq!(parsed.to_value(), v.clone());
        prop_assert_eq!(serde_json::to_value(&image).unwrap(), v);
        prop_assert_eq!(Image::from_bytes(image.as_bytes().to_vec()).unwrap(), image);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(image) = Image::from_bytes(bytes) {
            let _ = image.to_value();
            let _ = image.to_json();
        }
    }
}
