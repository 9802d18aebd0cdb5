//! `--metrics ADDR`: Prometheus text exposition, scraped during load and parsed by
//! the reference parser (Python's `prometheus_client`, which `.ci/run` installs into
//! `target/py-deps`); counters only grow and agree with `recluster status --json`.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use serde_json::Value;

/// Turns exposition text into `{"sample_name{labels}": value}` with the real parser.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
        out.setdefault("__types__", {})[s.name] = family.type
print(json.dumps(out))
"#;

/// A python3 that imports `prometheus_client`, with the PYTHONPATH it needs.
fn parser_python() -> Option<(String, Option<PathBuf>)> {
    let deps = manifest_dir().join("target/py-deps");
    let candidates = [
        ("python3".to_string(), Some(deps)),
        ("/usr/bin/python3".to_string(), None),
    ];
    for (py, path) in candidates {
        let mut cmd = Command::new(&py);
        cmd.args(["-c", "import prometheus_client.parser"]);
        if let Some(p) = &path {
            cmd.env("PYTHONPATH", p);
        }
        if cmd.output().is_ok_and(|o| o.status.success()) {
            return Some((py, path));
        }
    }
    skip("no python3 with prometheus_client (.ci/run installs it into target/py-deps)");
    None
}

fn scrape(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.to_string(), body.to_string())
}

fn parse(python: &(String, Option<PathBuf>), text: &str) -> BTreeMap<String, f64> {
    let mut cmd = Command::new(&python.0);
    cmd.args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if let Some(p) = &python.1 {
        cmd.env("PYTHONPATH", p);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser rejected:\n{text}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
        .collect()
}

#[test]
fn metrics_parse_grow_during_load_and_reloads_and_match_status() {
    let Some(python) = parser_python() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("recluster-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let control = dir.join("m.sock");
    std::fs::create_dir_all(&dir).unwrap();
    let m = Cluster::new()
        .workers(2)
        .args(["--balance", "sticky", "--listen", "127.0.0.1:0"])
        .args(["--metrics", "127.0.0.1:0", "--control"])
        .arg(&control)
        .command([echo()])
        .spawn();
    m.wait_cluster_ready(2);
    let at: SocketAddr = m.metrics_addr();
    let addr = m.addr();
    assert_ne!(at, addr, "never on a balanced listener");

    // Load from 16 source addresses until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..4)
        .map(|t| {
            let (stop, served) = (stop.clone(), served.clone());
            std::thread::spawn(move || {
                let mut i = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    let src = std::net::Ipv4Addr::new(127, 0, 1, 1 + t * 4 + i % 4);
                    if request_from(addr, Some(src), true, DEADLINE).is_ok() {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    i = i.wrapping_add(1);
                }
            })
        })
        .collect();

    let mut previous: Option<BTreeMap<String, f64>> = None;
    for round in 0..6 {
        // Wait for progress between scrapes rather than for time.
        let want = served.load(Ordering::Relaxed) + 50;
        assert!(
            poll_until(DEADLINE, || served.load(Ordering::Relaxed) >= want),
            "load stalled"
        );
        if round == 2 {
            m.signal(nix::sys::signal::Signal::SIGUSR2);
        }
        let (head, body) = scrape(at, "/metrics");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        let now = parse(&python, &body);
        for name in [
            "recluster_connections_accepted_total",
            "recluster_connections_handed_total",
            "recluster_connections_closed_total",
            "recluster_connections_reclaimed_total",
            "recluster_sticky_fallbacks_total",
            "recluster_queue_full_total",
            "recluster_accept_errors_total",
            "recluster_reloads_started_total",
            "recluster_reloads_completed_total",
            "recluster_reloads_aborted_total",
            "recluster_reloads_superseded_total",
            "recluster_generation",
            "recluster_ready_generation",
        ] {
            assert!(
                now.contains_key(&format!("{name}{{}}")),
                "{name} missing:\n{body}"
            );
        }
        assert!(now["recluster_connections_accepted_total{}"] > 0.0);
        if let Some(prev) = &previous {
            for (k, v) in prev {
                if k.contains("_total{") {
                    let later = now
                        .get(k)
                        .copied()
                        .unwrap_or_else(|| panic!("{k} disappeared:\n{body}"));
                    assert!(later >= *v, "counter {k} went down: {v} -> {later}");
                }
            }
        }
        previous = Some(now);
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    m.wait_event("reload_finished generation=2", DEADLINE);

    // Quiet: the metrics and `status --json` say the same.
    let control_arg = control.to_str().unwrap();
    let out = operator_ok(None, &["status", "--json", "--control", control_arg]);
    let status: Value = serde_json::from_str(&out).unwrap();
    let metrics = parse(&python, &scrape(at, "/metrics").1);
    let metric = |k: &str| {
        metrics
            .get(k)
            .copied()
            .unwrap_or_else(|| panic!("{k} missing: {metrics:?}"))
    };
    let total = |k: &str| status["totals"][k].as_f64().unwrap();
    assert_eq!(
        metric("recluster_connections_accepted_total{}"),
        total("accepted")
    );
    assert_eq!(
        metric("recluster_connections_handed_total{}"),
        total("handed")
    );
    assert_eq!(
        metric("recluster_sticky_fallbacks_total{}"),
        total("fallbacks")
    );
    assert_eq!(
        metric("recluster_connections_closed_total{}"),
        total("closed")
    );
    assert!(total("handed") >= served.load(Ordering::Relaxed) as f64);
    assert_eq!(metric("recluster_reloads_started_total{}"), 1.0);
    assert_eq!(metric("recluster_reloads_completed_total{}"), 1.0);
    assert_eq!(metric("recluster_reloads_superseded_total{}"), 0.0);
    assert_eq!(metric("recluster_ready_generation{}"), 2.0);
    let mut per_slot = 0.0;
    for s in status["slots"].as_array().unwrap() {
        let slot = s["slot"].as_u64().unwrap();
        let label = format!("{{slot=\"{slot}\"}}");
        assert_eq!(
            metric(&format!("recluster_slot_worker_pid{label}")),
            s["pid"].as_f64().unwrap()
        );
        assert_eq!(metric(&format!("recluster_slot_generation{label}")), 2.0);
        assert_eq!(
            metric(&format!("recluster_slot_connections_handed_total{label}")),
            s["handed"].as_f64().unwrap()
        );
        assert_eq!(
            metric(&format!("recluster_slot_restarts_total{label}")),
            0.0
        );
        assert_eq!(
            metric(&format!(
                "recluster_slot_state{{slot=\"{slot}\",state=\"ready\"}}"
            )),
            1.0
        );
        per_slot += s["handed"].as_f64().unwrap();
    }
    assert_eq!(
        per_slot,
        total("handed"),
        "the slots' counters add up to the total, generation 1 included"
    );
    eprintln!(
        "scraped 7 times; {} connections handed; accepted {}",
        total("handed"),
        total("accepted")
    );

    // Anything but GET /metrics is refused; the endpoint survives a silent client.
    assert!(scrape(at, "/nope").0.starts_with("HTTP/1.1 404"));
    let silent = TcpStream::connect(at).unwrap();
    assert!(scrape(at, "/metrics").0.starts_with("HTTP/1.1 200"));
    drop(silent);
    m.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(m.expect_exit(DEADLINE).success());
}

#[test]
fn a_metrics_address_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (exit, stderr) = Cluster::new()
        .workers(1)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            &format!("127.0.0.1:{port}"),
        ])
        .command([echo()])
        .run(DEADLINE)
        .expect("the master exits");
    assert_eq!(exit.code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot listen for metrics (--metrics)"),
        "{stderr}"
    );
}
