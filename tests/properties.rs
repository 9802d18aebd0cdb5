//! Property tests: random event sequences through the supervisor core, random bytes
//! and random batches through the channel parsers.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use proptest::prelude::*;
use recluster::channel::{self, MasterLine};
use recluster::supervisor::{
    Action, Event, ExitStatus, Input, SpawnError, SpawnStep, Supervisor, WorkerId, WorkerInfo,
    WorkerState,
};
use recluster::{RollingReload, Timing};
use tokio::time::Instant;

#[derive(Debug, Clone)]
enum Op {
    Reload,
    Terminate,
    KillAll,
    /// The n-th live worker (mod count) becomes ready.
    Ready(usize),
    /// The n-th live worker exits.
    Exit(usize),
    /// The n-th live worker asks to be replaced.
    Replace(usize),
    /// The n-th live worker is found stuck.
    Stuck(usize),
    /// Time passes.
    Wait(u64),
    /// The next spawns fail (true) or succeed (false).
    SpawnsFail(bool),
    /// Scale to this many slots (0 included: refused).
    Scale(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Reload),
        1 => Just(Op::Terminate),
        1 => Just(Op::KillAll),
        6 => any::<usize>().prop_map(Op::Ready),
        4 => any::<usize>().prop_map(Op::Exit),
        1 => any::<usize>().prop_map(Op::Replace),
        1 => any::<usize>().prop_map(Op::Stuck),
        4 => (0u64..3000).prop_map(Op::Wait),
        1 => any::<bool>().prop_map(Op::SpawnsFail),
        1 => (0usize..6).prop_map(Op::Scale),
    ]
}

fn timing() -> impl Strategy<Value = Timing> {
    (0u64..500, 0u64..2000, 0u64..1500, 0u64..3000).prop_map(|(t, r, b, rt)| Timing {
        timeout: Duration::from_millis(t),
        respawn: Duration::from_millis(r),
        backoff: Duration::from_millis(b),
        ready_timeout: Duration::from_millis(rt),
        stuck_timeout: Duration::from_secs(10),
    })
}

/// Runs the core like the driver does, checking the invariants after every step.
struct Checker {
    sup: Supervisor,
    timing: Timing,
    now: Instant,
    fail_spawns: bool,
    next_pid: u32,
    exited: bool,
    /// `--reload-batch`.
    batch: usize,
}

impl Checker {
    fn live(&self) -> Vec<WorkerInfo> {
        self.sup.workers()
    }

    fn run(&mut self, input: Input) {
        let before: BTreeMap<WorkerId, WorkerInfo> =
            self.live().into_iter().map(|w| (w.id, w)).collect();
        let mut actions = self.sup.handle(input, self.now);
        let mut i = 0;
        while i < actions.len() {
            if let Action::Spawn { id, .. } = actions[i] {
                let reply = if self.fail_spawns {
                    Input::SpawnFailed {
                        id,
                        error: SpawnError {
                            step: SpawnStep::Launch,
                            errno: libc::EAGAIN,
                        },
                    }
                } else {
                    self.next_pid += 1;
                    Input::Spawned {
                        id,
                        pid: self.next_pid,
                    }
                };
                let more = self.sup.handle(reply, self.now);
                // One input never makes the core act without end (a livelock).
                assert!(
                    actions.len() < 100_000,
                    "runaway actions: {:?}",
                    &actions[..40]
                );
                actions.extend(more);
            }
            i += 1;
        }
        self.check(&before, &actions);
    }

    fn check(&mut self, before: &BTreeMap<WorkerId, WorkerInfo>, actions: &[Action]) {
        let live = self.live();
        // Never two ready (active) workers in a slot, never two starting ones.
        let mut ready = BTreeMap::<usize, usize>::new();
        let mut starting = BTreeMap::<usize, usize>::new();
        for w in &live {
            match w.state {
                WorkerState::Ready => *ready.entry(w.slot).or_default() += 1,
                WorkerState::Starting => *starting.entry(w.slot).or_default() += 1,
                WorkerState::Retiring => {}
            }
        }
        assert!(
            ready.values().all(|&n| n <= 1),
            "two active in a slot: {live:?}"
        );
        assert!(
            starting.values().all(|&n| n <= 1),
            "two pending in a slot: {live:?}"
        );
        let active = self.sup.active_workers();
        // A rolling reload has at most `batch` slots whose old worker awaits its replacement.
        if let (Some(g), true) = (self.sup.reloading(), self.batch > 0) {
            let replacing = active
                .iter()
                .enumerate()
                .filter(|(slot, a)| {
                    a.is_some_and(|a| a.generation < g)
                        && live.iter().any(|w| {
                            w.slot == *slot && w.state == WorkerState::Starting && w.generation == g
                        })
                })
                .count();
            assert!(
                replacing <= self.batch,
                "{replacing} slots mid-replacement: {live:?}"
            );
        }
        for (slot, a) in active.iter().enumerate() {
            if let Some(a) = a {
                assert_eq!((a.slot, a.state), (slot, WorkerState::Ready));
            }
        }
        for a in actions {
            match a {
                // An active worker is retired only once its slot has a new active one,
                // unless it was found stuck (then it serves no one anyway).
                Action::Stop { id } => {
                    let stuck = actions.iter().any(|a| {
                        matches!(a, Action::Report(Event::Stuck { worker, .. }) if worker.id == *id)
                    });
                    if let Some(old) = before.get(id).filter(|w| w.state == WorkerState::Ready) {
                        // A slot scaled away retires its worker with no replacement.
                        let removed = old.slot >= active.len();
                        if !self.sup.is_terminating() && !stuck && !removed {
                            let now_active = active[old.slot].map(|w| w.id);
                            assert!(
                                now_active.is_some() && now_active != Some(*id),
                                "worker {id} of slot {} retired with no replacement ready",
                                old.slot
                            );
                        }
                    }
                }
                // Backoff stays within its bounds.
                Action::Report(Event::RespawnScheduled { delay, .. }) => {
                    let Timing {
                        respawn, backoff, ..
                    } = self.timing;
                    // A failed spawn waits at least SPAWN_RETRY.
                    let max = respawn.max(backoff).max(recluster::supervisor::SPAWN_RETRY);
                    assert!(
                        *delay >= respawn && *delay <= max,
                        "delay {delay:?} outside [{respawn:?}, {max:?}]"
                    );
                }
                Action::Spawn { .. } => {
                    assert!(!self.sup.is_terminating(), "spawned while terminating")
                }
                // Only an active worker's queue is taken back, and only once nothing
                // is routed to it any more.
                Action::Reclaim { id } => {
                    let old = before.get(id).expect("reclaimed from an unknown worker");
                    assert_eq!(old.state, WorkerState::Ready, "reclaimed from {old:?}");
                    assert_ne!(active[old.slot].map(|w| w.id), Some(*id));
                }
                Action::Exit => {
                    assert!(live.is_empty(), "exit with workers alive");
                    self.exited = true;
                }
                _ => {}
            }
        }
    }

    fn pick(&self, n: usize) -> Option<WorkerId> {
        let live = self.live();
        (!live.is_empty()).then(|| live[n % live.len()].id)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn supervisor_invariants_hold_for_any_event_sequence(
        slots in 1usize..5,
        timing in timing(),
        batch in 0usize..3,
        abort_after in 0u32..3,
        ops in proptest::collection::vec(op(), 0..80),
    ) {
        let now = Instant::now();
        let rolling = RollingReload { batch, abort_after };
        let mut c = Checker {
            sup: Supervisor::new(slots, timing).with_rolling(rolling),
            timing,
            now,
            fail_spawns: false,
            next_pid: 100,
            exited: false,
            batch,
        };
        let mut first = c.sup.start(now);
        let spawns: Vec<WorkerId> = first
            .iter()
            .filter_map(|a| match a { Action::Spawn { id, .. } => Some(*id), _ => None })
            .collect();
        for id in spawns {
            c.next_pid += 1;
            first.extend(c.sup.handle(Input::Spawned { id, pid: c.next_pid }, now));
        }
        for op in ops {
            match op {
                Op::Reload => c.run(Input::Reload),
                Op::Terminate => c.run(Input::Terminate),
                Op::KillAll => c.run(Input::KillAll),
                Op::Ready(n) => if let Some(id) = c.pick(n) { c.run(Input::Ready { id }) },
                Op::Exit(n) => if let Some(id) = c.pick(n) {
                    c.run(Input::Exited { id, status: ExitStatus::Code(1) })
                },
                Op::Replace(n) => if let Some(id) = c.pick(n) { c.run(Input::ReplaceRequested { id }) },
                Op::Stuck(n) => if let Some(id) = c.pick(n) {
                    c.run(Input::Stuck { id, unread_for: Duration::from_secs(10) })
                },
                Op::Wait(ms) => {
                    c.now += Duration::from_millis(ms);
                    c.run(Input::Tick);
                }
                Op::SpawnsFail(f) => c.fail_spawns = f,
                Op::Scale(n) => c.run(Input::Scale(n)),
            }
        }
        // Terminate always ends with no worker: stop everyone, let time pass (kills),
        // reap what was killed.
        c.fail_spawns = false;
        c.run(Input::Terminate);
        c.now += timing.timeout + Duration::from_millis(1);
        c.run(Input::Tick);
        while let Some(id) = c.pick(0) {
            c.run(Input::Exited { id, status: ExitStatus::Signal(9) });
        }
        prop_assert!(c.live().is_empty());
        prop_assert!(c.exited, "terminate never said Exit");
        prop_assert!(c.sup.next_deadline().is_none());
    }

    #[test]
    fn master_parser_never_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        for line in channel::lines(&bytes) {
            let _ = channel::parse_master_line(line);
            let _ = channel::parse_worker_line(line);
        }
    }

    #[test]
    fn batches_of_records_round_trip(
        records in proptest::collection::vec((0usize..16, addr(), addr()), 1..64),
        stop in any::<bool>(),
    ) {
        let mut buf = Vec::new();
        for (l, p, o) in &records {
            channel::encode_conn(&mut buf, *l, *p, *o);
        }
        if stop {
            channel::encode_stop(&mut buf);
        }
        prop_assert!(buf.len() <= channel::MAX_MASTER_MESSAGE);
        let parsed: Vec<MasterLine> = channel::lines(&buf).map(channel::parse_master_line).collect();
        prop_assert_eq!(parsed.len(), records.len() + stop as usize);
        for (got, (l, p, o)) in parsed.iter().zip(&records) {
            prop_assert_eq!(*got, MasterLine::Conn { listener: *l, peer: *p, local: *o });
        }
        if stop {
            prop_assert_eq!(*parsed.last().unwrap(), MasterLine::Stop);
        }
    }
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<u128>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
    ]
}
