//! The `sticky` mapping from client IP to slot is fixed: the same address goes to the
//! same slot in every master process, after a restart as after a reload, whatever
//! binary, version or machine runs it (the function is written down in
//! `balance::sticky` and README.md; these values were also computed by an independent
//! implementation of it). A change of the hash, its seeds or the rendezvous weights
//! fails this test instead of quietly moving every client to another worker.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::*;
use recluster::balance::Router;
use recluster::Balance;

/// Preferred slot of 127.0.0.1 ..= 127.0.0.16 with 2, 3 and 4 ready slots.
const V4_BY_SLOTS: [(usize, [usize; 16]); 3] = [
    (2, [0, 0, 0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0]),
    (3, [0, 0, 0, 0, 2, 1, 1, 1, 0, 1, 0, 0, 0, 0, 2, 2]),
    (4, [3, 3, 0, 0, 3, 1, 3, 1, 0, 1, 3, 0, 0, 0, 2, 3]),
];

/// Other addresses, and their preferred slot with 2, 3 and 4 ready slots.
const OTHERS: [(&str, [usize; 3]); 6] = [
    ("10.0.0.1", [1, 1, 1]),
    ("192.168.1.20", [1, 1, 1]),
    ("203.0.113.7", [1, 2, 2]),
    ("::1", [0, 2, 2]),
    ("2001:db8::1", [0, 0, 3]),
    // IPv4-mapped IPv6 is its IPv4 address: 127.0.0.1's slot.
    ("::ffff:127.0.0.1", [0, 0, 3]),
];

fn router(slots: usize) -> Router {
    let mut r = Router::new(Balance::Sticky);
    for s in 0..slots {
        r.set_ready(s, true);
    }
    r
}

fn local(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, i as u8)
}

#[test]
fn the_sticky_mapping_is_pinned_for_2_3_and_4_slots_and_for_ipv6() {
    for (slots, expected) in V4_BY_SLOTS {
        let r = router(slots);
        let got: Vec<usize> = (1..=16)
            .map(|i| r.preferred(IpAddr::V4(local(i))).unwrap())
            .collect();
        assert_eq!(got, expected, "127.0.0.1..=16 over {slots} slots");
    }
    for (addr, expected) in OTHERS {
        let ip: IpAddr = addr.parse().unwrap();
        let got: Vec<usize> = [2, 3, 4]
            .iter()
            .map(|&slots| router(slots).preferred(ip).unwrap())
            .collect();
        assert_eq!(got, expected, "{addr} over 2, 3 and 4 slots");
    }
}

/// The same pinned slots from a real master, another process than this test: the
/// binary maps as the library does.
#[test]
fn a_sticky_master_process_sends_each_address_to_its_pinned_slot() {
    let m = Cluster::new()
        .workers(4)
        .args(["--balance", "sticky", "--listen", "127.0.0.1:0"])
        .command([echo()])
        .spawn();
    let addr = m.addr();
    m.wait_cluster_ready(4);
    let expected = V4_BY_SLOTS[2].1;
    let got: BTreeMap<Ipv4Addr, usize> = (1..=16)
        .map(|i| {
            let r = request_from(addr, Some(local(i)), true, Duration::from_secs(15))
                .unwrap_or_else(|f| panic!("from {}: {f:?}", local(i)));
            (local(i), r.id)
        })
        .collect();
    let want: BTreeMap<Ipv4Addr, usize> = (1..=16).map(|i| (local(i), expected[i - 1])).collect();
    assert_eq!(got, want, "slot (WORKER_ID) serving each client address");
}
