//! `StartEnrollment` and `PollEnrollment`: a TV that is not enrolled asks for a short
//! code, shows it, and polls until the operator approves it (RFC 8628's device flow,
//! with the TV's TLS client certificate in the role of the device code: only the holder
//! of that key can poll, and the approval binds that key to the user).
//!
//! Also the check every registration passes ([`authenticate`]): on a TLS connection the
//! TV's certificate must be the valid credential of the user it registers as.

use std::sync::Arc;

use shared_proto::{EnrollmentStatus, ErrorCode, Reply, UserId, WireError};

use super::{storage_error, ConnState};
use crate::clock::now_ms;
use crate::server::Shared;
use crate::storage::enroll::{display_code, new_user_code, EnrollmentState, NewEnrollment};
use crate::storage::{Store, StoreError};
use crate::tls::TvIdentity;

/// New codes drawn before giving up when every one collides (it never does in practice:
/// 20⁸ codes).
const CODE_DRAWS: usize = 5;

fn needs_tls() -> WireError {
    WireError::new(
        ErrorCode::UNAUTHENTICATED,
        "enrollment needs a TLS connection with the TV's certificate",
    )
}

/// The status a TV is told for its key's state.
fn status<S: Store>(shared: &Shared<S>, state: EnrollmentState, now: i64) -> EnrollmentStatus {
    match state {
        EnrollmentState::Enrolled(user_id) => EnrollmentStatus::Enrolled { user_id },
        EnrollmentState::Pending {
            code,
            expires_at_ms,
        } => EnrollmentStatus::Pending {
            user_code: display_code(&code),
            expires_in_s: u32::try_from((expires_at_ms - now).max(0) / 1000).unwrap_or(u32::MAX),
            interval_s: shared.config.enrollment_poll_s.max(1),
        },
        EnrollmentState::Expired => EnrollmentStatus::Expired,
        EnrollmentState::Refused => EnrollmentStatus::Refused {
            reason: "the operator refused this TV".into(),
        },
        EnrollmentState::Revoked => EnrollmentStatus::Refused {
            reason: "this TV's credential was revoked or replaced; enroll it again".into(),
        },
        EnrollmentState::Unknown => EnrollmentStatus::Refused {
            reason: "this TV has no enrollment: start one".into(),
        },
    }
}

/// `StartEnrollment`.
pub async fn start<S: Store>(
    shared: &Arc<Shared<S>>,
    st: &ConnState,
    agent_version: String,
) -> Result<Reply, WireError> {
    let identity = st.identity.as_ref().ok_or_else(needs_tls)?;
    if st.session.is_some() {
        return Err(WireError::new(
            ErrorCode::ALREADY_REGISTERED,
            "this TV is enrolled and registered on this connection already",
        ));
    }
    let now = now_ms();
    let ttl_ms =
        i64::try_from(shared.config.enrollment_ttl_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    for _ in 0..CODE_DRAWS {
        let code = new_user_code();
        let result = shared
            .store
            .start_enrollment(NewEnrollment {
                fingerprint: identity.fingerprint.0,
                cert: identity.cert.clone(),
                agent_version: agent_version.clone(),
                source_ip: st.peer.ip().to_canonical().to_string(),
                code: code.clone(),
                at_ms: now,
                expires_at_ms: now.saturating_add(ttl_ms),
            })
            .await;
        match result {
            Ok(state) => {
                if matches!(&state, EnrollmentState::Pending { code: c, .. } if *c == code) {
                    shared.metrics.enrollments_started.inc();
                    tracing::info!(tv = %identity.fingerprint, code = %display_code(&code), peer = %st.peer, "enrollment started");
                }
                return Ok(Reply::Enrollment(status(shared, state, now)));
            }
            Err(StoreError::Constraint(_)) => continue,
            Err(e) => return Err(storage_error(e)),
        }
    }
    Err(storage_error(StoreError::Other(
        "no free enrollment code after several draws".into(),
    )))
}

/// `PollEnrollment`.
pub async fn poll<S: Store>(shared: &Arc<Shared<S>>, st: &ConnState) -> Result<Reply, WireError> {
    let identity = st.identity.as_ref().ok_or_else(needs_tls)?;
    let now = now_ms();
    let state = shared
        .store
        .enrollment(identity.fingerprint.0, now)
        .await
        .map_err(storage_error)?;
    Ok(Reply::Enrollment(status(shared, state, now)))
}

/// Checks that the connection may register as `user`: on TLS, its certificate must be
/// `user`'s valid credential; on plain TCP (`insecure_plaintext`) a TV is who it says.
/// A failure is counted, logged without secrets and charged to the source address.
pub async fn authenticate<S: Store>(
    shared: &Arc<Shared<S>>,
    st: &ConnState,
    user: UserId,
) -> Result<(), WireError> {
    if shared.tls.is_none() {
        return Ok(());
    }
    let refuse = |identity: Option<&TvIdentity>, why: String| {
        shared.metrics.auth_failures.inc();
        shared.gate.auth_failed(st.peer.ip());
        tracing::info!(peer = %st.peer, tv = ?identity, user, reason = %why, "registration refused");
        WireError::new(ErrorCode::UNAUTHENTICATED, why)
    };
    let Some(identity) = st.identity.as_ref() else {
        return Err(refuse(None, "no TV certificate on this connection".into()));
    };
    let credential = shared
        .store
        .credential(identity.fingerprint.0)
        .await
        .map_err(storage_error)?;
    match credential {
        Some(c) if !c.revoked && c.user_id == user => Ok(()),
        Some(c) if !c.revoked => Err(refuse(
            Some(identity),
            format!("this TV is enrolled as user {}, not {user}", c.user_id),
        )),
        Some(_) => Err(refuse(
            Some(identity),
            "this TV's credential was revoked; enroll it again".into(),
        )),
        None => Err(refuse(
            Some(identity),
            format!("this TV is not enrolled (as user {user} or any other): run `tv-agent enroll`"),
        )),
    }
}
