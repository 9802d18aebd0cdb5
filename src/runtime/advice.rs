//! What a worker must do in each mode, said once when workers keep failing to start.
//!
//! The commonest first mistake is a server that binds the port itself
//! (`server.listen(8080)`, `python3 -m http.server 8080`): the master already holds
//! that port, so the worker dies with EADDRINUSE and is respawned forever, or it
//! listens somewhere else and never gets ready. The supervisor core notices the
//! pattern ([`crate::supervisor::Event::StartsFailing`]); this module turns it into
//! one plain sentence for the current mode, pointing at the README's "Will my server
//! work?" section. The text avoids `key=value` so that log readers keep it whole.

use std::ffi::OsStr;
use std::fmt::Write;
use std::net::SocketAddr;
use std::path::Path;

use crate::config::{Balance, ReadyWhen, Via};
use crate::supervisor::StartFailure;

/// What the advice is built from.
pub(crate) struct Situation<'a> {
    /// The balance mode.
    pub balance: Balance,
    /// How workers receive connections in `rr`/`sticky`.
    pub via: Via,
    /// The readiness rule.
    pub ready_when: ReadyWhen,
    /// The addresses the master listens on.
    pub addrs: &'a [SocketAddr],
    /// The worker command's program, as given.
    pub program: &'a OsStr,
    /// How the last start failed.
    pub last: StartFailure,
    /// Failed starts in a row.
    pub failures: u32,
    /// The worker had a worker channel and never said anything on it.
    pub silent: bool,
}

/// The log message: what happened, what a worker must do in this mode, where to read more.
pub(crate) fn advice(s: &Situation) -> String {
    let addrs = s
        .addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = match s.last {
        StartFailure::Exited(status) => format!(
            "workers keep exiting before they are ready ({} in a row, the last with {}); \
             their own output above says why. ",
            s.failures,
            status.to_string().replace('=', " ")
        ),
        StartFailure::NotReady => "a worker was not ready within --ready-timeout. ".to_string(),
    };
    if s.last == StartFailure::NotReady && s.ready_when == ReadyWhen::Ready {
        text.push_str(
            "With --ready-when ready a worker is ready only once it says so: the ready message \
             on its worker channel (recluster::worker::ready()), or the readiness message of \
             sd_notify on NOTIFY_SOCKET; a worker that only listens needs --ready-when \
             listening. ",
        );
    }
    if s.silent && s.via == Via::Node {
        text.push_str("It never said listening or ready over Node's cluster IPC. ");
    } else if s.silent {
        text.push_str("The last one never spoke on its worker channel. ");
    }
    let node = is_node(s.program);
    match s.balance {
        Balance::RoundRobin | Balance::Sticky if s.via == Via::Node => {
            let _ = write!(
                text,
                "In --balance {} --via node recluster is the Node cluster primary: the \
                 worker must be the node process itself running a script whose server \
                 calls listen(port), and recluster serves that port (a --listen address \
                 with the same port, or one it binds on the first request). Not npm start: \
                 npm is a Node script itself, takes the channel, and the app never sees it. A server whose listen failed says why above \
                 (listen EADDRINUSE: another process holds the port). See docs/NODE.md. ",
                s.balance
            );
        }
        Balance::RoundRobin | Balance::Sticky if s.via == Via::Channel => {
            let _ = write!(
                text,
                "In --balance {} recluster itself listens on {addrs} and hands each connection \
                 to a worker over its worker channel (RECLUSTER_FD): a worker must take its \
                 connections from there, with recluster's worker library or the protocol in \
                 docs/PROTOCOL.md, and must not bind the port itself (that fails with \
                 EADDRINUSE). An unmodified server that can accept on an inherited socket \
                 (systemd socket activation) needs --balance shared. ",
                s.balance
            );
            if node {
                text.push_str(
                    "For an unmodified Node.js server: --via node (the default when the \
                     command is node), or --balance shared and server.listen({fd: 3}). ",
                );
            }
        }
        Balance::RoundRobin | Balance::Sticky | Balance::Shared => {
            let mode = match s.balance {
                Balance::Shared => "--balance shared".to_string(),
                b => format!("--balance {b} --via socket"),
            };
            let _ = write!(
                text,
                "In {mode} each worker must accept on the listening sockets it \
                 inherits from fd 3 on (LISTEN_FDS, systemd socket activation), not bind \
                 {addrs} itself (that fails with EADDRINUSE: recluster holds it). Node: \
                 server.listen({{fd: 3}}); Python: socket.fromfd(3, socket.AF_INET, \
                 socket.SOCK_STREAM); uvicorn --fd 3; gunicorn --bind fd://3; Go: \
                 net.FileListener(os.NewFile(3, \"listener\")). "
            );
            if s.last == StartFailure::NotReady && s.ready_when == ReadyWhen::Listening {
                text.push_str(
                    "A server that does accept there but waits in poll or select is not seen \
                     listening: use --ready-when ready and have it notify readiness (sd_notify). ",
                );
            }
        }
    }
    text.push_str("See \"Will my server work?\" in recluster's README.");
    text
}

/// Whether the program is Node.js, by its file name.
fn is_node(program: &OsStr) -> bool {
    Path::new(program)
        .file_name()
        .is_some_and(|n| n == "node" || n == "nodejs")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::ExitStatus;

    fn situation(balance: Balance, program: &str, last: StartFailure) -> String {
        let addrs = ["127.0.0.1:8080".parse().unwrap()];
        advice(&Situation {
            balance,
            via: Via::Channel,
            ready_when: ReadyWhen::Listening,
            addrs: &addrs,
            program: OsStr::new(program),
            last,
            failures: 3,
            silent: false,
        })
    }

    #[test]
    fn each_mode_says_what_a_worker_must_do_without_key_value_tokens() {
        let exited = StartFailure::Exited(ExitStatus::Code(1));
        let rr = situation(Balance::RoundRobin, "./server", exited);
        assert!(rr.contains("3 in a row, the last with code 1"), "{rr}");
        assert!(rr.contains("their own output above"), "{rr}");
        assert!(rr.contains("RECLUSTER_FD") && rr.contains("--balance shared"));
        assert!(!rr.contains("Node"), "{rr}");
        let node = situation(Balance::Sticky, "/usr/bin/node", exited);
        assert!(node.contains("listen({fd: 3})"), "{node}");
        let shared = situation(Balance::Shared, "python3", StartFailure::NotReady);
        assert!(shared.contains("LISTEN_FDS") && shared.contains("127.0.0.1:8080"));
        assert!(shared.contains("--ready-when ready"), "{shared}");
        let addrs = ["127.0.0.1:8080".parse().unwrap()];
        let ready = advice(&Situation {
            balance: Balance::Shared,
            via: Via::Channel,
            ready_when: ReadyWhen::Ready,
            addrs: &addrs,
            program: OsStr::new("./server"),
            last: StartFailure::NotReady,
            failures: 1,
            silent: false,
        });
        assert!(ready.contains("--ready-when listening") && ready.contains("sd_notify"));
        let via_node = advice(&Situation {
            balance: Balance::Sticky,
            via: Via::Node,
            ready_when: ReadyWhen::Listening,
            addrs: &addrs,
            program: OsStr::new("node"),
            last: StartFailure::Exited(ExitStatus::Code(1)),
            failures: 3,
            silent: true,
        });
        assert!(via_node.contains("npm start") && via_node.contains("docs/NODE.md"), "{via_node}");
        assert!(!via_node.contains("RECLUSTER_FD"), "{via_node}");
        for text in [rr, node, shared, ready, via_node] {
            assert!(text.contains("Will my server work?"));
            assert!(
                !text.split_whitespace().any(|t| t.contains('=')),
                "a log reader would split {text}"
            );
        }
    }
}
