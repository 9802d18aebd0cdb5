//! The worker channel protocol: the frames the master and a worker exchange.
//!
//! Pure encoding and parsing, no I/O (that is the `fdpass` module's job), so both sides
//! share one grammar and it can be tested and fuzzed alone. The full specification
//! is `docs/PROTOCOL.md`; in short, over a `SOCK_SEQPACKET` socketpair:
//!
//! * master → worker: a message of lines. Each `conn <listener> <peer> <local>` line
//!   is one connection and takes the next descriptor of the message's SCM_RIGHTS, in
//!   order; `stop` means stop accepting and drain. Unknown lines take no descriptor
//!   and are ignored; descriptors left over are closed.
//! * worker → master: lines `listening`, `ready`, `replace`.
//!
//! Parsing never allocates and never panics on any input.

use std::io::Write;
use std::net::SocketAddr;

/// The protocol version, given to workers in `RECLUSTER_PROTOCOL`.
pub const VERSION: u32 = 1;

/// Largest message a worker may send; anything longer is garbage.
pub const MAX_WORKER_MESSAGE: usize = 256;

/// Room for one master message: 64 records (the most per message) of the longest kind.
pub const MAX_MASTER_MESSAGE: usize = 64 * RECORD_MAX;

/// Longest `conn` record: two bracketed IPv6 addresses with scope ids and ports.
const RECORD_MAX: usize = 128;

/// One line of a master → worker message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterLine<'a> {
    /// A connection accepted on listener `listener`; its descriptor is the next one.
    Conn {
        /// Index of the `--listen` address it came in on.
        listener: usize,
        /// The client's address.
        peer: SocketAddr,
        /// The local address it was accepted on.
        local: SocketAddr,
    },
    /// Stop accepting: no more connections will come; drain and exit.
    Stop,
    /// A line this version does not know (to be ignored; takes no descriptor).
    Unknown(&'a [u8]),
}

/// One line of a worker → master message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerLine<'a> {
    /// The worker's library has started accepting (readiness `listening`).
    Listening,
    /// The worker is ready (readiness `ready`).
    Ready,
    /// The worker asks to be replaced and will retire once its replacement is ready.
    Replace,
    /// Not a line of the protocol.
    Unknown(&'a [u8]),
}

/// Appends a `conn` record to `out` (no allocation once `out` has the capacity).
pub fn encode_conn(out: &mut Vec<u8>, listener: usize, peer: SocketAddr, local: SocketAddr) {
    // This is on the master's hot path, once per connection: `core::fmt` was two
    // thirds of the master's user-space instructions (callgrind), so IPv4 — the common
    // case — is written by hand. The text is exactly what `SocketAddr` prints.
    out.extend_from_slice(b"conn ");
    write_decimal(out, listener as u64);
    out.push(b' ');
    write_addr(out, peer);
    out.push(b' ');
    write_addr(out, local);
    out.push(b'\n');
}

fn write_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            let [x, y, z, w] = a.ip().octets();
            for (i, octet) in [x, y, z, w].into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                write_decimal(out, octet.into());
            }
            out.push(b':');
            write_decimal(out, a.port().into());
        }
        // Writing into a Vec cannot fail.
        SocketAddr::V6(a) => {
            let _ = write!(out, "{a}");
        }
    }
}

fn write_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends a `stop` line to `out`.
pub fn encode_stop(out: &mut Vec<u8>) {
    out.extend_from_slice(b"stop\n");
}

/// The lines of a message, without their newlines; an empty trailing line is skipped.
pub fn lines(msg: &[u8]) -> impl Iterator<Item = &[u8]> {
    msg.split(|&b| b == b'\n').filter(|l| !l.is_empty())
}

/// Parses one master → worker line.
pub fn parse_master_line(line: &[u8]) -> MasterLine<'_> {
    if line == b"stop" {
        return MasterLine::Stop;
    }
    let Some(rest) = line.strip_prefix(b"conn ") else {
        return MasterLine::Unknown(line);
    };
    let Ok(rest) = std::str::from_utf8(rest) else {
        return MasterLine::Unknown(line);
    };
    let mut parts = rest.split(' ');
    let parsed = (|| {
        let listener = parts.next()?.parse().ok()?;
        let peer = parts.next()?.parse().ok()?;
        let local = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some(MasterLine::Conn {
            listener,
            peer,
            local,
        })
    })();
    parsed.unwrap_or(MasterLine::Unknown(line))
}

/// Parses one worker → master line.
pub fn parse_worker_line(line: &[u8]) -> WorkerLine<'_> {
    match line {
        b"listening" => WorkerLine::Listening,
        b"ready" => WorkerLine::Ready,
        b"replace" => WorkerLine::Replace,
        other => WorkerLine::Unknown(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_records_round_trip_for_v4_and_v6() {
        let cases: [(usize, &str, &str); 3] = [
            (0, "127.0.0.9:51000", "127.0.0.1:8080"),
            (3, "[::1]:1", "[::ffff:127.0.0.1]:65535"),
            (1, "[fe80::1%2]:443", "[fe80::2%2]:444"),
        ];
        let mut buf = Vec::new();
        for (l, p, o) in cases {
            encode_conn(&mut buf, l, p.parse().unwrap(), o.parse().unwrap());
        }
        encode_stop(&mut buf);
        let parsed: Vec<_> = lines(&buf).map(parse_master_line).collect();
        assert_eq!(parsed.len(), 4);
        for (i, (l, p, o)) in cases.iter().enumerate() {
            assert_eq!(
                parsed[i],
                MasterLine::Conn {
                    listener: *l,
                    peer: p.parse().unwrap(),
                    local: o.parse().unwrap()
                }
            );
        }
        assert_eq!(parsed[3], MasterLine::Stop);
    }

    #[test]
    fn the_hand_written_encoding_is_what_socketaddr_prints() {
        let cases = [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "127.0.0.1:8080",
            "10.0.100.9:443",
            "[::1]:80",
        ];
        for peer in cases {
            for local in cases {
                for listener in [0, 7, 12345] {
                    let (p, l): (SocketAddr, SocketAddr) =
                        (peer.parse().unwrap(), local.parse().unwrap());
                    let mut buf = Vec::new();
                    encode_conn(&mut buf, listener, p, l);
                    assert_eq!(buf, format!("conn {listener} {p} {l}\n").into_bytes());
                }
            }
        }
    }

    #[test]
    fn the_longest_record_fits_its_budget() {
        let a: SocketAddr = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535"
            .parse()
            .unwrap();
        let mut buf = Vec::new();
        encode_conn(&mut buf, 999, a, a);
        assert!(buf.len() <= RECORD_MAX, "{} bytes", buf.len());
    }

    #[test]
    fn malformed_lines_are_unknown_not_errors() {
        for bad in [
            &b"conn"[..],
            b"conn x 1.2.3.4:5 1.2.3.4:6",
            b"conn 0 1.2.3.4:5",
            b"conn 0 1.2.3.4:5 1.2.3.4:6 extra",
            b"conn 0 \xff 1.2.3.4:6",
            b"stop now",
            b"hello 2",
        ] {
            assert!(matches!(parse_master_line(bad), MasterLine::Unknown(_)));
        }
        assert_eq!(parse_worker_line(b"ready"), WorkerLine::Ready);
        assert_eq!(parse_worker_line(b"listening"), WorkerLine::Listening);
        assert_eq!(parse_worker_line(b"replace"), WorkerLine::Replace);
        assert!(matches!(
            parse_worker_line(b"READY"),
            WorkerLine::Unknown(_)
        ));
    }
}
