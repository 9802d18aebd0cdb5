//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a load balancer in
//! front of the master sends first on each connection, naming the real client.
//!
//! Behind a proxy every connection comes from the proxy's address, so `sticky` would
//! send every client to one worker and workers would see the proxy as the peer. With
//! `--proxy-protocol`, the balancer reads this header first (see `balance::proxy`), and
//! the client it names is what `sticky` hashes and what the worker's `conn` record
//! says.
//!
//! Pure parsing and encoding, no I/O, so that it can be property-tested and fuzzed
//! alone. [`parse`] looks at the bytes received so far (read with `MSG_PEEK`) and says
//! one of: here is a header of `len` bytes (consume exactly those, so the worker reads
//! what follows), need more bytes, or not a header. It never allocates and never
//! panics, and it never asks for more than [`V1_MAX`] / [`V2_MAX`] bytes, so a sender
//! cannot make the master hold more than that per connection.
//!
//! Why our own parser rather than the `ppp` crate (2.3): the balancer needs exactly
//! three answers from a *prefix* (complete with its length, need more, invalid) with
//! hard size bounds and no allocation, for v1 and v2 from one call; the grammar is
//! short (<https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>), and it is
//! pinned by property tests (`tests/proxy_parser.rs`) and a fuzz target
//! (`fuzz/fuzz_targets/proxy.rs`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::str::FromStr;

/// The 12 bytes every version 2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Longest version 1 header, CRLF included (the specification's bound).
pub const V1_MAX: usize = 107;

/// Longest version 2 header accepted, the 16 fixed bytes, addresses and TLVs included.
pub const V2_MAX: usize = 4096;

/// Which versions of the header a listener accepts (`--proxy-protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// Only the text header (`PROXY TCP4 …\r\n`).
    V1,
    /// Only the binary header.
    V2,
    /// Either, told apart by the first byte.
    Any,
}

impl ProxyProtocol {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
            ProxyProtocol::Any => "any",
        }
    }

    /// The most bytes a header of the accepted versions can take.
    pub fn max_len(self) -> usize {
        match self {
            ProxyProtocol::V1 => V1_MAX,
            ProxyProtocol::V2 | ProxyProtocol::Any => V2_MAX,
        }
    }
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProxyProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "v1" | "1" => Ok(ProxyProtocol::V1),
            "v2" | "2" => Ok(ProxyProtocol::V2),
            "any" => Ok(ProxyProtocol::Any),
            other => Err(format!(
                "unknown PROXY protocol version {other:?} (expected v1, v2 or any)"
            )),
        }
    }
}

/// A complete header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Its length in bytes: what to consume before the client's own data.
    pub len: usize,
    /// The client and the address it connected to, as the proxy saw them; `None` for a
    /// `LOCAL` command (the proxy's own health check), `UNKNOWN` (v1) or an unspecified
    /// or unix family (v2): then the connection's own addresses stand.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
}

/// What the bytes received so far are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A complete header.
    Header(Header),
    /// A valid beginning of a header: wait for more bytes.
    NeedMore,
    /// Not a header of an accepted version (the reason, for the log).
    Invalid(&'static str),
}

/// Parses the beginning of a connection's bytes as a header of the `accept`ed versions.
pub fn parse(buf: &[u8], accept: ProxyProtocol) -> Parsed {
    let Some(&first) = buf.first() else {
        return Parsed::NeedMore;
    };
    match (first, accept) {
        (b'P', ProxyProtocol::V1 | ProxyProtocol::Any) => parse_v1(buf),
        (b'\r', ProxyProtocol::V2 | ProxyProtocol::Any) => parse_v2(buf),
        _ => Parsed::Invalid("no PROXY header"),
    }
}

/// Parses a version 1 (text) header.
pub fn parse_v1(buf: &[u8]) -> Parsed {
    const PREFIX: &[u8] = b"PROXY ";
    let n = buf.len().min(PREFIX.len());
    if buf[..n] != PREFIX[..n] {
        return Parsed::Invalid("no PROXY header");
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(cr) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Parsed::Invalid("v1 header longer than 107 bytes")
        } else {
            Parsed::NeedMore
        };
    };
    if window[cr] != b'\r' {
        return Parsed::Invalid("v1 header line not ended by CRLF");
    }
    match window.get(cr + 1) {
        None if buf.len() < V1_MAX => return Parsed::NeedMore,
        Some(b'\n') => {}
        _ => return Parsed::Invalid("v1 header line not ended by CRLF"),
    }
    if cr < PREFIX.len() {
        return Parsed::Invalid("v1 header too short");
    }
    let len = cr + 2;
    let rest = &window[PREFIX.len()..cr];
    if rest == b"UNKNOWN" || rest.starts_with(b"UNKNOWN ") {
        // "the receiver must ignore anything presented before the CRLF", text or not.
        return Parsed::Header(Header { len, addrs: None });
    }
    let Ok(line) = std::str::from_utf8(rest) else {
        return Parsed::Invalid("v1 header is not text");
    };
    let mut words = line.split(' ');
    let family = words.next().unwrap_or("");
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        words.next(),
        words.next(),
        words.next(),
        words.next(),
        words.next(),
    ) else {
        return Parsed::Invalid("v1 header: wrong number of fields");
    };
    let (src, dst) = match family {
        "TCP4" => match (src.parse::<Ipv4Addr>(), dst.parse::<Ipv4Addr>()) {
            (Ok(s), Ok(d)) => (IpAddr::V4(s), IpAddr::V4(d)),
            _ => return Parsed::Invalid("v1 header: bad IPv4 address"),
        },
        "TCP6" => match (src.parse::<Ipv6Addr>(), dst.parse::<Ipv6Addr>()) {
            (Ok(s), Ok(d)) => (IpAddr::V6(s), IpAddr::V6(d)),
            _ => return Parsed::Invalid("v1 header: bad IPv6 address"),
        },
        _ => return Parsed::Invalid("v1 header: unknown protocol"),
    };
    let (Some(sport), Some(dport)) = (port(sport), port(dport)) else {
        return Parsed::Invalid("v1 header: bad port");
    };
    Parsed::Header(Header {
        len,
        addrs: Some((SocketAddr::new(src, sport), SocketAddr::new(dst, dport))),
    })
}

/// A decimal port, 0..=65535, without sign or leading zeros.
fn port(s: &str) -> Option<u16> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

/// Parses a version 2 (binary) header.
pub fn parse_v2(buf: &[u8]) -> Parsed {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Parsed::Invalid("no PROXY v2 signature");
    }
    if let Some(&ver_cmd) = buf.get(12) {
        if ver_cmd >> 4 != 2 || ver_cmd & 0x0f > 1 {
            return Parsed::Invalid("v2 header: bad version or command");
        }
    }
    // A LOCAL header (a proxy's health check) is valid whatever its family byte says:
    // "the receiver must ... discard the protocol block including the family".
    let local = buf.get(12).is_some_and(|&ver_cmd| ver_cmd & 0x0f == 0);
    if let Some(&fam) = buf.get(13) {
        if !local && (fam >> 4 > 3 || fam & 0x0f > 2) {
            return Parsed::Invalid("v2 header: bad address family or protocol");
        }
    }
    if buf.len() < 16 {
        return Parsed::NeedMore;
    }
    let family = buf[13] >> 4;
    let body = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = 16 + body;
    if len > V2_MAX {
        return Parsed::Invalid("v2 header longer than the limit");
    }
    let need = match family {
        _ if local => 0,
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if body < need {
        return Parsed::Invalid("v2 header: shorter than its addresses");
    }
    if buf.len() < len {
        return Parsed::NeedMore;
    }
    let a = &buf[16..len];
    let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
    let addrs = match family {
        _ if local => None,
        1 => {
            let ip = |i: usize| IpAddr::V4(Ipv4Addr::new(a[i], a[i + 1], a[i + 2], a[i + 3]));
            Some((
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            ))
        }
        2 => {
            let ip = |i: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&a[i..i + 16]);
                Ipv6Addr::from(o)
            };
            Some((
                SocketAddr::V6(SocketAddrV6::new(ip(0), port(32), 0, 0)),
                SocketAddr::V6(SocketAddrV6::new(ip(16), port(34), 0, 0)),
            ))
        }
        // UNSPEC, or unix sockets: the connection's own addresses stand.
        _ => None,
    };
    Parsed::Header(Header { len, addrs })
}

/// Appends a version 1 header for a TCP connection from `src` to `dst` (TCP6, with
/// both addresses as IPv6, if either is IPv6).
pub fn encode_v1(out: &mut Vec<u8>, src: SocketAddr, dst: SocketAddr) {
    use std::io::Write;
    let _ = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => write!(
            out,
            "PROXY TCP4 {} {} {} {}\r\n",
            s.ip(),
            d.ip(),
            s.port(),
            d.port()
        ),
        _ => write!(
            out,
            "PROXY TCP6 {} {} {} {}\r\n",
            v6(src.ip()),
            v6(dst.ip()),
            src.port(),
            dst.port()
        ),
    };
}

/// An address as IPv6 (IPv4 mapped).
fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// Appends a version 2 `PROXY` header for a TCP connection from `src` to `dst`,
/// followed by the raw TLV bytes `tlvs` (AF_INET6, both as IPv6, if either is IPv6).
pub fn encode_v2(out: &mut Vec<u8>, src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&((12 + tlvs.len()) as u16).to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
        }
        _ => {
            out.push(0x21);
            out.extend_from_slice(&((36 + tlvs.len()) as u16).to_be_bytes());
            out.extend_from_slice(&v6(src.ip()).octets());
            out.extend_from_slice(&v6(dst.ip()).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out.extend_from_slice(tlvs);
}

/// Appends a version 2 `LOCAL` header (a proxy's health check: no addresses).
pub fn encode_v2_local(out: &mut Vec<u8>) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
}

/// An IP network, `ADDR/BITS` (`--trusted-proxy`); a bare address is one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Whether `ip` is in this network; IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.bits)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or network (ADDR or ADDR/BITS)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => Some(b)
                .filter(|b| !b.is_empty() && b.bytes().all(|c| c.is_ascii_digit()))
                .and_then(|b| b.parse::<u8>().ok())
                .filter(|&b| b <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
        };
        // An IPv4-mapped network (`::ffff:10.0.0.0/104`, as a log of an IPv6 listener
        // shows peers) is the IPv4 network it maps: `contains` sees peers as IPv4.
        if let IpAddr::V6(v6) = addr {
            if let (Some(v4), true) = (v6.to_ipv4_mapped(), bits >= 96) {
                return Ok(Cidr {
                    addr: IpAddr::V4(v4),
                    bits: bits - 96,
                });
            }
        }
        Ok(Cidr { addr, bits })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_networks_are_ipv4_and_prefixes_are_plain_digits() {
        let c: Cidr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(c.contains("127.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:127.0.0.1".parse().unwrap()));
        let n: Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert!(n.contains("10.9.8.7".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/+8", "10.0.0.0/", "10.0.0.0/33", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_specification_examples_parse() {
        let h = parse(
            b"PROXY TCP4 10.1.2.3 192.168.0.1 56324 443\r\nGET /",
            ProxyProtocol::Any,
        );
        let src = "10.1.2.3:56324".parse().unwrap();
        let dst = "192.168.0.1:443".parse().unwrap();
        assert_eq!(
            h,
            Parsed::Header(Header {
                len: 43,
                addrs: Some((src, dst))
            })
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n", ProxyProtocol::V1),
            Parsed::Header(Header {
                len: 15,
                addrs: None
            })
        );
        let mut local = Vec::new();
        encode_v2_local(&mut local);
        assert_eq!(
            parse(&local, ProxyProtocol::V2),
            Parsed::Header(Header {
                len: 16,
                addrs: None
            })
        );
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n", ProxyProtocol::Any),
            Parsed::Invalid(_)
        ));
        assert!(matches!(
            parse(&local, ProxyProtocol::V1),
            Parsed::Invalid(_)
        ));
        assert_eq!(
            parse(b"PROXY TCP4 1.2", ProxyProtocol::Any),
            Parsed::NeedMore
        );
        assert!(matches!(
            parse(b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", ProxyProtocol::Any),
            Parsed::Invalid(_)
        ));
    }

    #[test]
    fn what_the_specification_says_to_ignore_is_ignored() {
        // v1 UNKNOWN: whatever precedes the CRLF, text or not.
        let unknown = b"PROXY UNKNOWN \xff\xfe 1.2.3.4\r\nGET /";
        assert_eq!(
            parse(unknown, ProxyProtocol::V1),
            Parsed::Header(Header {
                len: unknown.len() - 5,
                addrs: None
            })
        );
        assert!(matches!(
            parse(b"PROXY UNKNOWNX\r\n", ProxyProtocol::V1),
            Parsed::Invalid(_)
        ));
        // v2 LOCAL: the family byte and the address block are discarded, even when
        // they would be invalid or too short for a PROXY command.
        let mut local = Vec::new();
        encode_v2_local(&mut local);
        for family in [0x11, 0x21, 0xff] {
            local[13] = family;
            local[14..16].copy_from_slice(&4u16.to_be_bytes());
            local.truncate(16);
            local.extend_from_slice(&[9, 9, 9, 9]);
            assert_eq!(
                parse(&local, ProxyProtocol::V2),
                Parsed::Header(Header {
                    len: 20,
                    addrs: None
                }),
                "family {family:#x}"
            );
            assert_eq!(parse(&local[..17], ProxyProtocol::V2), Parsed::NeedMore);
        }
        // The same bytes as a PROXY command are refused.
        local[12] = 0x21;
        assert!(matches!(
            parse(&local, ProxyProtocol::V2),
            Parsed::Invalid(_)
        ));
    }

    #[test]
    fn networks_contain_their_addresses() {
        let n: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains("10.9.8.7".parse().unwrap()));
        assert!(n.contains("::ffff:10.9.8.7".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let host: Cidr = "::1".parse().unwrap();
        assert!(host.contains("::1".parse().unwrap()));
        assert!(!host.contains("::2".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    }
}
