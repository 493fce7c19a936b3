//! replication::protocol::binary: a batch's binary form. Batches are nearly
//! all the bytes between regions; as JSON every change was parsed again
//! into a tree of values on arrival. Here a change is fixed-width numbers,
//! its table as an index into the batch's list of tables, and its row
//! images as they are in memory ([`Image::as_bytes`], checked on arrival),
//! so decoding is a copy per image.
//!
//! Written by hand: the layout is a handful of integers and length-prefixed
//! byte strings, and a serde format would have to go through the images'
//! JSON form again. Little-endian throughout:
//!
//! ```text
//! batch   = MARK u8:flags [i64:floor if flags&1] [i64:caught_up if flags&2]
//!           u64:after_xid i64:after_seq                  -- what it follows
//!           u32:n (u64:xid u32:m (u16:origin u64:xid i64:seq)*m)*n  -- deps
//!           u32:n (str)*n                                  -- tables
//!           u32:n change*n
//! change  = u64:xid i64:seq i64:hlc i64:tx_hlc u32:table u8:op u16:present
//!           then, for each bit of present in order:
//!           pk, row, old, cols as bytes; base_hlc i64; base_origin i32;
//!           epoch i32; gen i32; tag_hlc i64; tag_origin i32
//! str, bytes = u32:len, then len bytes
//! ```

use std::collections::HashMap;

use super::{Change, Deps, Message, Operation, OriginPosition, Position, ProtocolError};
use crate::capture::image::Image;

/// First byte of a binary batch (JSON messages start with `{`).
pub const MARK: u8 = 0xB4;

const FLOOR: u8 = 1;
const CAUGHT_UP: u8 = 2;
/// The smallest change: its fixed part.
const CHANGE_MIN: usize = 8 * 4 + 4 + 1 + 2;

pub fn encode(
    after: Position,
    changes: &[Change],
    deps: &[Deps],
    floor: Option<i64>,
    caught_up: Option<i64>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + changes.len() * 256);
    out.push(MARK);
    let flags = match (floor, caught_up) {
        (None, None) => 0,
        (Some(_), None) => FLOOR,
        (None, Some(_)) => CAUGHT_UP,
        (Some(_), Some(_)) => FLOOR | CAUGHT_UP,
    };
    out.push(flags);
    for v in floor.iter().chain(&caught_up) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&after.xid.to_le_bytes());
    out.extend_from_slice(&after.seq.to_le_bytes());
    put_len(&mut out, deps.len());
    for d in deps {
        out.extend_from_slice(&d.xid.to_le_bytes());
        put_len(&mut out, d.after.len());
        for a in &d.after {
            out.extend_from_slice(&a.origin.to_le_bytes());
            out.extend_from_slice(&a.position.xid.to_le_bytes());
            out.extend_from_slice(&a.position.seq.to_le_bytes());
        }
    }
    let mut tables: HashMap<&str, u32> = HashMap::new();
    let mut names: Vec<&str> = Vec::new();
    for c in changes {
        tables.entry(&c.tbl).or_insert_with(|| {
            names.push(&c.tbl);
            names.len() as u32 - 1
        });
    }
    put_len(&mut out, names.len());
    for n in &names {
        put_bytes(&mut out, n.as_bytes());
    }
    put_len(&mut out, changes.len());
    for c in changes {
        put_change(&mut out, c, tables[c.tbl.as_str()]);
    }
    out
}

fn put_change(out: &mut Vec<u8>, c: &Change, table: u32) {
    for v in [c.xid as i64, c.seq, c.hlc, c.tx_hlc] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&table.to_le_bytes());
    out.push(op_code(c.op));
    let present = [
        c.pk.is_some(),
        c.row.is_some(),
        c.old.is_some(),
        c.cols.is_some(),
        c.base_hlc.is_some(),
        c.base_origin.is_some(),
        c.epoch.is_some(),
        c.gen.is_some(),
        c.tag_hlc.is_some(),
        c.tag_origin.is_some(),
    ]
    .iter()
    .enumerate()
    .fold(0u16, |p, (bit, &set)| p | u16::from(set) << bit);
    out.extend_from_slice(&present.to_le_bytes());
    for image in [&c.pk, &c.row, &c.old, &c.cols].into_iter().flatten() {
        put_bytes(out, image.as_bytes());
    }
    if let Some(v) = c.base_hlc {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in [c.base_origin, c.epoch, c.gen].into_iter().flatten() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    if let Some(v) = c.tag_hlc {
        out.extend_from_slice(&v.to_le_bytes());
    }
    if let Some(v) = c.tag_origin {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn op_code(op: Operation) -> u8 {
    match op {
        Operation::Insert => b'I',
        Operation::Update => b'U',
        Operation::Delete => b'D',
        Operation::Truncate => b'T',
        Operation::Schema => b'S',
    }
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    let n = u32::try_from(n).expect("frames are under 4 GiB");
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

pub fn decode(frame: &[u8]) -> Result<Message, ProtocolError> {
    let mut r = Reader { rest: frame };
    if r.u8()? != MARK {
        return Err(malformed("not a binary batch"));
    }
    let flags = r.u8()?;
    if flags & !(FLOOR | CAUGHT_UP) != 0 {
        return Err(malformed("unknown flags"));
    }
    let floor = (flags & FLOOR != 0).then(|| r.i64()).transpose()?;
    let caught_up = (flags & CAUGHT_UP != 0).then(|| r.i64()).transpose()?;
    let after = Position {
        xid: r.i64()? as u64,
        seq: r.i64()?,
    };
    let n = r.count(8 + 4)?;
    let mut deps = Vec::with_capacity(n);
    for _ in 0..n {
        let xid = r.i64()? as u64;
        let m = r.count(2 + 8 + 8)?;
        let mut after = Vec::with_capacity(m);
        for _ in 0..m {
            let origin = u16::from_le_bytes(r.take()?);
            let position = Position {
                xid: r.i64()? as u64,
                seq: r.i64()?,
            };
            after.push(OriginPosition { origin, position });
        }
        deps.push(Deps { xid, after });
    }
    let n = r.count(4)?;
    let mut tables = Vec::with_capacity(n);
    for _ in 0..n {
        let name = std::str::from_utf8(r.bytes()?).map_err(|_| malformed("table not UTF-8"))?;
        tables.push(name.to_string());
    }
    let n = r.count(CHANGE_MIN)?;
    let mut changes = Vec::with_capacity(n);
    for _ in 0..n {
        changes.push(r.change(&tables)?);
    }
    if !r.rest.is_empty() {
        return Err(malformed("bytes after the last change"));
    }
    Ok(Message::Batch {
        after,
        changes,
        deps,
        floor,
        caught_up,
    })
}

fn malformed(what: &str) -> ProtocolError {
    ProtocolError::Batch(what.to_string())
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let (head, rest) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or_else(|| malformed("truncated"))?;
        self.rest = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take::<1>()?[0])
    }

    fn i32(&mut self) -> Result<i32, ProtocolError> {
        Ok(i32::from_le_bytes(self.take()?))
    }

    fn i64(&mut self) -> Result<i64, ProtocolError> {
        Ok(i64::from_le_bytes(self.take()?))
    }

    /// A count of items at least `each` bytes long: no larger than what is left.
    fn count(&mut self, each: usize) -> Result<usize, ProtocolError> {
        let n = u32::from_le_bytes(self.take()?) as usize;
        if n.saturating_mul(each) > self.rest.len() {
            return Err(malformed("count beyond the frame"));
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let n = u32::from_le_bytes(self.take()?) as usize;
        if n > self.rest.len() {
            return Err(malformed("truncated"));
        }
        let (b, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(b)
    }

    fn image(&mut self) -> Result<Image, ProtocolError> {
        Image::from_bytes(self.bytes()?.to_vec()).map_err(|e| malformed(&e.to_string()))
    }

    fn change(&mut self, tables: &[String]) -> Result<Change, ProtocolError> {
        let (xid, seq, hlc, tx_hlc) = (self.i64()? as u64, self.i64()?, self.i64()?, self.i64()?);
        let table = u32::from_le_bytes(self.take()?) as usize;
        let tbl = tables
            .get(table)
            .ok_or_else(|| malformed("table index beyond the list"))?
            .clone();
        let op = match self.u8()? {
            b'I' => Operation::Insert,
            b'U' => Operation::Update,
            b'D' => Operation::Delete,
            b'T' => Operation::Truncate,
            b'S' => Operation::Schema,
            _ => return Err(malformed("unknown operation")),
        };
        let present = u16::from_le_bytes(self.take()?);
        if present >> 10 != 0 {
            return Err(malformed("unknown fields"));
        }
        let has = |bit: u16| present & (1 << bit) != 0;
        let mut image = |bit| has(bit).then(|| self.image()).transpose();
        let (pk, row, old, cols) = (image(0)?, image(1)?, image(2)?, image(3)?);
        let base_hlc = has(4).then(|| self.i64()).transpose()?;
        let base_origin = has(5).then(|| self.i32()).transpose()?;
        let epoch = has(6).then(|| self.i32()).transpose()?;
        let gen = has(7).then(|| self.i32()).transpose()?;
        let tag_hlc = has(8).then(|| self.i64()).transpose()?;
        let tag_origin = has(9).then(|| self.i32()).transpose()?;
        Ok(Change {
            xid,
            seq,
            origin: 0,
            hlc,
            tx_hlc,
            via_proxy: false,
            tbl,
            op,
            pk,
            row,
            old,
            base_hlc,
            base_origin,
            epoch,
            gen,
            tag_hlc,
            tag_origin,
            cols,
        })
    }
}
