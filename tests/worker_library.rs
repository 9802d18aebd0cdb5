//! The worker library against a hand-made worker channel, in this process: three
//! connections arrive in one message, and the stop signal (SIGTERM, raised in this
//! process) comes after `accept` has handed out the first. The other two are still
//! handed out, as working connections; then `accept` yields `None` and `shutdown`
//! resolves. A second `Listener::from_env` is refused. (The master's `stop` message is
//! not sent here.)
//!
//! One test per file: the test sets process-wide environment variables and raises
//! SIGTERM in its own process, and `Listener::from_env` takes the worker channel once
//! per process.

use std::io::{IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    recv, sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};

#[tokio::test(flavor = "current_thread")]
async fn received_connections_are_served_after_the_stop_signal() {
    let (master, worker): (OwnedFd, OwnedFd) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    // The environment a master gives a worker (this test binary holds one test only).
    std::env::set_var("RECLUSTER_FD", worker.as_raw_fd().to_string());
    std::env::set_var("RECLUSTER_PROTOCOL", "1");
    std::mem::forget(worker); // the library owns it now
    let mut listener = recluster::worker::Listener::from_env().expect("from_env");
    assert!(
        recluster::worker::Listener::from_env().is_err(),
        "a second from_env is refused"
    );
    let mut said = [0u8; 64];
    let n = recv(master.as_raw_fd(), &mut said, MsgFlags::empty()).unwrap();
    assert_eq!(&said[..n], b"listening\n");

    // Three connections in one message, as the master batches them.
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let accepted: Vec<TcpStream> = (0..3).map(|_| server.accept().unwrap().0).collect();
    let mut text = String::new();
    for (c, s) in clients.iter().zip(&accepted) {
        text.push_str(&format!(
            "conn 0 {} {}\n",
            c.local_addr().unwrap(),
            s.local_addr().unwrap()
        ));
    }
    let fds: Vec<i32> = accepted.iter().map(|s| s.as_raw_fd()).collect();
    sendmsg::<()>(
        master.as_raw_fd(),
        &[IoSlice::new(text.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    drop(accepted); // the worker holds its own copies now

    let (first, peer) = listener.accept().await.unwrap().expect("first connection");
    assert_eq!(peer, clients[0].local_addr().unwrap());
    // The stop signal arrives while two received connections wait in the library.
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
    let shutdown = listener.shutdown();
    let mut served = vec![first];
    while let Some((s, _)) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("accept answers")
        .unwrap()
    {
        served.push(s);
    }
    assert_eq!(
        served.len(),
        3,
        "received connections are served, not dropped"
    );
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown resolves once everything received was handed out");
    // They are real, working connections.
    for (s, mut c) in served.into_iter().zip(clients) {
        let mut s = s.into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }
}
