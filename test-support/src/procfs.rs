//! Readings from Linux's `/proc`: a process's CPU time and resident memory, the whole
//! machine's busy time, the CPU model, and [`CpuMeter`], which splits a benchmark
//! phase's CPU between the server, the load generator and everything else.

use std::time::Duration;

/// Clock ticks per second of `/proc` times (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// CPU time (user + system) process `pid` has used so far, in seconds; `pid` may be
/// `"self"`. `None` if it cannot be read.
pub fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces):
    // state is field 3; utime and stime are fields 14 and 15.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / USER_HZ)
}

/// CPU time the calling thread has used so far (nanosecond resolution, from
/// `/proc/thread-self/schedstat`); zero if it cannot be read.
pub fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// Resident memory of process `pid` (`VmRSS`), in bytes.
pub fn rss_bytes(pid: u32) -> std::io::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)?;
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| bad(format!("no VmRSS line in {path}")))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .map_err(|_| bad(format!("cannot parse {line:?} in {path}")))?;
    Ok(kb * 1024)
}

/// Busy CPU time of the whole machine so far (all CPUs; not idle, not waiting for I/O),
/// in seconds.
pub fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is counted in user).
    let busy: u64 = v.iter().take(8).sum::<u64>() - v.get(3)? - v.get(4)?;
    Some(busy as f64 / USER_HZ)
}

/// The CPU's model name as `/proc/cpuinfo` gives it.
pub fn cpu_model() -> String {
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

/// CPU used by the server, by this program, and by everything else on the machine
/// during a phase (the last shows whether something else disturbed the measurement).
#[derive(Debug, Clone)]
pub struct CpuMeter {
    /// The server's process id, if known.
    server: Option<u32>,
    /// Its CPU seconds at the start.
    server_start: Option<f64>,
    /// This process's CPU seconds at the start.
    own_start: Option<f64>,
    /// The machine's busy seconds at the start.
    machine_start: Option<f64>,
}

/// CPU seconds each part used since a [`CpuMeter`] started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuUse {
    /// The server, if its process id was given.
    pub server: Option<f64>,
    /// This process.
    pub own: Option<f64>,
    /// Everything else (with no server id: the server included).
    pub others: Option<f64>,
}

impl CpuMeter {
    /// Starts measuring now.
    pub fn start(server: Option<u32>) -> CpuMeter {
        CpuMeter {
            server,
            server_start: server.and_then(|p| cpu_secs(&p.to_string())),
            own_start: cpu_secs("self"),
            machine_start: machine_busy_secs(),
        }
    }

    /// CPU seconds used since the start.
    pub fn used(&self) -> CpuUse {
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
        CpuUse {
            server,
            own,
            others,
        }
    }

    /// One line for people: each part's CPU seconds and share of one core over `wall`.
    pub fn line(&self, wall: Duration) -> String {
        let wall = wall.as_secs_f64().max(1e-9);
        let u = self.used();
        let used = |v: Option<f64>| match v {
            Some(v) => format!("{v:.2} s ({:.0}% of one core)", v / wall * 100.0),
            None => "not measured".to_string(),
        };
        format!(
            "CPU during the phase ({wall:.2} s wall, clock-tick resolution): server {}, load \
             generator {}, {} {}",
            used(u.server),
            used(u.own),
            if self.server.is_some() {
                "everything else (other processes, kernel work charged to none)"
            } else {
                "everything else (server included)"
            },
            used(u.others)
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn own_process_readings_are_plausible() {
        let pid = std::process::id();
        let rss = rss_bytes(pid).unwrap();
        assert!(
            rss > 100 * 1024,
            "a test process uses more than 100 KiB: {rss}"
        );
        let before = cpu_secs("self").unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(150) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let after = cpu_secs(&pid.to_string()).unwrap();
        assert!(
            after >= before + 0.05,
            "150 ms of spinning shows: {before} -> {after}"
        );
        assert!(machine_busy_secs().unwrap() > 0.0);
        assert!(cpu_secs("999999999").is_none());
    }
}
