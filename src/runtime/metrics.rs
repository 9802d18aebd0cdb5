//! `--metrics ADDR`: the cluster's counters in Prometheus text exposition at `/metrics`.
//!
//! A small HTTP/1 endpoint of the master's own, on its own address: never on the
//! balanced listeners, where every connection belongs to a worker. It answers `GET
//! /metrics` (and `/`, for a quick look) with [`render`] of a [`Status`] and closes
//! the connection; nothing else is served. A scraper is untrusted input like any
//! client: at most [`MAX_CONNECTIONS`] at once (more are closed at once), each has
//! [`HEAD_DEADLINE`] to send a request head of at most [`MAX_HEAD`] bytes and
//! [`READ_DEADLINE`] in all.
//!
//! The names follow Prometheus conventions: a `recluster_` prefix, `_total` on
//! counters, base units. Counters only ever grow while the master runs; per-slot
//! counters sum over every worker the slot has had. README.md lists them all.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::runtime::status::{SlotState, Status};
use crate::ClusterHandle;

/// Scrapes served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// Time a scraper has to send its request head: short, so that clients that trickle
/// bytes cannot hold every place for long.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(1);

/// Time a scrape has in all, request and answer.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);

/// Largest request head read.
pub const MAX_HEAD: usize = 8192;

/// The bound metrics endpoint.
pub struct MetricsEndpoint {
    listener: TcpListener,
}

impl MetricsEndpoint {
    /// Binds `addr` (call within the runtime).
    pub async fn bind(addr: SocketAddr) -> io::Result<MetricsEndpoint> {
        Ok(MetricsEndpoint {
            listener: TcpListener::bind(addr).await?,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Answers scrapes of `handle`'s cluster until the task is dropped.
    pub async fn serve(self, handle: ClusterHandle) {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        continue; // busy: dropping it closes it at once
                    };
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        if let Err(e) = tokio::time::timeout(READ_DEADLINE, answer(stream, &handle)).await.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())) {
                            debug!(event = "metrics_connection_failed", error = %e, "metrics connection failed");
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    warn!(event = "metrics_failed", error = %e, "metrics endpoint accept failed");
                    // Out of descriptors, most likely: let some free up.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Reads one request head and writes the answer.
async fn answer(mut stream: TcpStream, handle: &ClusterHandle) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let head_by = tokio::time::Instant::now() + HEAD_DEADLINE;
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = tokio::time::timeout_at(head_by, stream.read(&mut buf))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return respond(&mut stream, "431 Request Header Fields Too Large", "text/plain", "request head too large\n").await;
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_ascii_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics" | "/") => {
            let body = render(&handle.status());
            let kind = "text/plain; version=0.0.4; charset=utf-8";
            if method == "HEAD" {
                write_head(&mut stream, "200 OK", kind, body.len()).await?;
                return stream.shutdown().await;
            }
            respond(&mut stream, "200 OK", kind, &body).await
        }
        ("GET" | "HEAD", _) => respond(&mut stream, "404 Not Found", "text/plain", "only /metrics is here\n").await,
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "use GET /metrics\n").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, kind: &str, body: &str) -> io::Result<()> {
    write_head(stream, status, kind, body.len()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

async fn write_head(stream: &mut TcpStream, status: &str, kind: &str, length: usize) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await
}

/// The Prometheus text exposition of `status`.
pub fn render(status: &Status) -> String {
    let mut out = String::with_capacity(4096);
    let t = &status.totals;
    let one = |v: u64| [(String::new(), v)];
    let counters = [
        ("recluster_connections_accepted_total", "Connections the master accepted.", t.accepted),
        ("recluster_connections_handed_total", "Connections handed to a worker (a reclaimed one counts again when handed again).", t.handed),
        ("recluster_connections_closed_total", "Connections closed without reaching a worker (none was ready for long).", t.closed),
        ("recluster_connections_reclaimed_total", "Connections taken back from a worker that exited or was stuck before reading them.", t.reclaimed),
        ("recluster_sticky_fallbacks_total", "sticky connections that went to their next choice because their worker was full or down.", t.fallbacks),
        ("recluster_queue_full_total", "Hand-overs that found a worker's queue full (the worker was skipped or waited for).", t.full),
        ("recluster_accept_errors_total", "Accept errors, file-descriptor exhaustion included.", t.accept_errors),
        ("recluster_proxy_header_errors_total", "Connections closed without a valid PROXY header in time (--proxy-protocol), or over the cap of headers awaited.", t.proxy_header_errors),
        ("recluster_proxy_untrusted_total", "Connections closed because their peer is outside --trusted-proxy.", t.proxy_untrusted),
        ("recluster_reloads_started_total", "Reloads started.", status.reloads.started),
        ("recluster_reloads_completed_total", "Reloads after which the new generation served every slot.", status.reloads.finished),
        ("recluster_reloads_aborted_total", "Reloads given up because the new generation kept failing to start.", status.reloads.aborted),
        ("recluster_reloads_superseded_total", "Reloads overtaken by a newer one, or by the stop, before they finished.", status.reloads.superseded),
    ];
    for (name, help, value) in counters {
        family(&mut out, name, "counter", help, one(value));
    }
    family(&mut out, "recluster_generation", "gauge", "The current generation: 1 at start, +1 per reload.", one(status.generation));
    family(&mut out, "recluster_ready_generation", "gauge", "The newest generation that served every slot.", one(status.ready_generation));
    family(&mut out, "recluster_reloading", "gauge", "1 while a reload is under way.", one(u64::from(status.reloading)));
    family(&mut out, "recluster_slots", "gauge", "Worker slots (--workers).", one(status.slots.len() as u64));
    family(&mut out, "recluster_master_pid", "gauge", "The master's process id.", one(u64::from(status.pid)));
    let uptime = format!("{:.3}", status.uptime.as_secs_f64());
    family(&mut out, "recluster_uptime_seconds", "gauge", "Time since the cluster started.", [(String::new(), uptime)]);
    let slot = |s: usize| format!("{{slot=\"{s}\"}}");
    let slots = &status.slots;
    family(
        &mut out,
        "recluster_slot_state",
        "gauge",
        "1 for the slot's state (ready: a worker serves it; starting: one is starting; down: none), 0 for the others.",
        slots
            .iter()
            .flat_map(|s| {
                SlotState::ALL.iter().map(move |st| {
                    (format!("{{slot=\"{}\",state=\"{}\"}}", s.slot, st.as_str()), u64::from(s.state == *st))
                })
            }),
    );
    family(
        &mut out,
        "recluster_slot_worker_pid",
        "gauge",
        "Process id of the worker serving the slot (or starting for it).",
        slots.iter().filter_map(|s| Some((slot(s.slot), u64::from(s.pid?)))),
    );
    family(
        &mut out,
        "recluster_slot_generation",
        "gauge",
        "Generation of the worker serving the slot (or starting for it).",
        slots.iter().filter_map(|s| Some((slot(s.slot), s.generation?))),
    );
    family(
        &mut out,
        "recluster_slot_restarts_total",
        "counter",
        "Workers started in the slot to replace one that died, failed to start, was stuck or asked to be replaced.",
        slots.iter().map(|s| (slot(s.slot), s.restarts)),
    );
    family(
        &mut out,
        "recluster_slot_connections_handed_total",
        "counter",
        "Connections handed to the slot's workers, past and present.",
        slots.iter().map(|s| (slot(s.slot), s.handed)),
    );
    out
}

/// Writes one metric family: its help and type lines, then a sample per label set.
fn family<V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (String, V)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}
