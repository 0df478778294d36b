//! The report: every figure is printed for people and kept for the JSON line here.

use std::net::SocketAddr;

use crate::args::Args;
use crate::boot::Boot;
use crate::cached::Cached;
use crate::dial::Dials;
use crate::register::Registrations;
use crate::stats::ms;

/// The figures, for the JSON line.
#[derive(Default)]
struct Figures {
    /// Name and JSON text of each figure, in the order measured.
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

/// The one printer of the run's figures: a few lines for people as each phase ends, and
/// the same figures in one JSON line at the end (`--json`).
#[derive(Default)]
pub(crate) struct Report {
    /// Everything printed so far, for the JSON line.
    figures: Figures,
}

/// Mebibytes, for people.
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl Report {
    /// The run's shape.
    pub(crate) fn start(&mut self, args: &Args, server: SocketAddr) {
        self.figures.int("tvs", args.tvs as u64);
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
    }

    /// [1] The server's memory before any TV connects.
    pub(crate) fn baseline_rss(&mut self, rss: Option<u64>) {
        match rss {
            Some(b) => {
                println!(
                    "[1] server RSS before any TV connects: {:.1} MiB ({b} bytes)",
                    mib(b)
                );
                self.figures.int("rss_baseline_bytes", b);
            }
            None => println!("[1] server RSS: not measured (give --server-pid)"),
        }
    }

    /// [2] Registrations.
    pub(crate) fn registrations(&mut self, r: &Registrations) {
        let rate = r.rate();
        println!(
            "[2] registrations: {} TVs connected and registered in {:.3} s = {rate:.0} \
             registrations/s",
            r.tvs,
            r.took.as_secs_f64()
        );
        println!(
            "    TCP connect + preamble exchange latency: {}",
            r.connect.line()
        );
        println!(
            "    Register request -> Registered reply latency: {}",
            r.register.line()
        );
        println!("    {}", r.cpu);
        self.figures.num("registrations_per_s", rate);
        self.figures.num("register_p99_ms", r.register.p99);
    }

    /// [3] The server's memory with every TV registered and idle: (before, after).
    pub(crate) fn idle_rss(&mut self, tvs: usize, rss: Option<(u64, u64)>) {
        let Some((base, after)) = rss else {
            println!("[3] server memory per idle TV: not measured (give --server-pid)");
            return;
        };
        let per_tv = after.saturating_sub(base) as f64 / tvs as f64;
        println!(
            "[3] server RSS with {tvs} idle TVs: {:.1} MiB ({after} bytes); per idle TV: \
             {per_tv:.0} bytes = {:.2} KiB",
            mib(after),
            per_tv / 1024.0
        );
        self.figures.int("rss_idle_bytes", after);
        self.figures.num("bytes_per_idle_tv", per_tv);
    }

    /// [4] Call set-up.
    pub(crate) fn dials(&mut self, tvs: usize, d: &Dials) {
        let rate = d.rate();
        println!(
            "[4] call set-up with {tvs} TVs online, {} concurrent callers, {}: {} dials (dial, \
             ringing, hang up) in {:.3} s = {rate:.0} dials/s; {} errors",
            d.callers,
            match d.paced {
                Some(target) => format!(
                    "paced at {target} dials/s ({} dials started over 2 ms late)",
                    d.stats.late
                ),
                None => "closed loop".to_string(),
            },
            d.dials,
            d.took.as_secs_f64(),
            d.stats.errors
        );
        println!(
            "    dial -> Ringing reply latency ({} samples): {}",
            d.samples,
            d.dial.line()
        );
        println!("    dial -> IncomingCall at the callee: {}", d.ring.line());
        println!("    {}", d.cpu);
        d.stats.print_errors("dial");
        let f = &mut self.figures;
        f.num("dial_p50_ms", d.dial.p50);
        f.num("dial_p99_ms", d.dial.p99);
        f.num("dial_p999_ms", d.dial.p999);
        f.num("dial_max_ms", d.dial.max);
        f.num("ring_p99_ms", d.ring.p99);
        f.num("dials_per_s", rate);
        f.int("dial_errors", d.stats.errors);
        f.num("dial_rate_target", d.paced.unwrap_or(0.0));
        f.int("dial_late", d.stats.late);
        f.int("dial_callers", d.callers as u64);
    }

    /// [5] Cached calls.
    pub(crate) fn cached(&mut self, args: &Args, c: &Cached) {
        let rate = args.cached as f64 / c.took.as_secs_f64();
        println!(
            "[5] cached calls: {} dials to {} offline users from {} concurrent callers in \
             {:.3} s = {rate:.0} durably cached calls/s; {} errors",
            args.cached,
            args.offline_targets,
            c.callers,
            c.took.as_secs_f64(),
            c.stats.errors
        );
        println!("    dial -> Cached reply latency: {}", c.latency.line());
        println!("    {}", c.cpu);
        c.stats.print_errors("cached");
        self.figures.num("cached_per_s", rate);
        self.figures.num("cached_p99_ms", c.latency.p99);
        self.figures.int("cached_errors", c.stats.errors);
    }

    /// [6] Boot fetch.
    pub(crate) fn boot(&mut self, args: &Args, b: &Boot) {
        if b.fetch.is_empty() {
            println!("[6] boot fetch: no successful samples");
        } else {
            println!(
                "[6] boot fetch of {} cached calls ({} samples, {} failed): register sent \
                 -> all calls received: p50 {:.3} ms, max {:.3} ms",
                args.boot_calls,
                b.fetch.len(),
                b.failed,
                ms(b.fetch.value_at_quantile(0.5)),
                ms(b.fetch.max())
            );
            println!(
                "    register sent -> all calls received and acknowledged: p50 {:.3} ms, max {:.3} ms",
                ms(b.fetch_ack.value_at_quantile(0.5)),
                ms(b.fetch_ack.max())
            );
            let f = &mut self.figures;
            f.num("boot_fetch_p50_ms", ms(b.fetch.value_at_quantile(0.5)));
            f.num("boot_fetch_max_ms", ms(b.fetch.max()));
            f.num(
                "boot_fetch_ack_p50_ms",
                ms(b.fetch_ack.value_at_quantile(0.5)),
            );
            f.num("boot_fetch_ack_max_ms", ms(b.fetch_ack.max()));
        }
        self.figures.int("boot_errors", b.failed);
    }

    /// The server's memory at the end, with the TVs still connected.
    /// The hold: TVs kept, for how long, heartbeat rounds, the server's memory then.
    pub(crate) fn held(&mut self, tvs: usize, secs: u64, rounds: u32, rss: Option<u64>) {
        match rss {
            Some(r) => println!(
                "    held {tvs} TVs for {secs} s, {rounds} heartbeat round(s) all answered; server RSS then {:.1} MiB",
                mib(r)
            ),
            None => println!(
                "    held {tvs} TVs for {secs} s, {rounds} heartbeat round(s) all answered"
            ),
        }
        self.figures.int("held_tvs", tvs as u64);
        self.figures.int("heartbeat_rounds", u64::from(rounds));
        if let Some(r) = rss {
            self.figures.int("rss_held_bytes", r);
        }
    }

    pub(crate) fn end_rss(&mut self, tvs: usize, rss: u64) {
        println!(
            "    server RSS at the end with {tvs} TVs still connected: {:.1} MiB",
            mib(rss)
        );
        self.figures.int("rss_end_bytes", rss);
    }

    /// The failed requests, and the JSON line if asked for.
    pub(crate) fn finish(&mut self, errors: u64, json: bool) {
        self.figures.int("errors", errors);
        if json {
            println!("{}", self.figures.json());
        }
    }
}
