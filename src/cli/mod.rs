//! The `recluster` command line: options, signals, logging, exit codes.
//!
//! A thin layer over [`crate::Cluster`]: it parses options (each also readable from a
//! `RECLUSTER_*` environment variable), maps the master's signals to handle calls, and
//! turns errors into one line on stderr and an exit code: 2 for bad usage, 1 when the
//! cluster cannot run.

use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::pidfile::PidFile;
use crate::config::{self, Balance, ReadyWhen, Via};
use crate::stdio::StderrLog;
use crate::{Cluster, WorkerCommand};
use crate::proxy::{Cidr, ProxyProtocol};

mod client;
mod pidfile;

/// Command-line options of `recluster`.
#[derive(Debug, Parser)]
#[command(
    name = "recluster",
    version,
    about = "Run N workers behind shared listening sockets; reload them with zero downtime.",
    subcommand_negates_reqs = true,
    subcommand_value_name = "SUBCOMMAND",
    subcommand_help_heading = "Subcommands (steer a running master through its control socket)",
    override_usage = "recluster [OPTIONS] -- COMMAND [ARGS]...\n       recluster status|reload|scale|stop [--control PATH | --name NAME]",
    after_help = "Signals: SIGUSR2 or SIGHUP reload; SIGTTIN adds a worker, SIGTTOU removes one (not under --via socket); SIGTERM or SIGINT terminate gracefully; a second SIGINT kills at once."
)]
pub struct Options {
    /// A subcommand for a running master, instead of starting one
    #[command(subcommand)]
    pub action: Option<client::Subcommand>,

    /// Number of worker processes [default: number of cores]
    #[arg(long, short = 'w', env = "RECLUSTER_WORKERS", value_parser = parse_workers)]
    pub workers: Option<usize>,

    /// Address to listen on, `host:port` or `[v6]:port`; repeatable [default: 127.0.0.1:8080]
    #[arg(
        long,
        short = 'l',
        env = "RECLUSTER_LISTEN",
        value_delimiter = ',',
        value_parser = parse_addr,
        help = "Address to listen on, host:port or [v6]:port; repeatable [default: 127.0.0.1:8080; with --via node, the ports the workers listen on]"
    )]
    pub listen: Vec<SocketAddr>,

    /// How connections reach workers: rr, sticky or shared
    #[arg(long, short = 'b', env = "RECLUSTER_BALANCE", default_value = "rr", value_parser = Balance::from_str)]
    pub balance: Balance,

    /// Time a retiring worker gets before SIGKILL [default: 1s; 1h when RECLUSTER_ENV or NODE_ENV is production]
    #[arg(long, env = "RECLUSTER_TIMEOUT", value_parser = config::parse_duration)]
    pub timeout: Option<Duration>,

    /// First delay before respawning a worker that died
    #[arg(long, env = "RECLUSTER_RESPAWN", default_value = "1s", value_parser = config::parse_duration)]
    pub respawn: Duration,

    /// Maximum the respawn delay doubles up to; 0 disables doubling
    #[arg(long, env = "RECLUSTER_BACKOFF", default_value = "0", value_parser = config::parse_duration)]
    pub backoff: Duration,

    /// How workers get connections in rr/sticky: channel (recluster's worker channel),
    /// node (Node's cluster IPC: an unmodified server's listen(port)) or socket (each
    /// slot its own SO_REUSEPORT sockets at fd 3.., the kernel chooses) [default: node
    /// when the program is node or nodejs, else channel]
    #[arg(long, env = "RECLUSTER_VIA", value_parser = Via::from_str)]
    pub via: Option<Via>,

    /// When a new worker counts as ready: started, listening or ready
    #[arg(long, env = "RECLUSTER_READY_WHEN", default_value = "listening", value_parser = ReadyWhen::from_str)]
    pub ready_when: ReadyWhen,

    /// Time a new worker has to become ready before it is stopped and retried; 0: no limit
    #[arg(long, env = "RECLUSTER_READY_TIMEOUT", default_value = "60s", value_parser = config::parse_duration)]
    pub ready_timeout: Duration,

    /// Time a worker may leave a connection unread before it is replaced (rr, sticky); 0: never
    #[arg(long, env = "RECLUSTER_STUCK_TIMEOUT", default_value = "10s", value_parser = config::parse_duration)]
    pub stuck_timeout: Duration,

    /// Slots a reload replaces at once, lowest first; each new worker ready starts the
    /// next slot (a rolling reload); 0: every slot at once
    #[arg(long, env = "RECLUSTER_RELOAD_BATCH", value_name = "K", default_value_t = 0)]
    pub reload_batch: usize,

    /// Failed starts in a row of a reload's new workers after which the reload is
    /// abandoned (slots not yet replaced keep their old workers); 0: never
    #[arg(long, env = "RECLUSTER_RELOAD_ABORT_AFTER", value_name = "M", default_value_t = 0)]
    pub reload_abort_after: u32,

    /// Signal that asks a worker to stop (TERM, SIGINT, 15, …)
    #[arg(long, env = "RECLUSTER_STOP_SIGNAL", default_value = "TERM", value_parser = parse_signal)]
    pub stop_signal: Signal,

    /// Master threads that accept and hand connections over, all on the same sockets
    /// (rr, sticky; not with --via socket) [default: one per 4 cores, at least 1, at
    /// most --workers]
    #[arg(long, env = "RECLUSTER_ACCEPT_THREADS", value_name = "K", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub accept_threads: Option<u16>,

    /// Run workers as this user (name or uid), in its primary group with no
    /// supplementary groups; the master must run as root
    #[arg(long, env = "RECLUSTER_USER", value_name = "USER")]
    pub user: Option<String>,

    /// Run workers in this group (name or gid) [default: the --user's primary group]
    #[arg(long, env = "RECLUSTER_GROUP", value_name = "GROUP")]
    pub group: Option<String>,

    /// Expect a PROXY protocol header (v1, v2 or any) first on every connection, and use
    /// the client it names for sticky and as the worker's peer (rr, sticky; not with
    /// --via socket); a connection without a valid one in time is closed and counted.
    /// ADDR=VERSION: on that --listen address only (repeatable)
    #[arg(long, env = "RECLUSTER_PROXY_PROTOCOL", value_name = "[ADDR=]VERSION", value_delimiter = ',', value_parser = parse_proxy_spec)]
    pub proxy_protocol: Vec<(Option<SocketAddr>, ProxyProtocol)>,

    /// Only peers in this network (ADDR/BITS or ADDR; repeatable) may send a PROXY
    /// header; connections from others are closed and counted [default: every peer]
    #[arg(long, env = "RECLUSTER_TRUSTED_PROXY", value_name = "CIDR", value_delimiter = ',', requires = "proxy_protocol", value_parser = Cidr::from_str)]
    pub trusted_proxy: Vec<Cidr>,

    /// Time a client has to send its whole PROXY header (more than 0)
    #[arg(long, env = "RECLUSTER_PROXY_TIMEOUT", default_value = "3s", value_parser = parse_proxy_timeout)]
    pub proxy_timeout: Duration,

    /// Listen backlog of the sockets the master binds
    #[arg(long, env = "RECLUSTER_BACKLOG", default_value_t = config::DEFAULT_BACKLOG, value_parser = clap::value_parser!(i32).range(1..))]
    pub backlog: i32,

    /// Become a child subreaper and reap orphaned grandchildren [default: on when PID 1]
    #[arg(long, env = "RECLUSTER_SUBREAPER", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub subreaper: Option<bool>,

    /// Put each worker in a cgroup of its own where cgroup v2 is writable (killed as one)
    #[arg(long, env = "RECLUSTER_CGROUPS", num_args = 0..=1, default_value = "true", default_missing_value = "true", require_equals = true)]
    pub cgroups: bool,

    /// Control socket for `recluster status|reload|stop` (mode 0600); `off` for none
    /// [default: NAME.sock in /run/recluster as root, else in $XDG_RUNTIME_DIR/recluster]
    #[arg(long, env = "RECLUSTER_CONTROL", value_name = "PATH")]
    pub control: Option<std::path::PathBuf>,

    /// The cluster's name: its control socket's in the default directory [default: the
    /// first listen address, as in 127.0.0.1-8080]
    #[arg(long, env = "RECLUSTER_NAME", value_name = "NAME", value_parser = client::parse_name)]
    pub name: Option<String>,

    /// Serve Prometheus metrics at http://ADDR/metrics (an address of its own, never a balanced one)
    #[arg(long, env = "RECLUSTER_METRICS", value_name = "ADDR", value_parser = parse_addr)]
    pub metrics: Option<SocketAddr>,

    /// File to write the master's pid to (removed at exit), for `kill -USR2 $(cat FILE)`
    #[arg(long, env = "RECLUSTER_PID_FILE", value_name = "FILE")]
    pub pid_file: Option<std::path::PathBuf>,

    /// Log level: error, warn, info, debug or trace (RUST_LOG, when set, wins)
    #[arg(long, env = "RECLUSTER_LOG_LEVEL", default_value = "info")]
    pub log_level: tracing::Level,

    /// Format of the master's log on stderr: text, or json (one object per line; with
    /// --prefix, the workers' lines too)
    #[arg(long, env = "RECLUSTER_LOG_FORMAT", default_value = "text", value_enum)]
    pub log_format: LogFormat,

    /// Write each line of the workers' stdout and stderr to the master's own, prefixed
    /// `[SLOT PID] `, or as JSON objects with --log-format json (lines over 16 KiB are
    /// cut, each piece prefixed; when the master's
    /// output is stuck, lines are dropped and counted: event output_dropped)
    #[arg(long, env = "RECLUSTER_PREFIX", num_args = 0..=1, default_value = "false", default_missing_value = "true", require_equals = true)]
    pub prefix: bool,

    /// The worker command and its arguments, after `--`
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// Format of the master's own log (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `<time>  INFO <target>: <message> key=value …`, for people.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields` (`message`, `event`, …),
    /// `target`, for log collectors.
    Json,
}

fn parse_workers(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("expected at least 1 worker".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("expected a number of workers, got `{s}`")),
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let s = s.trim(); // `a, b` in a list
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    if let Some(port) = s.strip_prefix(':').and_then(|p| p.parse::<u16>().ok()) {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    s.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("expected host:port or [v6]:port, got `{s}`"))
}

/// `--proxy-timeout`: a duration above zero (a zero deadline would refuse every
/// header not already there at accept, at random).
fn parse_proxy_timeout(s: &str) -> Result<Duration, String> {
    match config::parse_duration(s)? {
        d if d.is_zero() => Err("expected a time above 0, such as 3s".into()),
        d => Ok(d),
    }
}

fn parse_signal(s: &str) -> Result<Signal, String> {
    let err = || format!("expected a signal name like TERM, INT, QUIT or a number, got `{s}`");
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| err());
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).map_err(|_| err())
}

/// For a bad value that came from a `RECLUSTER_*` variable rather than the command
/// line, clap's message with the variable named (clap names only the option).
fn from_environment(e: &clap::Error, argv: impl Iterator<Item = OsString>) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    use clap::CommandFactory;
    let (Some(ContextValue::String(shown)), Some(ContextValue::String(value))) = (
        e.get(ContextKind::InvalidArg),
        e.get(ContextKind::InvalidValue),
    ) else {
        return None;
    };
    let command = Options::command();
    let arg = command.get_arguments().find(|a| {
        a.get_long()
            .is_some_and(|l| shown.split(['[', ' ']).next() == Some(&format!("--{l}")))
    })?;
    let env = arg.get_env()?;
    // The whole value, or one element of a list (`RECLUSTER_LISTEN=a,b`).
    let from_env = std::env::var(env).is_ok_and(|v| {
        v == *value || (arg.get_value_delimiter().is_some() && v.split(',').any(|e| e == value))
    });
    if !from_env {
        return None;
    }
    let long = format!("--{}", arg.get_long()?);
    let short = arg.get_short().map(|c| format!("-{c}"));
    let on_command_line = argv.skip(1).take_while(|a| a != "--").any(|a| {
        let a = a.to_string_lossy();
        a == long
            || a.starts_with(&format!("{long}="))
            || short.as_deref().is_some_and(|s| a.starts_with(s))
    });
    if on_command_line {
        return None;
    }
    let text = e.render().to_string();
    Some(text.replacen(
        &format!("for '{shown}'"),
        &format!(
            "in the environment variable {} (read for '{shown}')",
            env.to_string_lossy()
        ),
        1,
    ))
}

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    // Until the handlers are installed, a reload or terminate signal would kill the
    // master by its default action: hold them pending instead (see `run`).
    let held = control_signals();
    let _ = held.thread_block();
    let opts = match Options::try_parse() {
        Ok(o) => o,
        Err(e) => {
            let code = e.exit_code();
            match from_environment(&e, std::env::args_os()) {
                Some(text) => {
                    let _ = write!(std::io::stderr(), "{text}");
                }
                None => {
                    let _ = e.print();
                }
            }
            return code;
        }
    };
    if let Some(sub) = opts.action {
        // A subcommand for a running master: `--control`/`--name` may come before it.
        return client::run(sub.aimed(opts.control, opts.name));
    }
    // Every line to stderr from here on goes through `log`, which never blocks and
    // never fails; dropping it, at any return below, flushes it (bounded).
    let log = init_logging(opts.log_level, opts.log_format);
    let mut command = opts.command.iter();
    let program = command.next().cloned().unwrap_or_default();
    let mut builder = Cluster::builder(WorkerCommand::new(program).args(command.cloned()))
        .workers(opts.workers.unwrap_or_else(config::default_workers))
        .balance(opts.balance)
        .ready_when(opts.ready_when)
        .timeout(opts.timeout.unwrap_or_else(config::default_timeout))
        .respawn(opts.respawn)
        .backoff(opts.backoff)
        .ready_timeout(opts.ready_timeout)
        .stuck_timeout(opts.stuck_timeout)
        .reload_batch(opts.reload_batch)
        .reload_abort_after(opts.reload_abort_after)
        .stop_signal(opts.stop_signal)
        .backlog(opts.backlog)
        .cgroups(opts.cgroups)
        .prefix_output(opts.prefix)
        .json_output(opts.log_format == LogFormat::Json)
        .proxy_timeout(opts.proxy_timeout);
    for &(addr, accept) in &opts.proxy_protocol {
        builder = match addr {
            Some(addr) => builder.proxy_protocol_on(addr, accept),
            None => builder.proxy_protocol(accept),
        };
    }
    for network in &opts.trusted_proxy {
        builder = builder.trusted_proxy(*network);
    }
    if !opts.proxy_protocol.is_empty() && opts.trusted_proxy.is_empty() {
        tracing::warn!(event = "proxy_untrusted_open",
            "--proxy-protocol without --trusted-proxy: any client may claim any address, and silent clients may fill the headers awaited; name your balancer's addresses with --trusted-proxy");
    }
    if let Some(k) = opts.accept_threads {
        let workers = opts.workers.unwrap_or_else(config::default_workers);
        if opts.balance == Balance::Shared || opts.via == Some(Via::Socket) {
            tracing::warn!(event = "accept_threads_ignored", accept_threads = k,
                "--accept-threads has no effect here: workers accept themselves (shared, --via socket)");
        } else if usize::from(k) > workers {
            tracing::warn!(event = "accept_threads_over_workers", accept_threads = k, workers,
                "more accept threads than workers: the workers, not the master, set the pace; each thread costs a wake-up per new connection when idle");
        }
        builder = builder.accept_threads(k.into());
    }
    if let Some(on) = opts.subreaper {
        builder = builder.subreaper(on);
    }
    if let Some(via) = opts.via {
        builder = builder.via(via);
    }
    for addr in &opts.listen {
        builder = builder.listen(*addr);
    }
    match run_as(opts.user.as_deref(), opts.group.as_deref()) {
        Ok(Some(c)) => {
            if opts.user.is_none() {
                tracing::warn!(event = "group_without_user", gid = c.gid,
                    "--group without --user: workers keep the master's user (root); add --user to run them unprivileged");
            }
            builder = builder.run_as(c);
        }
        Ok(None) => {}
        Err(e) => {
            log.line(format_args!("recluster: {e}"));
            return 2;
        }
    }
    // Socket activation: the service manager bound the sockets (listen.rs).
    match crate::listen::activated() {
        Ok(Some(listeners)) => {
            let addrs: Vec<String> = listeners.iter().filter_map(|l| Some(l.local_addr().ok()?.to_string())).collect();
            tracing::info!(event = "socket_activated", count = listeners.len(), addrs = %addrs.join(","),
                "serving the sockets the service manager passed (LISTEN_FDS)");
            builder = builder.activated(listeners);
        }
        Ok(None) => {}
        Err(e) => {
            log.line(format_args!("recluster: {e}"));
            return 2;
        }
    }
    let cluster = match builder.build() {
        Ok(c) => c,
        Err(crate::Error::Config(e)) => {
            log.line(format_args!("recluster: {e}"));
            return 2;
        }
        Err(e) => {
            log.line(format_args!("recluster: {e}"));
            return 1;
        }
    };
    // Written once the sockets are bound, removed when `_pid_file` drops at the end.
    let _pid_file = match opts.pid_file.as_deref().map(PidFile::create).transpose() {
        Ok(f) => f,
        Err(e) => {
            let path = opts.pid_file.as_deref().unwrap_or(std::path::Path::new(""));
            log.line(format_args!(
                "recluster: cannot write the pid file {} (--pid-file): {e}",
                path.display()
            ));
            return 1;
        }
    };
    // One thread: the master forks from it, and PR_SET_PDEATHSIG is tied to the forking
    // thread, which must live as long as the master does.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            log.line(format_args!("recluster: cannot start the runtime: {e}"));
            return 1;
        }
    };
    let control = match opts.control {
        Some(path) if path.as_os_str() == "off" => Control::Off,
        Some(path) => Control::At(path),
        None => Control::Default(
            opts.name
                .unwrap_or_else(|| client::name_for(cluster.local_addrs().first().copied())),
        ),
    };
    match runtime.block_on(run(cluster, control, opts.metrics)) {
        Ok(()) => 0,
        Err(e) => {
            log.line(format_args!("recluster: {e}"));
            1
        }
    }
}

/// Where the master's control socket goes.
enum Control {
    /// `--control off`: none.
    Off,
    /// `--control PATH`: there, or the master does not start.
    At(std::path::PathBuf),
    /// The default directory, under this name; the master runs without one if it
    /// cannot be made (a warning says why).
    Default(String),
}

async fn run(cluster: Cluster, control: Control, metrics: Option<SocketAddr>) -> Result<(), crate::Error> {
    use crate::runtime::control::ControlSocket;
    let handle = cluster.handle();
    if let Some(addr) = metrics {
        let endpoint = crate::runtime::metrics::MetricsEndpoint::bind(addr)
            .await
            .map_err(|source| crate::Error::Io {
                context: "cannot listen for metrics (--metrics)",
                source,
            })?;
        let bound = endpoint.local_addr().unwrap_or(addr);
        tracing::info!(event = "metrics_listening", addr = %bound, "serving Prometheus metrics at /metrics");
        tokio::spawn(endpoint.serve(handle.clone()));
    }
    let socket = match control {
        Control::Off => None,
        Control::At(path) => Some(ControlSocket::bind(&path).map_err(|source| crate::Error::Io {
            context: "cannot create the control socket (--control)",
            source,
        })?),
        Control::Default(name) => match client::prepare_default(&name).and_then(|p| ControlSocket::bind(&p)) {
            Ok(s) => Some(s),
            // Another master answers under this name: `recluster status --name` could
            // never tell the two apart, so this one does not start.
            Err(source) if source.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(crate::Error::Io {
                    context: "another master runs under this name (--name, or the first listen address): give this one another --name",
                    source,
                });
            }
            Err(e) => {
                tracing::warn!(event = "control_unavailable", name, dir = %client::default_dir().display(), error = %e,
                    "no control socket: `recluster status` cannot reach this master; pass --control PATH or --name NAME");
                None
            }
        },
    };
    if let Some(socket) = socket {
        tracing::info!(event = "control_socket", path = %socket.path().display(), "control socket ready");
        tokio::spawn(socket.serve(handle.clone()));
    }
    let io = |source| crate::Error::Io {
        context: "cannot install signal handlers",
        source,
    };
    let mut usr2 = signal(SignalKind::user_defined2()).map_err(io)?;
    let mut hup = signal(SignalKind::hangup()).map_err(io)?;
    let mut term = signal(SignalKind::terminate()).map_err(io)?;
    let mut int = signal(SignalKind::interrupt()).map_err(io)?;
    // gunicorn's: TTIN one worker more, TTOU one fewer.
    let mut ttin = signal(SignalKind::from_raw(libc::SIGTTIN)).map_err(io)?;
    let mut ttou = signal(SignalKind::from_raw(libc::SIGTTOU)).map_err(io)?;
    // Handlers are in place: what arrived since start-up is delivered to them now.
    let _ = control_signals().thread_unblock();
    tokio::spawn(async move {
        let mut interrupted = false;
        loop {
            tokio::select! {
                _ = usr2.recv() => handle.reload(),
                _ = hup.recv() => handle.reload(),
                _ = ttin.recv() => handle.scale_by(1),
                _ = ttou.recv() => handle.scale_by(-1),
                _ = term.recv() => handle.terminate(),
                _ = int.recv() => {
                    if interrupted {
                        handle.kill();
                    } else {
                        interrupted = true;
                        handle.terminate();
                    }
                }
            }
        }
    });
    cluster.run().await
}

/// The signals the master acts on.
fn control_signals() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    for s in [
        Signal::SIGUSR2,
        Signal::SIGHUP,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ] {
        set.add(s);
    }
    set
}

/// Logs to stderr, as text or JSON, through a [`StderrLog`], so that a broken stderr (a
/// closed pipe, a hung-up terminal) or a stuck one never ends or stalls the master;
/// returns the log, which flushes when dropped.
fn init_logging(level: tracing::Level, format: LogFormat) -> StderrLog {
    use std::io::IsTerminal;
    let log = StderrLog::start(format == LogFormat::Json);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.as_str()));
    // A failed write is counted by the log and reported when stderr is back; the
    // default reports it with `eprintln!`, which panics on the same broken stderr.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(log.queue())
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).try_init(),
        // The master logs no spans: each line is the event alone.
        LogFormat::Json => fmt
            .json()
            .with_ansi(false)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    log
}

/// The workers' credentials from `--user` and `--group` (names or numbers): `None`
/// when neither is given; `--group` alone keeps the master's user.
fn run_as(user: Option<&str>, group: Option<&str>) -> Result<Option<config::Credentials>, String> {
    use nix::unistd::{Gid, Group, Uid, User};
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let (uid, primary) = match user {
        Some(u) => {
            let found = match u.parse::<u32>() {
                Ok(n) => User::from_uid(Uid::from_raw(n)),
                Err(_) => User::from_name(u),
            };
            match found {
                Ok(Some(p)) => (p.uid.as_raw(), p.gid.as_raw()),
                // A number names a uid even without a passwd entry (containers).
                Ok(None) => match u.parse::<u32>() {
                    Ok(n) => (n, n),
                    Err(_) => return Err(format!("--user {u}: no such user (see /etc/passwd)")),
                },
                Err(e) => return Err(format!("--user {u}: cannot look it up: {e}")),
            }
        }
        None => (Uid::current().as_raw(), Gid::current().as_raw()),
    };
    let gid = match group {
        Some(g) => {
            let found = match g.parse::<u32>() {
                Ok(n) => Group::from_gid(Gid::from_raw(n)),
                Err(_) => Group::from_name(g),
            };
            match found {
                Ok(Some(grp)) => grp.gid.as_raw(),
                Ok(None) => match g.parse::<u32>() {
                    Ok(n) => n,
                    Err(_) => return Err(format!("--group {g}: no such group (see /etc/group)")),
                },
                Err(e) => return Err(format!("--group {g}: cannot look it up: {e}")),
            }
        }
        None => primary,
    };
    // -1 means "unchanged" to setuid/setgid: never a user to run as.
    if uid == u32::MAX || gid == u32::MAX {
        return Err("--user/--group: 4294967295 (-1) is no user or group id".to_string());
    }
    Ok(Some(config::Credentials { uid, gid }))
}


/// `--proxy-protocol`: `VERSION` (every listener) or `ADDR=VERSION` (that listener).
fn parse_proxy_spec(s: &str) -> Result<(Option<SocketAddr>, ProxyProtocol), String> {
    match s.rsplit_once('=') {
        Some((addr, version)) => {
            let addr = addr
                .parse()
                .map_err(|_| format!("{addr:?} is not an address (HOST:PORT or [V6]:PORT)"))?;
            Ok((Some(addr), version.parse()?))
        }
        None => Ok((None, s.parse()?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("TERM"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("sigquit"), Ok(Signal::SIGQUIT));
        assert_eq!(parse_signal("2"), Ok(Signal::SIGINT));
        assert!(parse_signal("BOGUS").is_err());
    }

    #[test]
    fn addresses_parse_v4_v6_and_port_only() {
        assert_eq!(parse_addr("127.0.0.1:80").unwrap().port(), 80);
        assert!(parse_addr("[::1]:8080").unwrap().is_ipv6());
        assert_eq!(parse_addr(":9000").unwrap().port(), 9000);
        assert!(parse_addr("nope").is_err());
    }

    #[test]
    fn options_need_a_command_and_reject_bad_values() {
        assert!(Options::try_parse_from(["recluster"]).is_err());
        let bad =
            Options::try_parse_from(["recluster", "--workers", "abc", "--", "x"]).unwrap_err();
        assert_eq!(bad.exit_code(), 2);
        assert!(bad.to_string().contains("--workers"));
        let ok = Options::try_parse_from(["recluster", "--", "srv", "-x"]).unwrap();
        assert_eq!(
            ok.command,
            vec![OsString::from("srv"), OsString::from("-x")]
        );
        assert_eq!(ok.balance, Balance::RoundRobin);
    }

    #[test]
    fn prefix_and_log_format_parse_and_default_off_and_text() {
        let parse = |args: &[&str]| Options::try_parse_from(["recluster"].iter().chain(args).chain(&["--", "x"]));
        let plain = parse(&[]).unwrap();
        assert!(!plain.prefix);
        assert_eq!(plain.log_format, LogFormat::Text);
        let set = parse(&["--prefix", "--log-format", "json"]).unwrap();
        assert!(set.prefix);
        assert_eq!(set.log_format, LogFormat::Json);
        assert!(!parse(&["--prefix=false"]).unwrap().prefix);
        assert!(parse(&["--log-format", "xml"]).is_err());
    }

    #[test]
    fn rolling_reload_options_parse_and_read_their_variables() {
        use clap::CommandFactory;
        let ok = Options::try_parse_from(["recluster", "--", "srv"]).unwrap();
        assert_eq!((ok.reload_batch, ok.reload_abort_after), (0, 0));
        let ok = Options::try_parse_from([
            "recluster",
            "--reload-batch",
            "2",
            "--reload-abort-after",
            "3",
            "--",
            "srv",
        ])
        .unwrap();
        assert_eq!((ok.reload_batch, ok.reload_abort_after), (2, 3));
        let command = Options::command();
        let env = |long: &str| {
            command
                .get_arguments()
                .find(|a| a.get_long() == Some(long))
                .and_then(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned())
        };
        assert_eq!(env("reload-batch").as_deref(), Some("RECLUSTER_RELOAD_BATCH"));
        assert_eq!(
            env("reload-abort-after").as_deref(),
            Some("RECLUSTER_RELOAD_ABORT_AFTER")
        );
        let help = command.clone().render_long_help().to_string();
        assert!(help.contains("SIGTTIN") && help.contains("SIGTTOU"), "{help}");
        assert!(control_signals().contains(Signal::SIGTTIN));
        assert!(control_signals().contains(Signal::SIGTTOU));
    }

    #[test]
    fn help_shows_v6_addresses_without_escapes() {
        use clap::CommandFactory;
        let help = Options::command().render_long_help().to_string();
        assert!(help.contains("[v6]:port"), "{help}");
        assert!(!help.contains('\\'), "{help}");
    }
}

