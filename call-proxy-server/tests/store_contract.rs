//! The storage contract, written once and run against every backend: each check is a
//! generic `async fn` over `S: Store` and `O: OperatorStore`, and [`contract!`] runs every
//! check on a fresh database of each backend listed at the bottom, built through the same
//! factories the server uses (`storage::open`, `storage::open_operator`) from a `Config`.
//! A new backend passes when one more line in that list passes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use call_proxy_server::clock::now_ms;
use call_proxy_server::storage::operator::{CallQuery, OperatorStore, OutcomeFilter};
use call_proxy_server::storage::{
    self, CallEnd, InsertResult, KeyedCall, NewCall, Outcome, RegisterResult, Registration, Store,
    StoreError, UserRow,
};
use call_proxy_server::Config;
use shared_proto::{CallId, UserId, KEY_LIFETIME_MS};

/// A fresh, empty database of one backend: the config that names it, and whatever must
/// live as long as it (a temporary directory).
struct Fresh {
    /// Backend and location, as the server would be configured.
    config: Config,
    /// Dropped after the check.
    _keep: Box<dyn std::any::Any>,
}

/// A fresh SQLite file in a temporary directory.
fn sqlite() -> Fresh {
    let dir = tempfile::tempdir().unwrap();
    Fresh {
        config: Config {
            backend: storage::StorageBackend::Sqlite,
            db: Some(dir.path().join("contract.sqlite")),
            ..Config::default()
        },
        _keep: Box::new(dir),
    }
}

/// A fresh database of its own in this run's PostgreSQL cluster, or `None` (no cluster:
/// the check is skipped, unless the run requires one).
fn postgres() -> Option<Fresh> {
    let (url, password_file) = common::db::pg_cluster()?;
    let dir = tempfile::tempdir().unwrap();
    let db = common::TestDb::postgres(dir.path(), "contract", &url, &password_file);
    let mut config = Config::default();
    db.configure(&mut config);
    Some(Fresh {
        config,
        _keep: Box::new((db, dir)),
    })
}

/// Opens the store and the operator reads of `fresh`, runs `check`, closes the store.
macro_rules! run_check {
    ($fresh:expr, $check:path) => {{
        let Some(fresh) = $fresh else {
            eprintln!("skipped: no PostgreSQL cluster (scripts/test.sh starts one)");
            return;
        };
        let store = storage::open(&fresh.config).await.expect("open store");
        let target = storage::DbTarget::of(&fresh.config).expect("target");
        let ops = storage::open_operator(&target, 2);
        $check(&store, &ops, &fresh.config).await;
        store.close().await;
    }};
}

/// One test per check for each `backend => fresh database` line.
macro_rules! contract {
    ($($backend:ident => $fresh:expr;)+) => {$(
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn registration_and_offline_follow_session_ids() {
                run_check!($fresh, checks::registration_and_offline);
            }

            #[tokio::test]
            async fn calls_are_recorded_and_finished_and_missed_kinds_wait() {
                run_check!($fresh, checks::insert_finish_and_missed_kinds);
            }

            #[tokio::test]
            async fn cached_calls_page_by_id_and_acknowledged_ones_stop() {
                run_check!($fresh, checks::cached_paging_and_ack);
            }

            #[tokio::test]
            async fn writes_apply_in_the_order_they_were_called() {
                run_check!($fresh, checks::queued_in_call_order);
            }

            #[tokio::test]
            async fn a_failing_write_fails_alone() {
                run_check!($fresh, checks::failure_is_isolated);
            }

            #[tokio::test]
            async fn operator_reads_filter_page_and_count() {
                run_check!($fresh, checks::operator_reads);
            }

            #[tokio::test]
            async fn closing_flushes_queued_writes_and_refuses_later_ones() {
                run_check!($fresh, checks::close_flushes);
            }

            #[tokio::test]
            async fn reopening_keeps_ids_and_ends_what_was_live() {
                run_check!($fresh, checks::reopen_repairs);
            }

            #[tokio::test]
            async fn a_keyed_call_is_stored_at_most_once() {
                run_check!($fresh, checks::keyed_calls_once);
            }

            #[tokio::test]
            async fn writes_queued_together_are_answered_as_if_each_ran_alone() {
                run_check!($fresh, checks::bursts_answer_each_write);
            }

            #[tokio::test]
            async fn usage_adds_up_per_account_and_period_with_its_allowance() {
                run_check!($fresh, checks::usage_adds_up);
            }

            #[tokio::test]
            async fn an_address_book_is_replaced_whole_deduplicated_and_bounded() {
                run_check!($fresh, checks::presence_book_replaced);
            }

            #[tokio::test]
            async fn a_watcher_sees_a_state_only_when_allowed() {
                run_check!($fresh, checks::presence_view_rules);
            }

            #[tokio::test]
            async fn phone_numbers_are_set_shown_and_cleared_by_the_operator() {
                run_check!($fresh, checks::phone_numbers);
            }

            #[tokio::test]
            async fn alarms_are_raised_listed_and_cleared_once() {
                run_check!($fresh, checks::alarms_raised_and_cleared);
            }

            #[tokio::test]
            async fn messages_are_stored_once_within_quota_listed_settled_and_expired() {
                run_check!($fresh, checks::messages_lifecycle);
            }
        }
    )+};
}

contract! {
    sqlite => Some(sqlite());
    postgres => postgres();
}

/// The checks, each generic over the backend.
mod checks {
    use super::*;

    /// Traffic accounting: deltas add up per (account, period), also when written in
    /// the same burst as other writes; the operator reads them with the allowance and
    /// what is left, filtered by account and period, newest period first.
    pub async fn usage_adds_up<S: Store, O: OperatorStore>(store: &S, ops: &O, _: &Config) {
        use call_proxy_server::accounting::{Usage, UsageDelta};
        use call_proxy_server::storage::operator::UsageQuery;
        let delta = |user, period: &str, control_in, at_ms| UsageDelta {
            user_id: user,
            period: period.into(),
            usage: Usage {
                sessions: 1,
                session_ms: 1_000,
                control_in,
                control_out: 7,
                ..Usage::default()
            },
            at_ms,
        };
        let t = now_ms();
        store
            .add_usage(vec![
                delta(5, "2026-11", 100, t - 2_000),
                delta(6, "2026-12", 1, t),
            ])
            .await
            .unwrap();
        // In one burst with a registration and a call: each answered as if alone.
        let r = store.register(reg(5, 1));
        let u = store.add_usage(vec![
            delta(5, "2026-12", 40, t),
            delta(5, "2026-11", 2, t - 1_000),
        ]);
        let c = store.insert_call(call(1, 5, 6, Outcome::Cached));
        assert!(matches!(r.await.unwrap(), RegisterResult::Online { .. }));
        u.await.unwrap();
        assert!(matches!(
            c.await.unwrap(),
            InsertResult::Recorded { .. } | InsertResult::UnknownCallee
        ));
        ops.set_allowance(5, Some(10_000), t).await.unwrap();
        let q = |user, period: Option<&str>| UsageQuery {
            user,
            period: period.map(str::to_string),
            limit: 100,
        };
        let rows = ops.usage(q(Some(5), None)).await.unwrap();
        let periods: Vec<&str> = rows.iter().map(|r| r.period.as_str()).collect();
        assert_eq!(periods, ["2026-12", "2026-11"], "newest period first");
        let nov = &rows[1];
        assert_eq!(
            (
                nov.sessions,
                nov.session_ms,
                nov.control_in,
                nov.control_out
            ),
            (2, 2_000, 102, 14)
        );
        assert_eq!(nov.bytes, 116);
        assert_eq!(
            (nov.allowance, nov.remaining),
            (Some(10_000), Some(10_000 - 116))
        );
        assert!(nov.first_at < nov.last_at, "{nov:?}");
        let dec = ops.usage(q(None, Some("2026-12"))).await.unwrap();
        assert_eq!(dec.iter().map(|r| r.user_id).collect::<Vec<_>>(), [5, 6]);
        assert_eq!((dec[1].allowance, dec[1].remaining), (None, None));
        ops.set_allowance(5, None, t).await.unwrap();
        assert_eq!(
            ops.usage(q(Some(5), None)).await.unwrap()[0].allowance,
            None
        );
        assert!(ops.usage(q(Some(7), None)).await.unwrap().is_empty());
    }

    /// Presence: an address book is replaced as a whole (also in a burst with other
    /// writes), read back sorted without duplicates; more than 500 distinct contacts are
    /// refused and leave the book as it was; "hide my state" reads back.
    pub async fn presence_book_replaced<S: Store, O: OperatorStore>(
        store: &S,
        _ops: &O,
        _: &Config,
    ) {
        use call_proxy_server::storage::PresenceBook;
        assert_eq!(
            store.presence_book(1).await.unwrap(),
            PresenceBook::default()
        );
        store
            .set_presence_book(1, vec![30, 20, 30, 20, 10])
            .await
            .unwrap();
        assert_eq!(store.presence_book(1).await.unwrap().contacts, [10, 20, 30]);
        // Replaced, not added to; in one burst with a registration, a hidden switch and
        // another TV's book, each answered as if alone.
        let r = store.register(reg(1, 1));
        let b = store.set_presence_book(1, vec![40, 20]);
        let h = store.set_presence_hidden(1, true);
        let other = store.set_presence_book(2, vec![1]);
        assert!(matches!(r.await.unwrap(), RegisterResult::Online { .. }));
        b.await.unwrap();
        h.await.unwrap();
        other.await.unwrap();
        assert_eq!(
            store.presence_book(1).await.unwrap(),
            PresenceBook {
                contacts: vec![20, 40],
                hidden: true
            }
        );
        assert_eq!(store.presence_book(2).await.unwrap().contacts, [1]);
        store.set_presence_hidden(1, false).await.unwrap();
        assert!(!store.presence_book(1).await.unwrap().hidden);
        // 600 ids with 500 distinct ones: a full book.
        let many: Vec<UserId> = (1..=500).chain(1..=100).collect();
        store.set_presence_book(3, many).await.unwrap();
        assert_eq!(
            store.presence_book(3).await.unwrap().contacts,
            (1..=500).collect::<Vec<_>>()
        );
        // 501 distinct: refused, the book stays.
        let err = store
            .set_presence_book(3, (1..=501).collect())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Other(m) if m.contains("500")),
            "{err:?}"
        );
        assert_eq!(store.presence_book(3).await.unwrap().contacts.len(), 500);
        // An empty book clears it.
        store.set_presence_book(3, vec![]).await.unwrap();
        assert!(store.presence_book(3).await.unwrap().contacts.is_empty());
    }

    /// Presence: one row per distinct user asked; the state as `users()` reads it; allowed
    /// when the watcher is in the user's book or the user has called the watcher (not the
    /// other way round), never when hidden or unknown; the phone on file shown.
    pub async fn presence_view_rules<S: Store, O: OperatorStore>(store: &S, ops: &O, _: &Config) {
        use call_proxy_server::storage::PresenceRow;
        let watcher = 4;
        for u in [1, 2, 3, 4, 5] {
            store.register(reg(u, 1)).await.unwrap();
        }
        let off_at = now_ms() - 5_000;
        store.set_offline(2, 1, off_at).await.unwrap();
        // 1 lists the watcher; 3 lists it but hides; 5 lists someone else.
        store.set_presence_book(1, vec![watcher, 7]).await.unwrap();
        store.set_presence_book(3, vec![watcher]).await.unwrap();
        store.set_presence_book(5, vec![1]).await.unwrap();
        store.set_presence_hidden(3, true).await.unwrap();
        // 2 called the watcher once; the watcher called 5 (that allows nothing).
        store
            .insert_call(call(1, 2, watcher, Outcome::Cached))
            .await
            .unwrap();
        store
            .insert_call(call(2, watcher, 5, Outcome::Cached))
            .await
            .unwrap();
        assert!(ops
            .set_phone(1, Some("+4930123456".into()), now_ms())
            .await
            .unwrap());
        let view = |users: Vec<UserId>| async move {
            let mut rows = store.presence_view(watcher, users).await.unwrap();
            rows.sort_by_key(|r| r.user_id);
            rows
        };
        let rows = view(vec![9, 5, 3, 2, 1, 2, 9]).await;
        let users = store.users(vec![1, 2]).await.unwrap();
        let row = |user_id, online, last_seen_ms, hidden, allowed, has_phone| PresenceRow {
            user_id,
            online,
            last_seen_ms,
            hidden,
            allowed,
            has_phone,
        };
        assert_eq!(
            rows,
            vec![
                row(1, Some(true), users[0].last_seen_ms, false, true, true),
                row(2, Some(false), Some(off_at), false, true, false),
                row(3, Some(true), rows[2].last_seen_ms, true, false, false),
                row(5, Some(true), rows[3].last_seen_ms, false, false, false),
                row(9, None, None, false, false, false),
            ]
        );
        assert_eq!(users[1].last_seen_ms, Some(off_at));
        assert!(rows[2].last_seen_ms.is_some());
        // Another watcher is allowed nothing here: 1's book and 2's call name 4 only.
        let other = store.presence_view(7, vec![2, 3, 5]).await.unwrap();
        assert!(other.iter().all(|r| !r.allowed), "{other:?}");
        assert!(store.presence_view(7, vec![1]).await.unwrap()[0].allowed);
        // Hidden off: allowed again; an unknown user with a book is still not allowed.
        store.set_presence_hidden(3, false).await.unwrap();
        store.set_presence_book(9, vec![watcher]).await.unwrap();
        let rows = view(vec![3, 9]).await;
        assert_eq!(
            rows.iter()
                .map(|r| (r.user_id, r.allowed))
                .collect::<Vec<_>>(),
            [(3, true), (9, false)]
        );
        assert!(store
            .presence_view(watcher, vec![])
            .await
            .unwrap()
            .is_empty());
        // 500 distinct users in one read; 501 refused.
        assert_eq!(view((1..=500).chain([1, 2]).collect()).await.len(), 500);
        let err = store
            .presence_view(watcher, (1..=501).collect())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Other(m) if m.contains("500")),
            "{err:?}"
        );
    }

    /// The operator's phone numbers: only for users that exist, shown with the user,
    /// replaced, cleared.
    pub async fn phone_numbers<S: Store, O: OperatorStore>(store: &S, ops: &O, _: &Config) {
        store.register(reg(1, 1)).await.unwrap();
        store.register(reg(2, 1)).await.unwrap();
        let t = now_ms();
        assert!(!ops
            .set_phone(9, Some("+4930123456".into()), t)
            .await
            .unwrap());
        assert!(!ops.set_phone(9, None, t).await.unwrap());
        assert!(ops
            .set_phone(1, Some("+4930123456".into()), t)
            .await
            .unwrap());
        assert!(ops
            .set_phone(1, Some("+4930999999".into()), t)
            .await
            .unwrap());
        let phones = |users: Vec<call_proxy_server::storage::operator::UserRecord>| {
            users
                .into_iter()
                .map(|u| (u.user_id, u.phone))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            phones(ops.users(false, 10).await.unwrap()),
            [(1, Some("+4930999999".to_string())), (2, None)]
        );
        assert_eq!(
            ops.user(1).await.unwrap().unwrap().phone.as_deref(),
            Some("+4930999999")
        );
        assert!(store.presence_view(2, vec![1]).await.unwrap()[0].has_phone);
        assert!(ops.set_phone(1, None, t).await.unwrap());
        assert_eq!(ops.user(1).await.unwrap().unwrap().phone, None);
        assert!(!store.presence_view(2, vec![1]).await.unwrap()[0].has_phone);
    }

    /// Alarms: raised through the writer, listed newest first with what was recorded;
    /// cleared once (a second clear and an unknown id answer `false`); cleared ones
    /// listed only when asked.
    pub async fn alarms_raised_and_cleared<S: Store, O: OperatorStore>(
        store: &S,
        ops: &O,
        _: &Config,
    ) {
        use call_proxy_server::clock::to_db_text;
        use call_proxy_server::storage::NewAlarm;
        assert!(ops.alarms(true, 10).await.unwrap().is_empty());
        let t = now_ms() - 1_000;
        let alarm = |user_id, at_ms, reason: &str, count| NewAlarm {
            user_id,
            at_ms,
            reason: reason.into(),
            count,
        };
        store
            .raise_alarm(alarm(
                7,
                t,
                "presence recovery over threshold: signed out",
                5,
            ))
            .await
            .unwrap();
        let second = store.raise_alarm(alarm(8, t + 10, "dropped", 6));
        let reg = store.register(reg(8, 1));
        second.await.unwrap();
        reg.await.unwrap();
        let open = ops.alarms(false, 10).await.unwrap();
        assert_eq!(
            open.iter()
                .map(|a| (a.user_id, a.reason.as_str(), a.count))
                .collect::<Vec<_>>(),
            [
                (8, "dropped", 6),
                (7, "presence recovery over threshold: signed out", 5)
            ],
            "newest first"
        );
        assert_eq!(open[1].raised_at, to_db_text(t));
        assert!(open.iter().all(|a| a.cleared_at.is_none()));
        assert!(open[0].id > open[1].id);
        assert_eq!(ops.alarms(false, 1).await.unwrap().len(), 1);
        let first = open[1].id;
        let at = now_ms();
        assert!(ops.clear_alarm(first, at).await.unwrap());
        assert!(
            !ops.clear_alarm(first, at).await.unwrap(),
            "cleared already"
        );
        assert!(
            !ops.clear_alarm(first + 1_000, at).await.unwrap(),
            "unknown"
        );
        let open = ops.alarms(false, 10).await.unwrap();
        assert_eq!(open.iter().map(|a| a.user_id).collect::<Vec<_>>(), [8]);
        let all = ops.alarms(true, 10).await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].id, first);
        assert_eq!(all[1].cleared_at.as_deref(), Some(to_db_text(at).as_str()));
    }

    /// When the test calls were placed: call `id` at `BASE_MS + 10 * id`, a little
    /// before now.
    static BASE_MS: std::sync::LazyLock<i64> = std::sync::LazyLock::new(|| now_ms() - 60_000);

    pub fn reg(user_id: UserId, session_id: u64) -> Registration {
        Registration {
            user_id,
            ip: [192, 0, 2, 7].into(),
            media_port: 5004,
            session_id,
            agent_version: "contract".into(),
            at_ms: now_ms(),
            create_unknown: true,
        }
    }

    pub fn call(id: CallId, caller: UserId, callee: UserId, outcome: Outcome) -> NewCall {
        NewCall {
            id,
            caller,
            callee,
            at_ms: *BASE_MS + 10 * id as i64,
            outcome,
            caller_ip: [192, 0, 2, 8].into(),
        }
    }

    pub fn end(id: CallId, outcome: Outcome, answered: bool, ended: bool) -> CallEnd {
        let now = now_ms();
        CallEnd {
            id,
            outcome,
            answered_at_ms: answered.then_some(now),
            ended_at_ms: ended.then_some(now),
            at_ms: now,
        }
    }

    async fn online<S: Store>(store: &S, user: UserId) -> Option<bool> {
        store
            .users(vec![user])
            .await
            .unwrap()
            .first()
            .map(|r| r.online)
    }

    async fn cached_ids<S: Store>(store: &S, callee: UserId) -> Vec<CallId> {
        store
            .cached_calls(callee, 0, 1000)
            .await
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect()
    }

    pub async fn registration_and_offline<S: Store, O: OperatorStore>(
        store: &S,
        _ops: &O,
        _config: &Config,
    ) {
        let first = reg(1, 5);
        let at = first.at_ms;
        assert_eq!(
            store.register(first).await,
            Ok(RegisterResult::Online { cached_waiting: 0 })
        );
        assert_eq!(
            store.users(vec![1, 99]).await.unwrap(),
            vec![UserRow {
                user_id: 1,
                online: true,
                last_seen_ms: Some(at)
            }]
        );
        // An older or the same session never wins over the recorded one.
        for session in [4, 5] {
            assert_eq!(
                store.register(reg(1, session)).await,
                Ok(RegisterResult::Superseded)
            );
        }
        // Going offline is recorded only for the recorded session.
        store.set_offline(1, 4, now_ms()).await.unwrap();
        assert_eq!(online(store, 1).await, Some(true));
        let off_at = at + 10;
        store.set_offline(1, 5, off_at).await.unwrap();
        assert_eq!(
            store.users(vec![1]).await.unwrap(),
            vec![UserRow {
                user_id: 1,
                online: false,
                last_seen_ms: Some(off_at)
            }]
        );
        // Provisioned-only: unknown users are refused and nothing is written; known
        // ones register.
        let unknown = Registration {
            create_unknown: false,
            ..reg(2, 6)
        };
        assert_eq!(
            store.register(unknown).await,
            Ok(RegisterResult::UnknownUser)
        );
        assert_eq!(store.users(vec![2]).await.unwrap(), vec![]);
        let known = Registration {
            create_unknown: false,
            ..reg(1, 6)
        };
        assert!(matches!(
            store.register(known).await,
            Ok(RegisterResult::Online { .. })
        ));
        assert_eq!(online(store, 1).await, Some(true));
    }

    pub async fn insert_finish_and_missed_kinds<S: Store, O: OperatorStore>(
        store: &S,
        ops: &O,
        _config: &Config,
    ) {
        store.register(reg(1, 1)).await.unwrap();
        store.register(reg(2, 2)).await.unwrap();
        assert_eq!(
            store.insert_call(call(1, 1, 77, Outcome::Cached)).await,
            Ok(InsertResult::UnknownCallee)
        );
        // Missed kinds recorded at once count as waiting, this one included.
        assert_eq!(
            store.insert_call(call(2, 1, 2, Outcome::Cached)).await,
            Ok(InsertResult::Recorded { callee_waiting: 1 })
        );
        assert_eq!(
            store.insert_call(call(3, 1, 2, Outcome::Busy)).await,
            Ok(InsertResult::Recorded { callee_waiting: 2 })
        );
        // A live call does not, until it ends missed.
        assert_eq!(
            store.insert_call(call(4, 1, 2, Outcome::Ringing)).await,
            Ok(InsertResult::Recorded { callee_waiting: 0 })
        );
        assert_eq!(
            store
                .finish_call(end(4, Outcome::Missed, false, true), 2)
                .await,
            Ok(3)
        );
        // Answered (then ended) and rejected calls were seen: never waiting.
        store
            .insert_call(call(5, 1, 2, Outcome::Ringing))
            .await
            .unwrap();
        assert_eq!(
            store
                .finish_call(end(5, Outcome::Answered, true, false), 2)
                .await,
            Ok(0)
        );
        assert_eq!(
            store
                .finish_call(
                    CallEnd {
                        answered_at_ms: None,
                        ..end(5, Outcome::Answered, false, true)
                    },
                    2
                )
                .await,
            Ok(0)
        );
        store
            .insert_call(call(6, 1, 2, Outcome::Ringing))
            .await
            .unwrap();
        assert_eq!(
            store
                .finish_call(end(6, Outcome::Rejected, false, true), 2)
                .await,
            Ok(0)
        );
        // A caller without a row is reported as unknown.
        store
            .insert_call(call(7, 88, 2, Outcome::Cached))
            .await
            .unwrap();

        let rows = store.cached_calls(2, 0, 100).await.unwrap();
        let got: Vec<(CallId, Outcome, Option<bool>)> = rows
            .iter()
            .map(|r| (r.id, r.outcome, r.caller_online))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, Outcome::Cached, Some(true)),
                (3, Outcome::Busy, Some(true)),
                (4, Outcome::Missed, Some(true)),
                (7, Outcome::Cached, None),
            ]
        );
        assert!(rows.iter().all(|r| r.callee == 2));
        assert_eq!(rows[0].caller, 1);
        // The one rule: waiting exactly when the final outcome is a missed kind.
        let waiting: BTreeSet<CallId> = rows.iter().map(|r| r.id).collect();
        for (id, outcome) in [
            (2, Outcome::Cached),
            (3, Outcome::Busy),
            (4, Outcome::Missed),
            (5, Outcome::Answered),
            (6, Outcome::Rejected),
        ] {
            assert_eq!(
                waiting.contains(&id),
                outcome.is_missed_kind(),
                "{outcome:?}"
            );
        }
        // The operator reads apply the same rule.
        assert_eq!(ops.cached_waiting().await, Ok(4));
        let undelivered: BTreeSet<CallId> = ops
            .calls(CallQuery {
                outcome: Some(OutcomeFilter::Undelivered),
                limit: 100,
                ..CallQuery::default()
            })
            .await
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(undelivered, waiting);
        // A registration reports what waits.
        assert_eq!(
            store.register(reg(2, 3)).await,
            Ok(RegisterResult::Online { cached_waiting: 4 })
        );
    }

    pub async fn cached_paging_and_ack<S: Store, O: OperatorStore>(
        store: &S,
        ops: &O,
        _config: &Config,
    ) {
        store.register(reg(1, 1)).await.unwrap();
        store.register(reg(2, 2)).await.unwrap();
        store.register(reg(3, 3)).await.unwrap();
        for id in 1..=5 {
            store
                .insert_call(call(id, 1, 2, Outcome::Cached))
                .await
                .unwrap();
        }
        store
            .insert_call(call(6, 1, 3, Outcome::Cached))
            .await
            .unwrap();
        // Pages, oldest first, continue after the last id.
        let mut pages = Vec::new();
        let mut after = 0;
        for _ in 0..10 {
            let page: Vec<CallId> = store
                .cached_calls(2, after, 2)
                .await
                .unwrap()
                .iter()
                .map(|r| r.id)
                .collect();
            let Some(&last) = page.last() else { break };
            after = last;
            pages.push(page);
        }
        assert_eq!(pages, vec![vec![1, 2], vec![3, 4], vec![5]]);
        // Acknowledging counts only this callee's waiting calls; unknown ids and other
        // callees' calls are left alone; a second acknowledgement changes nothing.
        assert_eq!(
            store.ack_cached(2, vec![1, 2, 999, 6], now_ms()).await,
            Ok(2)
        );
        assert_eq!(store.ack_cached(2, vec![1, 2], now_ms()).await, Ok(0));
        assert_eq!(store.ack_cached(3, vec![3], now_ms()).await, Ok(0));
        assert_eq!(cached_ids(store, 2).await, vec![3, 4, 5]);
        assert_eq!(cached_ids(store, 3).await, vec![6]);
        // Answered calls are delivered already: nothing to acknowledge.
        store
            .insert_call(call(7, 1, 2, Outcome::Ringing))
            .await
            .unwrap();
        store
            .finish_call(end(7, Outcome::Answered, true, true), 2)
            .await
            .unwrap();
        assert_eq!(store.ack_cached(2, vec![7], now_ms()).await, Ok(0));
        let delivered: Vec<CallId> = ops
            .calls(CallQuery {
                outcome: Some(OutcomeFilter::Delivered),
                limit: 100,
                ..CallQuery::default()
            })
            .await
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(delivered, vec![2, 1]);
        assert_eq!(
            store.register(reg(2, 4)).await,
            Ok(RegisterResult::Online { cached_waiting: 3 })
        );
    }

    pub async fn queued_in_call_order<S: Store, O: OperatorStore>(
        store: &S,
        _ops: &O,
        _config: &Config,
    ) {
        store.register(reg(2, 1)).await.unwrap();
        // The change of a live call, queued right after its record and before anyone
        // awaits, finds the record.
        let insert = store.insert_call(call(1, 1, 2, Outcome::Ringing));
        let finish = store.finish_call(end(1, Outcome::Missed, false, true), 2);
        assert_eq!(finish.await, Ok(1));
        assert_eq!(
            insert.await,
            Ok(InsertResult::Recorded { callee_waiting: 0 })
        );
        // A dropped `Pending` does not cancel its write, and it stays ahead of later
        // writes.
        drop(store.insert_call(call(2, 1, 2, Outcome::Cached)));
        assert_eq!(store.ack_cached(2, vec![2], now_ms()).await, Ok(1));
        // Online then offline, queued together: offline wins.
        let on = store.register(reg(3, 7));
        let off = store.set_offline(3, 7, now_ms());
        off.await.unwrap();
        on.await.unwrap();
        assert_eq!(online(store, 3).await, Some(false));
        // Many writes queued before one that depends on all of them.
        let writes: Vec<_> = (100..300)
            .map(|id| store.insert_call(call(id, 1, 2, Outcome::Cached)))
            .collect();
        let ack = store.ack_cached(2, (100..300).collect(), now_ms());
        assert_eq!(ack.await, Ok(200));
        for w in futures::future::join_all(writes).await {
            assert!(matches!(w, Ok(InsertResult::Recorded { .. })), "{w:?}");
        }
        assert_eq!(cached_ids(store, 2).await, vec![1]);
    }

    pub async fn failure_is_isolated<S: Store, O: OperatorStore>(
        store: &S,
        _ops: &O,
        _config: &Config,
    ) {
        store.register(reg(2, 1)).await.unwrap();
        // Queued together (so a group-committing backend batches them): the duplicate
        // id fails, with a constraint error, and nothing else does.
        let mut writes = Vec::new();
        for id in 1..=20 {
            writes.push(store.insert_call(call(id, 1, 2, Outcome::Cached)));
            if id == 10 {
                writes.push(store.insert_call(call(5, 1, 2, Outcome::Busy)));
            }
        }
        let results = futures::future::join_all(writes).await;
        for (i, r) in results.iter().enumerate() {
            if i == 10 {
                assert!(matches!(r, Err(StoreError::Constraint(_))), "{r:?}");
            } else {
                assert!(matches!(r, Ok(InsertResult::Recorded { .. })), "{i}: {r:?}");
            }
        }
        let rows = store.cached_calls(2, 0, 100).await.unwrap();
        assert_eq!(
            rows.iter().map(|r| r.id).collect::<Vec<_>>(),
            (1..=20).collect::<Vec<_>>()
        );
        // The first record of call 5 stands, untouched by the refused one.
        assert_eq!(rows[4].outcome, Outcome::Cached);
    }

    pub async fn operator_reads<S: Store, O: OperatorStore>(store: &S, ops: &O, _config: &Config) {
        ops.ping().await.unwrap();
        for (user, session) in [(1, 1), (2, 2), (3, 3)] {
            store.register(reg(user, session)).await.unwrap();
        }
        store.set_offline(3, 3, now_ms()).await.unwrap();
        // 1 -> 2 answered, 1 -> 3 cached, 2 -> 1 rejected, 2 -> 3 busy, 3 -> 1 missed.
        let plan = [
            (1, 1, 2, Outcome::Answered),
            (2, 1, 3, Outcome::Cached),
            (3, 2, 1, Outcome::Rejected),
            (4, 2, 3, Outcome::Busy),
            (5, 3, 1, Outcome::Missed),
        ];
        for (id, caller, callee, outcome) in plan {
            if outcome.is_missed_kind() && outcome != Outcome::Missed {
                store
                    .insert_call(call(id, caller, callee, outcome))
                    .await
                    .unwrap();
            } else {
                store
                    .insert_call(call(id, caller, callee, Outcome::Ringing))
                    .await
                    .unwrap();
                let answered = outcome == Outcome::Answered;
                store
                    .finish_call(end(id, outcome, answered, true), callee)
                    .await
                    .unwrap();
            }
        }
        let ids = |q: CallQuery| async move {
            ops.calls(q)
                .await
                .unwrap()
                .iter()
                .map(|c| c.id)
                .collect::<Vec<_>>()
        };
        let all = |limit| CallQuery {
            limit,
            ..CallQuery::default()
        };
        // Newest first, in stable pages.
        assert_eq!(ids(all(10)).await, vec![5, 4, 3, 2, 1]);
        assert_eq!(ids(all(2)).await, vec![5, 4]);
        assert_eq!(
            ids(CallQuery {
                before: Some(4),
                ..all(2)
            })
            .await,
            vec![3, 2]
        );
        assert_eq!(
            ids(CallQuery {
                caller: Some(1),
                ..all(10)
            })
            .await,
            vec![2, 1]
        );
        assert_eq!(
            ids(CallQuery {
                callee: Some(3),
                ..all(10)
            })
            .await,
            vec![4, 2]
        );
        assert_eq!(
            ids(CallQuery {
                party: Some(1),
                ..all(10)
            })
            .await,
            vec![5, 3, 2, 1]
        );
        for (filter, expected) in [
            (OutcomeFilter::Answered, vec![1]),
            (OutcomeFilter::Cached, vec![2]),
            (OutcomeFilter::Rejected, vec![3]),
            (OutcomeFilter::Busy, vec![4]),
            (OutcomeFilter::Missed, vec![5]),
            (OutcomeFilter::Undelivered, vec![5, 4, 2]),
            (OutcomeFilter::Delivered, vec![]),
        ] {
            let q = CallQuery {
                outcome: Some(filter),
                ..all(10)
            };
            assert_eq!(ids(q).await, expected, "{filter:?}");
        }
        let third = ops
            .calls(CallQuery {
                party: Some(1),
                ..all(10)
            })
            .await
            .unwrap();
        let c = third.iter().find(|c| c.id == 1).unwrap();
        assert_eq!((c.user_id, c.otheruser_id), (1, 2));
        assert_eq!(c.outcome, "answered");
        assert!(c.delivered && c.answered_at.is_some() && c.ended_at.is_some());
        assert_eq!(c.caller_ip, "192.0.2.8");
        // A time range: only calls placed in it.
        let since = *BASE_MS + 30;
        assert_eq!(
            ids(CallQuery {
                since_ms: Some(since),
                until_ms: Some(since + 20),
                ..all(10)
            })
            .await,
            vec![4, 3]
        );
        // Users, by id; online only; one user.
        let users = ops.users(false, 10).await.unwrap();
        assert_eq!(
            users.iter().map(|u| u.user_id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(users[0].user_ip, "192.0.2.7");
        assert_eq!(users[0].media_port, 5004);
        assert_eq!(users[0].agent_version, "contract");
        let online: Vec<_> = ops
            .users(true, 10)
            .await
            .unwrap()
            .iter()
            .map(|u| u.user_id)
            .collect();
        assert_eq!(online, vec![1, 2]);
        assert_eq!(ops.users(false, 1).await.unwrap().len(), 1);
        let three = ops.user(3).await.unwrap().unwrap();
        assert_eq!((three.user_netstate, three.last_seen.is_some()), (0, true));
        assert_eq!(ops.user(42).await, Ok(None));
        // Statistics; then a delivery shows a delay.
        let stats = ops.stats(now_ms()).await.unwrap();
        assert_eq!((stats.users, stats.online), (3, 2));
        assert_eq!((stats.calls_last_hour, stats.calls_last_day), (5, 5));
        assert_eq!(stats.cached_waiting, 3);
        assert_eq!(stats.delivery_delay_p50_s, None);
        assert_eq!(store.ack_cached(3, vec![2, 4], now_ms()).await, Ok(2));
        let stats = ops.stats(now_ms()).await.unwrap();
        assert_eq!(stats.cached_waiting, 1);
        assert!(stats.delivery_delay_max_s.is_some_and(|d| d >= 0.0));
        assert_eq!(ops.cached_waiting().await, Ok(1));
    }

    pub async fn close_flushes<S: Store, O: OperatorStore>(store: &S, ops: &O, _config: &Config) {
        store.register(reg(2, 1)).await.unwrap();
        let queued: Vec<_> = (1..=50)
            .map(|id| store.insert_call(call(id, 1, 2, Outcome::Cached)))
            .collect();
        store.close().await;
        for w in futures::future::join_all(queued).await {
            assert!(matches!(w, Ok(InsertResult::Recorded { .. })), "{w:?}");
        }
        assert_eq!(store.register(reg(3, 2)).await, Err(StoreError::Closed));
        assert_eq!(
            store.insert_call(call(51, 1, 2, Outcome::Cached)).await,
            Err(StoreError::Closed)
        );
        // What was acknowledged is there for readers after the store closed.
        assert_eq!(ops.cached_waiting().await, Ok(50));
    }

    pub async fn reopen_repairs<S: Store, O: OperatorStore>(store: &S, ops: &O, config: &Config) {
        store.register(reg(1, 41)).await.unwrap();
        store.register(reg(2, 42)).await.unwrap();
        store
            .insert_call(call(7, 1, 2, Outcome::Ringing))
            .await
            .unwrap();
        store
            .insert_call(call(8, 2, 1, Outcome::Ringing))
            .await
            .unwrap();
        store
            .finish_call(end(8, Outcome::Answered, true, false), 1)
            .await
            .unwrap();
        store
            .insert_call(call(9, 1, 2, Outcome::Cached))
            .await
            .unwrap();
        // Stopped with both online and two calls live, as a crash leaves them.
        store.close().await;
        let again = storage::open(config).await.expect("reopen");
        let w = again.watermarks();
        assert_eq!((w.max_session_id, w.max_call_id), (42, 9));
        // No session survives a restart; the ringing call became missed, the answered
        // one ended and stays delivered.
        assert_eq!(online(&again, 1).await, Some(false));
        assert_eq!(online(&again, 2).await, Some(false));
        let rows = again.cached_calls(2, 0, 10).await.unwrap();
        assert_eq!(
            rows.iter().map(|r| (r.id, r.outcome)).collect::<Vec<_>>(),
            vec![(7, Outcome::Missed), (9, Outcome::Cached)]
        );
        assert_eq!(cached_ids(&again, 1).await, Vec::<CallId>::new());
        let answered = ops
            .calls(CallQuery {
                caller: Some(2),
                limit: 10,
                ..CallQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(answered.len(), 1);
        assert_eq!(answered[0].outcome, "answered");
        assert!(answered[0].delivered && answered[0].ended_at.is_some());
        again.close().await;
    }

    /// A fleet re-registering and callers leaving calls, all queued at once (a backend
    /// may apply such runs as one statement): each write is answered as if it had run
    /// alone, in order: a user registering twice, a superseded session, an unknown
    /// callee, counts of waiting calls that grow within the burst, a key used twice.
    pub async fn bursts_answer_each_write<S: Store, O: OperatorStore>(
        store: &S,
        _ops: &O,
        _config: &Config,
    ) {
        store.register(reg(3, 1)).await.unwrap();
        store
            .insert_call(call(1, 9, 3, Outcome::Cached))
            .await
            .unwrap();
        let regs = vec![
            store.register(reg(1, 10)),
            store.register(reg(2, 11)),
            store.register(reg(1, 5)),
            store.register(reg(3, 12)),
            store.register(reg(2, 13)),
            store.register(reg(2, 12)),
        ];
        let calls = vec![
            store.insert_keyed_call(call(2, 1, 3, Outcome::Cached), Some(7)),
            store.insert_keyed_call(call(3, 2, 3, Outcome::Busy), None),
            store.insert_keyed_call(call(4, 1, 99, Outcome::Cached), None),
            store.insert_keyed_call(call(5, 1, 3, Outcome::Cached), Some(7)),
            store.insert_keyed_call(call(6, 2, 3, Outcome::Ringing), Some(7)),
            store.insert_keyed_call(call(7, 2, 1, Outcome::Cached), None),
        ];
        let regs = futures::future::join_all(regs).await;
        let online = |n| Ok(RegisterResult::Online { cached_waiting: n });
        assert_eq!(
            regs,
            vec![
                online(0),
                online(0),
                Ok(RegisterResult::Superseded),
                online(1),
                online(0),
                Ok(RegisterResult::Superseded)
            ]
        );
        let calls = futures::future::join_all(calls).await;
        let recorded = |n| Ok(InsertResult::Recorded { callee_waiting: n });
        assert_eq!(calls[0], recorded(2));
        assert_eq!(calls[1], recorded(3));
        assert_eq!(calls[2], Ok(InsertResult::UnknownCallee));
        match &calls[3] {
            Ok(InsertResult::AlreadyRecorded(first)) => {
                assert_eq!((first.id, first.callee), (2, 3));
            }
            other => panic!("a key used twice: {other:?}"),
        }
        // Another caller's key 7 is its own; a ringing call does not wait.
        assert_eq!(calls[4], recorded(0));
        assert_eq!(calls[5], recorded(1));
        assert_eq!(cached_ids(store, 3).await, vec![1, 2, 3]);
        assert_eq!(cached_ids(store, 1).await, vec![7]);
    }

    /// Rows in the call log (through the operator reads: every backend has them).
    async fn call_count<O: OperatorStore>(ops: &O) -> usize {
        ops.calls(CallQuery {
            limit: 1000,
            ..CallQuery::default()
        })
        .await
        .unwrap()
        .len()
    }

    pub async fn keyed_calls_once<S: Store, O: OperatorStore>(store: &S, ops: &O, config: &Config) {
        store.register(reg(1, 1)).await.unwrap();
        store.register(reg(2, 2)).await.unwrap();
        store.register(reg(3, 3)).await.unwrap();
        let first = call(1, 1, 2, Outcome::Cached);
        let first_at = first.at_ms;
        assert_eq!(
            store.insert_keyed_call(first, Some(0xfeed)).await,
            Ok(InsertResult::Recorded { callee_waiting: 1 })
        );
        let recorded = KeyedCall {
            id: 1,
            callee: 2,
            outcome: Outcome::Cached,
            at_ms: first_at,
        };
        // The same key again, queued twice before either is awaited: nothing is written,
        // both report the first call.
        let again = store.insert_keyed_call(call(2, 1, 2, Outcome::Cached), Some(0xfeed));
        let and_again = store.insert_keyed_call(call(3, 1, 2, Outcome::Busy), Some(0xfeed));
        assert_eq!(again.await, Ok(InsertResult::AlreadyRecorded(recorded)));
        assert_eq!(and_again.await, Ok(InsertResult::AlreadyRecorded(recorded)));
        assert_eq!(call_count(ops).await, 1);
        assert_eq!(cached_ids(store, 2).await, vec![1]);
        // The read finds it; another caller's same key, another key, and no key are
        // all new calls.
        let now = first_at + 1;
        assert_eq!(store.keyed_call(1, 0xfeed, now).await, Ok(Some(recorded)));
        assert_eq!(store.keyed_call(3, 0xfeed, now).await, Ok(None));
        assert_eq!(store.keyed_call(1, 0xbeef, now).await, Ok(None));
        assert!(matches!(
            store
                .insert_keyed_call(call(4, 3, 2, Outcome::Cached), Some(0xfeed))
                .await,
            Ok(InsertResult::Recorded { .. })
        ));
        assert!(matches!(
            store
                .insert_keyed_call(call(5, 1, 2, Outcome::Cached), Some(0xbeef))
                .await,
            Ok(InsertResult::Recorded { .. })
        ));
        assert!(matches!(
            store.insert_call(call(6, 1, 2, Outcome::Cached)).await,
            Ok(InsertResult::Recorded { .. })
        ));
        // All 64 bits are kept (the largest key is not confused with another).
        assert!(matches!(
            store
                .insert_keyed_call(call(7, 1, 2, Outcome::Cached), Some(u64::MAX))
                .await,
            Ok(InsertResult::Recorded { .. })
        ));
        assert_eq!(
            store
                .keyed_call(1, u64::MAX, now)
                .await
                .unwrap()
                .map(|c| c.id),
            Some(7)
        );
        assert_eq!(call_count(ops).await, 5);
        // The record's outcome is answered as it stands now.
        store
            .insert_keyed_call(call(8, 1, 2, Outcome::Ringing), Some(8))
            .await
            .unwrap();
        store
            .finish_call(end(8, Outcome::Missed, false, true), 2)
            .await
            .unwrap();
        assert_eq!(
            store
                .keyed_call(1, 8, now)
                .await
                .unwrap()
                .map(|c| c.outcome),
            Some(Outcome::Missed)
        );
        // Past the key's lifetime it no longer counts: a new call takes it over.
        let late = first_at + KEY_LIFETIME_MS;
        assert_eq!(store.keyed_call(1, 0xfeed, late).await, Ok(None));
        let mut reused = call(9, 1, 2, Outcome::Cached);
        reused.at_ms = late;
        assert!(matches!(
            store.insert_keyed_call(reused, Some(0xfeed)).await,
            Ok(InsertResult::Recorded { .. })
        ));
        assert_eq!(
            store
                .keyed_call(1, 0xfeed, late)
                .await
                .unwrap()
                .map(|c| c.id),
            Some(9)
        );
        // The key is stored with the call: it holds after a restart.
        store.close().await;
        let reopened = storage::open(config).await.expect("reopen");
        let mut retry = call(10, 1, 2, Outcome::Cached);
        retry.at_ms = late;
        assert_eq!(
            reopened
                .insert_keyed_call(retry, Some(0xfeed))
                .await
                .map(|r| match r {
                    InsertResult::AlreadyRecorded(c) => Some(c.id),
                    _ => None,
                }),
            Ok(Some(9))
        );
        let ops = storage::open_operator(&storage::DbTarget::of(config).unwrap(), 1);
        assert_eq!(call_count(&ops).await, 7);
        reopened.close().await;
    }

    /// Messages: stored at most once per sender key, refused for an unknown recipient
    /// or a full mailbox (checked in the insert's own step, also inside one burst),
    /// listed newest first in pages without the acknowledged ones, read one by one and
    /// by key, deleted only by their recipient (with their bodies' paths), and expired
    /// by age.
    pub async fn messages_lifecycle<S: Store, O: OperatorStore>(store: &S, _: &O, _: &Config) {
        use call_proxy_server::storage::{
            BodyMeta, Mailbox, MessageInsert, MessageQuery, NewMessage, Quota, Settle,
        };
        store.register(reg(11, 1)).await.unwrap();
        store.register(reg(12, 2)).await.unwrap();
        let quota = Quota {
            max_messages: 3,
            max_bytes: 10_000,
        };
        let t = now_ms();
        let text = |key, to, text: &str, at_ms| NewMessage {
            sender: 11,
            recipient: to,
            key,
            kind: 1,
            text: text.into(),
            body: None,
            at_ms,
        };
        let body = |size| BodyMeta {
            size,
            sha256: [9; 32],
            mime: "audio/ogg".into(),
            duration_ms: Some(2_000),
            width: None,
            height: None,
            path: "store/11/0000000000000002".into(),
        };
        let first = store
            .insert_message(text(1, 12, "hello", t - 10_000), quota)
            .await
            .unwrap();
        let MessageInsert::Stored {
            id: id1,
            waiting: 1,
        } = first
        else {
            panic!("{first:?}")
        };
        // The same key again: the first message, nothing written.
        assert_eq!(
            store
                .insert_message(text(1, 12, "hello again", t), quota)
                .await
                .unwrap(),
            MessageInsert::AlreadyStored {
                id: id1,
                delivered: false
            }
        );
        assert_eq!(
            store
                .insert_message(text(3, 99, "nobody", t), quota)
                .await
                .unwrap(),
            MessageInsert::UnknownRecipient
        );
        // A voice message, and in one burst two more texts: the third over the quota.
        let mut voice = text(2, 12, "", t - 5_000);
        voice.kind = 2;
        voice.body = Some(body(4_000));
        let a = store.insert_message(voice.clone(), quota);
        let b = store.insert_message(text(4, 12, "third", t), quota);
        let c = store.insert_message(text(5, 12, "fourth", t), quota);
        let MessageInsert::Stored {
            id: id2,
            waiting: 2,
        } = a.await.unwrap()
        else {
            panic!("voice not stored")
        };
        let MessageInsert::Stored {
            id: id3,
            waiting: 3,
        } = b.await.unwrap()
        else {
            panic!("third not stored")
        };
        assert!(matches!(
            c.await.unwrap(),
            MessageInsert::QuotaExceeded { messages: 3, .. }
        ));
        // Bytes count too: a body larger than what is left.
        let mut big = text(6, 11, "", t);
        big.sender = 12;
        big.kind = 2;
        big.body = Some(BodyMeta {
            size: 10_001,
            ..body(0)
        });
        assert!(matches!(
            store.insert_message(big, quota).await.unwrap(),
            MessageInsert::QuotaExceeded {
                messages: 0,
                bytes: 0
            }
        ));
        assert_eq!(
            store.mailbox(12).await.unwrap(),
            Mailbox {
                waiting: 3,
                messages: 3,
                bytes: 5 + 4_000 + 5
            }
        );
        // Newest first, in pages.
        let page = store
            .messages(MessageQuery::Waiting {
                recipient: 12,
                before: 0,
                limit: 2,
            })
            .await
            .unwrap();
        assert_eq!(
            page.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![id3, id2]
        );
        assert_eq!(page[1].body, Some(body(4_000)));
        assert_eq!(page[1].kind, 2);
        assert_eq!(page[1].sender_online, Some(true));
        assert!((page[1].at_ms - (t - 5_000)).abs() < 2);
        let rest = store
            .messages(MessageQuery::Waiting {
                recipient: 12,
                before: id2,
                limit: 2,
            })
            .await
            .unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].text, "hello");
        assert_eq!(rest[0].body, None);
        // One, by recipient only; by key.
        assert_eq!(
            store
                .messages(MessageQuery::One {
                    recipient: 11,
                    id: id2
                })
                .await
                .unwrap(),
            vec![]
        );
        let by_key = store
            .messages(MessageQuery::Keyed { sender: 11, key: 2 })
            .await
            .unwrap();
        assert_eq!(by_key.len(), 1);
        assert_eq!(by_key[0].id, id2);
        // Acknowledged: no longer listed, still kept; twice counts once; another TV's
        // acknowledgement changes nothing.
        assert!(store
            .settle_messages(11, vec![id1], Settle::Ack, t)
            .await
            .unwrap()
            .is_empty());
        let acked = store
            .settle_messages(12, vec![id1, id1], Settle::Ack, t)
            .await
            .unwrap();
        assert_eq!(acked.len(), 1);
        assert_eq!(
            store.mailbox(12).await.unwrap(),
            Mailbox {
                waiting: 2,
                messages: 3,
                bytes: 4_010
            }
        );
        assert_eq!(
            store
                .insert_message(text(1, 12, "again", t), quota)
                .await
                .unwrap(),
            MessageInsert::AlreadyStored {
                id: id1,
                delivered: true
            }
        );
        // Deleted by its recipient, with the body's path to remove.
        let gone = store
            .settle_messages(12, vec![id2], Settle::Delete, t)
            .await
            .unwrap();
        assert_eq!(gone.len(), 1);
        assert_eq!(
            gone[0].body_path.as_deref(),
            Some("store/11/0000000000000002")
        );
        assert_eq!(store.mailbox(12).await.unwrap().messages, 2);
        // Retention: only what is older than the bound.
        let expired = store.expire_messages(t - 1_000, 100).await.unwrap();
        assert_eq!(expired.iter().map(|e| e.id).collect::<Vec<_>>(), vec![id1]);
        let left = store
            .messages(MessageQuery::Waiting {
                recipient: 12,
                before: 0,
                limit: 10,
            })
            .await
            .unwrap();
        assert_eq!(left.iter().map(|m| m.id).collect::<Vec<_>>(), vec![id3]);
    }
}

/// Two nodes on one PostgreSQL database store messages for the same TV at the same
/// time: the mailbox quota holds across them (each batch takes the recipient's mailbox
/// lock before it counts), so exactly the quota's worth is stored, whichever node
/// stored each. To make the two nodes' batches overlap for certain, a third connection
/// holds a lock on the table that stops both nodes' inserts until both are waiting;
/// without the mailbox lock both would then count the same empty mailbox and store
/// more than the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_mailbox_quota_holds_for_two_nodes_storing_at_once() {
    use call_proxy_server::storage::{MessageInsert, NewMessage, Quota};
    let Some(fresh) = postgres() else {
        eprintln!("skipped: no PostgreSQL cluster (scripts/test.sh starts one)");
        return;
    };
    let a = storage::open(&fresh.config).await.expect("node 1");
    let second = Config {
        node_id: "node-2".into(),
        node_slot: 1,
        ..fresh.config.clone()
    };
    let b = storage::open(&second).await.expect("node 2");
    a.register(checks::reg(12, 1)).await.unwrap();
    let quota = Quota {
        max_messages: 3,
        max_bytes: 1 << 20,
    };
    const EACH: u64 = 20;
    let message = |sender, key| NewMessage {
        sender,
        recipient: 12,
        key,
        kind: 1,
        text: format!("message {key} from {sender}"),
        body: None,
        at_ms: now_ms(),
    };
    let gate = common::db::PgProbe::connect(
        fresh.config.db_url.as_deref().unwrap(),
        fresh.config.db_password_file.as_deref().unwrap(),
    );
    gate.execute("BEGIN; LOCK TABLE user_message IN SHARE MODE");
    let pending: Vec<_> = (0..EACH)
        .flat_map(|k| {
            [
                a.insert_message(message(21, k), quota),
                b.insert_message(message(22, k), quota),
            ]
        })
        .collect();
    // Both nodes' first batches are waiting (one on the table, one on the mailbox lock).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    gate.execute("COMMIT");
    let (mut stored, mut refused) = (0, 0);
    for p in pending {
        match p.await.unwrap() {
            MessageInsert::Stored { .. } => stored += 1,
            MessageInsert::QuotaExceeded { .. } => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((stored, refused), (3, 2 * EACH - 3));
    assert_eq!(a.mailbox(12).await.unwrap().messages, 3);
    assert_eq!(b.mailbox(12).await.unwrap().messages, 3);
    a.close().await;
    b.close().await;
}
