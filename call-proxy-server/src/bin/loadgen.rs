//! `call-proxy-loadgen`: drives many simulated TVs over real TCP against a real
//! `call-proxy-server` and prints the figures of the server's performance goals.
//!
//! By default it starts the `call-proxy-server` binary found next to its own executable
//! on a free loopback port with a fresh database in a temporary directory, and stops it
//! (SIGTERM) at the end; `--server ADDR` targets a server that is already running instead
//! (`--server-pid PID` then enables the memory figures).
//!
//! Phases, each bounded in time (`--phase-timeout-secs`):
//! 1. the server's resident memory before any TV connects;
//! 2. connect and register `--tvs` TVs with `--concurrency` in flight (registrations/s),
//!    keeping every connection open and idle;
//! 3. the server's resident memory with all of them registered (bytes per idle TV);
//! 4. call set-up latency with all of them online: `--dial-pairs` tasks dial, wait for
//!    `Ringing`, and hang up, over pairs of registered TVs;
//! 5. durably cached calls per second to offline users;
//! 6. boot fetch: how long a TV with `--boot-calls` cached calls takes, from sending its
//!    registration, to hold all of them (and to have acknowledged them).
//!
//! Every phase's work is spread over the registered TVs so that no single connection
//! exceeds the server's per-connection request rate limit (20 requests/s sustained, a
//! burst of 100, by default): real TVs do not dial hundreds of times a second.
//!
//! The TVs stay connected until a spawned server has been stopped, so the server closes
//! first (no TIME_WAIT sockets pile up on this side) and its shutdown is exercised with
//! every session open. The process's open-file limit (soft raised to hard) bounds
//! `--tvs`; a run that does not fit is refused up front.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use call_proxy_server::client::Client;
use clap::Parser;
use hdrhistogram::Histogram;
use shared_proto::{DialOutcome, Event, Reply, Request, UserId};
use tokio::task::JoinSet;
use tokio::time::timeout;

/// Load generator for call-proxy-server: simulated TVs over real TCP.
#[derive(Parser, Debug, Clone)]
#[command(
    version,
    about = "Load generator for call-proxy-server: drives simulated TVs over real TCP and \
             prints registrations/s, memory per idle TV, call set-up latency, cached calls/s \
             and boot-fetch time"
)]
struct Args {
    /// Target a running server at this address instead of spawning one.
    #[arg(long)]
    server: Option<SocketAddr>,
    /// Process id of the server given with --server (enables the memory figures).
    #[arg(long, requires = "server")]
    server_pid: Option<u32>,
    /// Spawn `call-proxy-server` from next to this executable (the default when --server
    /// is not given).
    #[arg(long, conflicts_with = "server")]
    spawn: bool,
    /// The server binary to spawn [default: call-proxy-server next to this executable].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Extra argument for the spawned `serve` command (repeatable), e.g. --server-arg=--no-sync.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Directory in which the spawned server's temporary directory (database, log) is
    /// made [default: the system temporary directory].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the spawned server's temporary directory (database and log) at the end.
    #[arg(long)]
    keep: bool,
    /// Simulated TVs connected and registered at once.
    #[arg(long, default_value_t = 10_000)]
    tvs: usize,
    /// Connects + registrations in flight.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Calls set up (dial, ringing, hang up) with all TVs online.
    #[arg(long, default_value_t = 20_000)]
    dials: usize,
    /// Concurrent caller tasks in the dial phase.
    #[arg(long, default_value_t = 64)]
    dial_pairs: usize,
    /// Pace the dial phase at this many dials per second in all (each caller dials on a
    /// fixed schedule; dials that start over 2 ms after their slot are counted as late);
    /// 0 = every caller dials again as soon as its previous call is torn down (closed
    /// loop, the most load the callers can offer).
    #[arg(long, default_value_t = 0.0)]
    dial_rate: f64,
    /// Calls to offline users (cached) in the cached-call phase.
    #[arg(long, default_value_t = 50_000)]
    cached: usize,
    /// Concurrent callers in the cached-call phase.
    #[arg(long, default_value_t = 256)]
    cached_concurrency: usize,
    /// Offline users the cached calls are spread over.
    #[arg(long, default_value_t = 1_000)]
    offline_targets: usize,
    /// Cached calls waiting for each boot-fetch sample's TV.
    #[arg(long, default_value_t = 100)]
    boot_calls: usize,
    /// Boot-fetch samples.
    #[arg(long, default_value_t = 20)]
    boot_samples: usize,
    /// Most connections from one loopback source address. Each run draws fresh source
    /// addresses (127.X.0.2, 127.X.0.3, ... with X random) so that sockets a previous run
    /// left in TIME_WAIT do not exhaust the ephemeral ports of a source address.
    #[arg(long, default_value_t = 5_000)]
    per_source_ip: usize,
    /// First user id of the registered TVs.
    #[arg(long, default_value_t = 1_000_000)]
    user_base: u64,
    /// Time limit of each phase, in seconds.
    #[arg(long, default_value_t = 120)]
    phase_timeout_secs: u64,
    /// Time limit of one request, in seconds.
    #[arg(long, default_value_t = 10)]
    request_timeout_secs: u64,
    /// Worker threads of the load generator (the rest of the machine is the server's).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Also print one JSON summary line.
    #[arg(long)]
    json: bool,
}

/// One simulated TV: its user id and its open control connection.
struct Tv {
    user: UserId,
    client: Client,
}

/// Where connections come from: spread over loopback source addresses when the server
/// is on loopback, so that no source address runs out of ephemeral ports.
#[derive(Clone, Copy)]
struct Sources {
    loopback: bool,
    per_ip: usize,
    /// Second octet of the source addresses (127.net.x.y), drawn per run.
    net: u8,
}

impl Sources {
    fn for_index(&self, i: usize) -> Option<SocketAddr> {
        if !self.loopback {
            return None;
        }
        let k = i / self.per_ip.max(1);
        let third = u8::try_from(k / 250).unwrap_or(u8::MAX);
        let fourth = u8::try_from(2 + k % 250).unwrap_or(u8::MAX);
        Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, self.net, third, fourth)),
            0,
        ))
    }
}

/// Latencies (microseconds) and errors of one phase.
struct Stats {
    hist: Histogram<u64>,
    /// Second histogram (time until the callee rings, in the dial phase).
    hist2: Histogram<u64>,
    errors: u64,
    first_errors: Vec<String>,
    /// Paced operations that started over 2 ms after their slot.
    late: u64,
}

impl Stats {
    fn new() -> Result<Stats> {
        Ok(Stats {
            hist: new_hist()?,
            hist2: new_hist()?,
            errors: 0,
            first_errors: Vec::new(),
            late: 0,
        })
    }

    fn error(&mut self, e: &anyhow::Error) {
        self.errors += 1;
        if self.first_errors.len() < 5 {
            self.first_errors.push(format!("{e:#}"));
        }
    }

    fn merge(&mut self, other: Stats) -> Result<()> {
        self.hist
            .add(&other.hist)
            .map_err(|e| anyhow!("cannot merge histograms: {e:?}"))?;
        self.hist2
            .add(&other.hist2)
            .map_err(|e| anyhow!("cannot merge histograms: {e:?}"))?;
        self.errors += other.errors;
        self.late += other.late;
        for e in other.first_errors {
            if self.first_errors.len() < 5 {
                self.first_errors.push(e);
            }
        }
        Ok(())
    }

    fn print_errors(&self, phase: &str) {
        if self.errors > 0 {
            println!("    {phase}: {} errors; first ones:", self.errors);
            for e in &self.first_errors {
                println!("      - {e}");
            }
        }
    }
}

fn new_hist() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| anyhow!("cannot create a histogram: {e:?}"))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Quantiles of a latency histogram, in milliseconds.
struct Quantiles {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Quantiles {
    fn of(h: &Histogram<u64>) -> Quantiles {
        Quantiles {
            p50: ms(h.value_at_quantile(0.50)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }

    fn line(&self) -> String {
        format!(
            "p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
            self.p50, self.p99, self.p999, self.max
        )
    }
}

/// The figures, for the JSON line.
#[derive(Default)]
struct Figures {
    fields: Vec<(String, String)>,
}

impl Figures {
    fn num(&mut self, key: &str, v: f64) {
        let text = if v.is_finite() {
            format!("{v:.3}")
        } else {
            "null".into()
        };
        self.fields.push((key.into(), text));
    }

    fn int(&mut self, key: &str, v: u64) {
        self.fields.push((key.into(), v.to_string()));
    }

    fn json(&self) -> String {
        let body: Vec<String> = self
            .fields
            .iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        format!("{{{}}}", body.join(","))
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (soft, hard) = raise_fd_limit()?;
    let margin = args.concurrency.max(args.cached_concurrency) + 100;
    let needed = args.tvs + margin;
    ensure!(
        u64::try_from(needed).unwrap_or(u64::MAX) <= soft,
        "--tvs {} needs about {needed} file descriptors ({} TVs + {margin} for short-lived \
         connections and files), but this process may open only {soft} (hard limit {hard}, \
         which an unprivileged process cannot raise); lower --tvs or --concurrency",
        args.tvs,
        args.tvs
    );
    ensure!(args.tvs >= 2, "--tvs must be at least 2");
    ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    ensure!(args.dial_pairs >= 1, "--dial-pairs must be at least 1");
    ensure!(
        args.cached_concurrency >= 1,
        "--cached-concurrency must be at least 1"
    );
    ensure!(
        args.offline_targets >= 1,
        "--offline-targets must be at least 1"
    );
    ensure!(
        args.per_source_ip >= 1,
        "--per-source-ip must be at least 1"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    println!(
        "machine: {} CPUs ({}); load generator: {} worker thread(s); open-file limit {soft} \
         (hard {hard})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        args.threads.max(1)
    );
    runtime.block_on(run(args))
}

/// Raises the soft open-file limit to the hard one; returns (soft, hard) after.
#[allow(unsafe_code)]
fn raise_fd_limit() -> Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed in, which
    // lives for the whole call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!(
                "getrlimit(RLIMIT_NOFILE) failed: {}",
                std::io::Error::last_os_error()
            );
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Asks a process to stop the way an operator does.
#[allow(unsafe_code)]
fn sigterm(pid: u32) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("process id out of range")?;
    // SAFETY: kill only sends a signal to the given process id (our own child).
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc != 0 {
        bail!(
            "cannot send SIGTERM to {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Resident memory of a process, in bytes.
fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .with_context(|| format!("no VmRSS line in {path}"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("cannot parse {line:?}"))?;
    Ok(kb * 1024)
}

/// CPU time (user + system) a process has used so far, in seconds.
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces):
    // state is field 3; utime and stime are fields 14 and 15.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // /proc reports clock ticks of USER_HZ, which is 100 on Linux.
    Some(ticks as f64 / 100.0)
}

/// Busy CPU time of the whole machine so far (all CPUs; not idle, not waiting for I/O),
/// in seconds.
fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is counted in user).
    let busy: u64 = v.iter().take(8).sum::<u64>() - v.get(3)? - v.get(4)?;
    Some(busy as f64 / 100.0)
}

/// CPU used by the server, by this program, and by everything else on the machine
/// during a phase (the last shows whether something else disturbed the measurement).
struct CpuMeter {
    server: Option<u32>,
    server_start: Option<f64>,
    own_start: Option<f64>,
    machine_start: Option<f64>,
}

impl CpuMeter {
    fn start(server: Option<u32>) -> CpuMeter {
        CpuMeter {
            server,
            server_start: server.and_then(|p| cpu_secs(&p.to_string())),
            own_start: cpu_secs("self"),
            machine_start: machine_busy_secs(),
        }
    }

    fn line(&self, wall: Duration) -> String {
        let wall = wall.as_secs_f64().max(1e-9);
        let server = self
            .server_start
            .zip(self.server.and_then(|p| cpu_secs(&p.to_string())))
            .map(|(a, b)| b - a);
        let own = self.own_start.zip(cpu_secs("self")).map(|(a, b)| b - a);
        let machine = self
            .machine_start
            .zip(machine_busy_secs())
            .map(|(a, b)| b - a);
        let others = match (machine, server, own) {
            (Some(m), Some(s), Some(o)) => Some((m - s - o).max(0.0)),
            (Some(m), None, Some(o)) => Some((m - o).max(0.0)),
            _ => None,
        };
        let used = |v: Option<f64>| match v {
            Some(v) => format!("{v:.2} s ({:.0}% of one core)", v / wall * 100.0),
            None => "not measured".to_string(),
        };
        format!(
            "CPU during the phase ({wall:.2} s wall, clock-tick resolution): server {}, load \
             generator {}, {} {}",
            used(server),
            used(own),
            if self.server.is_some() {
                "everything else (other processes, kernel work charged to none)"
            } else {
                "everything else (server included)"
            },
            used(others)
        )
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A server this program started; killed if still running when dropped.
struct SpawnedServer {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    log: PathBuf,
    stopped: bool,
}

impl SpawnedServer {
    fn start(args: &Args) -> Result<SpawnedServer> {
        let bin = match &args.server_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()
                .context("cannot find this executable")?
                .with_file_name("call-proxy-server"),
        };
        ensure!(
            bin.is_file(),
            "server binary {} not found (build it: cargo build --release -p call-proxy-server, \
             or pass --server-bin)",
            bin.display()
        );
        let base = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = base.join(format!("call-proxy-bench-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")
                .context("cannot find a free loopback port")?;
            probe.local_addr()?.port()
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = dir.join("server.log");
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let db = dir.join("bench.sqlite");
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--db")
            .arg(&db)
            .args(&args.server_args)
            .stdin(Stdio::null())
            .stdout(
                log_file
                    .try_clone()
                    .context("cannot duplicate the log file")?,
            )
            .stderr(log_file);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        println!(
            "spawned {} serve --listen {addr} --db {} {} (pid {}, log {})",
            bin.display(),
            db.display(),
            args.server_args.join(" "),
            child.id(),
            log.display()
        );
        Ok(SpawnedServer {
            child,
            addr,
            dir,
            log,
            stopped: false,
        })
    }

    /// Waits until the server completes a protocol handshake.
    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the server exited before accepting connections ({status}); log:\n{}",
                    self.log_tail(30)
                );
            }
            if let Ok(Ok(c)) = timeout(Duration::from_millis(500), Client::connect(self.addr)).await
            {
                drop(c);
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the server did not accept connections within 20 s; log:\n{}",
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits up to 60 s (then SIGKILL). Returns the exit description.
    async fn stop(&mut self) -> Result<String> {
        if let Some(status) = self.child.try_wait()? {
            self.stopped = true;
            bail!("the server had already exited ({status}) before the end of the run");
        }
        let started = Instant::now();
        sigterm(self.child.id())?;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.stopped = true;
                let took = started.elapsed();
                ensure!(
                    status.success(),
                    "the server exited with {status} after SIGTERM"
                );
                return Ok(format!(
                    "exited cleanly ({status}) {:.2} s after SIGTERM",
                    took.as_secs_f64()
                ));
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.stopped = true;
                bail!("the server did not stop within 60 s of SIGTERM; killed");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Warning and error lines of the server's log.
    fn log_problems(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let mut spawned = match args.server {
        Some(_) => None,
        None => Some(SpawnedServer::start(&args)?),
    };
    let (server, pid) = match (&spawned, args.server) {
        (Some(s), _) => (s.addr, Some(s.child.id())),
        (None, Some(addr)) => (addr, args.server_pid),
        (None, None) => bail!("no server to test"),
    };
    if let Some(s) = spawned.as_mut() {
        s.wait_ready().await?;
    }
    let started = Instant::now();
    let result = phases(&args, server, pid).await;
    // The TVs stay connected until the server has stopped: the server then closes
    // first, so no TIME_WAIT sockets pile up on the load generator's source addresses,
    // and the shutdown is tested with every session open.
    let (result, tvs) = match result {
        Ok((errors, tvs)) => (Ok(errors), tvs),
        Err(e) => (Err(e), Vec::new()),
    };
    let mut problems = Vec::new();
    if let Some(mut s) = spawned {
        match s.stop().await {
            Ok(msg) => println!("server with {} TVs connected {msg}", tvs.len()),
            Err(e) => problems.push(format!("{e:#}")),
        }
        let warnings = s.log_problems();
        if warnings.is_empty() {
            println!("server log: no WARN or ERROR lines");
        } else {
            println!(
                "server log: {} WARN/ERROR lines; first ones:",
                warnings.len()
            );
            for w in warnings.iter().take(10) {
                println!("  {w}");
            }
        }
        if result.is_ok() && problems.is_empty() && !args.keep {
            let _ = std::fs::remove_dir_all(&s.dir);
        } else {
            println!("kept {} (database and server log)", s.dir.display());
            if result.is_err() {
                println!("server log tail:\n{}", s.log_tail(20));
            }
        }
    }
    drop(tvs);
    println!("total run time {:.1} s", started.elapsed().as_secs_f64());
    let errors = result?;
    if let Some(p) = problems.first() {
        bail!("{p}");
    }
    ensure!(
        errors == 0,
        "{errors} requests failed during the run (see above)"
    );
    Ok(())
}

/// Runs a phase within the phase time limit.
async fn bounded<T>(args: &Args, name: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
    let limit = Duration::from_secs(args.phase_timeout_secs);
    match timeout(limit, fut).await {
        Ok(r) => r.with_context(|| format!("phase {name:?} failed")),
        Err(_) => bail!(
            "phase {name:?} did not finish within {} s (--phase-timeout-secs)",
            limit.as_secs()
        ),
    }
}

/// All phases; returns how many requests failed, and the TVs, still connected.
async fn phases(args: &Args, server: SocketAddr, pid: Option<u32>) -> Result<(u64, Vec<Tv>)> {
    let req_t = Duration::from_secs(args.request_timeout_secs);
    let loopback = server.ip().is_loopback();
    // Fresh source addresses every run: 127.2-121.x.y for the TVs that stay connected,
    // 127.130-249.x.y for short-lived connections.
    let tv_sources = Sources {
        loopback,
        per_ip: args.per_source_ip,
        net: 2 + rand::random::<u8>() % 120,
    };
    let short_sources = Sources {
        net: 130 + rand::random::<u8>() % 120,
        ..tv_sources
    };
    let mut figures = Figures::default();
    let mut errors = 0u64;
    figures.int("tvs", args.tvs as u64);
    println!(
        "server {server}; {} TVs, {} in flight; {} dials over {} caller tasks; {} cached \
         calls over {} callers to {} offline users; boot fetch {} x {} calls",
        args.tvs,
        args.concurrency,
        args.dials,
        args.dial_pairs,
        args.cached,
        args.cached_concurrency,
        args.offline_targets,
        args.boot_samples,
        args.boot_calls
    );

    // 1. Baseline memory.
    let baseline = match pid {
        Some(pid) => {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let b = rss_bytes(pid)?;
            println!(
                "[1] server RSS before any TV connects: {:.1} MiB ({b} bytes)",
                mib(b)
            );
            figures.int("rss_baseline_bytes", b);
            Some(b)
        }
        None => {
            println!("[1] server RSS: not measured (give --server-pid)");
            None
        }
    };

    // 2. Connect and register N TVs.
    let t0 = Instant::now();
    let cpu = CpuMeter::start(pid);
    let users: Vec<UserId> = (0..args.tvs as u64).map(|i| args.user_base + i).collect();
    let (tvs, reg_stats) = bounded(
        args,
        "register",
        register_many(
            server,
            tv_sources,
            users,
            args.concurrency,
            true,
            req_t,
            true,
        ),
    )
    .await?;
    let took = t0.elapsed();
    let mut tvs = tvs;
    ensure!(
        tvs.len() == args.tvs,
        "only {} of {} TVs registered",
        tvs.len(),
        args.tvs
    );
    let reg_rate = args.tvs as f64 / took.as_secs_f64();
    let rq = Quantiles::of(&reg_stats.hist);
    println!(
        "[2] registrations: {} TVs connected and registered in {:.3} s = {reg_rate:.0} \
         registrations/s",
        args.tvs,
        took.as_secs_f64()
    );
    println!(
        "    TCP connect + preamble exchange latency: {}",
        Quantiles::of(&reg_stats.hist2).line()
    );
    println!(
        "    Register request -> Registered reply latency: {}",
        rq.line()
    );
    println!("    {}", cpu.line(took));
    figures.num("registrations_per_s", reg_rate);
    figures.num("register_p99_ms", rq.p99);
    let mut last_alive = Instant::now();

    // 3. Memory with N idle TVs.
    if let (Some(pid), Some(base)) = (pid, baseline) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_bytes(pid)?;
        let per_tv = after.saturating_sub(base) as f64 / args.tvs as f64;
        println!(
            "[3] server RSS with {} idle TVs: {:.1} MiB ({after} bytes); per idle TV: \
             {per_tv:.0} bytes = {:.2} KiB",
            args.tvs,
            mib(after),
            per_tv / 1024.0
        );
        figures.int("rss_idle_bytes", after);
        figures.num("bytes_per_idle_tv", per_tv);
    } else {
        println!("[3] server memory per idle TV: not measured (give --server-pid)");
    }

    // 4. Dial latency with all N online.
    keep_alive(args, &mut tvs, &mut last_alive, req_t).await?;
    let pairs = args.dial_pairs.min(args.tvs / 2).max(1);
    let t0 = Instant::now();
    let cpu = CpuMeter::start(pid);
    let pace =
        (args.dial_rate > 0.0).then(|| Duration::from_secs_f64(pairs as f64 / args.dial_rate));
    let (back, st) = bounded(
        args,
        "dial",
        on_chunks(tvs, pairs, |k, chunk| {
            let count = share(args.dials, pairs, k);
            let pace = pace.map(|every| (t0 + every.mul_f64(k as f64 / pairs as f64), every));
            dial_task(chunk, count, req_t, pace)
        }),
    )
    .await?;
    tvs = back;
    let took = t0.elapsed();
    let dial_rate = args.dials as f64 / took.as_secs_f64();
    let dq = Quantiles::of(&st.hist);
    let rq = Quantiles::of(&st.hist2);
    println!(
        "[4] call set-up with {} TVs online, {pairs} concurrent callers, {}: {} dials (dial, \
         ringing, hang up) in {:.3} s = {dial_rate:.0} dials/s; {} errors",
        args.tvs,
        if pace.is_some() {
            format!(
                "paced at {} dials/s ({} dials started over 2 ms late)",
                args.dial_rate, st.late
            )
        } else {
            "closed loop".to_string()
        },
        args.dials,
        took.as_secs_f64(),
        st.errors
    );
    println!(
        "    dial -> Ringing reply latency ({} samples): {}",
        st.hist.len(),
        dq.line()
    );
    println!("    dial -> IncomingCall at the callee: {}", rq.line());
    println!("    {}", cpu.line(t0.elapsed()));
    st.print_errors("dial");
    errors += st.errors;
    figures.num("dial_p50_ms", dq.p50);
    figures.num("dial_p99_ms", dq.p99);
    figures.num("dial_p999_ms", dq.p999);
    figures.num("dial_max_ms", dq.max);
    figures.num("ring_p99_ms", rq.p99);
    figures.num("dials_per_s", dial_rate);
    figures.int("dial_errors", st.errors);
    figures.num("dial_rate_target", args.dial_rate);
    figures.int("dial_late", st.late);
    figures.int("dial_callers", pairs as u64);

    // 5. Cached calls per second.
    let target_base = 2_000_000_000 + u64::from(rand::random::<u32>() % 1_000_000) * 10_000;
    let targets: Vec<UserId> = (0..args.offline_targets as u64)
        .map(|i| target_base + i)
        .collect();
    let (_, st) = bounded(
        args,
        "offline targets",
        register_many(
            server,
            short_sources,
            targets.clone(),
            args.concurrency,
            false,
            req_t,
            false,
        ),
    )
    .await?;
    ensure!(
        st.errors == 0,
        "{} offline targets failed to register",
        st.errors
    );
    keep_alive(args, &mut tvs, &mut last_alive, req_t).await?;
    let callers = args.cached_concurrency.min(tvs.len());
    let targets = Arc::new(targets);
    let t0 = Instant::now();
    let cpu = CpuMeter::start(pid);
    let (back, st) = bounded(
        args,
        "cached",
        on_chunks(tvs, callers, |k, chunk| {
            let count = share(args.cached, callers, k);
            let offset = (0..k).map(|j| share(args.cached, callers, j)).sum();
            cached_task(chunk, count, 0, Arc::clone(&targets), offset, req_t)
        }),
    )
    .await?;
    tvs = back;
    let took = t0.elapsed();
    let cached_rate = args.cached as f64 / took.as_secs_f64();
    let cq = Quantiles::of(&st.hist);
    println!(
        "[5] cached calls: {} dials to {} offline users from {callers} concurrent callers in \
         {:.3} s = {cached_rate:.0} durably cached calls/s; {} errors",
        args.cached,
        args.offline_targets,
        took.as_secs_f64(),
        st.errors
    );
    println!("    dial -> Cached reply latency: {}", cq.line());
    println!("    {}", cpu.line(t0.elapsed()));
    st.print_errors("cached");
    errors += st.errors;
    figures.num("cached_per_s", cached_rate);
    figures.num("cached_p99_ms", cq.p99);
    figures.int("cached_errors", st.errors);

    // 6. Boot fetch.
    let mut boot = new_hist()?;
    let mut boot_ack = new_hist()?;
    let boot_base = 3_000_000_000 + u64::from(rand::random::<u32>() % 1_000_000) * 1_000;
    let fill = args.cached_concurrency.min(args.boot_calls).max(1);
    let mut boot_errors = 0u64;
    for s in 0..args.boot_samples {
        keep_alive(args, &mut tvs, &mut last_alive, req_t).await?;
        let user = boot_base + s as u64;
        let (_, st) =
            register_many(server, short_sources, vec![user], 1, false, req_t, false).await?;
        ensure!(st.errors == 0, "boot user {user} failed to register");
        let target = Arc::new(vec![user]);
        let (back, st) = bounded(
            args,
            "boot fill",
            on_chunks(tvs, fill, |k, chunk| {
                let count = share(args.boot_calls, fill, k);
                cached_task(chunk, count, s, Arc::clone(&target), 0, req_t)
            }),
        )
        .await?;
        tvs = back;
        st.print_errors("boot fill");
        errors += st.errors;
        ensure!(
            st.errors == 0,
            "could not cache {} calls for boot user {user}",
            args.boot_calls
        );
        match bounded(
            args,
            "boot fetch",
            boot_sample(server, short_sources, user, args.boot_calls, req_t),
        )
        .await
        {
            Ok((fetch, ack)) => {
                boot.saturating_record(micros(fetch));
                boot_ack.saturating_record(micros(ack));
            }
            Err(e) => {
                boot_errors += 1;
                println!("    boot sample {s}: {e:#}");
            }
        }
    }
    errors += boot_errors;
    if boot.is_empty() {
        println!("[6] boot fetch: no successful samples");
    } else {
        println!(
            "[6] boot fetch of {} cached calls ({} samples, {boot_errors} failed): register sent \
             -> all calls received: p50 {:.3} ms, max {:.3} ms",
            args.boot_calls,
            boot.len(),
            ms(boot.value_at_quantile(0.5)),
            ms(boot.max())
        );
        println!(
            "    register sent -> all calls received and acknowledged: p50 {:.3} ms, max {:.3} ms",
            ms(boot_ack.value_at_quantile(0.5)),
            ms(boot_ack.max())
        );
        figures.num("boot_fetch_p50_ms", ms(boot.value_at_quantile(0.5)));
        figures.num("boot_fetch_max_ms", ms(boot.max()));
        figures.num("boot_fetch_ack_p50_ms", ms(boot_ack.value_at_quantile(0.5)));
        figures.num("boot_fetch_ack_max_ms", ms(boot_ack.max()));
    }
    figures.int("boot_errors", boot_errors);

    if let Some(pid) = pid {
        let end = rss_bytes(pid)?;
        println!(
            "    server RSS at the end with {} TVs still connected: {:.1} MiB",
            tvs.len(),
            mib(end)
        );
        figures.int("rss_end_bytes", end);
    }
    figures.int("errors", errors);
    if args.json {
        println!("{}", figures.json());
    }
    Ok((errors, tvs))
}

/// Item `k`'s share of `total` split over `parts`.
fn share(total: usize, parts: usize, k: usize) -> usize {
    total / parts + usize::from(k < total % parts)
}

/// Sends a heartbeat on every TV when the last one is getting old, so the server does
/// not time idle TVs out during a long run.
async fn keep_alive(
    args: &Args,
    tvs: &mut Vec<Tv>,
    last: &mut Instant,
    req_t: Duration,
) -> Result<()> {
    if last.elapsed() < Duration::from_secs(30) {
        return Ok(());
    }
    let all = std::mem::take(tvs);
    let (back, st) = bounded(
        args,
        "heartbeat",
        on_chunks(all, args.concurrency, |_, mut chunk| async move {
            let mut st = match Stats::new() {
                Ok(st) => st,
                Err(e) => return (chunk, Err(e)),
            };
            for tv in &mut chunk {
                if let Err(e) = request(&mut tv.client, Request::Heartbeat, req_t).await {
                    st.error(&e.context(format!("heartbeat of {}", tv.user)));
                }
                let _ = tv.client.queued_events();
            }
            (chunk, Ok(st))
        }),
    )
    .await?;
    *tvs = back;
    *last = Instant::now();
    st.print_errors("heartbeat");
    ensure!(st.errors == 0, "{} heartbeats failed", st.errors);
    Ok(())
}

/// One request with a time limit.
async fn request(client: &mut Client, req: Request, t: Duration) -> Result<Reply> {
    match timeout(t, client.request(req)).await {
        Ok(r) => Ok(r?),
        Err(_) => bail!("no reply within {} s", t.as_secs()),
    }
}

/// Connects and registers `users` with `conc` in flight. `keep`: keep the connections
/// (else say Bye, leaving the users offline). Every failure is an error of the phase.
async fn register_many(
    server: SocketAddr,
    sources: Sources,
    users: Vec<UserId>,
    conc: usize,
    keep: bool,
    req_t: Duration,
    fail_fast: bool,
) -> Result<(Vec<Tv>, Stats)> {
    let n = users.len();
    let users = Arc::new(users);
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..conc.clamp(1, n.max(1)) {
        let users = Arc::clone(&users);
        let next = Arc::clone(&next);
        set.spawn(async move {
            let mut out = Vec::new();
            let mut st = Stats::new()?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&user) = users.get(i) else { break };
                match register_one(server, sources.for_index(i), user, i, req_t).await {
                    Ok((client, connect, took)) => {
                        st.hist.saturating_record(micros(took));
                        st.hist2.saturating_record(micros(connect));
                        if keep {
                            out.push((i, Tv { user, client }));
                        } else if let Err(e) =
                            request_bye(client, req_t).await.context("bye failed")
                        {
                            st.error(&e.context(format!("user {user}")));
                        }
                    }
                    Err(e) if fail_fast => return Err(e),
                    Err(e) => st.error(&e),
                }
            }
            anyhow::Ok((out, st))
        });
    }
    let mut all = Vec::with_capacity(if keep { n } else { 0 });
    let mut stats = Stats::new()?;
    while let Some(joined) = set.join_next().await {
        let (out, st) = joined.context("a registration task panicked")??;
        all.extend(out);
        stats.merge(st)?;
    }
    all.sort_by_key(|(i, _)| *i);
    Ok((all.into_iter().map(|(_, tv)| tv).collect(), stats))
}

async fn register_one(
    server: SocketAddr,
    local: Option<SocketAddr>,
    user: UserId,
    i: usize,
    req_t: Duration,
) -> Result<(Client, Duration, Duration)> {
    let t0 = Instant::now();
    let mut client = match timeout(req_t, Client::connect_from(local, server)).await {
        Ok(r) => r.with_context(|| {
            format!(
                "TV {user}: cannot connect to {server} from {}",
                local.map_or_else(|| "any address".into(), |l| l.ip().to_string())
            )
        })?,
        Err(_) => bail!(
            "TV {user}: connect + preamble took over {} s",
            req_t.as_secs()
        ),
    };
    let port = u16::try_from(10_000 + i % 50_000).unwrap_or(5004);
    let t = Instant::now();
    match timeout(req_t, client.register(user, port)).await {
        Ok(r) => {
            r.with_context(|| format!("TV {user}: register failed"))?;
        }
        Err(_) => bail!(
            "TV {user}: no reply to register within {} s",
            req_t.as_secs()
        ),
    }
    Ok((client, t.duration_since(t0), t.elapsed()))
}

async fn request_bye(mut client: Client, req_t: Duration) -> Result<()> {
    match request(&mut client, Request::Bye, req_t).await? {
        Reply::Done => Ok(()),
        other => bail!("Bye answered {other:?}"),
    }
}

/// Splits `tvs` into `parts` contiguous chunks, runs `f` on each concurrently, and puts
/// the TVs back together in their order. `f` returns its TVs with its result.
async fn on_chunks<F, Fut>(tvs: Vec<Tv>, parts: usize, f: F) -> Result<(Vec<Tv>, Stats)>
where
    F: Fn(usize, Vec<Tv>) -> Fut,
    Fut: Future<Output = (Vec<Tv>, Result<Stats>)> + Send + 'static,
{
    let n = tvs.len();
    let parts = parts.clamp(1, n.max(1));
    let mut rest = tvs;
    let mut chunks = Vec::with_capacity(parts);
    for k in (0..parts).rev() {
        let size = share(n, parts, k);
        let tail = rest.split_off(rest.len() - size);
        chunks.push((k, tail));
    }
    let mut set = JoinSet::new();
    for (k, chunk) in chunks {
        let fut = f(k, chunk);
        set.spawn(async move {
            let (tvs, r) = fut.await;
            (k, tvs, r)
        });
    }
    let mut done = Vec::with_capacity(parts);
    let mut stats = Stats::new()?;
    let mut first_err = None;
    while let Some(joined) = set.join_next().await {
        let (k, tvs, r) = joined.context("a load task panicked")?;
        match r {
            Ok(st) => stats.merge(st)?,
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
        done.push((k, tvs));
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    done.sort_by_key(|(k, _)| *k);
    let mut all = Vec::with_capacity(n);
    for (_, tvs) in done {
        all.extend(tvs);
    }
    Ok((all, stats))
}

/// Two distinct elements of a slice, mutably.
fn pair_mut(tvs: &mut [Tv], a: usize, b: usize) -> Option<(&mut Tv, &mut Tv)> {
    if a == b || a >= tvs.len() || b >= tvs.len() {
        return None;
    }
    if a < b {
        let (x, y) = tvs.split_at_mut(b);
        Some((&mut x[a], &mut y[0]))
    } else {
        let (x, y) = tvs.split_at_mut(a);
        Some((&mut y[0], &mut x[b]))
    }
}

/// Dials `count` times over consecutive pairs of this chunk's TVs: each TV in turn
/// calls the next one, waits for `Ringing`, and hangs up; the callee's events
/// (IncomingCall, CallEnded, ...) are read so that nothing piles up.
///
/// `pace`: (first slot, interval): dial on that schedule. Latency is counted from the
/// moment the dial is sent (the timer wakes up to a millisecond after a slot, which is
/// the load generator's, not the server's); dials that start over 2 ms late, because the
/// previous call of the task overran its slot, are counted in `late`.
async fn dial_task(
    mut tvs: Vec<Tv>,
    count: usize,
    req_t: Duration,
    pace: Option<(Instant, Duration)>,
) -> (Vec<Tv>, Result<Stats>) {
    let mut st = match Stats::new() {
        Ok(st) => st,
        Err(e) => return (tvs, Err(e)),
    };
    let l = tvs.len();
    if l < 2 {
        return (tvs, Err(anyhow!("a dial task needs at least two TVs")));
    }
    for j in 0..count {
        let Some((caller, callee)) = pair_mut(&mut tvs, j % l, (j + 1) % l) else {
            break;
        };
        if let Some((first, every)) = pace {
            let slot = first + every.mul_f64(j as f64);
            tokio::time::sleep_until(slot.into()).await;
            if slot.elapsed() > Duration::from_millis(2) {
                st.late += 1;
            }
        }
        match one_dial(caller, callee, req_t).await {
            Ok((dial, ring)) => {
                st.hist.saturating_record(micros(dial));
                st.hist2.saturating_record(micros(ring));
            }
            Err(e) => {
                st.error(&e);
                if st.errors > 100 {
                    break;
                }
            }
        }
    }
    (tvs, Ok(st))
}

/// Reads events until one matches (discarding the others).
async fn wait_event(client: &mut Client, pred: impl Fn(&Event) -> bool) -> Result<Event> {
    loop {
        let e = client.next_event().await?;
        if pred(&e) {
            return Ok(e);
        }
    }
}

/// One call set-up: returns (dial -> Ringing reply, dial -> IncomingCall at the callee).
async fn one_dial(
    caller: &mut Tv,
    callee: &mut Tv,
    req_t: Duration,
) -> Result<(Duration, Duration)> {
    let _ = caller.client.queued_events();
    let _ = callee.client.queued_events();
    let (from, to) = (caller.user, callee.user);
    let start = Instant::now();
    let dial = async {
        let r = caller.client.request(Request::Dial { callee: to }).await;
        (r, start.elapsed())
    };
    let ring = async {
        let r = wait_event(
            &mut callee.client,
            |e| matches!(e, Event::IncomingCall { caller, .. } if *caller == from),
        )
        .await;
        (r, start.elapsed())
    };
    let both = async {
        tokio::pin!(dial);
        tokio::pin!(ring);
        let mut dialed = None;
        let mut rang = None;
        while dialed.is_none() || rang.is_none() {
            tokio::select! {
                (r, took) = &mut dial, if dialed.is_none() => {
                    let reply = r.with_context(|| format!("dial {from} -> {to} failed"))?;
                    match reply {
                        Reply::Dial(DialOutcome::Ringing { call_id, .. }) => {
                            dialed = Some((call_id, took));
                        }
                        other => bail!("dial {from} -> {to} answered {other:?}, not Ringing"),
                    }
                }
                (r, took) = &mut ring, if rang.is_none() => {
                    let e = r.with_context(|| format!("callee {to} failed while ringing"))?;
                    rang = Some((e, took));
                }
            }
        }
        match (dialed, rang) {
            (Some(d), Some(r)) => anyhow::Ok((d, r)),
            _ => bail!("dial {from} -> {to}: incomplete"),
        }
    };
    let ((call_id, dial_took), (incoming, ring_took)) = match timeout(req_t, both).await {
        Ok(r) => r?,
        Err(_) => bail!(
            "dial {from} -> {to}: no Ringing reply and IncomingCall within {} s",
            req_t.as_secs()
        ),
    };
    if let Event::IncomingCall { call_id: rung, .. } = incoming {
        ensure!(
            rung == call_id,
            "callee {to} rang for call {rung}, the caller was told {call_id}"
        );
    }
    match request(&mut caller.client, Request::HangUp { call_id }, req_t)
        .await
        .with_context(|| format!("hang up of call {call_id} failed"))?
    {
        Reply::Done => {}
        other => bail!("hang up of call {call_id} answered {other:?}"),
    }
    match timeout(
        req_t,
        wait_event(
            &mut callee.client,
            |e| matches!(e, Event::CallEnded { call_id: c, .. } if *c == call_id),
        ),
    )
    .await
    {
        Ok(r) => {
            r.with_context(|| format!("callee {to} failed waiting for the end of {call_id}"))?;
        }
        Err(_) => bail!(
            "callee {to} was not told call {call_id} ended within {} s",
            req_t.as_secs()
        ),
    }
    let _ = caller.client.queued_events();
    let _ = callee.client.queued_events();
    Ok((dial_took, ring_took))
}

/// Dials `count` offline users (round robin over `targets` from `offset`), rotating over
/// this chunk's TVs as callers from `start`; every reply must be `Cached`.
async fn cached_task(
    mut tvs: Vec<Tv>,
    count: usize,
    start: usize,
    targets: Arc<Vec<UserId>>,
    offset: usize,
    req_t: Duration,
) -> (Vec<Tv>, Result<Stats>) {
    let mut st = match Stats::new() {
        Ok(st) => st,
        Err(e) => return (tvs, Err(e)),
    };
    let l = tvs.len();
    if l == 0 || targets.is_empty() {
        return (tvs, Ok(st));
    }
    for j in 0..count {
        let tv = &mut tvs[(start * count + j) % l];
        let target = targets[(offset + j) % targets.len()];
        let t = Instant::now();
        let r = request(&mut tv.client, Request::Dial { callee: target }, req_t).await;
        let took = t.elapsed();
        let _ = tv.client.queued_events();
        match r {
            Ok(Reply::Dial(DialOutcome::Cached { .. })) => st.hist.saturating_record(micros(took)),
            Ok(other) => st.error(&anyhow!(
                "dial {} -> offline {target} answered {other:?}, not Cached",
                tv.user
            )),
            Err(e) => st.error(&e.context(format!("dial {} -> offline {target}", tv.user))),
        }
        if st.errors > 100 {
            break;
        }
    }
    (tvs, Ok(st))
}

/// A TV with `calls` cached calls switches on: time from sending Register to holding
/// every cached call, and to having acknowledged them.
async fn boot_sample(
    server: SocketAddr,
    sources: Sources,
    user: UserId,
    calls: usize,
    req_t: Duration,
) -> Result<(Duration, Duration)> {
    let local = sources.for_index(0);
    let mut client = match timeout(req_t, Client::connect_from(local, server)).await {
        Ok(r) => r.context("boot TV cannot connect")?,
        Err(_) => bail!("boot TV: connect took over {} s", req_t.as_secs()),
    };
    let deadline = req_t * 3;
    let (reg, fetched, ids, fetch_took, acked, ack_took) = match timeout(deadline, async {
        let t0 = Instant::now();
        let reg = client.register(user, 5004).await?;
        let fetched = client.fetch_all_cached().await?;
        let fetch_took = t0.elapsed();
        let ids: Vec<u64> = fetched.iter().map(|c| c.call_id).collect();
        let acked = client.ack_cached(&ids).await?;
        let ack_took = t0.elapsed();
        anyhow::Ok((reg, fetched, ids, fetch_took, acked, ack_took))
    })
    .await
    {
        Ok(r) => r.with_context(|| format!("boot TV {user}"))?,
        Err(_) => bail!("boot TV {user}: no result within {} s", deadline.as_secs()),
    };
    ensure!(
        usize::try_from(reg.cached_waiting).ok() == Some(calls),
        "boot TV {user}: registration said {} cached calls wait, expected {calls}",
        reg.cached_waiting
    );
    ensure!(
        fetched.len() == calls,
        "boot TV {user}: fetched {} cached calls, expected {calls}",
        fetched.len()
    );
    ensure!(
        fetched.iter().all(|c| c.callee == user),
        "boot TV {user}: fetched a call for another user"
    );
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    ensure!(
        unique.len() == calls,
        "boot TV {user}: duplicate call ids fetched"
    );
    ensure!(
        usize::try_from(acked).ok() == Some(calls),
        "boot TV {user}: {acked} of {calls} calls newly acknowledged"
    );
    let again = timeout(req_t, client.fetch_all_cached())
        .await
        .map_err(|_| anyhow!("boot TV {user}: second fetch timed out"))??;
    ensure!(
        again.is_empty(),
        "boot TV {user}: {} calls still delivered after acknowledging",
        again.len()
    );
    request_bye(client, req_t).await?;
    Ok((fetch_took, ack_took))
}
