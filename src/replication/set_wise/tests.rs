use serde_json::json;

use crate::capture::image::Image;

use super::*;

fn change(seq: i64, hlc: i64, op: Operation, id: i64) -> Change {
    Change {
        pk: Image::from_value(&json!({ "id": id })),
        row: (op != Operation::Delete)
            .then(|| Image::from_value(&json!({ "id": id, "v": seq })))
            .flatten(),
        ..Change::bare(1, seq, hlc, op)
    }
}

fn found(hlc: i64, origin: i32, place: &str) -> Option<Found> {
    Some(Found {
        version: (hlc, origin),
        place: place.into(),
    })
}

#[test]
fn each_key_newest_change_wins_only_above_its_version_here() {
    let changes = [
        change(1, 50, Operation::Update, 1),  // older than (100, 2) here
        change(2, 70, Operation::Insert, 2),  // new here
        change(3, 20, Operation::Update, 3),  // newer than (10, 1)
        change(4, 30, Operation::Delete, 4),  // newer than (10, 1)
        change(5, 100, Operation::Update, 5), // ties on hlc, region 2 > 1
        change(6, 100, Operation::Update, 6), // ties on hlc, region 2 = 2: not above
        change(7, 60, Operation::Update, 2),  // key 2 again: the newest counts
    ];
    let refs: Vec<&Change> = changes.iter().collect();
    let keys = Keys::of(&refs);
    assert_eq!(keys.pks.len(), 6);
    let here = vec![
        found(100, 2, "(0,1)"),
        None,
        found(10, 1, "(0,3)"),
        found(10, 1, "(0,4)"),
        found(100, 1, "(0,5)"),
        found(100, 2, "(0,6)"),
    ];
    let d = decide(&keys, here, None, 2);
    let ids = |rows: &[&Image]| {
        rows.iter()
            .map(|r| r.to_value()["id"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&d.inserts), [2]);
    assert_eq!(
        d.inserts[0].to_value()["v"],
        7,
        "the newest change of key 2"
    );
    assert_eq!(ids(&d.upserts), [3, 5]);
    assert_eq!(ids(&d.deletes), [4]);
    assert_eq!(ids(&d.new_versions.pks), [2]);
    assert_eq!(ids(&d.old_versions.pks), [3, 4, 5]);
    assert_eq!(d.old_versions.places, ["(0,3)", "(0,4)", "(0,5)"]);
    assert_eq!(d.old_versions.deleted, [false, true, false]);
    assert_eq!(d.old_versions.hlcs, [20, 30, 100]);
}

#[test]
fn with_rows_locked_one_by_one_presence_decides_insert_or_upsert() {
    // A row from before capture: present, but without a version.
    let changes = [
        change(1, 5, Operation::Update, 1),
        change(2, 5, Operation::Insert, 2),
    ];
    let refs: Vec<&Change> = changes.iter().collect();
    let keys = Keys::of(&refs);
    let d = decide(&keys, vec![None, None], Some(&[true, false]), 1);
    assert_eq!(d.upserts.len(), 1);
    assert_eq!(d.upserts[0].to_value()["id"], 1);
    assert_eq!(d.inserts.len(), 1);
    assert_eq!(d.inserts[0].to_value()["id"], 2);
    assert_eq!(d.new_versions.pks.len(), 2, "neither had a version");
}
