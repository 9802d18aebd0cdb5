//! The `sticky` hash: which slot a client IP prefers, the same in every master.
//!
//! A client's IP (never its port; IPv4-mapped IPv6 counts as IPv4) is hashed once,
//! then each ready slot gets a rendezvous weight from that hash and its number; the
//! heaviest ready slot wins. When a slot has no ready worker its clients go to their
//! next-heaviest slot and come back when it is ready again; adding or removing a
//! slot moves only the clients whose heaviest slot changed (about 1/N).

use std::net::IpAddr;

/// Fixed seeds: the same IP maps to the same slot across reloads and master restarts.
const SEEDS: [u64; 4] = [
    0x243f_6a88_85a3_08d3,
    0x1319_8a2e_0370_7344,
    0xa409_3822_299f_31d0,
    0x082e_fa98_ec4e_6c89,
];

/// The hash of a client IP used by `sticky`: IPv4-mapped IPv6 counts as IPv4.
pub fn ip_hash(ip: IpAddr) -> u64 {
    let state = ahash::RandomState::with_seeds(SEEDS[0], SEEDS[1], SEEDS[2], SEEDS[3]);
    match ip {
        IpAddr::V4(v4) => state.hash_one(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => state.hash_one(u32::from(v4)),
            None => state.hash_one(u128::from(v6)),
        },
    }
}

/// The rendezvous weight of `slot` for a client whose IP hashed to `h`.
pub(crate) fn weight(h: u64, slot: usize) -> u64 {
    // splitmix64 finaliser over the pair: cheap, and every bit of both inputs matters.
    let mut z = h
        ^ (slot as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
