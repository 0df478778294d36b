//! Ring timeouts: which ringing call's timer task is armed, and the rules that keep the
//! timers in step with the calls.
//!
//! The timer task itself is spawned by the dial handler (`handler/dial.rs`): it sleeps
//! on `tokio::time` (so a test can pause and advance the clock), then calls
//! [`Registry::ring_timeout`](super::Registry::ring_timeout) and, if that ended the
//! call, records the end in the database. That follow-up awaits the store, which the
//! registry must never do, so the task lives outside; the registry only keeps its
//! [`AbortHandle`] here. Rules, applied by the façade under its lock:
//! - a timer is armed only for a call that is `Ringing` (arming any other aborts it);
//! - every step that leaves `Ringing` another way (answer, reject, hang-up, a lost
//!   party, shutdown) disarms it, which aborts the task;
//! - the timeout firing forgets the handle *without* aborting it, for the task that
//!   fired is the one still running and has the end to record.

use std::collections::HashMap;

use shared_proto::CallId;
use tokio::task::AbortHandle;

/// Armed ring-timeout tasks, by call.
#[derive(Debug, Default)]
pub struct RingTimers {
    /// The running timer task of each ringing call that has one.
    armed: HashMap<CallId, AbortHandle>,
}

impl RingTimers {
    /// Arms `call_id`'s timer; one armed earlier for the same call is aborted.
    pub fn arm(&mut self, call_id: CallId, timer: AbortHandle) {
        if let Some(old) = self.armed.insert(call_id, timer) {
            old.abort();
        }
    }

    /// The call stopped ringing another way: abort its timer, if any.
    pub fn disarm(&mut self, call_id: CallId) {
        if let Some(t) = self.armed.remove(&call_id) {
            t.abort();
        }
    }

    /// The call's timer fired: forget it without aborting the (running) task.
    pub fn fired(&mut self, call_id: CallId) {
        self.armed.remove(&call_id);
    }

    /// Number of armed timers.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.armed.len()
    }
}

#[cfg(test)]
mod tests {
    use std::future::pending;
    use std::sync::Arc;
    use std::time::Duration;

    use shared_proto::{EndReason, Event, ServerMsg};
    use tokio::task::JoinHandle;

    use super::super::testing::{next_event, ringing_call, session};
    use super::super::{DialPlan, Registry};
    use super::*;
    use crate::storage::Outcome;

    /// Upper bound for anything these tests wait for.
    const BOUND: Duration = Duration::from_secs(5);

    /// A task that never ends by itself.
    fn forever() -> JoinHandle<()> {
        tokio::spawn(pending::<()>())
    }

    async fn cancelled(task: JoinHandle<()>) -> bool {
        match tokio::time::timeout(BOUND, task).await {
            Ok(Err(e)) => e.is_cancelled(),
            _ => false,
        }
    }

    #[tokio::test]
    async fn disarm_aborts_and_fired_does_not() {
        let mut timers = RingTimers::default();
        let (a, b) = (forever(), forever());
        timers.arm(1, a.abort_handle());
        timers.arm(2, b.abort_handle());
        assert_eq!(timers.len(), 2);
        timers.disarm(1);
        assert!(cancelled(a).await);
        timers.fired(2);
        assert_eq!(timers.len(), 0);
        tokio::task::yield_now().await;
        assert!(!b.is_finished(), "a fired timer's task keeps running");
        b.abort();
    }

    #[tokio::test]
    async fn rearming_aborts_the_earlier_timer() {
        let mut timers = RingTimers::default();
        let (a, b) = (forever(), forever());
        timers.arm(1, a.abort_handle());
        timers.arm(1, b.abort_handle());
        assert!(cancelled(a).await);
        assert_eq!(timers.len(), 1);
        timers.disarm(1);
        assert!(cancelled(b).await);
    }

    #[tokio::test]
    async fn only_ringing_calls_keep_a_timer_and_answering_aborts_it() {
        let reg = Registry::new(0, 0);
        let (sa, _ra) = session(&reg, 1);
        let (sb, _rb) = session(&reg, 2);
        let DialPlan::Ring { call_id } = reg.plan_dial(1, sa, 2, 0).expect("plan") else {
            panic!("expected ring")
        };
        let early = forever();
        reg.set_timer(call_id, early.abort_handle());
        assert!(cancelled(early).await, "not ringing yet: aborted at once");
        reg.start_ringing(call_id);
        let timer = forever();
        reg.set_timer(call_id, timer.abort_handle());
        reg.answer(2, sb, call_id, 1).expect("answer");
        assert!(cancelled(timer).await, "answering cancels the ring timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_task_like_the_dials_ends_the_call_with_no_answer() {
        let reg = Arc::new(Registry::new(0, 0));
        let (call_id, mut ra, mut rb) = ringing_call(&reg, 1, 2);
        let task_reg = Arc::clone(&reg);
        let timer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let ended = task_reg.ring_timeout(call_id);
            // Still running after the registry forgot the handle: the end is recorded here.
            tokio::task::yield_now().await;
            assert_eq!(ended.map(|e| e.outcome), Some(Outcome::Missed));
        });
        reg.set_timer(call_id, timer.abort_handle());
        tokio::time::timeout(BOUND, timer)
            .await
            .expect("fires in time")
            .expect("not aborted by its own firing");
        assert_eq!(reg.live_calls(), 0);
        let no_answer = Some(ServerMsg::Event(Event::CallEnded {
            call_id,
            reason: EndReason::NoAnswer,
        }));
        assert_eq!(next_event(&mut ra), no_answer);
        assert_eq!(next_event(&mut rb), no_answer);
    }

    #[test]
    fn ring_timeout_only_ends_ringing_calls() {
        let reg = Registry::new(0, 0);
        let (sa, _ra) = session(&reg, 1);
        let (sb, _rb) = session(&reg, 2);
        let DialPlan::Ring { call_id } = reg.plan_dial(1, sa, 2, 0).expect("plan") else {
            panic!("expected ring")
        };
        assert_eq!(reg.ring_timeout(call_id), None, "not ringing yet");
        reg.start_ringing(call_id);
        reg.answer(2, sb, call_id, 1).expect("answer");
        assert_eq!(
            reg.ring_timeout(call_id),
            None,
            "answered calls do not time out"
        );
    }
}
