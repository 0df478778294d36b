//! Runs of like writes in a pipelined batch sent as one statement over arrays: a fleet
//! re-registering, or many callers leaving calls for TVs that are off, cost PostgreSQL a
//! few statements per run instead of two or three per write (each statement has a fixed
//! cost in PostgreSQL's backend that dwarfs the row's own).
//!
//! A run keeps the batch's meaning exactly: its writes are consecutive in the batch, so no
//! other write comes between them; each write's answer is worked out as if it had run
//! alone at its place (a cached call's count of waiting calls is the count before the run
//! plus the run's own inserts up to it). What one array statement cannot express, a run
//! does not hold: a user registering twice, or a caller's key used twice, starts a new run.
//! If anything in a run fails, the whole batch is applied again one write at a time
//! ([`super::one_by_one`]).

use std::collections::{HashMap, HashSet};

use deadpool_postgres::Object;
use tokio_postgres::Row;

use super::{
    ip_text, key_value, keyed_at, register_result, send_query, Done, Sent, Statements, WriteJob,
    KEY_LIFETIME_MS,
};
use crate::storage::{InsertResult, KeyedCall, StoreError};

/// Registrations with distinct users (creating unknown ones), as one upsert.
pub(super) fn registers_run(batch: &[WriteJob]) -> usize {
    let mut users = HashSet::new();
    batch
        .iter()
        .take_while(|j| match j {
            WriteJob::Register(reg, _) => reg.create_unknown && users.insert(reg.user_id),
            _ => false,
        })
        .count()
}

/// New call records with distinct (caller, key) pairs, as one insert.
pub(super) fn inserts_run(batch: &[WriteJob]) -> usize {
    let mut keys = HashSet::new();
    batch
        .iter()
        .take_while(|j| match j {
            WriteJob::Insert(call, key, _) => key.is_none_or(|k| keys.insert((call.caller, k))),
            _ => false,
        })
        .count()
}

/// A run's statements, sent; [`Run::finish`] reads their answers into each write's result.
pub(super) enum Run<'a> {
    /// Registrations: the upsert (the users it changed) and each user's state after it.
    Registers {
        users: Vec<i64>,
        elsewhere: Sent<'a, Vec<Row>>,
        changed: Sent<'a, Vec<Row>>,
        state: Sent<'a, Vec<Row>>,
    },
    /// New call records.
    Inserts {
        /// Per write: call id, caller, callee, missed kind, key.
        calls: Vec<(i64, i64, i64, bool, Option<i64>)>,
        /// Waiting calls of the missed-kind callees before the run.
        before: Option<Sent<'a, Vec<Row>>>,
        /// Keys past their lifetime given up.
        expire: Option<Sent<'a, u64>>,
        /// The ids inserted.
        inserted: Sent<'a, Vec<Row>>,
        /// The calls recorded under the run's keys, after it.
        keyed: Option<Sent<'a, Vec<Row>>>,
    },
}

/// Sends the registrations `jobs` (a [`registers_run`]) as one run.
pub(super) async fn send_registers<'a>(
    conn: &'a Object,
    s: &Statements,
    jobs: &[WriteJob],
    node: &str,
) -> Run<'a> {
    let mut users = Vec::with_capacity(jobs.len());
    let (mut ips, mut ports, mut sessions, mut versions, mut ats) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for job in jobs {
        if let WriteJob::Register(reg, _) = job {
            users.push(reg.user_id as i64);
            ips.push(ip_text(reg.ip));
            ports.push(i64::from(reg.media_port));
            sessions.push(reg.session_id as i64);
            versions.push(reg.agent_version.clone());
            ats.push(reg.at_ms);
        }
    }
    // Tells the nodes holding older sessions of these TVs (sent at commit).
    let elsewhere = send_query(
        conn,
        &s.replaced_elsewhere_many,
        vec![
            Box::new(users.clone()),
            Box::new(sessions.clone()),
            Box::new(node.to_string()),
        ],
    )
    .await;
    let changed = send_query(
        conn,
        &s.register_many,
        vec![
            Box::new(users.clone()),
            Box::new(ips),
            Box::new(ports),
            Box::new(sessions),
            Box::new(versions),
            Box::new(ats),
            Box::new(node.to_string()),
        ],
    )
    .await;
    let state = send_query(conn, &s.user_state_many, vec![Box::new(users.clone())]).await;
    Run::Registers {
        users,
        elsewhere,
        changed,
        state,
    }
}

/// Sends the new call records `jobs` (an [`inserts_run`]) as one run.
pub(super) async fn send_inserts<'a>(
    conn: &'a Object,
    s: &Statements,
    jobs: &[WriteJob],
    node: &str,
) -> Run<'a> {
    let mut calls = Vec::with_capacity(jobs.len());
    let (mut ats, mut outcomes, mut ips, mut keys) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut expiring: (Vec<i64>, Vec<i64>, Vec<i64>) = (Vec::new(), Vec::new(), Vec::new());
    let mut missed_callees = Vec::new();
    for job in jobs {
        if let WriteJob::Insert(call, key, _) = job {
            let key = key.map(key_value);
            let missed = call.outcome.is_missed_kind();
            calls.push((
                call.id as i64,
                call.caller as i64,
                call.callee as i64,
                missed,
                key,
            ));
            ats.push(call.at_ms);
            outcomes.push(call.outcome.as_str().to_string());
            ips.push(ip_text(call.caller_ip));
            keys.push(key);
            if let Some(k) = key {
                expiring.0.push(call.caller as i64);
                expiring.1.push(k);
                expiring.2.push(call.at_ms.saturating_sub(KEY_LIFETIME_MS));
            }
            if missed && !missed_callees.contains(&(call.callee as i64)) {
                missed_callees.push(call.callee as i64);
            }
        }
    }
    let before = if missed_callees.is_empty() {
        None
    } else {
        Some(send_query(conn, &s.waiting_many, vec![Box::new(missed_callees)]).await)
    };
    let (callers, key_values, cutoffs) = expiring;
    let expire = if callers.is_empty() {
        None
    } else {
        Some(
            super::send_exec(
                conn,
                &s.key_expire_many,
                vec![
                    Box::new(callers.clone()),
                    Box::new(key_values.clone()),
                    Box::new(cutoffs),
                ],
            )
            .await,
        )
    };
    let inserted = send_query(
        conn,
        &s.insert_many,
        vec![
            Box::new(calls.iter().map(|c| c.0).collect::<Vec<_>>()),
            Box::new(calls.iter().map(|c| c.1).collect::<Vec<_>>()),
            Box::new(calls.iter().map(|c| c.2).collect::<Vec<_>>()),
            Box::new(ats),
            Box::new(outcomes),
            Box::new(ips),
            Box::new(keys),
            Box::new(node.to_string()),
        ],
    )
    .await;
    let keyed = if callers.is_empty() {
        None
    } else {
        Some(
            send_query(
                conn,
                &s.keyed_many,
                vec![Box::new(callers), Box::new(key_values)],
            )
            .await,
        )
    };
    Run::Inserts {
        calls,
        before,
        expire,
        inserted,
        keyed,
    }
}

impl Run<'_> {
    /// Reads every answer of the run (in the order sent) and makes each write's result,
    /// in the run's order; any failure fails the run (and with it the pipelined batch).
    pub(super) async fn finish(self) -> Result<Vec<Done>, StoreError> {
        match self {
            Run::Registers {
                users,
                elsewhere,
                changed,
                state,
            } => {
                let elsewhere = elsewhere.answer().await;
                let changed = changed.answer().await;
                let state = state.answer().await;
                elsewhere?;
                let changed: HashSet<i64> = changed?
                    .iter()
                    .map(|r| r.try_get::<_, i64>(0))
                    .collect::<Result<_, _>>()?;
                let mut states = HashMap::new();
                for r in state? {
                    let user: i64 = r.try_get(0)?;
                    let exists: bool = r.try_get(1)?;
                    let waiting: i64 = r.try_get(2)?;
                    states.insert(user, (exists, waiting));
                }
                users
                    .iter()
                    .map(|u| {
                        let (exists, waiting) = states
                            .get(u)
                            .copied()
                            .ok_or_else(|| StoreError::Other(format!("no state for user {u}")))?;
                        Ok(Done::Register(register_result(
                            changed.contains(u),
                            exists,
                            waiting,
                        )))
                    })
                    .collect()
            }
            Run::Inserts {
                calls,
                before,
                expire,
                inserted,
                keyed,
            } => {
                let before = Sent::answer_opt(before).await;
                let expired = Sent::answer_opt(expire).await;
                let inserted = inserted.answer().await;
                let keyed = Sent::answer_opt(keyed).await;
                let mut waiting: HashMap<i64, u32> = HashMap::new();
                for r in before.transpose()?.unwrap_or_default() {
                    let callee: i64 = r.try_get(0)?;
                    let n: i64 = r.try_get(1)?;
                    waiting.insert(callee, u32::try_from(n.max(0)).unwrap_or(u32::MAX));
                }
                if let Some(e) = expired {
                    e?;
                }
                let inserted: HashSet<i64> = inserted?
                    .iter()
                    .map(|r| r.try_get::<_, i64>(0))
                    .collect::<Result<_, _>>()?;
                let mut first_calls: HashMap<(i64, i64), KeyedCall> = HashMap::new();
                for r in keyed.transpose()?.unwrap_or_default() {
                    let caller: i64 = r.try_get(0)?;
                    let key: i64 = r.try_get(1)?;
                    first_calls.insert((caller, key), keyed_at(&r, 2)?);
                }
                calls
                    .iter()
                    .map(|&(id, caller, callee, missed, key)| {
                        if inserted.contains(&id) {
                            let callee_waiting = if missed {
                                let n = waiting.entry(callee).or_insert(0);
                                *n = n.saturating_add(1);
                                *n
                            } else {
                                0
                            };
                            return Ok(Done::Insert(InsertResult::Recorded { callee_waiting }));
                        }
                        Ok(Done::Insert(
                            match key.and_then(|k| first_calls.get(&(caller, k))) {
                                Some(first) => InsertResult::AlreadyRecorded(*first),
                                None => InsertResult::UnknownCallee,
                            },
                        ))
                    })
                    .collect()
            }
        }
    }
}
