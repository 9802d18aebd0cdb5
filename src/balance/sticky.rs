//! The `sticky` hash: which slot a client IP prefers, the same in every master, on
//! every machine, and in the kernel.
//!
//! A client's IP (never its port; IPv4-mapped IPv6 counts as IPv4) becomes one 32-bit
//! word; each ready slot gets a rendezvous weight from that word and the slot's seed;
//! the heaviest ready slot wins, a tie going to the lowest slot. When a slot has no
//! ready worker its clients go to their next-heaviest slot and come back when it is
//! ready again; adding or removing a slot moves only the clients whose heaviest slot
//! changed (about 1/N).
//!
//! Everything is written down and made of 32-bit operations (xor, shifts, wrapping
//! multiplication), so that it is the same for every build, version and CPU, and so
//! that a classic BPF program can compute it for `--via socket` (`via::socket`
//! generates that program from these same functions):
//!
//! * the word of an IPv4 address is the address as a big-endian number
//!   (`10.0.0.1` is `0x0a000001`); an IPv6 address's four big-endian words fold as
//!   `h = w0; h = fmix32(h) ^ w1; h = fmix32(h) ^ w2; h = fmix32(h) ^ w3`;
//! * `fmix32` is murmur3's 32-bit finaliser;
//! * slot `k`'s seed is `fmix32((k + 1) * 0x9e3779b9)`;
//! * slot `k`'s weight for a word `h` is `fmix32(h ^ seed(k))`.
//!
//! Test vectors (address, ready slots → slot) are pinned in this module's tests, in
//! `tests/sticky_mapping.rs` through a real master, and in README.md.

use std::net::IpAddr;

/// murmur3's 32-bit finaliser: every input bit affects every output bit.
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The 32-bit word a client IP is hashed from; IPv4-mapped IPv6 counts as IPv4.
pub fn ip_hash(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u32::from(v4),
            None => {
                let o = v6.octets();
                let word = |i: usize| u32::from_be_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                (1..4).fold(word(0), |h, i| fmix32(h) ^ word(4 * i))
            }
        },
    }
}

/// The seed of `slot`, mixed into its weights.
pub const fn seed(slot: usize) -> u32 {
    fmix32((slot as u32).wrapping_add(1).wrapping_mul(0x9e37_79b9))
}

/// The rendezvous weight of `slot` for a client whose IP hashed to `h`.
pub const fn weight(h: u32, slot: usize) -> u32 {
    fmix32(h ^ seed(slot))
}

/// The slot a client at `ip` goes to among `ready` (in any order): the heaviest, the
/// lowest slot on a tie; `None` when none is ready.
pub fn slot_for(ip: IpAddr, ready: impl IntoIterator<Item = usize>) -> Option<usize> {
    let h = ip_hash(ip);
    ready
        .into_iter()
        .map(|s| (weight(h, s), std::cmp::Reverse(s)))
        .max()
        .map(|(_, std::cmp::Reverse(s))| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_function_is_pinned() {
        // Values also computed by an independent implementation (Python).
        assert_eq!(fmix32(0), 0);
        assert_eq!(fmix32(1), 0x514e_28b7);
        assert_eq!(ip_hash(ip("10.0.0.1")), 0x0a00_0001);
        assert_eq!(ip_hash(ip("::ffff:10.0.0.1")), 0x0a00_0001);
        assert_eq!(ip_hash(ip("2001:db8::1")), 0xda53_5546);
        assert_eq!(ip_hash(ip("::1")), 1);
        let vectors: [(&str, &[usize], Option<usize>); 14] = [
            ("127.0.0.1", &[0, 1, 2, 3], Some(3)),
            ("127.0.0.1", &[0, 1, 2], Some(0)),
            ("127.0.0.1", &[0, 1], Some(0)),
            ("127.0.0.2", &[0, 1, 2, 3], Some(3)),
            ("127.0.0.3", &[1, 2, 3], Some(2)),
            ("10.0.0.1", &[0, 1, 2, 3], Some(1)),
            ("10.0.0.1", &[0, 2, 3], Some(3)),
            ("192.168.1.20", &[0, 1, 2, 3], Some(1)),
            ("::ffff:127.0.0.1", &[0, 1, 2, 3], Some(3)),
            ("2001:db8::1", &[0, 1, 2, 3], Some(3)),
            ("2001:db8::1", &[0, 1, 2], Some(0)),
            ("::1", &[0, 1, 2, 3], Some(2)),
            ("::1", &[0, 1, 3], Some(3)),
            ("::1", &[], None),
        ];
        for (addr, ready, slot) in vectors {
            assert_eq!(slot_for(ip(addr), ready.iter().copied()), slot, "{addr} {ready:?}");
        }
    }

    #[test]
    fn ties_go_to_the_lowest_slot_and_order_does_not_matter() {
        let a = ip("127.0.0.9");
        assert_eq!(slot_for(a, [0, 1, 2, 3]), slot_for(a, [3, 2, 1, 0]));
        assert_eq!(slot_for(a, []), None);
        assert_eq!(slot_for(a, [5]), Some(5));
    }
}
