//! Stamping writing transactions, inside the relay.
//!
//! Before the first statement of a transaction that may write, the proxy
//! slips a few messages of its own into the client's stream:
//!
//! ```text
//! [Parse  meridian_stamp_N  "SELECT pg_catalog.set_config('meridian.stamp', $1, false)"]  once per backend session
//!  Bind   portal meridian_stamp, statement meridian_stamp_N, $1 = '<hlc>'
//!  Execute meridian_stamp
//!  Close  portal meridian_stamp
//! [Sync]  only before a simple Query at a group boundary
//! ```
//!
//! The capture trigger reads `meridian.stamp` and pins it for the rest of the
//! transaction. The messages travel in the same write as the client's own
//! bytes: no extra round trip. A named statement and a named portal leave the
//! client's unnamed ones alone. Before an extended-protocol Execute the
//! injection joins the client's group (no Sync: a Sync would end the
//! client's implicit transaction). Before a simple Query it is its own group,
//! so the Query starts exactly as the client meant it to (multi-statement
//! strings, CALL with transaction control).
//!
//! Every reply to an injected message is swallowed. To know which replies are
//! ours, both pumps share a queue of *units*: one per client or injected
//! message that gets an answer (Parse, Bind, Describe, Execute, Close, Sync,
//! Query, FunctionCall), in stream order. Postgres answers units in order, and
//! each unit's answer ends with a recognisable message; after an error in an
//! extended-protocol unit Postgres skips every unit up to the next Sync.
//!
//! If an injected message fails, the client must not believe in a commit that
//! did not happen: a failure because the transaction was already aborted
//! (25P02) is what the client's own statement would get, so it is passed on
//! in place of that statement's answer (or dropped when the injection was its
//! own group, since the client's Query then gets its own 25P02); any other
//! failure ends the session with a FATAL error that says why, which rolls the
//! transaction back.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use crate::clock::Clock;
use crate::sql::{Classification, StatementKind, StatementTracker};

/// The session setting the capture trigger reads.
pub const STAMP_SETTING: &str = "meridian.stamp";
const PORTAL: &str = "meridian_stamp";
const STATEMENT: &str = "SELECT pg_catalog.set_config('meridian.stamp', $1, false)";
/// Portals remembered per session; beyond this an Execute of an unknown
/// portal is stamped (conservative).
const MAX_PORTALS: usize = 1000;

/// One message that gets an answer, in stream order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    /// The frontend message type.
    pub tag: u8,
    /// Injected by the proxy: its answer is swallowed.
    pub ours: bool,
    /// For an injected Parse: the generation of the statement it prepares.
    pub generation: u32,
}

impl Unit {
    pub fn client(tag: u8) -> Unit {
        Unit {
            tag,
            ours: false,
            generation: 0,
        }
    }

    pub fn ours(tag: u8) -> Unit {
        Unit {
            tag,
            ours: true,
            generation: 0,
        }
    }
}

/// Whether a frontend message type gets an answer from Postgres.
pub fn is_unit(tag: u8) -> bool {
    matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C' | b'S' | b'Q' | b'F')
}

/// Whether backend message `reply` is the last answer to a unit of type `unit`.
fn ends(unit: u8, reply: u8) -> bool {
    match unit {
        b'P' => reply == b'1',
        b'B' => reply == b'2',
        b'D' => matches!(reply, b'T' | b'n'),
        b'E' => matches!(reply, b'C' | b'I' | b's'),
        b'C' => reply == b'3',
        _ => reply == b'Z',
    }
}

/// Extended-protocol units: an error ends them and starts skip-to-Sync.
fn is_extended(unit: u8) -> bool {
    matches!(unit, b'P' | b'B' | b'D' | b'E' | b'C')
}

/// Messages Postgres may send at any time, owned by no unit.
fn is_async(reply: u8) -> bool {
    matches!(reply, b'N' | b'A' | b'S')
}

/// SQLSTATE and message of an ErrorResponse body.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match field {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    (code, message)
}

/// What the backend side does with one reply message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    Swallow,
}

/// Something the backend side learned from a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyEvent {
    /// A ReadyForQuery answering a client unit, with its status byte.
    ClientReady(u8),
    /// An injected message failed for a reason other than an aborted
    /// transaction: the session must end.
    StampFailed { code: String, message: String },
    /// The injected statement of this generation is prepared in the backend.
    StatementReady(u32),
}

/// CopyDone and CopyFail get no answer of their own, but they end COPY FROM
/// STDIN, during which Postgres ignores Sync: they are queued as markers.
fn is_copy_end(tag: u8) -> bool {
    matches!(tag, b'c' | b'f')
}

/// The backend side's view of the unit queue.
#[derive(Debug, Default)]
pub struct ReplyTracker {
    /// Postgres is skipping units up to the next Sync after an error.
    skipping: bool,
    /// The front unit started COPY FROM STDIN (CopyInResponse seen).
    copy_in: bool,
}

impl ReplyTracker {
    /// Classifies one reply message. `units` is the shared queue, locked by the
    /// caller for the whole chunk. `body` is captured for 'Z' and 'E'.
    pub fn on_reply(
        &mut self,
        units: &mut VecDeque<Unit>,
        tag: u8,
        body: Option<&[u8]>,
    ) -> (Verdict, Option<ReplyEvent>) {
        self.settle(units);
        if self.skipping {
            // Only asynchronous messages can come before the Sync's answer.
            return (Verdict::Forward, None);
        }
        let Some(&unit) = units.front() else {
            // Nothing outstanding (or a unit we did not see): pass it on.
            return (Verdict::Forward, None);
        };
        if is_async(tag) {
            return (Verdict::Forward, None);
        }
        let error = tag == b'E';
        let done = ends(unit.tag, tag) || (error && is_extended(unit.tag));
        let mut event = None;
        let mut verdict = if unit.ours {
            Verdict::Swallow
        } else {
            Verdict::Forward
        };
        if error && unit.ours {
            let (code, message) = error_fields(body.unwrap_or_default());
            if code == "25P02" {
                // The transaction was already aborted: the client's next
                // statement would get exactly this. Pass it on when that
                // statement will now be skipped (same group); otherwise the
                // client's own statement answers for itself.
                let same_group = units
                    .iter()
                    .skip(1)
                    .take_while(|u| u.ours)
                    .all(|u| u.tag != b'S');
                if same_group {
                    verdict = Verdict::Forward;
                }
            } else {
                event = Some(ReplyEvent::StampFailed { code, message });
            }
        }
        if tag == b'G' {
            self.copy_in = true;
        }
        if done {
            units.pop_front();
            if std::mem::take(&mut self.copy_in) {
                drop_syncs_ignored_by_copy(units);
            }
            if error && is_extended(unit.tag) {
                self.skipping = true;
            }
            if tag == b'Z' && !unit.ours {
                if let Some(&[status]) = body {
                    event = Some(ReplyEvent::ClientReady(status));
                }
            }
            if tag == b'1' && unit.ours {
                event = Some(ReplyEvent::StatementReady(unit.generation));
            }
        }
        (verdict, event)
    }
}

impl ReplyTracker {
    /// After an error in an extended-protocol unit Postgres answers nothing
    /// until the next Sync: drop the units it skips (the Sync may not have
    /// been sent yet, so skipping can outlast an empty queue).
    fn skip_to_sync(&mut self, units: &mut VecDeque<Unit>) {
        if !self.skipping {
            return;
        }
        while let Some(u) = units.front() {
            if u.tag == b'S' {
                self.skipping = false;
                return;
            }
            units.pop_front();
        }
    }

    /// Drops units that get no answer from the front: stray copy-end markers,
    /// and whatever Postgres skips after an error.
    fn settle(&mut self, units: &mut VecDeque<Unit>) {
        while units.front().is_some_and(|u| is_copy_end(u.tag)) {
            units.pop_front();
        }
        self.skip_to_sync(units);
    }

    /// Whether the next reply answers an injected message (so a reply cut
    /// at a chunk's end must be held back until its fate is known).
    pub fn front_is_ours(&mut self, units: &mut VecDeque<Unit>) -> bool {
        self.settle(units);
        !self.skipping && units.front().is_some_and(|u| u.ours)
    }
}

/// Postgres reads and ignores Sync messages while in COPY FROM STDIN (client
/// libraries send Bind, Execute, Sync before they know the statement is a
/// COPY, and Sync again after CopyDone). Once the COPY's unit is answered,
/// drop the Syncs sent before its CopyDone/CopyFail, and that marker.
fn drop_syncs_ignored_by_copy(units: &mut VecDeque<Unit>) {
    let syncs = units
        .iter()
        .take_while(|u| u.tag == b'S' && !u.ours)
        .count();
    let marker = units.get(syncs).is_some_and(|u| is_copy_end(u.tag));
    units.drain(..syncs + usize::from(marker));
}

#[derive(Debug, Clone, Copy)]
struct PortalInfo {
    needs_stamp: bool,
    ends_stamp: bool,
    drops_prepared: bool,
}

impl PortalInfo {
    fn of(c: &Classification) -> PortalInfo {
        PortalInfo {
            needs_stamp: c.needs_stamp(),
            ends_stamp: ends_stamp(c),
            drops_prepared: c.drops_prepared,
        }
    }
}

/// Transaction control may end the stamped transaction (or, for savepoints,
/// roll back the pinned stamp): stamp again next time.
fn ends_stamp(c: &Classification) -> bool {
    c.kinds
        .iter()
        .any(|k| matches!(k, StatementKind::Transaction(_)))
}

/// What the backend side reports, for [`Injector`]'s decisions.
pub trait ReadyLog {
    /// ReadyForQuery answers to client units received so far.
    fn ready_count(&self) -> u64;
    /// Number (1-based) of the last of those whose status was not 'T'.
    fn last_closed(&self) -> u64;
    /// The newest generation of the injected statement Postgres confirmed
    /// (ParseComplete) as prepared.
    fn statement_ready(&self) -> Option<u32>;
}

/// The client side: decides where to inject and builds the bytes.
pub struct Injector {
    clock: Option<Arc<Clock>>,
    /// Generation of the next injected Parse. Each Parse prepares a new name,
    /// so a Parse never collides with an earlier one still in flight.
    next_generation: u32,
    /// Generations below this were dropped by DISCARD/DEALLOCATE.
    valid_from: u32,
    portals: HashMap<Box<[u8]>, PortalInfo>,
    /// The client has sent extended-protocol messages since its last Sync.
    in_group: bool,
    /// Sync, Query and FunctionCall messages the client has sent.
    syncs_sent: u64,
    /// `syncs_sent` when the current stamp was injected.
    stamped_at: Option<u64>,
    /// Stamps injected (for tests and statistics).
    pub injected: u64,
}

impl Injector {
    /// `clock: None` relays without stamping.
    pub fn new(clock: Option<Arc<Clock>>) -> Injector {
        Injector {
            clock,
            next_generation: 0,
            valid_from: 0,
            portals: HashMap::new(),
            in_group: false,
            syncs_sent: 0,
            stamped_at: None,
            injected: 0,
        }
    }

    /// True when the last stamp certainly still belongs to the open transaction.
    fn stamp_open(&self, log: &impl ReadyLog) -> bool {
        match self.stamped_at {
            None => false,
            Some(at) => {
                at == self.syncs_sent
                    || (log.ready_count() >= self.syncs_sent && log.last_closed() <= at)
            }
        }
    }

    /// Injects a stamp. The statement is used only once Postgres confirmed
    /// it (a Parse can fail, for example in an aborted transaction, or be
    /// skipped after an error); until then every injection carries its own
    /// Parse under a new name.
    fn inject(
        &mut self,
        sync: bool,
        log: &impl ReadyLog,
        out: &mut BytesMut,
        units: &mut VecDeque<Unit>,
    ) {
        let Some(clock) = &self.clock else { return };
        let stamp = clock.stamp().to_string();
        let ours = Unit::ours;
        let ready = log.statement_ready().filter(|&g| g >= self.valid_from);
        let name = match ready {
            Some(generation) => statement_name(generation),
            None => {
                let generation = self.next_generation;
                self.next_generation = self.next_generation.wrapping_add(1);
                let name = statement_name(generation);
                put_message(out, b'P', |b| {
                    put_cstr(b, &name);
                    put_cstr(b, STATEMENT);
                    b.put_i16(0);
                });
                units.push_back(Unit {
                    generation,
                    ..ours(b'P')
                });
                name
            }
        };
        put_message(out, b'B', |b| {
            put_cstr(b, PORTAL);
            put_cstr(b, &name);
            b.put_i16(0); // parameter formats: all text
            b.put_i16(1);
            b.put_i32(stamp.len() as i32);
            b.put_slice(stamp.as_bytes());
            b.put_i16(0); // result formats: all text
        });
        put_message(out, b'E', |b| {
            put_cstr(b, PORTAL);
            b.put_i32(0);
        });
        put_message(out, b'C', |b| {
            b.put_u8(b'P');
            put_cstr(b, PORTAL);
        });
        units.extend([ours(b'B'), ours(b'E'), ours(b'C')]);
        if sync {
            put_message(out, b'S', |_| {});
            units.push_back(ours(b'S'));
        }
        self.stamped_at = Some(self.syncs_sent);
        self.injected += 1;
    }

    /// One complete client message, about to be forwarded: classifies it
    /// (`statements`), injects a stamp into `out` when it needs one, and
    /// records its unit. `body` is what the relay's scanner captured.
    pub fn on_message(
        &mut self,
        tag: u8,
        body: &[u8],
        statements: &mut StatementTracker,
        log: &impl ReadyLog,
        out: &mut BytesMut,
        units: &mut VecDeque<Unit>,
    ) {
        match tag {
            b'Q' => {
                let c = statements.on_query(body);
                self.on_query(&c, log, out, units);
            }
            b'E' => self.on_execute(body, log, out, units),
            b'P' => {
                statements.on_parse(body);
                self.on_other(b'P', units);
            }
            b'B' => {
                let c = statements.on_bind(body);
                self.on_bind(body, &c, units);
            }
            b'C' => {
                statements.on_close(body);
                self.on_close(body, units);
            }
            tag => self.on_other(tag, units),
        }
    }

    /// A simple Query the client is about to send: injects into `out` first
    /// when it needs a stamp, and records its unit.
    pub fn on_query(
        &mut self,
        c: &Classification,
        log: &impl ReadyLog,
        out: &mut BytesMut,
        units: &mut VecDeque<Unit>,
    ) {
        if c.needs_stamp() && !self.stamp_open(log) {
            let own_group = !self.in_group;
            self.inject(own_group, log, out, units);
        }
        units.push_back(Unit::client(b'Q'));
        self.syncs_sent += 1;
        self.in_group = false;
        if ends_stamp(c) {
            self.stamped_at = None;
        }
        if c.drops_prepared {
            self.forget_prepared();
        }
    }

    /// A Bind: remembers what its portal will do when executed.
    pub fn on_bind(&mut self, body_prefix: &[u8], c: &Classification, units: &mut VecDeque<Unit>) {
        if let Some(portal) = cstr(body_prefix) {
            if self.portals.len() < MAX_PORTALS || self.portals.contains_key(portal) {
                self.portals.insert(portal.into(), PortalInfo::of(c));
            }
        }
        self.on_other(b'B', units);
    }

    /// An Execute the client is about to send: injects into `out` first when
    /// its portal needs a stamp.
    pub fn on_execute(
        &mut self,
        body_prefix: &[u8],
        log: &impl ReadyLog,
        out: &mut BytesMut,
        units: &mut VecDeque<Unit>,
    ) {
        let info = cstr(body_prefix)
            .and_then(|p| self.portals.get(p))
            .copied()
            .unwrap_or(PortalInfo {
                needs_stamp: true,
                ends_stamp: false,
                drops_prepared: false,
            });
        if info.needs_stamp && !self.stamp_open(log) {
            self.inject(false, log, out, units);
        }
        self.on_other(b'E', units);
        if info.ends_stamp {
            self.stamped_at = None;
        }
        if info.drops_prepared {
            self.forget_prepared();
        }
    }

    /// A Close: a closed portal is forgotten.
    pub fn on_close(&mut self, body_prefix: &[u8], units: &mut VecDeque<Unit>) {
        if let Some((&b'P', rest)) = body_prefix.split_first() {
            if let Some(portal) = cstr(rest) {
                self.portals.remove(portal);
            }
        }
        self.on_other(b'C', units);
    }

    /// Any other client message (Parse, Describe, Sync, FunctionCall, Flush, ...).
    pub fn on_other(&mut self, tag: u8, units: &mut VecDeque<Unit>) {
        if is_unit(tag) || is_copy_end(tag) {
            units.push_back(Unit::client(tag));
        }
        match tag {
            b'S' | b'F' => {
                self.syncs_sent += 1;
                self.in_group = false;
            }
            b'P' | b'B' | b'D' | b'E' | b'C' => self.in_group = true,
            _ => {}
        }
    }

    fn forget_prepared(&mut self) {
        self.valid_from = self.next_generation;
    }
}

fn statement_name(generation: u32) -> String {
    format!("meridian_stamp_{generation}")
}

fn cstr(body: &[u8]) -> Option<&[u8]> {
    body.iter().position(|&b| b == 0).map(|n| &body[..n])
}

fn put_cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

fn put_message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::classify;
    use crate::wire::frame::{self, Direction, FrameScanner};

    struct Log(u64, u64, Option<u32>);
    impl ReadyLog for Log {
        fn ready_count(&self) -> u64 {
            self.0
        }
        fn last_closed(&self) -> u64 {
            self.1
        }
        fn statement_ready(&self) -> Option<u32> {
            self.2
        }
    }

    fn injector() -> Injector {
        Injector::new(Some(Arc::new(Clock::start(
            0,
            crate::clock::DEFAULT_MAX_DRIFT,
        ))))
    }

    fn tags(bytes: &[u8]) -> Vec<u8> {
        let mut s = FrameScanner::new(Direction::Frontend, u32::MAX, frame::capture_none);
        let mut out = Vec::new();
        s.scan(bytes, |m| out.push(m.tag)).unwrap();
        out
    }

    #[test]
    fn reads_pay_nothing_and_a_write_is_stamped_once_per_transaction() {
        let mut inj = injector();
        let (mut out, mut units) = (BytesMut::new(), VecDeque::new());
        inj.on_query(
            &classify("SELECT 1"),
            &Log(0, 0, None),
            &mut out,
            &mut units,
        );
        assert!(out.is_empty());
        inj.on_query(
            &classify("BEGIN"),
            &Log(1, 1, Some(0)),
            &mut out,
            &mut units,
        );
        assert!(out.is_empty());
        // First write of the transaction: Parse (first time), Bind, Execute, Close, Sync.
        inj.on_query(
            &classify("UPDATE t SET v = 1"),
            &Log(2, 1, None),
            &mut out,
            &mut units,
        );
        assert_eq!(tags(&out), b"PBECS");
        out.clear();
        // The UPDATE's ReadyForQuery said 'T': still the same transaction.
        inj.on_query(
            &classify("INSERT INTO t VALUES (1)"),
            &Log(3, 1, Some(0)),
            &mut out,
            &mut units,
        );
        assert!(out.is_empty());
        inj.on_query(
            &classify("COMMIT"),
            &Log(4, 1, Some(0)),
            &mut out,
            &mut units,
        );
        // Next transaction: stamped again, statement already prepared.
        inj.on_query(
            &classify("DELETE FROM t"),
            &Log(5, 5, Some(0)),
            &mut out,
            &mut units,
        );
        assert_eq!(tags(&out), b"BECS");
        assert_eq!(inj.injected, 2);
        // DISCARD ALL drops the statement: prepared again, under a new name.
        out.clear();
        inj.on_query(
            &classify("DISCARD ALL"),
            &Log(6, 6, Some(0)),
            &mut out,
            &mut units,
        );
        inj.on_query(
            &classify("DELETE FROM t"),
            &Log(7, 7, Some(0)),
            &mut out,
            &mut units,
        );
        assert_eq!(tags(&out), b"PBECS");
    }

    #[test]
    fn unknown_reply_state_means_stamp_again() {
        let mut inj = injector();
        let (mut out, mut units) = (BytesMut::new(), VecDeque::new());
        inj.on_query(
            &classify("INSERT INTO t VALUES (1)"),
            &Log(0, 0, None),
            &mut out,
            &mut units,
        );
        out.clear();
        // Pipelined: the first reply has not arrived yet, so it may have committed.
        inj.on_query(
            &classify("INSERT INTO t VALUES (2)"),
            &Log(0, 0, None),
            &mut out,
            &mut units,
        );
        // The first Parse is not confirmed yet either: a second one, new name.
        assert_eq!(tags(&out), b"PBECS");
        let parses: Vec<u32> = units
            .iter()
            .filter(|u| u.ours && u.tag == b'P')
            .map(|u| u.generation)
            .collect();
        assert_eq!(parses, [0, 1]);
    }

    #[test]
    fn execute_of_a_writing_portal_is_stamped_inside_the_clients_group() {
        let mut inj = injector();
        let (mut out, mut units) = (BytesMut::new(), VecDeque::new());
        let log = Log(0, 0, None);
        inj.on_other(b'P', &mut units);
        inj.on_bind(b"\0upd\0", &classify("UPDATE t SET v = $1"), &mut units);
        inj.on_execute(b"\0", &log, &mut out, &mut units);
        assert_eq!(tags(&out), b"PBEC", "no Sync inside the client's group");
        out.clear();
        inj.on_other(b'B', &mut units);
        // Same group, no Sync since the stamp: same implicit transaction.
        inj.on_execute(b"\0", &log, &mut out, &mut units);
        assert!(out.is_empty());
        let kinds: Vec<(u8, bool)> = units.iter().map(|u| (u.tag, u.ours)).collect();
        assert_eq!(
            kinds,
            [
                (b'P', false),
                (b'B', false),
                (b'P', true),
                (b'B', true),
                (b'E', true),
                (b'C', true),
                (b'E', false),
                (b'B', false),
                (b'E', false)
            ]
        );
    }

    /// A unit queue from (frontend tag, injected) pairs.
    fn queue(units: &[(u8, bool)]) -> VecDeque<Unit> {
        units
            .iter()
            .map(|&(tag, ours)| {
                if ours {
                    Unit::ours(tag)
                } else {
                    Unit::client(tag)
                }
            })
            .collect()
    }

    fn reply(
        t: &mut ReplyTracker,
        units: &mut VecDeque<Unit>,
        tag: u8,
        body: &[u8],
    ) -> (Verdict, Option<ReplyEvent>) {
        t.on_reply(units, tag, Some(body))
    }

    fn error_body(code: &str) -> Vec<u8> {
        let mut b = Vec::new();
        for (f, v) in [(b'S', "ERROR"), (b'C', code), (b'M', "boom")] {
            b.push(f);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    #[test]
    fn injected_replies_are_swallowed_and_client_replies_forwarded() {
        let mut units = queue(&[
            (b'B', true),
            (b'E', true),
            (b'C', true),
            (b'S', true),
            (b'Q', false),
        ]);
        let mut t = ReplyTracker::default();
        for tag in [b'2', b'D', b'C', b'3', b'Z'] {
            assert_eq!(
                reply(&mut t, &mut units, tag, b"I").0,
                Verdict::Swallow,
                "{}",
                tag as char
            );
        }
        assert_eq!(reply(&mut t, &mut units, b'N', b"").0, Verdict::Forward);
        assert_eq!(reply(&mut t, &mut units, b'C', b"").0, Verdict::Forward);
        assert_eq!(
            reply(&mut t, &mut units, b'Z', b"I"),
            (Verdict::Forward, Some(ReplyEvent::ClientReady(b'I')))
        );
        assert!(units.is_empty());
    }

    #[test]
    fn failed_injection_in_an_aborted_transaction_answers_for_the_skipped_statement() {
        let mut units = queue(&[
            (b'B', false),
            (b'B', true),
            (b'E', true),
            (b'C', true),
            (b'E', false),
            (b'S', false),
        ]);
        let mut t = ReplyTracker::default();
        assert_eq!(reply(&mut t, &mut units, b'2', b"").0, Verdict::Forward);
        assert_eq!(
            reply(&mut t, &mut units, b'E', &error_body("25P02")).0,
            Verdict::Forward
        );
        // Postgres skips to the Sync: its ReadyForQuery is the client's.
        assert_eq!(
            reply(&mut t, &mut units, b'Z', b"E"),
            (Verdict::Forward, Some(ReplyEvent::ClientReady(b'E')))
        );
        assert!(units.is_empty());
    }

    #[test]
    fn syncs_sent_during_copy_from_stdin_are_not_expected_to_answer() {
        // tokio-postgres and libpq: Bind, Execute, Sync, CopyData, CopyDone, Sync.
        let mut units = queue(&[
            (b'B', false),
            (b'E', false),
            (b'S', false),
            (b'c', false),
            (b'S', false),
            (b'P', false),
            (b'B', true),
        ]);
        let mut t = ReplyTracker::default();
        for tag in [b'2', b'G', b'C'] {
            assert_eq!(reply(&mut t, &mut units, tag, b"").0, Verdict::Forward);
        }
        // Postgres ignored the first Sync: this ReadyForQuery answers the second.
        assert_eq!(
            reply(&mut t, &mut units, b'Z', b"I").1,
            Some(ReplyEvent::ClientReady(b'I'))
        );
        assert_eq!(reply(&mut t, &mut units, b'1', b"").0, Verdict::Forward);
        assert_eq!(reply(&mut t, &mut units, b'2', b"").0, Verdict::Swallow);
    }

    #[test]
    fn any_other_injection_failure_ends_the_session() {
        let mut units = queue(&[(b'B', true), (b'E', true)]);
        let mut t = ReplyTracker::default();
        let (verdict, event) = reply(&mut t, &mut units, b'E', &error_body("57014"));
        assert_eq!(verdict, Verdict::Swallow);
        assert!(matches!(event, Some(ReplyEvent::StampFailed { code, .. }) if code == "57014"));
    }
}
