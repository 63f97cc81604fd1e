//! Just enough DNS wire format for the sim: the guest's queries, the upstream servers'
//! answers, and the guest's checks of what comes back.

use std::net::Ipv4Addr;

pub const FLAG_QR: u16 = 0x8000;
pub const FLAG_TC: u16 = 0x0200;
pub const FLAG_RD: u16 = 0x0100;
pub const FLAG_RA: u16 = 0x0080;
pub const RCODE_SERVFAIL: u16 = 2;
const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;

/// The largest number of records an upstream puts in one answer.
pub const MAX_RECORDS: u32 = 200;

/// A query for `name` (dotted), type A, class IN, RD set, no EDNS (so a UDP answer over
/// 512 bytes comes back truncated).
pub fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(12 + name.len() + 6);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&FLAG_RD.to_be_bytes());
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&TYPE_A.to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
    m
}

/// The name asked for by a guest: the first label says how many records to answer.
pub fn query_name(records: u32, guest: usize, job: usize, i: u32) -> String {
    format!("n{records}-q{i}.g{guest}j{job}.sim.test")
}

/// The `k`-th address an upstream answers: its own address first, then a fixed sequence.
pub fn record_addr(me: Ipv4Addr, k: u32) -> Ipv4Addr {
    if k == 0 {
        me
    } else {
        Ipv4Addr::new(10, 200, (k >> 8) as u8, k as u8)
    }
}

/// The question of a message (bytes from offset 12 to the end of the first question) and
/// the dotted name in it.
pub fn question(msg: &[u8]) -> Option<(&[u8], String)> {
    if msg.len() < 12 || u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return None;
    }
    let mut i = 12;
    let mut name = Vec::new();
    loop {
        let l = usize::from(*msg.get(i)?);
        if l == 0 {
            i += 1;
            break;
        }
        if l > 63 {
            return None;
        }
        name.push(String::from_utf8_lossy(msg.get(i + 1..i + 1 + l)?).to_string());
        i += 1 + l;
    }
    let end = i + 4;
    if msg.len() < end {
        return None;
    }
    Some((&msg[12..end], name.join(".")))
}

/// How many records a query name asks for (`n{N}-...`).
pub fn records_asked(name: &str) -> u32 {
    name.split('-')
        .next()
        .and_then(|l| l.strip_prefix('n'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
        .clamp(1, MAX_RECORDS)
}

/// An answer to `query` with `flags` (QR, RD and RA added) and A records for `addrs`.
pub fn answer(query: &[u8], flags: u16, addrs: &[Ipv4Addr]) -> Option<Vec<u8>> {
    let (q, _) = question(query)?;
    let mut m = Vec::with_capacity(12 + q.len() + addrs.len() * 16);
    m.extend_from_slice(&query[0..2]);
    m.extend_from_slice(&(flags | FLAG_QR | FLAG_RD | FLAG_RA).to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(q);
    for a in addrs {
        // A pointer to the question's name, A, IN, TTL 60, 4 bytes.
        m.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        m.extend_from_slice(&a.octets());
    }
    Some(m)
}

/// A parsed answer, as the guest checks it.
#[derive(Debug)]
pub struct Reply {
    pub id: u16,
    pub flags: u16,
    pub name: String,
    pub addrs: Vec<Ipv4Addr>,
}

impl Reply {
    pub fn rcode(&self) -> u16 {
        self.flags & 0xf
    }
    pub fn truncated(&self) -> bool {
        self.flags & FLAG_TC != 0
    }
}

/// Parse an answer of the shape the sim's upstreams send (A records behind a name pointer).
pub fn parse_reply(msg: &[u8]) -> Result<Reply, String> {
    if msg.len() < 12 {
        return Err(format!("{}-byte reply", msg.len()));
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    if flags & FLAG_QR == 0 {
        return Err("reply without QR".into());
    }
    let ancount = usize::from(u16::from_be_bytes([msg[6], msg[7]]));
    let (q, name) = question(msg).ok_or("reply without its question")?;
    let mut i = 12 + q.len();
    let mut addrs = Vec::new();
    for _ in 0..ancount {
        let rr = msg.get(i..i + 16).ok_or("answer records cut short")?;
        if rr[2..4] != [0, 1] || rr[10..12] != [0, 4] {
            return Err(format!("unexpected record {rr:?}"));
        }
        addrs.push(Ipv4Addr::new(rr[12], rr[13], rr[14], rr[15]));
        i += 16;
    }
    Ok(Reply {
        id,
        flags,
        name,
        addrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let name = query_name(3, 0, 1, 7);
        let q = query(0x1234, &name);
        assert_eq!(records_asked(&question(&q).unwrap().1), 3);
        let me = Ipv4Addr::new(10, 2, 0, 1);
        let addrs: Vec<_> = (0..3).map(|k| record_addr(me, k)).collect();
        let a = answer(&q, 0, &addrs).unwrap();
        let r = parse_reply(&a).unwrap();
        assert_eq!(
            (r.id, r.name.as_str(), r.rcode()),
            (0x1234, name.as_str(), 0)
        );
        assert_eq!(r.addrs, addrs);
    }
}
