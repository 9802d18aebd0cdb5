//! Fuzzes the PROXY header parser: any bytes, any accepted versions, never panic; a
//! header found lies within the input and the size bounds, and its addresses encode
//! back to a header that parses to the same addresses; "need more" never comes past
//! the bounds (so a sender cannot make the master buffer more).
#![no_main]

use libfuzzer_sys::fuzz_target;
use recluster::proxy::{self, Parsed, ProxyProtocol};

fuzz_target!(|data: &[u8]| {
    for accept in [ProxyProtocol::V1, ProxyProtocol::V2, ProxyProtocol::Any] {
        match proxy::parse(data, accept) {
            Parsed::Header(h) => {
                assert!(h.len <= data.len() && h.len <= accept.max_len());
                if let Some((src, dst)) = h.addrs {
                    for again in [encode(true, src, dst), encode(false, src, dst)] {
                        match proxy::parse(&again, ProxyProtocol::Any) {
                            Parsed::Header(h2) => {
                                assert_eq!(h2.len, again.len());
                                let (s2, d2) = h2.addrs.expect("addresses");
                                assert_eq!((s2.port(), d2.port()), (src.port(), dst.port()));
                            }
                            other => panic!("re-encoded header did not parse: {other:?}"),
                        }
                    }
                }
            }
            Parsed::NeedMore => assert!(data.len() < accept.max_len()),
            Parsed::Invalid(_) => {}
        }
    }
});

fn encode(v1: bool, src: std::net::SocketAddr, dst: std::net::SocketAddr) -> Vec<u8> {
    let mut out = Vec::new();
    if v1 {
        proxy::encode_v1(&mut out, src, dst);
    } else {
        proxy::encode_v2(&mut out, src, dst, &[]);
    }
    out
}
