//! Phase 2: connect and register `--tvs` TVs with `--concurrency` in flight, keeping
//! every connection open and idle (registrations/s).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use shared_proto::UserId;
use test_support::procfs::CpuMeter;

use crate::args::Args;
use crate::bounded;
use crate::stats::Quantiles;
use crate::tvs::{register_many, Sources, Tv};

/// What the registration phase measured.
pub(crate) struct Registrations {
    /// TVs registered (all of `--tvs`).
    pub(crate) tvs: usize,
    /// Wall time of the phase.
    pub(crate) took: Duration,
    /// TCP connect + preamble exchange.
    pub(crate) connect: Quantiles,
    /// `Register` → `Registered`.
    pub(crate) register: Quantiles,
    /// CPU split during the phase.
    pub(crate) cpu: String,
}

impl Registrations {
    /// Registrations per second.
    pub(crate) fn rate(&self) -> f64 {
        self.tvs as f64 / self.took.as_secs_f64()
    }
}

/// Registers every TV; fails if any registration fails.
pub(crate) async fn run(
    args: &Args,
    server: SocketAddr,
    sources: Sources,
    pid: Option<u32>,
    req_t: Duration,
) -> Result<(Vec<Tv>, Registrations)> {
    let t0 = Instant::now();
    let cpu = CpuMeter::start(pid);
    let users: Vec<UserId> = (0..args.tvs as u64).map(|i| args.user_base + i).collect();
    let (tvs, st) = bounded(
        args,
        "register",
        register_many(
            server,
            args.other_server,
            sources,
            users,
            args.concurrency,
            true,
            req_t,
            true,
        ),
    )
    .await?;
    let took = t0.elapsed();
    ensure!(
        tvs.len() == args.tvs,
        "only {} of {} TVs registered",
        tvs.len(),
        args.tvs
    );
    let figures = Registrations {
        tvs: tvs.len(),
        took,
        connect: Quantiles::of(&st.hist2),
        register: Quantiles::of(&st.hist),
        cpu: cpu.line(took),
    };
    Ok((tvs, figures))
}
