//! Byte-level DNS helpers: the header, the question, ID rewriting, truncation and error
//! replies. These never trust a length field and never panic on any input.

/// Header flag bits (second 16-bit word of the header).
pub(crate) const QR: u16 = 0x8000;
pub(crate) const TC: u16 = 0x0200;
pub(crate) const RD: u16 = 0x0100;
pub(crate) const RA: u16 = 0x0080;
pub(crate) const CD: u16 = 0x0010;

pub(crate) const RCODE_NOERROR: u8 = 0;
pub(crate) const RCODE_FORMERR: u8 = 1;
pub(crate) const RCODE_SERVFAIL: u8 = 2;
pub(crate) const RCODE_NXDOMAIN: u8 = 3;
pub(crate) const RCODE_NOTIMP: u8 = 4;
pub(crate) const RCODE_REFUSED: u8 = 5;

pub(crate) const TYPE_A: u16 = 1;
pub(crate) const TYPE_PTR: u16 = 12;
pub(crate) const TYPE_AAAA: u16 = 28;
pub(crate) const TYPE_OPT: u16 = 41;
pub(crate) const TYPE_ANY: u16 = 255;
pub(crate) const CLASS_IN: u16 = 1;

pub(crate) const HEADER_LEN: usize = 12;

/// The fixed 12-byte header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_LEN {
            return None;
        }
        let w = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        Some(Header {
            id: w(0),
            flags: w(2),
            qdcount: w(4),
            ancount: w(6),
            nscount: w(8),
            arcount: w(10),
        })
    }
    pub fn is_response(&self) -> bool {
        self.flags & QR != 0
    }
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }
    pub fn rcode(&self) -> u8 {
        (self.flags & 0xf) as u8
    }
    pub fn emit(&self, out: &mut Vec<u8>) {
        for w in [
            self.id,
            self.flags,
            self.qdcount,
            self.ancount,
            self.nscount,
            self.arcount,
        ] {
            out.extend_from_slice(&w.to_be_bytes());
        }
    }
}

/// The (single) question of a message, with the name lower-cased in wire form.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Question {
    /// Wire-format name (length-prefixed labels, ending with the root's 0), ASCII lower case.
    pub name: Vec<u8>,
    pub qtype: u16,
    pub qclass: u16,
}

impl Question {
    /// Parse the first question, right after the header. Compression pointers are refused
    /// (the first name of a message has nothing to point back to). Returns the question and
    /// the offset just past it.
    pub fn parse(b: &[u8]) -> Option<(Question, usize)> {
        let mut i = HEADER_LEN;
        let mut name = Vec::new();
        loop {
            let len = usize::from(*b.get(i)?);
            if len == 0 {
                name.push(0);
                i += 1;
                break;
            }
            if len > 63 {
                return None;
            }
            let label = b.get(i + 1..i + 1 + len)?;
            if name.len() + 1 + len + 1 > 255 {
                return None;
            }
            name.push(len as u8);
            name.extend(label.iter().map(|c| c.to_ascii_lowercase()));
            i += 1 + len;
        }
        let t = b.get(i..i + 4)?;
        let q = Question {
            name,
            qtype: u16::from_be_bytes([t[0], t[1]]),
            qclass: u16::from_be_bytes([t[2], t[3]]),
        };
        Some((q, i + 4))
    }

    /// The name as dotted text without the final dot, if every label is plain printable
    /// ASCII without dots or spaces (anything else cannot be a static or host-resolvable name).
    pub fn dotted(&self) -> Option<String> {
        let mut s = String::new();
        let mut i = 0;
        while let Some(&len) = self.name.get(i) {
            if len == 0 {
                break;
            }
            let label = self.name.get(i + 1..i + 1 + usize::from(len))?;
            if !label
                .iter()
                .all(|c| c.is_ascii_graphic() && *c != b'.' && *c != b'\\')
            {
                return None;
            }
            if !s.is_empty() {
                s.push('.');
            }
            s.extend(label.iter().map(|c| char::from(*c)));
            i += 1 + usize::from(len);
        }
        Some(s)
    }
}

/// Overwrite the message ID.
pub(crate) fn set_id(b: &mut [u8], id: u16) {
    if b.len() >= 2 {
        b[..2].copy_from_slice(&id.to_be_bytes());
    }
}

/// Skip one (possibly compressed) name starting at `i`; the offset just past it.
fn skip_name(b: &[u8], mut i: usize) -> Option<usize> {
    // At most 128 labels fit in 255 bytes; anything longer is garbage.
    for _ in 0..128 {
        let len = *b.get(i)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(i + 1),
            0x00 => i += 1 + usize::from(len),
            0xc0 => return if i + 2 <= b.len() { Some(i + 2) } else { None },
            _ => return None,
        }
    }
    None
}

/// The raw bytes of the OPT pseudo-record of a message, if it has one and the message
/// walks cleanly up to it.
pub(crate) fn find_opt(b: &[u8], question_end: usize) -> Option<&[u8]> {
    let h = Header::parse(b)?;
    let mut i = question_end;
    let total = usize::from(h.ancount) + usize::from(h.nscount) + usize::from(h.arcount);
    let additional_from = usize::from(h.ancount) + usize::from(h.nscount);
    for n in 0..total {
        let start = i;
        i = skip_name(b, i)?;
        let fixed = b.get(i..i + 10)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        i += 10 + rdlen;
        if i > b.len() {
            return None;
        }
        if n >= additional_from && rtype == TYPE_OPT {
            return Some(&b[start..i]);
        }
    }
    None
}

/// An answer cut down to its header and question, with TC set (RFC 2181 9, RFC 1035 4.2.1);
/// the OPT record is kept when there is one so that the guest still sees EDNS.
pub(crate) fn truncate(answer: &[u8], keep_opt: bool) -> Option<Vec<u8>> {
    let mut h = Header::parse(answer)?;
    let (_, qend) = Question::parse(answer)?;
    let opt = if keep_opt {
        find_opt(answer, qend)
    } else {
        None
    };
    h.flags |= TC;
    h.qdcount = 1;
    h.ancount = 0;
    h.nscount = 0;
    h.arcount = u16::from(opt.is_some());
    let mut out = Vec::with_capacity(qend + opt.map_or(0, |o| o.len()));
    h.emit(&mut out);
    out.extend_from_slice(&answer[HEADER_LEN..qend]);
    if let Some(o) = opt {
        out.extend_from_slice(o);
    }
    Some(out)
}

/// A bare error reply to `query` (whose header must be readable): same ID and opcode, RD
/// copied, the question echoed when it parses, no EDNS.
pub(crate) fn error_reply(query: &[u8], rcode: u8) -> Vec<u8> {
    let q = Header::parse(query).unwrap_or(Header {
        id: 0,
        flags: 0,
        qdcount: 0,
        ancount: 0,
        nscount: 0,
        arcount: 0,
    });
    let question = if q.qdcount == 1 {
        Question::parse(query).map(|(_, end)| &query[HEADER_LEN..end])
    } else {
        None
    };
    let flags = QR | (q.flags & (0xf << 11)) | (q.flags & RD) | RA | u16::from(rcode & 0xf);
    let h = Header {
        id: q.id,
        flags,
        qdcount: u16::from(question.is_some()),
        ancount: 0,
        nscount: 0,
        arcount: 0,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + question.map_or(0, |q| q.len()));
    h.emit(&mut out);
    if let Some(qb) = question {
        out.extend_from_slice(qb);
    }
    out
}
