//! The library API, as a program embedding recluster uses it: two clusters in one
//! process, steered through their handles and watched through their event streams.

mod common;

use std::time::Duration;

use common::{example_bin, DEADLINE};
use recluster::{Balance, Cluster, Event, WorkerCommand, WorkerState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;

async fn next_matching(
    events: &mut broadcast::Receiver<Event>,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(e) => panic!("event stream ended waiting for {what}: {e}"),
            }
        }
    };
    tokio::time::timeout(DEADLINE, wait)
        .await
        .unwrap_or_else(|_| panic!("no {what} event within {DEADLINE:?}"))
}

async fn ask(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.shutdown().await.expect("half-close");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test(flavor = "current_thread")]
async fn two_clusters_in_one_process_reload_and_terminate_through_their_handles() {
    let echo = example_bin("echo");
    let build = |balance| {
        Cluster::builder(WorkerCommand::new(&echo))
            .workers(2)
            .listen("127.0.0.1:0".parse().unwrap())
            .balance(balance)
            .timeout(Duration::from_secs(5))
            .build()
            .expect("build")
    };
    let (a, b) = (build(Balance::RoundRobin), build(Balance::Sticky));
    let (addr_a, addr_b) = (a.local_addrs()[0], b.local_addrs()[0]);
    let (ha, hb) = (a.handle(), b.handle());
    let (mut ea, mut eb) = (ha.events(), hb.events());
    let run_a = tokio::spawn(a.run());
    let run_b = tokio::spawn(b.run());

    for (events, name) in [(&mut ea, "a"), (&mut eb, "b")] {
        next_matching(events, &format!("cluster {name} ready"), |e| {
            matches!(e, Event::ClusterReady { generation: 1 })
        })
        .await;
    }
    let active = ha.active_workers();
    assert_eq!(active.len(), 2);
    assert!(active
        .iter()
        .all(|w| w.is_some_and(|w| w.state == WorkerState::Ready)));
    assert_eq!(ha.generation(), 1);
    assert!(ask(addr_a).await.contains("gen=1"));
    assert!(ask(addr_b).await.contains("gen=1"));

    // Reloading one cluster leaves the other alone.
    ha.reload();
    next_matching(&mut ea, "reload finished", |e| {
        matches!(e, Event::ReloadFinished { generation: 2 })
    })
    .await;
    assert_eq!(ha.generation(), 2);
    assert_eq!(hb.generation(), 1);
    assert!(ask(addr_a).await.contains("gen=2"));
    assert!(ask(addr_b).await.contains("gen=1"));
    // Counted as handed just after it is sent, which a reply can outrun: polled (the
    // accept threads count, not this runtime).
    let mut counts = ha.balance_counts();
    common::poll_until(DEADLINE, || {
        counts = ha.balance_counts();
        counts.handed >= 2 && counts.accepted == counts.handed
    });
    assert!(
        counts.handed >= 2 && counts.accepted == counts.handed,
        "{counts:?}"
    );

    // Terminate both: run() returns Ok once every worker is reaped.
    let pids: Vec<u32> = ha
        .workers()
        .into_iter()
        .chain(hb.workers())
        .filter_map(|w| w.pid)
        .collect();
    ha.terminate();
    hb.terminate();
    run_a.await.unwrap().expect("cluster a ran");
    run_b.await.unwrap().expect("cluster b ran");
    for pid in pids {
        assert!(!common::pid_alive(pid), "worker {pid} outlived its cluster");
    }
    assert!(ha.workers().is_empty() && hb.workers().is_empty());
}

#[test]
fn a_command_that_does_not_exist_fails_at_build_with_a_clear_error() {
    let err = Cluster::builder(WorkerCommand::new("/nonexistent/server"))
        .listen("127.0.0.1:0".parse().unwrap())
        .build()
        .err()
        .expect("build must fail");
    let msg = err.to_string();
    assert!(msg.contains("/nonexistent/server"), "{msg}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_shared_cluster_scales_through_its_handle_and_the_snapshot_follows() {
    let cluster = Cluster::builder(WorkerCommand::new("sleep").arg("60"))
        .workers(2)
        .listen("127.0.0.1:0".parse().unwrap())
        .balance(Balance::Shared)
        .ready_when(recluster::ReadyWhen::Started)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("build");
    let handle = cluster.handle();
    let mut events = handle.events();
    let running = tokio::spawn(cluster.run());
    next_matching(&mut events, "cluster ready", |e| {
        matches!(e, Event::ClusterReady { generation: 1 })
    })
    .await;

    handle.scale(3);
    next_matching(&mut events, "scaled 2 -> 3", |e| {
        matches!(e, Event::Scaled { from: 2, to: 3 })
    })
    .await;
    next_matching(
        &mut events,
        "slot 2 ready",
        |e| matches!(e, Event::Ready(w) if w.slot == 2),
    )
    .await;
    assert_eq!(handle.active_workers().len(), 3);
    assert!(handle.active_workers().iter().all(Option::is_some));

    // Relative: from the number the cluster has when the request is handled.
    handle.scale_by(-1);
    handle.scale_by(-1);
    next_matching(&mut events, "scaled 2 -> 1", |e| {
        matches!(e, Event::Scaled { from: 2, to: 1 })
    })
    .await;
    let gone = next_matching(
        &mut events,
        "a removed slot's worker exited",
        |e| matches!(e, Event::Exited { worker, .. } if worker.slot >= 1),
    )
    .await;
    assert!(matches!(gone, Event::Exited { worker, .. } if worker.state == WorkerState::Retiring));
    assert_eq!(handle.active_workers().len(), 1);

    handle.terminate();
    running.await.unwrap().expect("the cluster ran");
}
