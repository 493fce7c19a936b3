//! What the proxy refuses to relay because it would let a session change
//! how meridian captures its writes: setting one of meridian's own settings
//! (`meridian.*`, by SET, RESET, ALTER ROLE/DATABASE ... SET, a function's
//! SET clause, `set_config()` with a literal name, or the startup packet),
//! and taking a replication origin (`pg_replication_origin_session_setup`,
//! `pg_replication_origin_xact_setup`), which is how meridian's apply
//! sessions keep their writes out of capture.
//!
//! This is a courtesy, not the guarantee: the database refuses or ignores
//! all of these by itself, whatever path they take (meridian's functions
//! keep their state in a table only meridian may write, and the
//! replication-origin functions are granted to meridian's apply role only;
//! see migrations/functions/marks.sql and README "Roles"). The proxy sees
//! literal text only, and says clearly why it refuses instead of letting a
//! setting that does nothing pass silently.

use std::fmt;

use super::lex::{Lexer, Token};

/// Why a statement or a startup packet is refused (SQLSTATE 42501).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A `meridian.*` setting, by its name as written.
    Setting(String),
    /// A replication-origin function, by name.
    Origin(String),
}

impl Refusal {
    /// insufficient_privilege: what a client is told with every refusal.
    pub const SQLSTATE: &'static str = "42501";
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Setting(name) => write!(
                f,
                "meridian refuses to change setting \"{name}\": settings under meridian.* \
                 belong to meridian, and no session may change how its writes are replicated"
            ),
            Refusal::Origin(name) => write!(
                f,
                "meridian refuses {name}(): a session with a replication origin has its \
                 writes skipped by capture, so they would never reach the other regions"
            ),
        }
    }
}

const ORIGIN_FUNCTIONS: [&str; 2] = [
    "pg_replication_origin_session_setup",
    "pg_replication_origin_xact_setup",
];

/// The first thing in a Query's or Parse's text the proxy refuses, if any.
pub fn refusal(text: &[u8]) -> Option<Refusal> {
    // Nearly every text mentions neither: a look at each dot and
    // underscore, without the lexer.
    if !mentions_meridian_or_origin(text) {
        return None;
    }
    let mut tokens = Lexer::new(text).peekable();
    let (mut first, mut previous): (Option<&[u8]>, Option<Token>) = (None, None);
    while let Some(token) = tokens.next() {
        match token {
            Token::Semicolon => {
                first = None;
                previous = None;
                continue;
            }
            Token::Word(w) | Token::Quoted(w) => {
                if ORIGIN_FUNCTIONS
                    .iter()
                    .any(|f| w.eq_ignore_ascii_case(f.as_bytes()))
                {
                    return Some(Refusal::Origin(lossy(w)));
                }
                let setting_clause = matches!(previous, Some(Token::Word(p)) if is_set(p))
                    && first.is_some_and(|f| {
                        ["SET", "RESET", "ALTER", "CREATE"]
                            .iter()
                            .any(|k| f.eq_ignore_ascii_case(k.as_bytes()))
                    });
                if setting_clause {
                    if let Some(name) = setting_name(token, &mut tokens) {
                        return Some(Refusal::Setting(name));
                    }
                }
                if w.eq_ignore_ascii_case(b"set_config") && matches!(token, Token::Word(_)) {
                    if let (Some(Token::Open), Some(Token::Str(s))) = (tokens.next(), tokens.next())
                    {
                        if is_meridian(s) {
                            return Some(Refusal::Setting(lossy(s)));
                        }
                    }
                }
                if first.is_none() {
                    first = Some(w);
                }
            }
            _ => {}
        }
        previous = Some(token);
    }
    None
}

/// SET or RESET, and the words that may stand between them and the name.
fn is_set(word: &[u8]) -> bool {
    ["SET", "RESET", "SESSION", "LOCAL"]
        .iter()
        .any(|k| word.eq_ignore_ascii_case(k.as_bytes()))
}

/// At the word after SET/RESET: `meridian.x` (a word, a dot, a word) or
/// `"meridian.x"`.
fn setting_name<'a>(
    token: Token<'a>,
    tokens: &mut std::iter::Peekable<Lexer<'a>>,
) -> Option<String> {
    match token {
        Token::Quoted(q) if is_meridian(q) => Some(lossy(q)),
        Token::Word(w) if w.eq_ignore_ascii_case(b"meridian") => {
            if tokens.peek() == Some(&Token::Dot) {
                tokens.next();
                let rest = match tokens.peek() {
                    Some(Token::Word(r)) | Some(Token::Quoted(r)) => lossy(r),
                    _ => String::new(),
                };
                Some(format!("{}.{rest}", lossy(w)))
            } else {
                None
            }
        }
        _ => None,
    }
}

fn is_meridian(name: &[u8]) -> bool {
    name.len() > 9 && name[..9].eq_ignore_ascii_case(b"meridian.")
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `meridian.` or `_origin_` anywhere, in any case.
fn mentions_meridian_or_origin(text: &[u8]) -> bool {
    memchr::memchr2_iter(b'.', b'_', text).any(|i| {
        if text[i] == b'.' {
            i >= 8 && text[i - 8..i].eq_ignore_ascii_case(b"meridian")
        } else {
            text.get(i + 1..i + 8)
                .is_some_and(|w| w.eq_ignore_ascii_case(b"origin_"))
        }
    })
}

/// A startup parameter the proxy refuses: a `meridian.*` parameter, or
/// `options` setting one (`-c meridian.x=...`, `--meridian.x=...`).
pub fn startup_refusal<'a>(
    params: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Option<Refusal> {
    for (key, value) in params {
        if is_meridian(key.as_bytes()) {
            return Some(Refusal::Setting(key.to_string()));
        }
        if key == "options" {
            // Postgres splits options at unescaped white space; `-c name=v`,
            // `-cname=v` and `--name=v` set a parameter.
            let words: Vec<&str> = value.split_ascii_whitespace().collect();
            for (i, word) in words.iter().enumerate() {
                let assignment = match *word {
                    "-c" => words.get(i + 1).copied(),
                    w => w.strip_prefix("--").or_else(|| w.strip_prefix("-c")),
                };
                let name = assignment.map(|a| a.split('=').next().unwrap_or(a));
                if let Some(name) = name.filter(|n| is_meridian(n.replace('-', "_").as_bytes())) {
                    return Some(Refusal::Setting(name.to_string()));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> Option<String> {
        refusal(text.as_bytes()).map(|r| match r {
            Refusal::Setting(n) | Refusal::Origin(n) => n,
        })
    }

    #[test]
    fn every_visible_way_to_set_a_meridian_setting_is_refused() {
        for (text, name) in [
            ("SET meridian.applying = on", "meridian.applying"),
            (
                "set local MERIDIAN.in_capture to 'on'",
                "MERIDIAN.in_capture",
            ),
            ("SET SESSION meridian.x = 1", "meridian.x"),
            ("RESET meridian.tx_stamp", "meridian.tx_stamp"),
            ("SET \"meridian.applying\" = on", "meridian.applying"),
            ("select 1; SET meridian.a = on", "meridian.a"),
            (
                "SELECT pg_catalog.set_config('meridian.applying', 'on', false)",
                "meridian.applying",
            ),
            (
                "select x, set_config ( 'Meridian.b' , 'on', true) from t",
                "Meridian.b",
            ),
            (
                "ALTER ROLE app SET meridian.applying = on",
                "meridian.applying",
            ),
            (
                "ALTER DATABASE d RESET meridian.applying",
                "meridian.applying",
            ),
            (
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET meridian.q = 'on' AS 'select 1'",
                "meridian.q",
            ),
            (
                "SELECT pg_replication_origin_session_setup('meridian_5_1')",
                "pg_replication_origin_session_setup",
            ),
            (
                "select pg_catalog.PG_REPLICATION_ORIGIN_XACT_SETUP('0/0', now())",
                "PG_REPLICATION_ORIGIN_XACT_SETUP",
            ),
        ] {
            assert_eq!(refused(text).as_deref(), Some(name), "{text}");
        }
    }

    #[test]
    fn what_merely_mentions_meridian_passes() {
        for text in [
            "SELECT * FROM meridian.changes",
            "SELECT meridian.hlc_time(1)",
            "SET search_path = meridian, public",
            "UPDATE t SET meridian.x = 1",
            "SELECT 'SET meridian.applying = on'",
            "-- SET meridian.applying = on\nSELECT 1",
            "SELECT set_config('search_path', 'meridian.x', false)",
            "SELECT current_setting('meridian.applying', true)",
            "SELECT pg_replication_origin_progress('x', false)",
            "SELECT 1.5, a.b FROM meridian.node a",
        ] {
            assert_eq!(refused(text), None, "{text}");
        }
    }

    #[test]
    fn startup_options_that_set_a_meridian_setting_are_refused() {
        let refused = |key: &'static str, value: &'static str| {
            startup_refusal([("user", "app"), (key, value)]).map(|r| match r {
                Refusal::Setting(n) | Refusal::Origin(n) => n,
            })
        };
        assert_eq!(
            refused("options", "-c meridian.applying=on").as_deref(),
            Some("meridian.applying")
        );
        assert_eq!(
            refused("options", "-c work_mem=4MB -cmeridian.a=1").as_deref(),
            Some("meridian.a")
        );
        assert_eq!(
            refused("options", "--meridian.b=on").as_deref(),
            Some("meridian.b")
        );
        assert_eq!(
            refused("meridian.applying", "on").as_deref(),
            Some("meridian.applying")
        );
        assert_eq!(refused("options", "-c search_path=meridian.x"), None);
        assert_eq!(refused("application_name", "meridian.x"), None);
    }

    #[test]
    fn the_message_says_why() {
        let m = Refusal::Setting("meridian.applying".into()).to_string();
        assert!(
            m.contains("meridian.applying") && m.contains("replicated"),
            "{m}"
        );
    }
}
