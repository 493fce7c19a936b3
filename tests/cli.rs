//! The command line: `meridian check` explains config mistakes with the file
//! and the key's path (rule files too); `meridian verifier` makes verifiers
//! `check` accepts.

mod support;

use std::process::Command;

fn meridian(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let out = support::run_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_meridian")).args(args),
        stdin,
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn check_accepts_a_good_config_with_a_generated_verifier() {
    let (ok, users, _) = meridian(&["verifier", "--user", "app"], Some("s3cret\n"));
    assert!(ok);
    assert!(
        users.contains("verifier = \"SCRAM-SHA-256$4096:"),
        "{users}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("region.toml");
    std::fs::write(&path, format!("[region]\nname = \"eu-west\"\nid = 2\n[backend]\nhost = \"/run/postgresql\"\n[auth]\n{users}")).unwrap();
    let (ok, out, err) = meridian(&["check", "--config", path.to_str().unwrap()], None);
    assert!(ok, "{err}");
    assert!(out.contains("ok (region eu-west id 2"), "{out}");
}

#[test]
fn check_names_file_and_key_for_each_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[region]\nname = \"eu-west\"\nid = 2\n[backend]\nhost = \"/tmp\"\nprot = 5432\n",
    )
    .unwrap();
    let (ok, _, err) = meridian(&["check", "--config", path.to_str().unwrap()], None);
    assert!(!ok);
    let file = path.display().to_string();
    assert!(
        err.contains(&format!("{file}: backend.prot: unknown field `prot`")),
        "{err}"
    );

    std::fs::write(&path, "[region]\nname = \"EU West\"\nid = 2\n[backend]\nhost = \"/tmp\"\n[[auth.users]]\nname = \"app\"\nverifier = \"md5deadbeef\"\n").unwrap();
    let (ok, _, err) = meridian(&["check", "--config", path.to_str().unwrap()], None);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{file}: region.name: \"EU West\" must be lowercase"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{file}: auth.users[0].verifier: malformed SCRAM verifier"
        )),
        "{err}"
    );
    assert!(err.contains("2 problem(s) found"), "{err}");

    let (ok, _, err) = meridian(&["check", "--config", "/nonexistent.toml"], None);
    assert!(!ok);
    assert!(err.contains("cannot read /nonexistent.toml"), "{err}");
}

#[test]
fn shipped_example_config_passes_check() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/meridian.example.toml");
    let (ok, out, err) = meridian(&["check", "--config", path], None);
    assert!(ok, "{err}");
    assert!(out.contains("ok (region us-east id 1"), "{out}");
}

#[test]
fn check_reads_the_rule_files_and_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    let path = dir.path().join("region.toml");
    std::fs::write(
        &path,
        "[region]\nname = \"eu-west\"\nid = 2\n[backend]\nhost = \"/tmp\"\n[auth]\nmethod = \"trust\"\n[replication]\nrules = \"rules\"\n",
    )
    .unwrap();
    let rule = dir.path().join("rules/accounts.toml");
    std::fs::write(
        &rule,
        "[[table]]\nname = \"public.accounts\"\n[table.columns]\nbalance = \"counter\"\n",
    )
    .unwrap();
    let (ok, out, err) = meridian(&["check", "--config", path.to_str().unwrap()], None);
    assert!(ok, "{err}");
    assert!(out.contains("1 table rule(s)"), "{out}");
    std::fs::write(
        &rule,
        "[[table]]\nname = \"public.accounts\"\n[table.columns]\nbalance = \"sum\"\n",
    )
    .unwrap();
    let (ok, _, err) = meridian(&["check", "--config", path.to_str().unwrap()], None);
    assert!(!ok);
    assert!(
        err.contains(&format!("{}: table[0].columns.balance", rule.display())),
        "{err}"
    );
    // A region name that is neither this region nor a peer.
    std::fs::write(
        &rule,
        "[[table]]\nname = \"public.accounts\"\npolicy = \"region-priority\"\nregions = [\"eu-west\", \"mars\"]\n",
    )
    .unwrap();
    let (ok, _, err) = meridian(&["check", "--config", path.to_str().unwrap()], None);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{}: table[0].regions[1]: \"mars\" is neither this region nor one of its peers",
            rule.display()
        )),
        "{err}"
    );
}
