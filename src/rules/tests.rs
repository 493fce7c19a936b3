use super::*;

fn parse(text: &str) -> Result<RuleSet, RulesError> {
    let mut set = RuleSet::default();
    set.add_file(Path::new("conflict-rules/x.toml"), text)?;
    Ok(set)
}

#[test]
fn reads_tables_insert_only_and_counters() {
    let set = parse(
        r#"
[[table]]
name = "public.accounts"
[table.columns]
balance = "counter"

[[table]]
name = "audit_log"
insert_only = true
"#,
    )
    .unwrap();
    assert_eq!(set.tables.len(), 2);
    assert_eq!(set.tables[0].qualified(), "public.accounts");
    assert_eq!(set.tables[0].counters, ["balance"]);
    assert_eq!(set.tables[1].qualified(), "public.audit_log");
    assert!(set.tables[1].insert_only);
}

#[test]
fn mistakes_name_the_file_and_key() {
    let e = parse("[[table]]\nname = \"public.a\"\ninsert_onyl = true\n").unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with("conflict-rules/x.toml: table[0]"),
        "{text}"
    );
    assert!(text.contains("insert_onyl"), "{text}");
    let e = parse("[[table]]\nname = \"public.a\"\n[table.columns]\nb = \"sum\"\n").unwrap_err();
    assert!(e.to_string().contains("table[0].columns.b"), "{e}");
    let e = parse("[[table]]\nname = \"Public.A\"\n").unwrap_err();
    assert!(e.to_string().contains("table[0].name"), "{e}");
    let e = parse("[[table]]\nname = \"a\"\n[[table]]\nname = \"public.a\"\n").unwrap_err();
    assert!(e.to_string().contains("already has a rule"), "{e}");
}

#[test]
fn reads_policies_and_column_merges() {
    let set = parse(
        r#"
[[table]]
name = "public.orders"
policy = "region-priority"
regions = ["us-east", "eu-west"]
deletes = "delete-wins"
[table.columns]
total = "counter"
high = "max"
low = "min"
tags = "union"
status = { states = ["created", "paid", "shipped"] }

[[table]]
name = "public.users"
policy = "first-writer-wins"
"#,
    )
    .unwrap();
    let orders = &set.tables[0];
    assert!(orders.needs_engine());
    assert_eq!(orders.counters, ["total"]);
    assert_eq!(
        orders.columns["status"],
        ColumnRule::States(vec!["created".into(), "paid".into(), "shipped".into()])
    );
    let ids = |n: &str| match n {
        "us-east" => Some(1),
        "eu-west" => Some(2),
        _ => None,
    };
    let engine = orders.engine(ids).unwrap();
    assert_eq!(engine.priority, [1, 2]);
    assert_eq!(engine.columns.len(), 5);
    let e = orders.engine(|_| None).unwrap_err();
    assert!(
        e.to_string().ends_with(
            "table[0].regions[0]: \"us-east\" is neither this region nor one of its peers"
        ),
        "{e}"
    );
    assert!(set.tables[1].needs_engine());
    assert_eq!(set.tables[1].engine(ids).unwrap().deletes, None);
    // A counter-only last-writer-wins table stays on the SQL path.
    let plain = parse("[[table]]\nname = \"a\"\n[table.columns]\nn = \"counter\"\n").unwrap();
    assert!(!plain.tables[0].needs_engine());
}

#[test]
fn policy_mistakes_name_the_key() {
    let key = |text: &str| match parse(text) {
        Err(RulesError::Invalid { key, message, .. }) => format!("{key}: {message}"),
        other => panic!("{other:?}"),
    };
    let t = "[[table]]\nname = \"a\"\n";
    assert!(
        key(&format!("{t}policy = \"random\"\n")).starts_with("table[0].policy: unknown variant")
    );
    assert!(key(&format!("{t}policy = \"region-priority\"\n"))
        .starts_with("table[0].regions: policy \"region-priority\" needs"));
    assert!(key(&format!("{t}regions = [\"x\"]\n"))
        .starts_with("table[0].regions: regions only applies"));
    assert!(key(&format!(
        "{t}policy = \"region-priority\"\nregions = [\"x\", \"x\"]\n"
    ))
    .contains("listed twice"));
    assert!(key(&format!("{t}policy = \"custom\"\n"))
        .starts_with("table[0].function: policy \"custom\" needs"));
    assert!(
        key(&format!("{t}policy = \"custom\"\nfunction = \"F()\"\n"))
            .starts_with("table[0].function")
    );
    assert!(key(&format!(
        "{t}policy = \"custom\"\nfunction = \"f\"\n[table.columns]\nn = \"max\"\n"
    ))
    .starts_with("table[0].columns"));
    assert!(key(&format!("{t}function = \"f\"\n")).starts_with("table[0].function"));
    assert!(key(&format!(
        "{t}deletes = \"update-wins\"\n[table.columns]\nn = \"max\"\n"
    ))
    .starts_with("table[0].deletes"));
    assert!(key(&format!("{t}[table.columns]\nn = \"newest\"\n"))
        .contains("\"last-writer-wins\" or { states"));
    assert!(
        key(&format!("{t}[table.columns]\nn = {{ states = [\"a\"] }}\n")).contains("at least two")
    );
    assert!(key(&format!(
        "{t}[table.columns]\nn = {{ state = [\"a\", \"b\"] }}\n"
    ))
    .contains("unknown key \"state\""));
    assert!(
        key(&format!("{t}[table.columns]\nn = 3\n")).starts_with("table[0].columns.n: expected")
    );
    assert!(
        key(&format!("{t}insert_only = true\npolicy = \"keep-local\"\n"))
            .starts_with("table[0].insert_only")
    );
}

#[test]
fn shipped_examples_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("conflict-rules/examples");
    let set = RuleSet::load(&dir).unwrap();
    assert!(!set.tables.is_empty());
}

#[test]
fn missing_directory_is_no_rules() {
    assert_eq!(
        RuleSet::load(Path::new("/nonexistent/rules")).unwrap(),
        RuleSet::default()
    );
}
