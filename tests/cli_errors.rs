//! Command-line errors of the real binary: bad option values exit 2 with one line
//! naming the option; a worker command that cannot run is a clear error (exit 1), not
//! a respawn loop.

mod common;

use common::*;
use nix::sys::signal::Signal;

/// A valid command line, but for `flag`, which gets `value`.
fn args_with(flag: &str, value: &str) -> Vec<String> {
    let mut args = Vec::new();
    for (f, v) in [
        ("--workers", "1"),
        ("--balance", "shared"),
        ("--listen", "127.0.0.1:0"),
    ] {
        if f != flag {
            args.extend([f.to_string(), v.to_string()]);
        }
    }
    args.extend([flag.to_string(), value.to_string()]);
    args.extend(["--".to_string(), "true".to_string()]);
    args
}

fn run(cluster: Cluster) -> (Exit, String) {
    cluster
        .raw()
        .run(DEADLINE)
        .unwrap_or_else(|| panic!("recluster still running after {DEADLINE:?}"))
}

fn first_line(stderr: &str) -> &str {
    stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("")
}

/// Exit code 2, and the first line of stderr names `flag`.
fn assert_usage_error(args: &[String], flag: &str) {
    let (exit, stderr) = run(Cluster::new().args(args));
    assert_eq!(
        exit.code,
        Some(2),
        "{args:?}: exit {exit:?}, stderr:\n{stderr}"
    );
    assert!(
        first_line(&stderr).contains(flag),
        "{args:?}: first line of stderr does not name {flag}:\n{stderr}"
    );
}

#[test]
fn workers_not_a_number() {
    assert_usage_error(&args_with("--workers", "abc"), "--workers");
}

#[test]
fn unknown_balance_mode() {
    assert_usage_error(&args_with("--balance", "bogus"), "--balance");
}

#[test]
fn bad_duration() {
    assert_usage_error(&args_with("--timeout", "5x"), "--timeout");
}

#[test]
fn every_bad_value_names_its_option() {
    for (flag, value) in [
        ("--respawn", "soon"),
        ("--backoff", "1y"),
        ("--ready-timeout", "ms"),
        ("--timeout", "1.5.2"),
        ("--ready-when", "bogus"),
        ("--stop-signal", "SIGBOGUS"),
        ("--listen", "not-an-address"),
        ("--listen", "127.0.0.1:99999"),
        ("--backlog", "many"),
        ("--workers", "-3"),
    ] {
        let mut args = args_with(flag, value);
        // `--workers -3` would read as an unknown option: pass it as `--workers=-3`.
        if value.starts_with('-') {
            let at = args.iter().position(|a| a == flag).unwrap();
            args[at] = format!("{flag}={value}");
            args.remove(at + 1);
        }
        assert_usage_error(&args, flag);
    }
}

#[test]
fn bad_value_from_the_environment() {
    let (exit, stderr) = run(Cluster::new().env("RECLUSTER_WORKERS", "abc").args([
        "--balance",
        "shared",
        "--listen",
        "127.0.0.1:0",
        "--",
        "true",
    ]));
    assert_eq!(exit.code, Some(2), "stderr:\n{stderr}");
    let line = first_line(&stderr);
    assert!(
        line.contains("RECLUSTER_WORKERS") && line.contains("'abc'"),
        "the first line does not name RECLUSTER_WORKERS:\n{stderr}"
    );
    // The same variable beside a bad value on the command line: the flag is named.
    let (exit, stderr) = run(Cluster::new().env("RECLUSTER_BALANCE", "sticky").args([
        "--balance",
        "bogus",
        "--",
        "true",
    ]));
    assert_eq!(exit.code, Some(2), "stderr:\n{stderr}");
    let line = first_line(&stderr);
    assert!(
        line.contains("'--balance <BALANCE>'") && !line.contains("RECLUSTER_BALANCE"),
        "{stderr}"
    );
    // An optional value (`--subreaper[=BOOL]`) from the environment.
    let (exit, stderr) = run(Cluster::new()
        .env("RECLUSTER_SUBREAPER", "maybe")
        .args(["--", "true"]));
    assert_eq!(exit.code, Some(2), "stderr:\n{stderr}");
    assert!(
        first_line(&stderr).contains("RECLUSTER_SUBREAPER"),
        "{stderr}"
    );
}

#[test]
fn help_shows_addresses_as_typed() {
    let (exit, stdout) = {
        let out = std::process::Command::new(recluster_bin())
            .arg("--help")
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert!(exit.success());
    assert!(stdout.contains("host:port or [v6]:port"), "{stdout}");
    assert!(!stdout.contains('\\'), "a backslash in --help:\n{stdout}");
    assert!(stdout.contains("--pid-file"), "{stdout}");
}

#[test]
fn missing_command() {
    let (exit, stderr) =
        run(Cluster::new().args(["--balance", "shared", "--listen", "127.0.0.1:0", "--"]));
    assert_eq!(exit.code, Some(2), "with `--`: stderr:\n{stderr}");
    let (exit, stderr) =
        run(Cluster::new().args(["--balance", "shared", "--listen", "127.0.0.1:0"]));
    assert_eq!(exit.code, Some(2), "without `--`: stderr:\n{stderr}");
}

/// The command cannot be run: exit 1 promptly, stderr names it, nothing respawned.
fn assert_command_error(cluster: Cluster, program: &str) {
    let (exit, stderr) = run(cluster);
    assert_eq!(
        exit.code,
        Some(1),
        "{program}: exit {exit:?}, stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(program),
        "stderr does not name {program}:\n{stderr}"
    );
    assert!(
        events_in(&stderr, "respawn_scheduled").is_empty(),
        "{program}: a respawn loop:\n{stderr}"
    );
}

#[test]
fn nonexistent_program() {
    assert_command_error(
        Cluster::new()
            .workers(2)
            .args(["--balance", "shared", "--listen", "127.0.0.1:0"])
            .args(["--", "/nonexistent/prog", "--flag"]),
        "/nonexistent/prog",
    );
}

#[test]
fn program_not_on_path() {
    assert_command_error(
        Cluster::new()
            .workers(2)
            .args(["--balance", "shared", "--listen", "127.0.0.1:0"])
            .args(["--", "recluster-no-such-program"]),
        "recluster-no-such-program",
    );
}

#[test]
fn program_not_executable() {
    assert_command_error(
        Cluster::new()
            .workers(2)
            .args(["--balance", "shared", "--listen", "127.0.0.1:0"])
            .args(["--", "./Cargo.toml"])
            .current_dir(manifest_dir()),
        "Cargo.toml",
    );
}

#[test]
fn address_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (exit, stderr) = run(Cluster::new().workers(1).args([
        "--balance",
        "shared",
        "--listen",
        &addr,
        "--",
        "true",
    ]));
    assert_ne!(exit.code, Some(0), "stderr:\n{stderr}");
    assert!(exit.code.is_some(), "died of a signal: {exit:?}\n{stderr}");
    assert!(
        stderr.contains(&addr) || stderr.contains(&taken.local_addr().unwrap().port().to_string()),
        "stderr does not name {addr}:\n{stderr}"
    );
}

#[test]
fn valid_values_are_accepted() {
    for extra in [
        [
            "--timeout",
            "1.5",
            "--respawn",
            "500ms",
            "--backoff",
            "1m",
            "--ready-timeout",
            "1h",
        ],
        [
            "--timeout",
            "2s",
            "--respawn",
            "0",
            "--backoff",
            "0",
            "--ready-timeout",
            "1.5",
        ],
    ] {
        let m = shared_cluster(1)
            .args(extra)
            .args([
                "--ready-when",
                "started",
                "--stop-signal",
                "TERM",
                "--backlog",
                "64",
            ])
            .spawn();
        m.wait_cluster_ready(1);
        m.signal(Signal::SIGTERM);
        let exit = m.expect_exit(DEADLINE);
        assert_eq!(exit.code, Some(0), "{extra:?}\n{}", m.stderr_text());
    }
}
