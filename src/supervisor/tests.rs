//! The supervisor's rules on tokio's paused clock.

use super::*;
use tokio::time::advance;

const MS: Duration = Duration::from_millis(1);

fn timing() -> Timing {
    Timing {
        timeout: 1000 * MS,
        respawn: 100 * MS,
        backoff: 1000 * MS,
        ready_timeout: 5000 * MS,
        stuck_timeout: 2000 * MS,
    }
}

/// A supervisor whose spawns always succeed, with pids handed out in order.
struct Sim {
    sup: Supervisor,
    next_pid: u32,
}

impl Sim {
    fn start(slots: usize, timing: Timing) -> (Sim, Vec<Action>) {
        let mut sim = Sim {
            sup: Supervisor::new(slots, timing),
            next_pid: 1000,
        };
        let first = sim.sup.start(Instant::now());
        let out = sim.answer_spawns(first);
        (sim, out)
    }

    fn answer_spawns(&mut self, actions: Vec<Action>) -> Vec<Action> {
        let mut out = Vec::new();
        for a in actions {
            let spawn = match a {
                Action::Spawn { id, .. } => Some(id),
                _ => None,
            };
            out.push(a);
            if let Some(id) = spawn {
                self.next_pid += 1;
                let more = self.sup.handle(
                    Input::Spawned {
                        id,
                        pid: self.next_pid,
                    },
                    Instant::now(),
                );
                out.extend(self.answer_spawns(more));
            }
        }
        out
    }

    fn feed(&mut self, input: Input) -> Vec<Action> {
        let out = self.sup.handle(input, Instant::now());
        self.answer_spawns(out)
    }

    async fn wait(&mut self, d: Duration) -> Vec<Action> {
        advance(d).await;
        self.feed(Input::Tick)
    }

    fn ready_all(&mut self, ids: &[WorkerId]) -> Vec<Action> {
        ids.iter()
            .flat_map(|&id| self.feed(Input::Ready { id }))
            .collect()
    }

    fn exit(&mut self, id: WorkerId) -> Vec<Action> {
        self.feed(Input::Exited {
            id,
            status: ExitStatus::Code(1),
        })
    }

    fn active(&self, slot: usize) -> Option<WorkerId> {
        self.sup.active_workers()[slot].map(|w| w.id)
    }
}

fn spawned(actions: &[Action]) -> Vec<(WorkerId, usize, u64)> {
    actions
        .iter()
        .filter_map(|a| match *a {
            Action::Spawn {
                id,
                slot,
                generation,
            } => Some((id, slot, generation)),
            _ => None,
        })
        .collect()
}

fn ids(actions: &[Action]) -> Vec<WorkerId> {
    spawned(actions).into_iter().map(|(id, _, _)| id).collect()
}

fn stopped(actions: &[Action]) -> Vec<WorkerId> {
    actions
        .iter()
        .filter_map(|a| match *a {
            Action::Stop { id } => Some(id),
            _ => None,
        })
        .collect()
}

fn killed(actions: &[Action]) -> Vec<WorkerId> {
    actions
        .iter()
        .filter_map(|a| match *a {
            Action::Kill { id } => Some(id),
            _ => None,
        })
        .collect()
}

fn respawn_delays(actions: &[Action]) -> Vec<Duration> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Report(Event::RespawnScheduled { delay, .. }) => Some(*delay),
            _ => None,
        })
        .collect()
}

fn has(actions: &[Action], event: &Event) -> bool {
    actions.iter().any(|a| a == &Action::Report(event.clone()))
}

#[tokio::test(start_paused = true)]
async fn start_spawns_a_worker_per_slot_and_reports_cluster_ready_once_all_are_ready() {
    let (mut sim, out) = Sim::start(3, timing());
    let first = spawned(&out);
    assert_eq!(
        first.iter().map(|s| (s.1, s.2)).collect::<Vec<_>>(),
        vec![(0, 1), (1, 1), (2, 1)]
    );
    assert_eq!(sim.sup.workers().len(), 3);
    assert!(sim.sup.workers().iter().all(|w| w.pid.is_some()));
    let out = sim.ready_all(&ids(&out)[..2]);
    assert!(!has(&out, &Event::ClusterReady { generation: 1 }));
    assert_eq!(sim.sup.active_workers().iter().flatten().count(), 2);
    let out = sim.feed(Input::Ready { id: first[2].0 });
    assert!(has(&out, &Event::ClusterReady { generation: 1 }));
    assert!(out.contains(&Action::Route {
        slot: 2,
        worker: Some(first[2].0)
    }));
}

#[tokio::test(start_paused = true)]
async fn reload_retires_each_old_worker_only_after_its_replacement_is_ready() {
    let (mut sim, out) = Sim::start(2, timing());
    let old = ids(&out);
    sim.ready_all(&old);

    let out = sim.feed(Input::Reload);
    assert!(has(&out, &Event::ReloadStarted { generation: 2 }));
    let new = spawned(&out);
    assert_eq!(
        new.iter().map(|s| (s.1, s.2)).collect::<Vec<_>>(),
        vec![(0, 2), (1, 2)]
    );
    assert!(
        stopped(&out).is_empty(),
        "nothing retires before a replacement is ready"
    );

    // Time passes: still nothing retires while the replacements start.
    let out = sim.wait(2000 * MS).await;
    assert!(stopped(&out).is_empty());
    assert_eq!(sim.active(0), Some(old[0]));

    let out = sim.feed(Input::Ready { id: new[0].0 });
    assert_eq!(stopped(&out), vec![old[0]]);
    let route = out
        .iter()
        .position(|a| matches!(a, Action::Route { slot: 0, .. }))
        .unwrap();
    let stop = out
        .iter()
        .position(|a| matches!(a, Action::Stop { .. }))
        .unwrap();
    assert!(
        route < stop,
        "traffic moves before the old worker is stopped"
    );
    assert_eq!(sim.active(0), Some(new[0].0));
    assert_eq!(sim.active(1), Some(old[1]), "slot 1 keeps its old worker");
    assert!(!has(&out, &Event::ReloadFinished { generation: 2 }));

    let out = sim.feed(Input::Ready { id: new[1].0 });
    assert_eq!(stopped(&out), vec![old[1]]);
    assert!(has(&out, &Event::ReloadFinished { generation: 2 }));
    // The retiring ones are still listed among the live workers until they exit.
    assert_eq!(sim.sup.workers().len(), 4);
    sim.exit(old[0]);
    sim.exit(old[1]);
    assert_eq!(sim.sup.workers().len(), 2);
    assert!(sim.sup.next_deadline().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_replacement_dying_before_ready_is_respawned_with_backoff_while_the_old_one_serves() {
    let (mut sim, out) = Sim::start(1, timing());
    let old = ids(&out)[0];
    sim.ready_all(&[old]);
    let mut pending = ids(&sim.feed(Input::Reload))[0];

    let mut seen = Vec::new();
    for _ in 0..6 {
        let out = sim.exit(pending);
        assert!(stopped(&out).is_empty() && killed(&out).is_empty());
        assert_eq!(sim.active(0), Some(old), "the old worker keeps serving");
        let delay = respawn_delays(&out)[0];
        seen.push(delay.as_millis());
        // Not respawned a moment before the delay...
        let early = sim.wait(delay - MS).await;
        assert!(spawned(&early).is_empty());
        // ...but exactly at it, in the same slot and the new generation.
        let out = sim.wait(MS).await;
        let s = spawned(&out);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].1, s[0].2), (0, 2));
        pending = s[0].0;
    }
    assert_eq!(seen, vec![100, 200, 400, 800, 1000, 1000]);
    let out = sim.feed(Input::Ready { id: pending });
    assert_eq!(stopped(&out), vec![old]);
    assert!(has(&out, &Event::ReloadFinished { generation: 2 }));
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_per_quick_death_up_to_the_maximum_and_resets_after_a_long_life() {
    let (mut sim, out) = Sim::start(2, timing());
    let first = ids(&out);
    sim.ready_all(&first);
    let mut current = first[0];
    let mut delays = Vec::new();
    for _ in 0..6 {
        let out = sim.exit(current);
        assert_eq!(sim.active(0), None);
        assert!(out.contains(&Action::Route {
            slot: 0,
            worker: None
        }));
        let d = respawn_delays(&out)[0];
        delays.push(d.as_millis());
        let out = sim.wait(d).await;
        current = ids(&out)[0];
        sim.feed(Input::Ready { id: current });
    }
    assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
    // Slot 1's backoff is its own.
    let out = sim.exit(first[1]);
    assert_eq!(respawn_delays(&out), vec![100 * MS]);
    // A worker that stayed up for the backoff period resets slot 0's delay.
    sim.wait(1000 * MS).await;
    let out = sim.exit(current);
    assert_eq!(respawn_delays(&out), vec![100 * MS]);
}

#[tokio::test(start_paused = true)]
async fn zero_backoff_disables_doubling_and_zero_respawn_means_at_once() {
    let t = Timing {
        respawn: Duration::ZERO,
        backoff: Duration::ZERO,
        ..timing()
    };
    let (mut sim, out) = Sim::start(1, t);
    let mut w = ids(&out)[0];
    for _ in 0..3 {
        sim.feed(Input::Ready { id: w });
        let out = sim.exit(w);
        assert_eq!(respawn_delays(&out), vec![Duration::ZERO]);
        let s = ids(&out);
        assert_eq!(s.len(), 1, "respawned in the same step");
        w = s[0];
    }
}

#[tokio::test(start_paused = true)]
async fn a_retiring_worker_is_killed_exactly_after_the_timeout() {
    let (mut sim, out) = Sim::start(1, timing());
    let old = ids(&out)[0];
    sim.ready_all(&[old]);
    let new = ids(&sim.feed(Input::Reload))[0];
    let out = sim.feed(Input::Ready { id: new });
    assert_eq!(stopped(&out), vec![old]);
    assert!(killed(&sim.wait(999 * MS).await).is_empty());
    assert_eq!(sim.sup.next_deadline(), Some(Instant::now() + MS));
    let out = sim.wait(MS).await;
    assert_eq!(killed(&out), vec![old]);
    assert!(matches!(
        out[0],
        Action::Report(Event::KilledAfterTimeout(WorkerInfo { generation: 1, .. }))
    ));
    // Killed once only.
    assert!(killed(&sim.wait(5000 * MS).await).is_empty());
    sim.feed(Input::Exited {
        id: old,
        status: ExitStatus::Signal(9),
    });
    assert_eq!(sim.sup.workers().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_reload_during_a_reload_supersedes_the_pending_generation() {
    let (mut sim, out) = Sim::start(2, timing());
    let g1 = ids(&out);
    sim.ready_all(&g1);
    let g2 = ids(&sim.feed(Input::Reload));
    // Slot 0's gen-2 worker gets ready before the second reload; slot 1's does not.
    sim.feed(Input::Ready { id: g2[0] });
    assert_eq!(sim.active(0), Some(g2[0]));
    let out = sim.feed(Input::Reload);
    assert!(has(&out, &Event::ReloadStarted { generation: 3 }));
    let g3 = spawned(&out);
    assert!(g3.iter().all(|s| s.2 == 3));
    assert_eq!(
        stopped(&out),
        vec![g2[1]],
        "the pending gen-2 worker retires"
    );
    assert_eq!(sim.active(1), Some(g1[1]), "slot 1 still served by gen 1");

    // A late ready from the superseded worker changes nothing.
    let out = sim.feed(Input::Ready { id: g2[1] });
    assert!(out.is_empty());
    assert_eq!(sim.active(1), Some(g1[1]));

    let out = sim.ready_all(&[g3[0].0, g3[1].0]);
    assert_eq!(stopped(&out), vec![g2[0], g1[1]]);
    assert!(has(&out, &Event::ReloadFinished { generation: 3 }));
    assert!(!has(&out, &Event::ReloadFinished { generation: 2 }));
}

#[tokio::test(start_paused = true)]
async fn terminate_during_a_reload_stops_everyone_and_exits_after_the_last_exit() {
    let (mut sim, out) = Sim::start(2, timing());
    let g1 = ids(&out);
    sim.ready_all(&g1);
    let g2 = ids(&sim.feed(Input::Reload));
    // A slot-0 crash with its respawn timer pending.
    sim.feed(Input::Ready { id: g2[0] });
    let crash = sim.exit(g2[0]);
    assert_eq!(respawn_delays(&crash).len(), 1);

    let out = sim.feed(Input::Terminate);
    assert!(has(&out, &Event::Terminating));
    let mut s = stopped(&out);
    s.sort();
    let mut expect = vec![g1[1], g2[1]];
    expect.sort();
    assert_eq!(
        s, expect,
        "g1[0] was retiring already; the rest are told to stop"
    );
    assert!(sim.sup.active_workers().iter().all(Option::is_none));
    // No respawn, no new reload while terminating.
    assert!(spawned(&sim.wait(10_000 * MS).await).is_empty());
    assert!(sim.feed(Input::Reload).is_empty());
    // The kill came at the timeout; exit only after the last one is reaped.
    let mut live = sim.sup.workers();
    let last = live.pop().unwrap();
    for w in live {
        assert!(!sim.exit(w.id).contains(&Action::Exit));
    }
    assert!(sim.exit(last.id).contains(&Action::Exit));
    assert!(sim.feed(Input::Tick).is_empty(), "Exit is said once");
}

#[tokio::test(start_paused = true)]
async fn terminate_kills_at_the_timeout_and_kill_all_kills_at_once() {
    let (mut sim, out) = Sim::start(2, timing());
    let g1 = ids(&out);
    sim.ready_all(&g1);
    let out = sim.feed(Input::Terminate);
    assert_eq!(stopped(&out).len(), 2);
    assert!(killed(&sim.wait(999 * MS).await).is_empty());
    assert_eq!(killed(&sim.wait(MS).await).len(), 2);

    let (mut sim, out) = Sim::start(2, timing());
    sim.ready_all(&ids(&out));
    let out = sim.feed(Input::KillAll);
    assert_eq!(killed(&out).len(), 2);
    assert!(sim.sup.next_deadline().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_worker_not_ready_in_time_is_stopped_and_retried_while_the_old_one_serves() {
    let (mut sim, out) = Sim::start(1, timing());
    let old = ids(&out)[0];
    sim.ready_all(&[old]);
    let new = ids(&sim.feed(Input::Reload))[0];
    assert!(stopped(&sim.wait(4999 * MS).await).is_empty());
    let out = sim.wait(MS).await;
    assert!(matches!(
        out[0],
        Action::Report(Event::NotReadyInTime(WorkerInfo { generation: 2, .. }))
    ));
    assert_eq!(stopped(&out), vec![new]);
    assert_eq!(respawn_delays(&out), vec![100 * MS]);
    assert_eq!(sim.active(0), Some(old));
    let out = sim.wait(100 * MS).await;
    let retry = spawned(&out);
    assert_eq!((retry[0].1, retry[0].2), (0, 2));
    // The second failure waits longer: timed-out starts count as quick deaths.
    let out = sim.wait(5000 * MS).await;
    assert_eq!(respawn_delays(&out), vec![200 * MS]);
    // And the stopped one is killed after the timeout if it lingers.
    assert!(killed(&out).contains(&new));
}

#[tokio::test(start_paused = true)]
async fn an_active_worker_dying_during_a_reload_is_covered_by_its_pending_replacement() {
    let (mut sim, out) = Sim::start(1, timing());
    let old = ids(&out)[0];
    sim.ready_all(&[old]);
    let new = ids(&sim.feed(Input::Reload))[0];
    let out = sim.exit(old);
    assert!(
        respawn_delays(&out).is_empty(),
        "the pending worker will take over"
    );
    assert_eq!(sim.active(0), None);
    let out = sim.feed(Input::Ready { id: new });
    assert!(out.contains(&Action::Route {
        slot: 0,
        worker: Some(new)
    }));
    assert!(has(&out, &Event::ReloadFinished { generation: 2 }));
}

#[tokio::test(start_paused = true)]
async fn a_worker_asking_to_be_replaced_retires_once_its_replacement_is_ready() {
    let (mut sim, out) = Sim::start(2, timing());
    let g1 = ids(&out);
    sim.ready_all(&g1);
    let out = sim.feed(Input::ReplaceRequested { id: g1[1] });
    let s = spawned(&out);
    assert_eq!((s.len(), s[0].1, s[0].2), (1, 1, 1));
    assert!(stopped(&out).is_empty());
    // Asking twice starts no second replacement.
    assert!(spawned(&sim.feed(Input::ReplaceRequested { id: g1[1] })).is_empty());
    let out = sim.feed(Input::Ready { id: s[0].0 });
    assert_eq!(stopped(&out), vec![g1[1]]);
    assert_eq!(sim.active(1), Some(s[0].0));
}

#[tokio::test(start_paused = true)]
async fn a_failed_spawn_is_retried_with_backoff() {
    let mut sup = Supervisor::new(1, timing());
    let out = sup.start(Instant::now());
    let id = ids(&out)[0];
    let out = sup.handle(
        Input::SpawnFailed {
            id,
            error: SpawnError {
                step: SpawnStep::Launch,
                errno: libc::EMFILE,
            },
        },
        Instant::now(),
    );
    assert!(matches!(
        out[0],
        Action::Report(Event::SpawnFailed { slot: 0, .. })
    ));
    assert_eq!(respawn_delays(&out), vec![100 * MS]);
    assert!(sup.workers().is_empty());
    advance(100 * MS).await;
    assert_eq!(spawned(&sup.handle(Input::Tick, Instant::now())).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn zero_ready_timeout_means_no_deadline() {
    let t = Timing {
        ready_timeout: Duration::ZERO,
        ..timing()
    };
    let (mut sim, _) = Sim::start(1, t);
    assert!(sim.sup.next_deadline().is_none());
    assert!(sim.wait(100_000 * MS).await.is_empty());
}

fn starts_failing(actions: &[Action]) -> Vec<(u32, StartFailure)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Report(Event::StartsFailing { failures, last, .. }) => Some((*failures, *last)),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_third_exit_before_ready_in_a_row_reports_failing_starts_once() {
    let (mut sim, out) = Sim::start(1, timing());
    let mut id = ids(&out)[0];
    let mut reports = Vec::new();
    for _ in 0..6 {
        // However long it took: it never got ready.
        advance(QUICK_EXIT * 2).await;
        reports.extend(starts_failing(&sim.exit(id)));
        let out = sim.wait(1000 * MS).await;
        id = ids(&out)[0];
    }
    assert_eq!(
        reports,
        vec![(3, StartFailure::Exited(ExitStatus::Code(1)))],
        "said at the third failed start, and never again"
    );
}

#[tokio::test(start_paused = true)]
async fn a_ready_worker_ends_the_streak_and_ready_or_retired_workers_never_count() {
    let (mut sim, out) = Sim::start(2, timing());
    let g1 = ids(&out);
    sim.ready_all(&g1[1..]);
    // Two failed starts of slot 0...
    let mut id = g1[0];
    for _ in 0..2 {
        assert!(starts_failing(&sim.exit(id)).is_empty());
        id = ids(&sim.wait(1000 * MS).await)[0];
    }
    // ...then it gets ready: the streak ends, and a ready worker that crashes at once
    // (a bug in a request handler) is no failed start.
    sim.ready_all(&[id]);
    assert!(starts_failing(&sim.exit(id)).is_empty());
    assert!(starts_failing(&sim.exit(g1[1])).is_empty());
    // Workers told to stop (a reload) that exit at once are no failed starts either.
    let mut slots = ids(&sim.wait(1000 * MS).await);
    sim.ready_all(&slots);
    let g2 = ids(&sim.feed(Input::Reload));
    for old in stopped(&sim.ready_all(&g2)) {
        assert!(starts_failing(&sim.exit(old)).is_empty());
    }
    // Two failed starts do not make three in a row; the third does.
    let g3 = ids(&sim.feed(Input::Reload));
    assert!(starts_failing(&sim.exit(g3[0])).is_empty());
    assert!(starts_failing(&sim.exit(g3[1])).is_empty());
    slots = ids(&sim.wait(1000 * MS).await);
    assert_eq!(
        starts_failing(&sim.exit(slots[0])),
        vec![(3, StartFailure::Exited(ExitStatus::Code(1)))]
    );
}

#[tokio::test(start_paused = true)]
async fn under_ready_when_started_quick_exits_are_failed_starts() {
    let mut sim = Sim {
        sup: Supervisor::new(1, timing()).with_ready_when(ReadyWhen::Started),
        next_pid: 1000,
    };
    let first = sim.sup.start(Instant::now());
    let mut id = ids(&sim.answer_spawns(first))[0];
    // A worker that lived past QUICK_EXIT is no failed start.
    advance(QUICK_EXIT).await;
    assert!(starts_failing(&sim.exit(id)).is_empty());
    let mut reports = Vec::new();
    for _ in 0..3 {
        id = ids(&sim.wait(1000 * MS).await)[0];
        advance(QUICK_EXIT - MS).await;
        reports.extend(starts_failing(&sim.exit(id)));
    }
    assert_eq!(
        reports,
        vec![(3, StartFailure::Exited(ExitStatus::Code(1)))]
    );
}

#[tokio::test(start_paused = true)]
async fn a_worker_never_ready_reports_failing_starts_at_its_ready_timeout() {
    let (mut sim, _) = Sim::start(1, timing());
    assert!(starts_failing(&sim.wait(4999 * MS).await).is_empty());
    let out = sim.wait(MS).await;
    assert_eq!(starts_failing(&out), vec![(1, StartFailure::NotReady)]);
    // Its retry failing the same way says nothing more.
    assert!(starts_failing(&sim.wait(5200 * MS).await).is_empty());
}

fn launch_error(errno: i32) -> SpawnError {
    SpawnError {
        step: SpawnStep::Launch,
        errno,
    }
}

#[tokio::test(start_paused = true)]
async fn readiness_follows_ready_when() {
    // `started`: ready once spawned, and later messages change nothing.
    let mut sup = Supervisor::new(1, timing()).with_ready_when(ReadyWhen::Started);
    let id = ids(&sup.start(Instant::now()))[0];
    let out = sup.handle(Input::Spawned { id, pid: 7 }, Instant::now());
    assert!(has(&out, &Event::ClusterReady { generation: 1 }));
    // `listening`: the listening message or an explicit ready.
    for (input, ready) in [(0, true), (1, true)] {
        let mut sup = Supervisor::new(1, timing());
        let id = ids(&sup.start(Instant::now()))[0];
        assert!(
            sup.handle(Input::Spawned { id, pid: 7 }, Instant::now())
                .len()
                == 1
        );
        let msg = [Input::Listening { id }, Input::Ready { id }][input].clone();
        let out = sup.handle(msg, Instant::now());
        assert_eq!(has(&out, &Event::ClusterReady { generation: 1 }), ready);
    }
    // `ready`: only the explicit ready.
    let mut sup = Supervisor::new(1, timing()).with_ready_when(ReadyWhen::Ready);
    let id = ids(&sup.start(Instant::now()))[0];
    sup.handle(Input::Spawned { id, pid: 7 }, Instant::now());
    assert!(sup
        .handle(Input::Listening { id }, Instant::now())
        .is_empty());
    let out = sup.handle(Input::Ready { id }, Instant::now());
    assert!(has(&out, &Event::ClusterReady { generation: 1 }));
}

#[tokio::test(start_paused = true)]
async fn garbage_is_reported_at_powers_of_two_and_kills_at_the_limit() {
    let (mut sim, out) = Sim::start(1, timing());
    let id = ids(&out)[0];
    sim.ready_all(&[id]);
    let mut reported = Vec::new();
    let mut kills = Vec::new();
    for _ in 0..GARBAGE_LIMIT + 10 {
        let out = sim.feed(Input::Garbage { id });
        kills.extend(killed(&out));
        for a in out {
            if let Action::Report(Event::Garbage { count, .. }) = a {
                reported.push(count);
            }
        }
    }
    assert_eq!(reported, [1, 2, 4, 8, 16, 32, 64]);
    assert_eq!(kills, [id], "killed once, at the limit");
    // A worker killed for garbage says nothing that counts while it dies.
    let (mut sim2, out) = Sim::start(1, timing());
    let dying = ids(&out)[0];
    for _ in 0..GARBAGE_LIMIT {
        sim2.feed(Input::Garbage { id: dying });
    }
    assert!(sim2.feed(Input::Listening { id: dying }).is_empty());
    assert!(sim2.feed(Input::Ready { id: dying }).is_empty());
    assert!(sim2.feed(Input::ReplaceRequested { id: dying }).is_empty());
    assert_eq!(sim2.active(0), None);
    // Then it is replaced as any dead worker is.
    assert_eq!(respawn_delays(&sim.exit(id)), [100 * MS]);
}

#[tokio::test(start_paused = true)]
async fn a_command_that_cannot_execute_ends_the_cluster_before_any_ready_but_not_after() {
    let mut sup = Supervisor::new(2, timing());
    let first = ids(&sup.start(Instant::now()));
    sup.handle(
        Input::Spawned {
            id: first[0],
            pid: 7,
        },
        Instant::now(),
    );
    let out = sup.handle(
        Input::SpawnFailed {
            id: first[1],
            error: launch_error(libc::ENOENT),
        },
        Instant::now(),
    );
    assert!(has(
        &out,
        &Event::CannotExecute {
            error: launch_error(libc::ENOENT)
        }
    ));
    assert_eq!(killed(&out), [first[0]], "the one that did start is killed");
    assert!(sup.is_terminating());
    let out = sup.handle(
        Input::Exited {
            id: first[0],
            status: ExitStatus::Signal(9),
        },
        Instant::now(),
    );
    assert!(out.contains(&Action::Exit));

    // Once a worker has been ready, the same failure is retried with backoff.
    let (mut sim, out) = Sim::start(1, timing());
    sim.ready_all(&ids(&out));
    let new = ids(&sim.feed(Input::Reload))[0];
    let out = sim.sup.handle(
        Input::SpawnFailed {
            id: new,
            error: launch_error(libc::ENOENT),
        },
        Instant::now(),
    );
    assert!(!out
        .iter()
        .any(|a| matches!(a, Action::Report(Event::CannotExecute { .. }))));
    assert_eq!(respawn_delays(&out), [100 * MS]);
    // And resource errors never end the cluster.
    assert!(!launch_error(libc::EMFILE).cannot_execute());
    assert!(!SpawnError {
        step: SpawnStep::Channel,
        errno: libc::ENOENT
    }
    .cannot_execute());
}

#[tokio::test(start_paused = true)]
async fn a_worker_stopped_or_killed_before_its_pid_is_known_is_told_once_it_is() {
    let mut sup = Supervisor::new(2, timing());
    let first = ids(&sup.start(Instant::now()));
    // Terminate while both launches are in flight: no pid yet to signal.
    sup.handle(Input::Terminate, Instant::now());
    let out = sup.handle(
        Input::Spawned {
            id: first[0],
            pid: 7,
        },
        Instant::now(),
    );
    assert_eq!(stopped(&out), [first[0]]);
    sup.handle(Input::KillAll, Instant::now());
    let out = sup.handle(
        Input::Spawned {
            id: first[1],
            pid: 8,
        },
        Instant::now(),
    );
    assert_eq!(killed(&out), [first[1]]);
}

#[tokio::test(start_paused = true)]
async fn a_stuck_worker_is_routed_away_reclaimed_retired_and_replaced() {
    let (mut sim, out) = Sim::start(2, timing());
    let first = ids(&out);
    sim.ready_all(&first);
    advance(10_000 * MS).await;
    let stuck = first[1];
    let out = sim.feed(Input::Stuck {
        id: stuck,
        unread_for: 2000 * MS,
    });
    // In this order: reported, routed away, its queue taken back, told to stop.
    let order: Vec<&Action> = out
        .iter()
        .filter(|a| !matches!(a, Action::Report(Event::Retiring(_))))
        .take(4)
        .collect();
    let info = WorkerInfo {
        state: WorkerState::Ready,
        ..sim.sup.info(stuck).unwrap()
    };
    assert_eq!(
        order,
        vec![
            &Action::Report(Event::Stuck {
                worker: info,
                unread_for: 2000 * MS
            }),
            &Action::Route {
                slot: 1,
                worker: None
            },
            &Action::Reclaim { id: stuck },
            &Action::Drain { id: stuck },
        ]
    );
    assert_eq!(sim.active(1), None);
    assert_eq!(sim.active(0), Some(first[0]));
    // It lived past the backoff: respawned after the first delay, like a worker that died.
    assert_eq!(respawn_delays(&out), vec![100 * MS]);
    let out = sim.wait(100 * MS).await;
    let new = ids(&out);
    assert_eq!(spawned(&out), vec![(new[0], 1, 1)]);
    sim.ready_all(&new);
    assert_eq!(sim.active(1), Some(new[0]));
    // Retired: killed after the timeout if it never wakes up.
    let out = sim.wait(1000 * MS).await;
    assert_eq!(killed(&out), vec![stuck]);
    // Reported once: a second report about the same worker does nothing.
    assert!(sim
        .feed(Input::Stuck {
            id: stuck,
            unread_for: 4000 * MS
        })
        .is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_stuck_worker_during_a_reload_leaves_its_slot_to_the_pending_one() {
    let (mut sim, out) = Sim::start(1, timing());
    let first = ids(&out);
    sim.ready_all(&first);
    let out = sim.feed(Input::Reload);
    let pending = ids(&out);
    let out = sim.feed(Input::Stuck {
        id: first[0],
        unread_for: 2000 * MS,
    });
    assert!(spawned(&out).is_empty() && respawn_delays(&out).is_empty());
    assert!(out.contains(&Action::Drain { id: first[0] }));
    let out = sim.ready_all(&pending);
    assert!(has(&out, &Event::ReloadFinished { generation: 2 }));
    assert_eq!(sim.active(0), Some(pending[0]));
    // Terminating: a stuck report changes nothing.
    sim.feed(Input::Terminate);
    assert!(!sim
        .feed(Input::Stuck {
            id: pending[0],
            unread_for: 2000 * MS
        })
        .iter()
        .any(|a| matches!(a, Action::Reclaim { .. })));
}

#[tokio::test(start_paused = true)]
async fn a_workers_own_message_goes_to_the_event_stream_with_its_slot() {
    let (mut sim, out) = Sim::start(2, timing());
    let first = ids(&out);
    let out = sim.feed(Input::Message {
        id: first[1],
        text: r#"{"hello":1}"#.into(),
    });
    let worker = sim.sup.info(first[1]).unwrap();
    assert_eq!(worker.slot, 1);
    assert_eq!(
        out,
        vec![Action::Report(Event::Message {
            worker,
            text: r#"{"hello":1}"#.into()
        })]
    );
    // From a worker that is gone: nothing.
    sim.exit(first[1]);
    assert!(sim
        .feed(Input::Message {
            id: first[1],
            text: "{}".into()
        })
        .is_empty());
}

impl Sim {
    fn with(sup: Supervisor) -> (Sim, Vec<Action>) {
        let mut sim = Sim {
            sup,
            next_pid: 1000,
        };
        let first = sim.sup.start(Instant::now());
        let out = sim.answer_spawns(first);
        (sim, out)
    }
}

fn rolling(batch: usize, abort_after: u32) -> RollingReload {
    RollingReload { batch, abort_after }
}

#[tokio::test(start_paused = true)]
async fn scaling_up_adds_slots_whose_workers_join_routing_when_ready() {
    let (mut sim, out) = Sim::start(2, timing());
    sim.ready_all(&ids(&out));
    let out = sim.feed(Input::Scale(4));
    assert!(has(&out, &Event::Scaled { from: 2, to: 4 }));
    let new = spawned(&out);
    assert_eq!(
        new.iter().map(|s| (s.1, s.2)).collect::<Vec<_>>(),
        vec![(2, 1), (3, 1)],
        "a worker of the current generation in each new slot"
    );
    assert!(stopped(&out).is_empty());
    assert!(
        !out.iter().any(|a| matches!(a, Action::Route { .. })),
        "nothing routed to a slot before its worker is ready"
    );
    assert_eq!(sim.sup.slots(), 4);
    assert_eq!(sim.active(2), None);
    let out = sim.feed(Input::Ready { id: new[0].0 });
    assert!(out.contains(&Action::Route {
        slot: 2,
        worker: Some(new[0].0)
    }));
    // A new slot is respawned like any other.
    sim.feed(Input::Ready { id: new[1].0 });
    let out = sim.exit(new[1].0);
    assert_eq!(respawn_delays(&out), vec![100 * MS]);
    assert_eq!(spawned(&sim.wait(100 * MS).await)[0].1, 3);
    // Scaling to the same number changes nothing.
    assert!(sim.feed(Input::Scale(4)).is_empty());
}

#[tokio::test(start_paused = true)]
async fn scaling_down_routes_the_highest_slots_away_then_retires_them_and_cancels_their_respawns() {
    let (mut sim, out) = Sim::start(4, timing());
    let g1 = ids(&out);
    sim.ready_all(&g1);
    // Slot 2 asks to be replaced (a pending worker), slot 3 crashed (a respawn due).
    let pending = ids(&sim.feed(Input::ReplaceRequested { id: g1[2] }))[0];
    assert_eq!(respawn_delays(&sim.exit(g1[3])), vec![100 * MS]);

    let out = sim.feed(Input::Scale(2));
    assert!(has(&out, &Event::Scaled { from: 4, to: 2 }));
    let route = out
        .iter()
        .position(|a| {
            a == &Action::Route {
                slot: 2,
                worker: None,
            }
        })
        .expect("slot 2 routed away");
    let stop = out
        .iter()
        .position(|a| a == &Action::Stop { id: g1[2] })
        .expect("slot 2's worker stopped");
    assert!(route < stop, "routed away before it is stopped");
    let mut s = stopped(&out);
    s.sort();
    assert_eq!(s, vec![g1[2], pending], "the active and the pending one retire");
    assert!(spawned(&out).is_empty());
    assert_eq!(sim.sup.slots(), 2);
    assert_eq!(sim.sup.active_workers().len(), 2);
    // Slot 3's respawn never comes; the retired ones are killed after the timeout.
    let out = sim.wait(5000 * MS).await;
    assert!(spawned(&out).is_empty());
    let mut k = killed(&out);
    k.sort();
    assert_eq!(k, vec![g1[2], pending]);
    // Their exits respawn nothing.
    assert!(respawn_delays(&sim.exit(g1[2])).is_empty());
    assert!(respawn_delays(&sim.exit(pending)).is_empty());
    assert_eq!(sim.sup.workers().len(), 2);
    assert!(sim.sup.next_deadline().is_none());
    // Slots 0 and 1 are untouched; scaling up again starts afresh.
    assert_eq!((sim.active(0), sim.active(1)), (Some(g1[0]), Some(g1[1])));
    let out = sim.feed(Input::Scale(3));
    assert_eq!(spawned(&out)[0].1, 2);
}

#[tokio::test(start_paused = true)]
async fn scaling_below_one_or_above_the_cap_or_while_terminating_changes_nothing() {
    let (mut sim, out) = Sim::start(1, timing());
    let first = ids(&out);
    sim.ready_all(&first);
    assert!(sim.feed(Input::Scale(0)).is_empty());
    assert!(sim.feed(Input::Scale(MAX_SLOTS + 1)).is_empty());
    assert_eq!(sim.sup.slots(), 1);
    assert_eq!(sim.active(0), Some(first[0]));
    sim.feed(Input::Terminate);
    assert!(sim.feed(Input::Scale(3)).is_empty());
}

#[tokio::test(start_paused = true)]
async fn scaling_during_a_reload_starts_new_slots_in_the_new_generation_and_finishes_on_live_slots() {
    let (mut sim, out) = Sim::start(3, timing());
    let g1 = ids(&out);
    sim.ready_all(&g1);
    let g2 = ids(&sim.feed(Input::Reload));
    let out = sim.feed(Input::Scale(4));
    let added = spawned(&out);
    assert_eq!((added[0].1, added[0].2), (3, 2), "slot 3 starts in generation 2");
    sim.ready_all(&[g2[0], added[0].0]);
    // Slots 1 and 2 are still being replaced: removing them finishes the reload.
    let out = sim.feed(Input::Scale(1));
    assert!(has(&out, &Event::ReloadFinished { generation: 2 }));
    let mut s = stopped(&out);
    s.sort();
    let mut expect = vec![g1[1], g1[2], g2[1], g2[2], added[0].0];
    expect.sort();
    assert_eq!(s, expect);
    assert_eq!(sim.sup.reloading(), None);
    assert_eq!(sim.active(0), Some(g2[0]));
}

#[tokio::test(start_paused = true)]
async fn a_rolling_reload_replaces_at_most_batch_slots_at_once_lowest_first() {
    let sup = Supervisor::new(3, timing()).with_rolling(rolling(1, 0));
    let (mut sim, out) = Sim::with(sup);
    let g1 = ids(&out);
    sim.ready_all(&g1);
    let out = sim.feed(Input::Reload);
    let first = spawned(&out);
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].1, first[0].2), (0, 2), "slot 0 first");
    // Nothing more starts while it is not ready, however long it takes.
    assert!(spawned(&sim.wait(4000 * MS).await).is_empty());
    let out = sim.feed(Input::Ready { id: first[0].0 });
    assert_eq!(stopped(&out), vec![g1[0]]);
    let second = spawned(&out);
    assert_eq!((second.len(), second[0].1, second[0].2), (1, 1, 2));
    let stop = out.iter().position(|a| matches!(a, Action::Stop { .. })).unwrap();
    let spawn = out.iter().position(|a| matches!(a, Action::Spawn { .. })).unwrap();
    assert!(stop < spawn, "the old worker retires before the next slot starts");
    // A failed start is retried in its slot; the next slot still waits.
    let out = sim.exit(second[0].0);
    assert_eq!(respawn_delays(&out), vec![100 * MS]);
    let retry = spawned(&sim.wait(100 * MS).await);
    assert_eq!((retry.len(), retry[0].1), (1, 1));
    let out = sim.feed(Input::Ready { id: retry[0].0 });
    let third = spawned(&out);
    assert_eq!((third.len(), third[0].1), (1, 2));
    assert!(!has(&out, &Event::ReloadFinished { generation: 2 }));
    let out = sim.feed(Input::Ready { id: third[0].0 });
    assert!(has(&out, &Event::ReloadFinished { generation: 2 }));
    assert!(spawned(&out).is_empty());

    // A batch of 2 of 3 slots.
    let sup = Supervisor::new(3, timing()).with_rolling(rolling(2, 0));
    let (mut sim, out) = Sim::with(sup);
    sim.ready_all(&ids(&out));
    let out = sim.feed(Input::Reload);
    assert_eq!(
        spawned(&out).iter().map(|s| s.1).collect::<Vec<_>>(),
        vec![0, 1]
    );
    let out = sim.feed(Input::Ready { id: ids(&out)[1] });
    assert_eq!(spawned(&out).iter().map(|s| s.1).collect::<Vec<_>>(), vec![2]);
}

#[tokio::test(start_paused = true)]
async fn a_reload_whose_new_workers_keep_failing_is_aborted_and_the_old_workers_keep_serving() {
    let sup = Supervisor::new(3, timing()).with_rolling(rolling(1, 2));
    let (mut sim, out) = Sim::with(sup);
    let g1 = ids(&out);
    sim.ready_all(&g1);
    let s0 = ids(&sim.feed(Input::Reload))[0];
    let out = sim.feed(Input::Ready { id: s0 });
    let s1 = ids(&out)[0];
    // One failure, then a retry that is not ready in time: two in a row.
    let out = sim.exit(s1);
    assert!(!out
        .iter()
        .any(|a| matches!(a, Action::Report(Event::ReloadAborted { .. }))));
    let retry = ids(&sim.wait(100 * MS).await)[0];
    let out = sim.wait(5000 * MS).await;
    assert!(has(
        &out,
        &Event::ReloadAborted {
            generation: 2,
            failures: 2
        }
    ));
    assert!(stopped(&out).contains(&retry));
    assert_eq!(sim.sup.reloading(), None);
    // No respawn, no further slot: slot 0 keeps its new worker, 1 and 2 their old ones.
    assert!(spawned(&sim.wait(10_000 * MS).await).is_empty());
    assert_eq!(sim.active(0), Some(s0));
    assert_eq!(sim.active(1), Some(g1[1]));
    assert_eq!(sim.active(2), Some(g1[2]));
    assert!(!sim.sup.workers().iter().any(|w| w.state == WorkerState::Starting));

    // A later reload starts afresh.
    let out = sim.feed(Input::Reload);
    assert!(has(&out, &Event::ReloadStarted { generation: 3 }));
    let s = spawned(&out);
    assert_eq!((s.len(), s[0].1, s[0].2), (1, 0, 3));
    let out = sim.feed(Input::Ready { id: s[0].0 });
    let s = spawned(&out);
    sim.exit(s[0].0);
    let retry = ids(&sim.wait(1000 * MS).await)[0];
    // A new worker that gets ready ends the streak.
    let out = sim.feed(Input::Ready { id: retry });
    let s = spawned(&out);
    let out = sim.exit(s[0].0);
    assert!(!out
        .iter()
        .any(|a| matches!(a, Action::Report(Event::ReloadAborted { .. }))));
}

#[tokio::test(start_paused = true)]
async fn an_all_at_once_reload_aborts_too_and_without_a_limit_never_does() {
    let sup = Supervisor::new(2, timing()).with_rolling(rolling(0, 2));
    let (mut sim, out) = Sim::with(sup);
    let g1 = ids(&out);
    sim.ready_all(&g1);
    let g2 = ids(&sim.feed(Input::Reload));
    assert_eq!(g2.len(), 2, "every slot at once");
    sim.exit(g2[0]);
    let out = sim.exit(g2[1]);
    assert!(has(
        &out,
        &Event::ReloadAborted {
            generation: 2,
            failures: 2
        }
    ));
    assert!(spawned(&sim.wait(10_000 * MS).await).is_empty());
    assert_eq!((sim.active(0), sim.active(1)), (Some(g1[0]), Some(g1[1])));

    // abort_after 0: retried for ever.
    let (mut sim, out) = Sim::start(1, timing());
    sim.ready_all(&ids(&out));
    let mut pending = ids(&sim.feed(Input::Reload))[0];
    for _ in 0..10 {
        let out = sim.exit(pending);
        assert!(!out
            .iter()
            .any(|a| matches!(a, Action::Report(Event::ReloadAborted { .. }))));
        pending = ids(&sim.wait(1000 * MS).await)[0];
    }
}

#[tokio::test(start_paused = true)]
async fn an_aborted_rolling_reload_never_leaves_a_slot_without_a_worker() {
    let sup = Supervisor::new(2, timing()).with_rolling(rolling(1, 1));
    let (mut sim, out) = Sim::with(sup);
    let g1 = ids(&out);
    sim.feed(Input::Ready { id: g1[0] }); // slot 1 is still starting
    let out = sim.feed(Input::Reload);
    // Slot 1 has no worker serving: it starts the new generation at once, and slot 0
    // (serving) takes the batch's place only after it.
    let started: Vec<(usize, u64)> = spawned(&out).iter().map(|s| (s.1, s.2)).collect();
    assert!(started.contains(&(1, 2)), "{started:?}");
    let s1 = spawned(&out).iter().find(|s| s.1 == 1).unwrap().0;
    let out = sim.exit(s1); // one failed start: the reload is given up
    assert!(has(&out, &Event::ReloadAborted { generation: 2, failures: 1 }), "{out:?}");
    // Slot 1 still gets a worker.
    let out = sim.wait(10_000 * MS).await;
    assert_eq!(spawned(&out).iter().filter(|s| s.1 == 1).count(), 1, "{out:?}");
}

#[tokio::test(start_paused = true)]
async fn a_reload_before_the_cluster_was_ready_is_not_finished_by_readiness_alone() {
    let (mut sim, out) = Sim::start(2, timing());
    let g1 = ids(&out);
    sim.feed(Input::Ready { id: g1[0] });
    let g2 = ids(&sim.feed(Input::Reload));
    let slot1 = spawned(&sim.feed(Input::Tick)).len(); // nothing more
    assert_eq!(slot1, 0);
    // Slot 1's new worker gets ready: every slot serves, slot 0 still generation 1.
    let s1 = g2.iter().copied().find(|&id| sim.sup.info(id).is_some_and(|w| w.slot == 1)).unwrap();
    let out = sim.feed(Input::Ready { id: s1 });
    assert!(has(&out, &Event::ClusterReady { generation: 1 }), "{out:?}");
    assert!(!out.iter().any(|a| matches!(a, Action::Report(Event::ReloadFinished { .. }))));
}

#[tokio::test(start_paused = true)]
async fn a_replace_request_during_a_rolling_reload_takes_a_place_of_the_batch() {
    let sup = Supervisor::new(3, timing()).with_rolling(rolling(1, 0));
    let (mut sim, out) = Sim::with(sup);
    sim.ready_all(&ids(&out));
    let first = spawned(&sim.feed(Input::Reload));
    assert_eq!(first.len(), 1);
    let second = spawned(&sim.feed(Input::Ready { id: first[0].0 }));
    assert_eq!(second.len(), 1, "slot 1's turn");
    // Slot 0's new worker asks to be replaced while slot 1 is mid-replacement.
    let replacement = spawned(&sim.feed(Input::ReplaceRequested { id: first[0].0 }));
    assert_eq!(replacement.len(), 1);
    // Slot 1 is done, but slot 0's replacement still starts: slot 2 waits for it.
    let out = sim.feed(Input::Ready { id: second[0].0 });
    assert!(spawned(&out).is_empty(), "slot 2 waits: {out:?}");
    let out = sim.feed(Input::Ready { id: replacement[0].0 });
    assert_eq!(spawned(&out).iter().map(|s| s.1).collect::<Vec<_>>(), [2]);
}

#[tokio::test(start_paused = true)]
async fn restarts_of_a_slot_outlive_its_removal_and_count_on_when_it_comes_back() {
    let (mut sim, out) = Sim::start(3, timing());
    let g1 = ids(&out);
    sim.ready_all(&g1);
    sim.exit(g1[2]);
    let out = sim.wait(10_000 * MS).await;
    assert_eq!(spawned(&out).len(), 1);
    assert_eq!(sim.sup.restarts(2), 1);
    sim.feed(Input::Scale(2));
    sim.feed(Input::Scale(3));
    assert_eq!(sim.sup.restarts(2), 1, "a counter never goes down");
}
