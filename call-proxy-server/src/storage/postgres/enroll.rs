//! Enrollment on PostgreSQL: the writer's step that starts (or finds) a TV's enrollment,
//! the readers' lookups of a key's state, credential and the revocations after a point,
//! and the operator's approvals, refusals and revocations, each one transaction on a
//! pooled connection (the same rules as [`crate::storage::sqlite::enroll`]).

use deadpool_postgres::GenericClient;
use deadpool_postgres::Object;
use shared_proto::{UnixMillis, UserId};

use crate::storage::enroll::{
    decide, display_code, Approval, CodeState, Credential, EnrollmentRecord, EnrollmentState,
    NewEnrollment, Refusal, Revocation,
};
use crate::storage::StoreError;

fn fp_array(v: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    if v.len() == 32 {
        out.copy_from_slice(v);
    }
    out
}

/// Writer step (inside the batch's transaction and savepoint): the key's state if it is
/// enrolled or has a live code, else a new pending enrollment under `e.code` (a code in
/// use already fails with `Constraint`: the caller draws another).
pub async fn start(conn: &Object, e: &NewEnrollment) -> Result<EnrollmentState, StoreError> {
    let now = state(conn, &e.fingerprint, e.at_ms).await?;
    if matches!(
        now,
        EnrollmentState::Enrolled(_) | EnrollmentState::Pending { .. }
    ) {
        return Ok(now);
    }
    let stmt = conn
        .prepare_cached(
            "INSERT INTO tv_enrollment (user_code, fingerprint, cert, agent_version, source_ip,
                                        created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, tvcall_ts($6), $7)",
        )
        .await?;
    conn.execute(
        &stmt,
        &[
            &e.code,
            &&e.fingerprint[..],
            &e.cert,
            &e.agent_version,
            &e.source_ip,
            &e.at_ms,
            &e.expires_at_ms,
        ],
    )
    .await?;
    Ok(EnrollmentState::Pending {
        code: e.code.clone(),
        expires_at_ms: e.expires_at_ms,
    })
}

/// How the key `fp` stands at `now_ms`.
pub async fn state<C: GenericClient + Sync>(
    conn: &C,
    fp: &[u8; 32],
    now_ms: UnixMillis,
) -> Result<EnrollmentState, StoreError> {
    let cred = credential(conn, fp).await?;
    if cred.is_some_and(|c| !c.revoked) {
        return Ok(decide(cred, None, now_ms));
    }
    let latest = conn
        .query_opt(
            "SELECT user_code, state, expires_at FROM tv_enrollment
             WHERE fingerprint = $1 ORDER BY created_at DESC, seq DESC LIMIT 1",
            &[&&fp[..]],
        )
        .await?;
    let latest = match latest {
        Some(r) => Some((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)),
        None => None,
    };
    Ok(decide(cred, latest, now_ms))
}

/// The credential of the key `fp`, if any.
pub async fn credential<C: GenericClient + Sync>(
    conn: &C,
    fp: &[u8; 32],
) -> Result<Option<Credential>, StoreError> {
    let row = conn
        .query_opt(
            "SELECT user_id, revoked_at IS NOT NULL FROM tv_credential WHERE fingerprint = $1",
            &[&&fp[..]],
        )
        .await?;
    Ok(match row {
        Some(r) => Some(Credential {
            user_id: r.try_get::<_, i64>(0)? as UserId,
            revoked: r.try_get(1)?,
        }),
        None => None,
    })
}

/// Revocations with a sequence number above `after`, oldest first (at most 1,000).
pub async fn revocations_after<C: GenericClient + Sync>(
    conn: &C,
    after: i64,
) -> Result<Vec<Revocation>, StoreError> {
    let rows = conn
        .query(
            "SELECT seq, user_id, fingerprint FROM tv_revocation WHERE seq > $1
             ORDER BY seq LIMIT 1000",
            &[&after],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Revocation {
                seq: r.try_get(0)?,
                user_id: r.try_get::<_, i64>(1)? as UserId,
                fingerprint: fp_array(r.try_get::<_, &[u8]>(2)?),
            })
        })
        .collect()
}

async fn revoke_in<C: GenericClient + Sync>(
    tx: &C,
    user: UserId,
    at: UnixMillis,
) -> Result<bool, StoreError> {
    let Some(row) = tx
        .query_opt(
            "SELECT fingerprint FROM tv_credential WHERE user_id = $1 AND revoked_at IS NULL
             FOR UPDATE",
            &[&(user as i64)],
        )
        .await?
    else {
        return Ok(false);
    };
    let fp: Vec<u8> = row.try_get(0)?;
    tx.execute(
        "UPDATE tv_credential SET revoked_at = tvcall_ts($2) WHERE fingerprint = $1",
        &[&fp, &at],
    )
    .await?;
    tx.execute(
        "INSERT INTO tv_revocation (user_id, fingerprint, at) VALUES ($1, $2, tvcall_ts($3))",
        &[&(user as i64), &fp, &at],
    )
    .await?;
    Ok(true)
}

/// The operator's first step on a code, whether approving or refusing it (the row is
/// locked until the transaction ends).
async fn pending<C: GenericClient + Sync>(
    tx: &C,
    code: &str,
    now_ms: UnixMillis,
) -> Result<CodeState, StoreError> {
    let row = tx
        .query_opt(
            "SELECT fingerprint, cert, state, expires_at FROM tv_enrollment
             WHERE user_code = $1 FOR UPDATE",
            &[&code],
        )
        .await?;
    let row = match row {
        Some(r) => Some((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)),
        None => None,
    };
    Ok(CodeState::of(row, now_ms))
}

/// Operator: approves the enrollment with code `code` (stored form) for `user`.
pub async fn approve(
    conn: &mut Object,
    code: &str,
    user: UserId,
    replace: bool,
    now_ms: UnixMillis,
) -> Result<Approval, StoreError> {
    let tx = conn.transaction().await?;
    let (fp, cert) = match pending(&tx, code, now_ms).await? {
        CodeState::Open { fingerprint, cert } => (fingerprint, cert),
        CodeState::Unknown => return Ok(Approval::UnknownCode),
        CodeState::Decided => return Ok(Approval::AlreadyDecided),
        CodeState::Expired => return Ok(Approval::Expired),
    };
    let has_tv: bool = tx
        .query_one(
            "SELECT count(*) > 0 FROM tv_credential WHERE user_id = $1 AND revoked_at IS NULL",
            &[&(user as i64)],
        )
        .await?
        .try_get(0)?;
    if has_tv && !replace {
        return Ok(Approval::UserHasTv);
    }
    let replaced = revoke_in(&tx, user, now_ms).await?;
    // A key enrolled (and revoked) before gets a fresh credential row.
    tx.execute("DELETE FROM tv_credential WHERE fingerprint = $1", &[&fp])
        .await?;
    tx.execute(
        "INSERT INTO tv_credential (fingerprint, user_id, cert, enrolled_at)
         VALUES ($1, $2, $3, tvcall_ts($4))",
        &[&fp, &(user as i64), &cert, &now_ms],
    )
    .await?;
    tx.execute(
        "UPDATE tv_enrollment SET state = 'approved', user_id = $2, decided_at = tvcall_ts($3)
         WHERE user_code = $1",
        &[&code, &(user as i64), &now_ms],
    )
    .await?;
    tx.commit().await?;
    Ok(Approval::Approved { user, replaced })
}

/// Operator: refuses the pending enrollment with code `code` (stored form).
pub async fn refuse(
    conn: &mut Object,
    code: &str,
    now_ms: UnixMillis,
) -> Result<Refusal, StoreError> {
    let tx = conn.transaction().await?;
    match pending(&tx, code, now_ms).await? {
        CodeState::Open { .. } => {}
        CodeState::Unknown => return Ok(Refusal::UnknownCode),
        CodeState::Decided => return Ok(Refusal::AlreadyDecided),
        CodeState::Expired => return Ok(Refusal::Expired),
    }
    tx.execute(
        "UPDATE tv_enrollment SET state = 'refused', decided_at = tvcall_ts($2) WHERE user_code = $1",
        &[&code, &now_ms],
    )
    .await?;
    tx.commit().await?;
    Ok(Refusal::Refused)
}

/// Operator: withdraws `user`'s TV credential; `false` if it had none.
pub async fn revoke(
    conn: &mut Object,
    user: UserId,
    now_ms: UnixMillis,
) -> Result<bool, StoreError> {
    let tx = conn.transaction().await?;
    let done = revoke_in(&tx, user, now_ms).await?;
    tx.commit().await?;
    Ok(done)
}

/// Operator: the newest enrollments (at most `limit`).
pub async fn list(
    conn: &Object,
    now_ms: UnixMillis,
    limit: usize,
) -> Result<Vec<EnrollmentRecord>, StoreError> {
    let rows = conn
        .query(
            "SELECT user_code, state, expires_at, user_id, fingerprint, agent_version, source_ip,
                    tvcall_text(created_at)
             FROM tv_enrollment ORDER BY created_at DESC, seq DESC LIMIT $1",
            &[&i64::try_from(limit).unwrap_or(i64::MAX)],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let state: String = r.try_get(1)?;
            let expires: i64 = r.try_get(2)?;
            let fp: &[u8] = r.try_get(4)?;
            Ok(EnrollmentRecord {
                code: display_code(&r.try_get::<_, String>(0)?),
                state: if state == "pending" && expires <= now_ms {
                    "expired".into()
                } else {
                    state
                },
                user_id: r.try_get::<_, Option<i64>>(3)?.map(|u| u as UserId),
                fingerprint: fp.iter().map(|b| format!("{b:02x}")).collect(),
                agent_version: r.try_get(5)?,
                source_ip: r.try_get(6)?,
                created_at: r.try_get(7)?,
            })
        })
        .collect()
}

/// Benchmarks only (never used by the server): writes valid credentials for
/// `(certificate, user)` pairs straight into the database at `target` (created and
/// migrated if needed), in one statement, as if each TV had been enrolled.
pub async fn seed_credentials(
    target: &super::PgTarget,
    tvs: &[(Vec<u8>, UserId)],
) -> Result<(), StoreError> {
    super::create_schema(target).await?;
    let pool = target.pool(1, true)?;
    let conn = super::connection(&pool).await?;
    let fingerprints: Vec<Vec<u8>> = tvs
        .iter()
        .map(|(cert, _)| {
            ring::digest::digest(&ring::digest::SHA256, cert)
                .as_ref()
                .to_vec()
        })
        .collect();
    let users: Vec<i64> = tvs.iter().map(|(_, u)| *u as i64).collect();
    let certs: Vec<&[u8]> = tvs.iter().map(|(c, _)| c.as_slice()).collect();
    conn.execute(
        "INSERT INTO tv_credential (fingerprint, user_id, cert, enrolled_at)
         SELECT f, u, c, now() FROM unnest($1::bytea[], $2::bigint[], $3::bytea[]) AS t(f, u, c)",
        &[&fingerprints, &users, &certs],
    )
    .await?;
    Ok(())
}
