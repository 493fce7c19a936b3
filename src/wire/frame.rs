//! Message framing for the Postgres v3 protocol, with no sockets involved.
//!
//! The relay never buffers whole messages: [`FrameScanner`] follows message
//! boundaries across arbitrary read chunks (a 5-byte header, then a body it
//! mostly skips) so bytes can be forwarded the moment they are read, and only
//! the few bodies meridian must look at (ReadyForQuery today; Query and Parse
//! text for the write path) are captured. Because nothing here touches I/O,
//! every function is unit-tested, property-tested and fuzzed on plain slices.
//!
//! The second half builds the handful of backend messages the proxy itself
//! must say (authentication, errors, key data).

use bytes::{BufMut, Bytes, BytesMut};

/// A fault in the byte stream itself: the peer does not speak the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {len} for message type {tag:?}")]
    BadLength { tag: char, len: u32 },
    #[error("message of type {tag:?} is {len} bytes, above the limit of {max} bytes")]
    TooLarge { tag: char, len: u32, max: u32 },
    #[error("invalid frontend message type {code} ({ch:?})", code = .0, ch = char::from(*.0))]
    UnknownTag(u8),
}

/// Which side produced the stream being scanned; decides which tags are legal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server, after the startup packet.
    Frontend,
    /// Server to client.
    Backend,
}

/// Frontend message types a client may send once the session is established.
pub fn is_frontend_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'B' | b'C'
            | b'd'
            | b'c'
            | b'f'
            | b'D'
            | b'E'
            | b'H'
            | b'F'
            | b'P'
            | b'p'
            | b'Q'
            | b'S'
            | b'X'
    )
}

/// One complete message seen by the scanner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen<'a> {
    pub tag: u8,
    /// The body, if this tag is one the scanner was asked to capture.
    pub body: Option<&'a [u8]>,
    /// Offset just past this message's last byte within the current chunk.
    pub end: usize,
}

/// How much of each message's body a scanner hands out, by tag: 0 for
/// nothing, `usize::MAX` for the whole body, or a prefix length.
pub type CapturePolicy = fn(u8) -> usize;

/// Incremental message-boundary tracker. Feed it every chunk read from one
/// direction of a connection, in order.
#[derive(Debug)]
pub struct FrameScanner {
    direction: Direction,
    max_len: u32,
    capture: CapturePolicy,
    header: [u8; 5],
    header_len: usize,
    tag: u8,
    remaining: usize,
    /// Captured body bytes of a message that spans chunks. Bounded by the
    /// capture limit and `max_len`.
    spill: Vec<u8>,
    capturing: bool,
    /// Bytes of the current body to capture.
    capture_limit: usize,
}

impl FrameScanner {
    /// `max_len` bounds the length field (which counts itself but not the tag).
    /// `capture` says how much of which bodies are handed to the callback.
    pub fn new(direction: Direction, max_len: u32, capture: CapturePolicy) -> Self {
        FrameScanner {
            direction,
            max_len,
            capture,
            header: [0; 5],
            header_len: 0,
            tag: 0,
            remaining: 0,
            spill: Vec::new(),
            capturing: false,
            capture_limit: 0,
        }
    }

    /// True when the stream is positioned exactly between two messages.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0
    }

    /// The tag of the message the stream is in the middle of, if any.
    pub fn pending_tag(&self) -> Option<u8> {
        (self.header_len > 0).then_some(self.header[0])
    }

    /// Scans `chunk`, calling `on_message` for each message completed in it.
    /// On error the stream is unusable; the caller reports it and disconnects.
    pub fn scan(
        &mut self,
        chunk: &[u8],
        mut on_message: impl FnMut(Seen<'_>),
    ) -> Result<(), FrameError> {
        let mut pos = 0;
        while pos < chunk.len() {
            if self.header_len < 5 {
                let take = (5 - self.header_len).min(chunk.len() - pos);
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&chunk[pos..pos + take]);
                self.header_len += take;
                pos += take;
                if self.header_len < 5 {
                    break;
                }
                self.start_body()?;
                if self.remaining == 0 {
                    let body = self.capturing.then_some(&[][..]);
                    self.finish(&mut on_message, body, pos);
                }
                continue;
            }
            let take = self.remaining.min(chunk.len() - pos);
            let piece = &chunk[pos..pos + take];
            pos += take;
            self.remaining -= take;
            let wanted = &piece[..piece
                .len()
                .min(self.capture_limit - self.spill.len().min(self.capture_limit))];
            if self.remaining > 0 {
                if self.capturing {
                    self.spill.extend_from_slice(wanted);
                }
                continue;
            }
            if !self.capturing {
                self.finish(&mut on_message, None, pos);
            } else if self.spill.is_empty() {
                // Captured part inside this chunk: hand out a borrowed slice, no copy.
                self.finish(&mut on_message, Some(wanted), pos);
            } else {
                let mut spill = std::mem::take(&mut self.spill);
                spill.extend_from_slice(wanted);
                self.finish(&mut on_message, Some(&spill), pos);
                spill.clear();
                self.spill = spill;
            }
        }
        Ok(())
    }

    fn start_body(&mut self) -> Result<(), FrameError> {
        let tag = self.header[0];
        let len = u32::from_be_bytes([
            self.header[1],
            self.header[2],
            self.header[3],
            self.header[4],
        ]);
        if self.direction == Direction::Frontend && !is_frontend_tag(tag) {
            return Err(FrameError::UnknownTag(tag));
        }
        if len < 4 {
            return Err(FrameError::BadLength {
                tag: tag.into(),
                len,
            });
        }
        if len > self.max_len {
            return Err(FrameError::TooLarge {
                tag: tag.into(),
                len,
                max: self.max_len,
            });
        }
        self.tag = tag;
        self.remaining = (len - 4) as usize;
        self.capture_limit = (self.capture)(tag);
        self.capturing = self.capture_limit > 0;
        Ok(())
    }

    fn finish(&mut self, on_message: &mut impl FnMut(Seen<'_>), body: Option<&[u8]>, end: usize) {
        on_message(Seen {
            tag: self.tag,
            body,
            end,
        });
        self.header_len = 0;
        self.capturing = false;
    }
}

/// Capture nothing.
pub fn capture_none(_: u8) -> usize {
    0
}

/// The proxy's backend-side interest: ReadyForQuery carries the transaction status.
pub fn capture_ready_for_query(tag: u8) -> usize {
    if tag == b'Z' {
        usize::MAX
    } else {
        0
    }
}

/// The relay's backend-side interest: ReadyForQuery's status byte.
pub fn capture_ready(tag: u8) -> usize {
    usize::from(tag == b'Z')
}

/// Longest statement or portal name Postgres keeps (NAMEDATALEN - 1), plus its NUL.
const NAME_FIELD: usize = 64;

/// The proxy's client-side interest: statement texts (Query, Parse), and the
/// names a Bind or Close refers to (a short prefix, never the parameters),
/// which is what statement counting needs.
pub fn capture_statements(tag: u8) -> usize {
    match tag {
        b'Q' | b'P' => usize::MAX,
        b'B' => 2 * NAME_FIELD,
        b'C' => 1 + NAME_FIELD,
        _ => 0,
    }
}

// ---------------------------------------------------------------------------
// Messages the proxy writes itself.

/// Severity of an ErrorResponse the proxy writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "FATAL",
        }
    }
}

fn message(tag: u8, body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = BytesMut::with_capacity(64);
    buf.put_u8(tag);
    buf.put_u32(0);
    body(&mut buf);
    let len = (buf.len() - 1) as u32;
    buf[1..5].copy_from_slice(&len.to_be_bytes());
    buf.freeze()
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside a field would end it early on the client; replace it.
    buf.extend(s.bytes().map(|b| if b == 0 { b'?' } else { b }));
    buf.put_u8(0);
}

/// ErrorResponse with severity, SQLSTATE and message.
pub fn error_response(severity: Severity, code: &str, text: &str) -> Bytes {
    message(b'E', |b| {
        b.put_u8(b'S');
        put_cstr(b, severity.as_str());
        b.put_u8(b'V');
        put_cstr(b, severity.as_str());
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, text);
        b.put_u8(0);
    })
}

/// Authentication request with a code (0 ok, 10 SASL, 11 continue, 12 final) and payload.
pub fn authentication(code: u32, payload: &[u8]) -> Bytes {
    message(b'R', |b| {
        b.put_u32(code);
        b.put_slice(payload);
    })
}

pub fn backend_key_data(pid: i32, secret: i32) -> Bytes {
    message(b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    })
}

/// NegotiateProtocolVersion: the newest minor version we speak and the
/// `_pq_.` options we did not recognise.
pub fn negotiate_protocol_version(minor: u32, unrecognised: &[String]) -> Bytes {
    message(b'v', |b| {
        b.put_u32(minor);
        b.put_u32(unrecognised.len() as u32);
        for o in unrecognised {
            put_cstr(b, o);
        }
    })
}

/// Splits a NUL-terminated string off the front of a body: (string, rest).
pub fn cstr(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = body.iter().position(|&b| b == 0)?;
    Some((&body[..nul], &body[nul + 1..]))
}

/// Typed views of the frontend bodies the relay looks into, as the scanner
/// captures them (Query and Parse whole, Bind and Close as a name prefix).
/// Each is `None` for a body too short to hold what it must.
pub mod views {
    use super::cstr;

    /// Query: the statement text.
    pub fn query(body: &[u8]) -> &[u8] {
        cstr(body).map_or(body, |(text, _)| text)
    }

    /// Parse: (statement name, statement text).
    pub fn parse(body: &[u8]) -> Option<(&[u8], &[u8])> {
        let (name, rest) = cstr(body)?;
        Some((name, cstr(rest).map_or(rest, |(text, _)| text)))
    }

    /// Bind: the statement name (after the portal's).
    pub fn bind_statement(prefix: &[u8]) -> Option<&[u8]> {
        let (_portal, rest) = cstr(prefix)?;
        Some(cstr(rest)?.0)
    }

    /// Close: the name of the statement it closes; `None` for a portal.
    pub fn closed_statement(prefix: &[u8]) -> Option<&[u8]> {
        match prefix.split_first() {
            Some((&b'S', rest)) => Some(cstr(rest)?.0),
            _ => None,
        }
    }
}

/// Any message from a tag and a body (tests and benchmarks).
pub fn encode(tag: u8, body: &[u8]) -> Bytes {
    message(tag, |b| b.put_slice(body))
}

/// The Terminate message a proxy sends to a backend it is closing.
pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_of_query_parse_bind_and_close_bodies() {
        assert_eq!(views::query(b"SELECT 1\0"), b"SELECT 1");
        assert_eq!(views::query(b"cut short"), b"cut short");
        assert_eq!(
            views::parse(b"s1\0SELECT $1\0\0\x01\0\0\0\x17"),
            Some((&b"s1"[..], &b"SELECT $1"[..]))
        );
        assert_eq!(views::parse(b"no terminator"), None);
        assert_eq!(
            views::bind_statement(b"portal\0s1\0\0\x01"),
            Some(&b"s1"[..])
        );
        assert_eq!(views::bind_statement(b"portal\0s1"), None);
        assert_eq!(views::closed_statement(b"Ss1\0"), Some(&b"s1"[..]));
        assert_eq!(views::closed_statement(b"Pp1\0"), None);
        assert_eq!(cstr(b"a\0b"), Some((&b"a"[..], &b"b"[..])));
    }
    use proptest::prelude::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        encode(tag, body).to_vec()
    }

    type SeenOwned = Vec<(u8, Option<Vec<u8>>)>;

    fn scan_all(scanner: &mut FrameScanner, chunks: &[&[u8]]) -> Result<SeenOwned, FrameError> {
        let mut out = Vec::new();
        for c in chunks {
            scanner.scan(c, |s| out.push((s.tag, s.body.map(<[u8]>::to_vec))))?;
        }
        Ok(out)
    }

    #[test]
    fn captures_ready_for_query_and_skips_rows() {
        let mut stream = frame(b'D', b"rowdata");
        stream.extend(frame(b'Z', b"T"));
        let mut s = FrameScanner::new(Direction::Backend, 1 << 20, capture_ready_for_query);
        let seen = scan_all(&mut s, &[&stream]).unwrap();
        assert_eq!(seen, vec![(b'D', None), (b'Z', Some(b"T".to_vec()))]);
        assert!(s.at_boundary());
    }

    #[test]
    fn rejects_unknown_frontend_tag_and_huge_length() {
        let mut s = FrameScanner::new(Direction::Frontend, 1024, capture_none);
        assert_eq!(
            scan_all(&mut s, &[b"\x01\x00\x00\x00\x04"]),
            Err(FrameError::UnknownTag(1))
        );
        let mut s = FrameScanner::new(Direction::Frontend, 1024, capture_none);
        let err = scan_all(&mut s, &[b"Q\x80\x00\x00\x00"]).unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLarge {
                len: 0x8000_0000,
                ..
            }
        ));
        let mut s = FrameScanner::new(Direction::Frontend, 1024, capture_none);
        assert!(matches!(
            scan_all(&mut s, &[b"S\x00\x00\x00\x02"]),
            Err(FrameError::BadLength { .. })
        ));
    }

    #[test]
    fn error_response_is_well_formed() {
        let e = error_response(Severity::Fatal, "08P01", "bad\0thing");
        assert_eq!(e[0], b'E');
        assert_eq!(
            u32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize,
            e.len() - 1
        );
        assert!(e.windows(6).any(|w| w == b"08P01\0"));
        assert!(e.windows(9).any(|w| w == b"bad?thing"));
    }

    proptest! {
        /// However a stream is cut into chunks, the scanner sees the same messages.
        #[test]
        fn chunking_does_not_change_what_is_seen(
            msgs in proptest::collection::vec((prop_oneof![Just(b'D'), Just(b'Z'), Just(b'C')], proptest::collection::vec(any::<u8>(), 0..40)), 0..20),
            cuts in proptest::collection::vec(0usize..400, 0..10),
        ) {
            let stream: Vec<u8> = msgs.iter().flat_map(|(t, b)| frame(*t, b)).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(stream.len())).collect();
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort_unstable();
            let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
            // 'Z' whole, 'C' a 3-byte prefix, 'D' nothing.
            let mut s = FrameScanner::new(Direction::Backend, 1 << 20, |t| match t { b'Z' => usize::MAX, b'C' => 3, _ => 0 });
            let seen = scan_all(&mut s, &chunks).unwrap();
            let expected: SeenOwned = msgs
                .iter()
                .map(|(t, b)| match t {
                    b'Z' => (*t, Some(b.clone())),
                    b'C' => (*t, Some(b[..b.len().min(3)].to_vec())),
                    _ => (*t, None),
                })
                .collect();
            prop_assert_eq!(seen, expected);
            prop_assert!(s.at_boundary());
        }

        /// Arbitrary bytes never panic the frontend scanner.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut s = FrameScanner::new(Direction::Frontend, 4096, capture_statements);
            let _ = s.scan(&bytes, |_| {});
        }
    }
}
