//! Fuzzes the worker channel parsers: any bytes, either direction, never panic, and
//! every `conn` record that parses re-encodes to the same record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use recluster::channel::{self, MasterLine};

fuzz_target!(|data: &[u8]| {
    for line in channel::lines(data) {
        let _ = channel::parse_worker_line(line);
        if let MasterLine::Conn {
            listener,
            peer,
            local,
        } = channel::parse_master_line(line)
        {
            let mut again = Vec::new();
            channel::encode_conn(&mut again, listener, peer, local);
            let reparsed = channel::parse_master_line(&again[..again.len() - 1]);
            assert_eq!(
                reparsed,
                MasterLine::Conn {
                    listener,
                    peer,
                    local
                }
            );
        }
    }
});
