//! Enrollment on SQLite: the writer's step that starts (or finds) a TV's enrollment, the
//! readers' lookups of a key's state, credential and the revocations after a point, and
//! the operator's approvals and revocations, each one transaction on its own read-write
//! connection (the CLI works on the file while the server runs, like its reads).

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use shared_proto::{UnixMillis, UserId};

use super::{db_error, OperatorDb};
use crate::clock::to_db_text;
use crate::storage::enroll::{
    decide, display_code, Approval, CodeState, Credential, EnrollmentRecord, EnrollmentState,
    NewEnrollment, Refusal, Revocation,
};
use crate::storage::StoreError;

fn fp_array(v: Vec<u8>) -> [u8; 32] {
    let mut out = [0u8; 32];
    if v.len() == 32 {
        out.copy_from_slice(&v);
    }
    out
}

/// Writer step: the key's state if it is enrolled or has a live code, else a new pending
/// enrollment under `e.code` (a code in use already fails with `Constraint`: the caller
/// draws another).
pub fn start(tx: &Transaction<'_>, e: &NewEnrollment) -> Result<EnrollmentState, StoreError> {
    let now = state(tx, &e.fingerprint, e.at_ms)?;
    if matches!(
        now,
        EnrollmentState::Enrolled(_) | EnrollmentState::Pending { .. }
    ) {
        return Ok(now);
    }
    tx.prepare_cached(
        "INSERT INTO tv_enrollment (user_code, fingerprint, cert, agent_version, source_ip,
                                    created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut s| {
        s.execute(params![
            e.code,
            &e.fingerprint[..],
            e.cert,
            e.agent_version,
            e.source_ip,
            to_db_text(e.at_ms),
            e.expires_at_ms
        ])
    })
    .map_err(db_error)?;
    Ok(EnrollmentState::Pending {
        code: e.code.clone(),
        expires_at_ms: e.expires_at_ms,
    })
}

/// How the key `fp` stands at `now_ms`.
pub fn state(
    conn: &Connection,
    fp: &[u8; 32],
    now_ms: UnixMillis,
) -> Result<EnrollmentState, StoreError> {
    let cred = credential(conn, fp)?;
    if cred.is_some_and(|c| !c.revoked) {
        return Ok(decide(cred, None, now_ms));
    }
    let latest: Option<(String, String, i64)> = conn
        .prepare_cached(
            "SELECT user_code, state, expires_at FROM tv_enrollment
             WHERE fingerprint = ?1 ORDER BY created_at DESC, rowid DESC LIMIT 1",
        )
        .and_then(|mut s| {
            s.query_row([&fp[..]], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
        })
        .map_err(db_error)?;
    Ok(decide(cred, latest, now_ms))
}

/// The credential of the key `fp`, if any.
pub fn credential(conn: &Connection, fp: &[u8; 32]) -> Result<Option<Credential>, StoreError> {
    conn.prepare_cached(
        "SELECT user_id, revoked_at IS NOT NULL FROM tv_credential WHERE fingerprint = ?1",
    )
    .and_then(|mut s| {
        s.query_row([&fp[..]], |r| {
            Ok(Credential {
                user_id: r.get::<_, i64>(0)? as UserId,
                revoked: r.get(1)?,
            })
        })
        .optional()
    })
    .map_err(db_error)
}

/// Revocations with a sequence number above `after`, oldest first (at most 1,000).
pub fn revocations_after(conn: &Connection, after: i64) -> Result<Vec<Revocation>, StoreError> {
    let mut s = conn
        .prepare_cached(
            "SELECT seq, user_id, fingerprint FROM tv_revocation WHERE seq > ?1 ORDER BY seq LIMIT 1000",
        )
        .map_err(db_error)?;
    let rows = s
        .query_map([after], |r| {
            Ok(Revocation {
                seq: r.get(0)?,
                user_id: r.get::<_, i64>(1)? as UserId,
                fingerprint: fp_array(r.get(2)?),
            })
        })
        .map_err(db_error)?;
    rows.collect::<Result<_, _>>().map_err(db_error)
}

/// The largest revocation sequence number so far (0: none).
pub fn max_revocation(conn: &Connection) -> Result<i64, StoreError> {
    conn.query_row("SELECT coalesce(max(seq), 0) FROM tv_revocation", [], |r| {
        r.get(0)
    })
    .map_err(db_error)
}

/// Opens the database file read-write for one operator change.
pub(super) fn open_rw(path: &Path) -> Result<Connection, StoreError> {
    // The file must exist (and be migrated): the operator changes a server's database,
    // never creates one.
    drop(OperatorDb::open(path)?);
    let conn = Connection::open(path).map_err(db_error)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(db_error)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(db_error)?;
    Ok(conn)
}

fn revoke_in(tx: &Transaction<'_>, user: UserId, at: &str) -> Result<bool, StoreError> {
    let fp: Option<Vec<u8>> = tx
        .query_row(
            "SELECT fingerprint FROM tv_credential WHERE user_id = ?1 AND revoked_at IS NULL",
            [user as i64],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_error)?;
    let Some(fp) = fp else { return Ok(false) };
    tx.execute(
        "UPDATE tv_credential SET revoked_at = ?2 WHERE fingerprint = ?1",
        params![fp, at],
    )
    .map_err(db_error)?;
    tx.execute(
        "INSERT INTO tv_revocation (user_id, fingerprint, at) VALUES (?1, ?2, ?3)",
        params![user as i64, fp, at],
    )
    .map_err(db_error)?;
    Ok(true)
}

/// The operator's first step on a code, whether approving or refusing it.
fn pending(tx: &Transaction<'_>, code: &str, now_ms: UnixMillis) -> Result<CodeState, StoreError> {
    let row: Option<(Vec<u8>, Vec<u8>, String, i64)> = tx
        .query_row(
            "SELECT fingerprint, cert, state, expires_at FROM tv_enrollment WHERE user_code = ?1",
            [code],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()
        .map_err(db_error)?;
    Ok(CodeState::of(row, now_ms))
}

/// Operator: approves the enrollment with code `code` (stored form) for `user`.
pub fn approve(
    path: &Path,
    code: &str,
    user: UserId,
    replace: bool,
    now_ms: UnixMillis,
) -> Result<Approval, StoreError> {
    let mut conn = open_rw(path)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_error)?;
    let (fp, cert) = match pending(&tx, code, now_ms)? {
        CodeState::Open { fingerprint, cert } => (fingerprint, cert),
        CodeState::Unknown => return Ok(Approval::UnknownCode),
        CodeState::Decided => return Ok(Approval::AlreadyDecided),
        CodeState::Expired => return Ok(Approval::Expired),
    };
    let has_tv: bool = tx
        .query_row(
            "SELECT count(*) > 0 FROM tv_credential WHERE user_id = ?1 AND revoked_at IS NULL",
            [user as i64],
            |r| r.get(0),
        )
        .map_err(db_error)?;
    if has_tv && !replace {
        return Ok(Approval::UserHasTv);
    }
    let at = to_db_text(now_ms);
    let replaced = revoke_in(&tx, user, &at)?;
    // A key enrolled (and revoked) before gets a fresh credential row.
    tx.execute("DELETE FROM tv_credential WHERE fingerprint = ?1", [&fp])
        .map_err(db_error)?;
    tx.execute(
        "INSERT INTO tv_credential (fingerprint, user_id, cert, enrolled_at) VALUES (?1, ?2, ?3, ?4)",
        params![fp, user as i64, cert, at],
    )
    .map_err(db_error)?;
    tx.execute(
        "UPDATE tv_enrollment SET state = 'approved', user_id = ?2, decided_at = ?3 WHERE user_code = ?1",
        params![code, user as i64, at],
    )
    .map_err(db_error)?;
    tx.commit().map_err(db_error)?;
    Ok(Approval::Approved { user, replaced })
}

/// Operator: refuses the pending enrollment with code `code` (stored form).
pub fn refuse(path: &Path, code: &str, now_ms: UnixMillis) -> Result<Refusal, StoreError> {
    let mut conn = open_rw(path)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_error)?;
    match pending(&tx, code, now_ms)? {
        CodeState::Open { .. } => {}
        CodeState::Unknown => return Ok(Refusal::UnknownCode),
        CodeState::Decided => return Ok(Refusal::AlreadyDecided),
        CodeState::Expired => return Ok(Refusal::Expired),
    }
    tx.execute(
        "UPDATE tv_enrollment SET state = 'refused', decided_at = ?2 WHERE user_code = ?1",
        params![code, to_db_text(now_ms)],
    )
    .map_err(db_error)?;
    tx.commit().map_err(db_error)?;
    Ok(Refusal::Refused)
}

/// Operator: withdraws `user`'s TV credential; `false` if it had none.
pub fn revoke(path: &Path, user: UserId, now_ms: UnixMillis) -> Result<bool, StoreError> {
    let mut conn = open_rw(path)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_error)?;
    let done = revoke_in(&tx, user, &to_db_text(now_ms))?;
    tx.commit().map_err(db_error)?;
    Ok(done)
}

/// Operator: the newest enrollments (at most `limit`).
pub fn list(
    db: &OperatorDb,
    now_ms: UnixMillis,
    limit: usize,
) -> Result<Vec<EnrollmentRecord>, StoreError> {
    let mut s = db
        .conn()
        .prepare(
            "SELECT user_code, state, expires_at, user_id, fingerprint, agent_version, source_ip, created_at
             FROM tv_enrollment ORDER BY created_at DESC, rowid DESC LIMIT ?1",
        )
        .map_err(db_error)?;
    let rows = s
        .query_map([limit as i64], |r| {
            let state: String = r.get(1)?;
            let expires: i64 = r.get(2)?;
            let fp: Vec<u8> = r.get(4)?;
            Ok(EnrollmentRecord {
                code: display_code(&r.get::<_, String>(0)?),
                state: if state == "pending" && expires <= now_ms {
                    "expired".into()
                } else {
                    state
                },
                user_id: r.get::<_, Option<i64>>(3)?.map(|u| u as UserId),
                fingerprint: fp.iter().map(|b| format!("{b:02x}")).collect(),
                agent_version: r.get(5)?,
                source_ip: r.get(6)?,
                created_at: r.get(7)?,
            })
        })
        .map_err(db_error)?;
    rows.collect::<Result<_, _>>().map_err(db_error)
}

/// Benchmarks only (never used by the server): writes valid credentials for
/// `(certificate, user)` pairs straight into the database at `path` (created and
/// migrated if needed), in one transaction, as if each TV had been enrolled.
pub fn seed_credentials(path: &Path, tvs: &[(Vec<u8>, UserId)]) -> Result<(), StoreError> {
    super::create_schema(path)?;
    let mut conn = Connection::open(path).map_err(db_error)?;
    let tx = conn.transaction().map_err(db_error)?;
    {
        let mut s = tx
            .prepare(
                "INSERT INTO tv_credential (fingerprint, user_id, cert, enrolled_at)
                 VALUES (?1, ?2, ?3, '2026-01-01T00:00:00.000Z')",
            )
            .map_err(db_error)?;
        for (cert, user) in tvs {
            let fp = ring::digest::digest(&ring::digest::SHA256, cert);
            s.execute(params![fp.as_ref(), *user as i64, cert])
                .map_err(db_error)?;
        }
    }
    tx.commit().map_err(db_error)
}
