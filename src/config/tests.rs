//! Config parsing and structural checks.
use super::*;

const MINIMAL: &str = r#"
[region]
name = "us-east"
id = 1
[backend]
host = "127.0.0.1"
[auth]
method = "trust"
"#;

#[test]
fn backend_tls_needs_tcp_and_verify_full_needs_a_ca() {
    let keys = |extra: &str, host: &str| {
        let text = MINIMAL.replace(
            "host = \"127.0.0.1\"",
            &format!("host = \"{host}\"\n{extra}"),
        );
        match Config::from_toml(&text) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.into_iter().map(|p| p.key).collect::<Vec<_>>(),
        }
    };
    assert_eq!(
        keys("tls = \"verify-full\"", "db.internal"),
        ["backend.tls_ca"]
    );
    assert_eq!(
        keys("tls = \"require\"", "/run/postgresql"),
        ["backend.tls"]
    );
    assert_eq!(
        keys("tls_ca = \"ca.pem\"", "db.internal"),
        ["backend.tls_ca"]
    );
    assert!(keys("tls = \"verify-full\"\ntls_ca = \"ca.pem\"", "db.internal").is_empty());
    let text = MINIMAL.replace("host = \"127.0.0.1\"", "host = \"h\"\ntls = \"prefer\"");
    assert!(
        Config::from_toml(&text).is_err(),
        "an unknown mode is refused"
    );
}

#[test]
fn minimal_config_takes_defaults() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(c.proxy.max_connections, 1000);
    assert_eq!(c.backend.port, 5432);
    assert!(c.tls.is_none());
}

#[test]
fn unknown_key_is_named_with_its_path() {
    let text = MINIMAL
        .replace("port", "x")
        .replace("[backend]", "[backend]\nprot = 5432");
    let problems = Config::from_toml(&text).unwrap_err();
    assert_eq!(problems[0].key, "backend.prot");
    assert!(
        problems[0].message.contains("unknown field `prot`"),
        "{}",
        problems[0].message
    );
}

#[test]
fn wrong_type_and_bad_duration_are_named() {
    let text = format!("{MINIMAL}\n[proxy]\nmax_connections = \"many\"\n");
    assert_eq!(
        Config::from_toml(&text).unwrap_err()[0].key,
        "proxy.max_connections"
    );
    let text = format!("{MINIMAL}\n[proxy]\nhandshake_timeout = \"soon\"\n");
    assert_eq!(
        Config::from_toml(&text).unwrap_err()[0].key,
        "proxy.handshake_timeout"
    );
}

#[test]
fn semantic_mistakes_are_all_reported() {
    let text = r#"
[region]
name = "US East"
id = 1
[backend]
host = "/tmp"
[[auth.users]]
name = "app"
verifier = "plain"
[[auth.users]]
name = "app"
verifier = "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA"
[tls]
cert = "/nonexistent/cert.pem"
key = "/nonexistent/key.pem"
"#;
    let keys: Vec<String> = Config::from_toml(text)
        .unwrap_err()
        .into_iter()
        .map(|p| p.key)
        .collect();
    assert_eq!(
        keys,
        [
            "region.name",
            "auth.users[0].verifier",
            "auth.users[1].name",
            "auth.users[1].verifier",
        ]
    );
}

#[test]
fn a_peer_database_that_is_no_connection_string_is_named() {
    let text = format!(
        "{MINIMAL}\n[replication]\nsecret = \"0123456789abcdef\"\n\
         [[replication.peers]]\nname = \"b\"\nid = 2\naddress = \"127.0.0.1:1\"\npostgres = \"port=eleven\"\n\
         [[replication.peers]]\nname = \"c\"\nid = 3\naddress = \"127.0.0.1:2\"\npostgres = \"postgres://u@h:5432/db\"\n"
    );
    let problems = Config::from_toml(&text).unwrap_err();
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["replication.peers[0].postgres"]);
    assert!(problems[0]
        .message
        .starts_with("not a PostgreSQL connection string"));
}

#[test]
fn peer_names_that_no_certificate_can_carry_are_named() {
    let text = format!(
        "{MINIMAL}\n[replication]\nsecret = \"0123456789abcdef\"\n\
         [replication.tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\nca = \"/nonexistent/ca.pem\"\n\
         [[replication.peers]]\nname = \"b\"\nid = 2\naddress = \"127.0.0.1:1\"\nserver_name = \"not a name!\"\n"
    );
    let problems = Config::from_toml(&text).unwrap_err();
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["replication.peers[0].server_name"]);
    assert_eq!(host_of("[::1]:5432"), "::1");
    assert_eq!(host_of("db.example:5432"), "db.example");
}
