//! The missed-call list: the cached calls presented since power-on (or kept in a file
//! across restarts), merged without duplicates, the newest [`MAX_MISSED_KEPT`] kept, and
//! the [`MissedKeeping`] policy that says when the server may be told they were delivered.
//!
//! Architecture invariant: nothing is acknowledged before it is shown or durably kept.
//! [`MissedList::after_fetch`] is the one place that decides it; `tests/kill_fetch.rs`
//! SIGKILLs `tv-agent missed` mid-fetch to prove it.

use std::path::PathBuf;

use super::types::{AgentError, MissedCall, MissedKeeping};

/// Most missed calls kept in the missed-call list (the oldest go first).
pub const MAX_MISSED_KEPT: usize = 200;
/// Largest missed-call file read at power-on.
const MAX_MISSED_FILE: u64 = 512 * 1024;

/// When the calls of a fetch may be acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckWhen {
    /// Once the list is written to this file (and the `CachedCalls` event sent); not if
    /// the write fails.
    AfterSaving(PathBuf),
    /// Once the `CachedCalls` event is sent (the presenter is in this process).
    AfterEmitting,
    /// Never by the agent: whoever shows them calls `Agent::shown`.
    ByPresenter,
}

/// The missed-call list and where it is kept.
#[derive(Debug)]
pub struct MissedList {
    /// Oldest first, at most [`MAX_MISSED_KEPT`].
    calls: Vec<MissedCall>,
    /// Where it is kept.
    keeping: MissedKeeping,
}

/// Drops the oldest missed calls beyond [`MAX_MISSED_KEPT`].
fn keep_newest(missed: &mut Vec<MissedCall>) {
    let excess = missed.len().saturating_sub(MAX_MISSED_KEPT);
    missed.drain(..excess);
}

impl MissedList {
    /// The list as kept: read from its file (missing: empty), or empty.
    pub fn load(keeping: MissedKeeping) -> anyhow::Result<Self> {
        let calls = match &keeping {
            MissedKeeping::File(path) => {
                let mut kept: Vec<MissedCall> = crate::files::read_json(path, MAX_MISSED_FILE)
                    .map_err(|e| {
                        anyhow::anyhow!("cannot read the missed calls {}: {e}", path.display())
                    })?;
                keep_newest(&mut kept);
                kept
            }
            MissedKeeping::WhenShown | MissedKeeping::Memory => Vec::new(),
        };
        Ok(MissedList { calls, keeping })
    }

    /// The calls, oldest first.
    pub fn calls(&self) -> &[MissedCall] {
        &self.calls
    }

    /// Adds newly presented calls (those not in the list yet) and keeps the newest.
    pub fn merge(&mut self, presented: &[MissedCall]) {
        for m in presented {
            if !self.calls.iter().any(|x| x.call_id == m.call_id) {
                self.calls.push(m.clone());
            }
        }
        keep_newest(&mut self.calls);
    }

    /// Empties the list (the caller saves it first).
    pub fn clear(&mut self) {
        self.calls.clear();
    }

    /// When the calls of a fetch may be acknowledged, by how the list is kept.
    pub fn after_fetch(&self) -> AckWhen {
        match &self.keeping {
            MissedKeeping::File(path) => AckWhen::AfterSaving(path.clone()),
            MissedKeeping::Memory => AckWhen::AfterEmitting,
            MissedKeeping::WhenShown => AckWhen::ByPresenter,
        }
    }

    /// Writes `calls` (the list as it is to be) to the list's file, if it has one,
    /// written and synced before returning.
    pub async fn save(&self, calls: Vec<MissedCall>) -> Result<(), AgentError> {
        let MissedKeeping::File(path) = &self.keeping else {
            return Ok(());
        };
        let path = path.clone();
        tokio::task::spawn_blocking(move || crate::files::write_json(&path, &calls))
            .await
            .map_err(|e| AgentError::Save(e.to_string()))?
            .map_err(|e| AgentError::Save(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::events::MissReason;

    fn call(id: u64) -> MissedCall {
        MissedCall {
            call_id: id,
            user_id: 2002,
            otheruser_id: 1001,
            call_date: "2026-01-01T00:00:00Z".into(),
            user_netstate: Some(1),
            reason: MissReason::Offline,
        }
    }

    #[test]
    fn merge_skips_known_calls_and_keeps_the_newest() {
        let mut l = MissedList::load(MissedKeeping::Memory).unwrap();
        l.merge(&[call(1), call(2)]);
        l.merge(&[call(2), call(3)]);
        let ids: Vec<u64> = l.calls().iter().map(|c| c.call_id).collect();
        assert_eq!(ids, [1, 2, 3]);
        let many: Vec<MissedCall> = (10..10 + MAX_MISSED_KEPT as u64).map(call).collect();
        l.merge(&many);
        assert_eq!(l.calls().len(), MAX_MISSED_KEPT);
        assert_eq!(l.calls()[0].call_id, 10, "the oldest went first");
        l.clear();
        assert!(l.calls().is_empty());
    }

    #[test]
    fn the_policy_never_acknowledges_before_keeping_or_showing() {
        let file = MissedKeeping::File("/nonexistent/x.json".into());
        assert_eq!(
            MissedList {
                calls: Vec::new(),
                keeping: file
            }
            .after_fetch(),
            AckWhen::AfterSaving("/nonexistent/x.json".into())
        );
        let shown = MissedList::load(MissedKeeping::WhenShown).unwrap();
        assert_eq!(shown.after_fetch(), AckWhen::ByPresenter);
        let mem = MissedList::load(MissedKeeping::Memory).unwrap();
        assert_eq!(mem.after_fetch(), AckWhen::AfterEmitting);
    }

    #[tokio::test]
    async fn a_file_list_is_saved_and_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missed.json");
        let keeping = MissedKeeping::File(path.clone());
        let mut l = MissedList::load(keeping.clone()).unwrap();
        assert!(l.calls().is_empty(), "no file yet: empty");
        l.merge(&[call(4), call(5)]);
        l.save(l.calls().to_vec()).await.unwrap();
        let again = MissedList::load(keeping).unwrap();
        assert_eq!(again.calls(), l.calls());
        // The JSON is the documented one.
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v[0]["reason"], "offline");
    }
}
