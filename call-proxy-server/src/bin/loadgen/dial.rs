//! Phase 4: call set-up latency with every TV online (dial, ringing, hang up over
//! pairs of registered TVs, closed loop or paced).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use shared_proto::{DialOutcome, Event, Reply, Request};
use tokio::time::timeout;

use test_support::procfs::CpuMeter;

use crate::args::Args;
use crate::bounded;
use crate::stats::{micros, Quantiles, Stats};
use crate::tvs::{on_chunks, pair_mut, request, share, wait_event, Tv};

/// What the dial phase measured.
pub(crate) struct Dials {
    /// Concurrent caller tasks.
    pub(crate) callers: usize,
    /// Target dials/s, if paced.
    pub(crate) paced: Option<f64>,
    /// Dials made.
    pub(crate) dials: usize,
    /// Wall time of the phase.
    pub(crate) took: Duration,
    /// Dial → `Ringing` reply.
    pub(crate) dial: Quantiles,
    /// Samples in `dial`.
    pub(crate) samples: u64,
    /// Dial → `IncomingCall` at the callee.
    pub(crate) ring: Quantiles,
    /// CPU split during the phase.
    pub(crate) cpu: String,
    /// Errors and late starts.
    pub(crate) stats: Stats,
}

impl Dials {
    /// Dials per second.
    pub(crate) fn rate(&self) -> f64 {
        self.dials as f64 / self.took.as_secs_f64()
    }
}

/// Sets up `--dials` calls over pairs of the registered TVs.
pub(crate) async fn run(
    args: &Args,
    tvs: Vec<Tv>,
    pid: Option<u32>,
    req_t: Duration,
) -> Result<(Vec<Tv>, Dials)> {
    let pairs = args.dial_pairs.min(args.tvs / 2).max(1);
    let t0 = Instant::now();
    let cpu = CpuMeter::start(pid);
    let pace =
        (args.dial_rate > 0.0).then(|| Duration::from_secs_f64(pairs as f64 / args.dial_rate));
    let (tvs, stats) = bounded(
        args,
        "dial",
        on_chunks(tvs, pairs, |k, chunk| {
            let count = share(args.dials, pairs, k);
            let pace = pace.map(|every| (t0 + every.mul_f64(k as f64 / pairs as f64), every));
            dial_task(chunk, count, req_t, pace)
        }),
    )
    .await?;
    let took = t0.elapsed();
    let figures = Dials {
        callers: pairs,
        paced: pace.map(|_| args.dial_rate),
        dials: args.dials,
        took,
        dial: Quantiles::of(&stats.hist),
        samples: stats.hist.len(),
        ring: Quantiles::of(&stats.hist2),
        cpu: cpu.line(t0.elapsed()),
        stats,
    };
    Ok((tvs, figures))
}

/// Dials `count` times over consecutive pairs of this chunk's TVs: each TV in turn
/// calls the next one, waits for `Ringing`, and hangs up; the callee's events
/// (IncomingCall, CallEnded, ...) are read so that nothing piles up.
///
/// `pace`: (first slot, interval): dial on that schedule. Latency is counted from the
/// moment the dial is sent (the timer wakes up to a millisecond after a slot, which is
/// the load generator's, not the server's); dials that start over 2 ms late, because the
/// previous call of the task overran its slot, are counted in `late`.
pub(crate) async fn dial_task(
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

/// One call set-up: returns (dial -> Ringing reply, dial -> IncomingCall at the callee).
pub(crate) async fn one_dial(
    caller: &mut Tv,
    callee: &mut Tv,
    req_t: Duration,
) -> Result<(Duration, Duration)> {
    let _ = caller.client.queued_events();
    let _ = callee.client.queued_events();
    let (from, to) = (caller.user, callee.user);
    let start = Instant::now();
    let dial = async {
        let r = caller
            .client
            .request(Request::Dial {
                callee: to,
                key: None,
                srtp: None,
                ice: None,
            })
            .await;
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
