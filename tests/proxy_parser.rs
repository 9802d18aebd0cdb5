//! The PROXY header parser (`recluster::proxy`), property-tested: generated v1 and v2
//! headers (IPv4, IPv6, TLVs, any trailing data) parse back to their addresses and
//! exact length; every proper prefix of one asks for more and never panics; garbage
//! is rejected; and no input makes it ask for more beyond the size bounds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use recluster::proxy::{self, Header, Parsed, ProxyProtocol, V1_MAX, V2_MAX};

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
    ]
}

/// Well-formed TLVs: type, 16-bit length, value.
fn tlvs() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64)),
        0..6,
    )
    .prop_map(|tlvs| {
        let mut out = Vec::new();
        for (kind, value) in tlvs {
            out.push(kind);
            out.extend_from_slice(&(value.len() as u16).to_be_bytes());
            out.extend_from_slice(&value);
        }
        out
    })
}

/// What a header for `src` → `dst` should parse to (one of them IPv6: both as IPv6).
fn expected(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if src.is_ipv4() && dst.is_ipv4() {
        (src, dst)
    } else {
        (v6(src), v6(dst))
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn v1_headers_round_trip_and_their_prefixes_need_more(
        src in addr(), dst in addr(), rest in proptest::collection::vec(any::<u8>(), 0..32)
    ) {
        let mut h = Vec::new();
        proxy::encode_v1(&mut h, src, dst);
        prop_assert!(h.len() <= V1_MAX);
        let len = h.len();
        h.extend_from_slice(&rest);
        for accept in [ProxyProtocol::V1, ProxyProtocol::Any] {
            prop_assert_eq!(
                proxy::parse(&h, accept),
                Parsed::Header(Header { len, addrs: Some(expected(src, dst)) })
            );
            for cut in 0..len {
                prop_assert_eq!(proxy::parse(&h[..cut], accept), Parsed::NeedMore, "prefix of {}", cut);
            }
        }
        prop_assert!(matches!(proxy::parse(&h, ProxyProtocol::V2), Parsed::Invalid(_)));
    }

    #[test]
    fn v2_headers_round_trip_and_their_prefixes_need_more(
        src in addr(), dst in addr(), tlvs in tlvs(), rest in proptest::collection::vec(any::<u8>(), 0..32)
    ) {
        let mut h = Vec::new();
        proxy::encode_v2(&mut h, src, dst, &tlvs);
        let len = h.len();
        h.extend_from_slice(&rest);
        for accept in [ProxyProtocol::V2, ProxyProtocol::Any] {
            prop_assert_eq!(
                proxy::parse(&h, accept),
                Parsed::Header(Header { len, addrs: Some(expected(src, dst)) })
            );
            for cut in 0..len {
                prop_assert_eq!(proxy::parse(&h[..cut], accept), Parsed::NeedMore, "prefix of {}", cut);
            }
        }
        prop_assert!(matches!(proxy::parse(&h, ProxyProtocol::V1), Parsed::Invalid(_)));
    }

    #[test]
    fn garbage_is_rejected(first in any::<u8>(), rest in proptest::collection::vec(any::<u8>(), 0..200)) {
        prop_assume!(first != b'P' && first != b'\r');
        let mut h = vec![first];
        h.extend_from_slice(&rest);
        for accept in [ProxyProtocol::V1, ProxyProtocol::V2, ProxyProtocol::Any] {
            prop_assert!(matches!(proxy::parse(&h, accept), Parsed::Invalid(_)));
        }
    }

    #[test]
    fn any_bytes_parse_without_panic_within_the_bounds(
        prefix in prop_oneof![Just(b"PROXY ".to_vec()), Just(proxy::V2_SIGNATURE.to_vec()), Just(Vec::new())],
        rest in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut h = prefix;
        h.extend_from_slice(&rest);
        for accept in [ProxyProtocol::V1, ProxyProtocol::V2, ProxyProtocol::Any] {
            match proxy::parse(&h, accept) {
                Parsed::Header(hd) => prop_assert!(hd.len <= h.len() && hd.len <= V2_MAX),
                Parsed::NeedMore => prop_assert!(h.len() < accept.max_len()),
                Parsed::Invalid(_) => {}
            }
        }
    }
}

#[test]
fn v1_without_crlf_by_107_bytes_is_invalid_and_v2_over_4_kib_too() {
    let mut long = b"PROXY TCP4 ".to_vec();
    long.resize(V1_MAX, b'1');
    assert!(matches!(
        proxy::parse(&long, ProxyProtocol::V1),
        Parsed::Invalid(_)
    ));
    assert_eq!(
        proxy::parse(&long[..V1_MAX - 1], ProxyProtocol::V1),
        Parsed::NeedMore
    );
    let mut big = proxy::V2_SIGNATURE.to_vec();
    big.extend_from_slice(&[0x21, 0x11]);
    big.extend_from_slice(&((V2_MAX - 16 + 1) as u16).to_be_bytes());
    assert!(matches!(
        proxy::parse(&big, ProxyProtocol::V2),
        Parsed::Invalid(_)
    ));
    let mut max = proxy::V2_SIGNATURE.to_vec();
    max.extend_from_slice(&[0x21, 0x11]);
    max.extend_from_slice(&((V2_MAX - 16) as u16).to_be_bytes());
    assert_eq!(proxy::parse(&max, ProxyProtocol::V2), Parsed::NeedMore);
    max.resize(V2_MAX, 0);
    assert!(matches!(proxy::parse(&max, ProxyProtocol::V2), Parsed::Header(h) if h.len == V2_MAX));
}
