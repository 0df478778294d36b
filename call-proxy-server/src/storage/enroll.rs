//! Enrollment records, backend-neutral: a TV's pending enrollment (its certificate and
//! the short code the operator approves), its credential once approved (the certificate's
//! fingerprint bound to a user), and the revocations the server watches to cut revoked
//! TVs off. What the server keeps is public: a certificate and its fingerprint; the
//! private key stays on the TV, so nothing here lets a database reader act as a TV.
//!
//! User codes follow RFC 8628 §6.1: 8 letters from an alphabet without vowels (no words,
//! no look-alikes), shown as `BCDF-GHJK`, case-insensitive, dash optional when typed.

use shared_proto::{UnixMillis, UserId};

/// The letters user codes are made of: consonants only (RFC 8628 §6.1's example set).
pub const CODE_ALPHABET: &[u8; 20] = b"BCDFGHJKLMNPQRSTVWXZ";

/// Letters in a user code.
pub const CODE_LEN: usize = 8;

/// A fresh random user code, normalised (8 letters, no dash).
pub fn new_user_code() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..CODE_LEN)
        .map(|_| char::from(CODE_ALPHABET[rng.random_range(0..CODE_ALPHABET.len())]))
        .collect()
}

/// A user code as typed (any case, dashes and spaces anywhere) in its stored form, or
/// `None` if it cannot be one.
pub fn normalise_code(typed: &str) -> Option<String> {
    let code: String = typed
        .chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .map(|c| c.to_ascii_uppercase())
        .collect();
    (code.len() == CODE_LEN && code.bytes().all(|b| CODE_ALPHABET.contains(&b))).then_some(code)
}

/// A stored code as shown to people: `BCDF-GHJK`.
pub fn display_code(code: &str) -> String {
    match (code.get(..4), code.get(4..)) {
        (Some(a), Some(b)) if !b.is_empty() => format!("{a}-{b}"),
        _ => code.to_string(),
    }
}

/// A TV asking to be enrolled.
#[derive(Debug, Clone)]
pub struct NewEnrollment {
    /// SHA-256 of its certificate.
    pub fingerprint: [u8; 32],
    /// Its certificate (DER).
    pub cert: Vec<u8>,
    /// Its agent version.
    pub agent_version: String,
    /// Where it connected from.
    pub source_ip: String,
    /// A fresh code for it, used if it has no pending one ([`new_user_code`]).
    pub code: String,
    /// Now.
    pub at_ms: UnixMillis,
    /// When a new code expires.
    pub expires_at_ms: UnixMillis,
}

/// How a TV's key stands, as the server answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollmentState {
    /// The key is the valid credential of this user.
    Enrolled(UserId),
    /// Waiting for approval of this code until then.
    Pending {
        /// Stored form.
        code: String,
        /// Expiry.
        expires_at_ms: UnixMillis,
    },
    /// The last code of this key expired unapproved.
    Expired,
    /// The operator refused it.
    Refused,
    /// The key's credential was revoked.
    Revoked,
    /// Nothing is known of this key.
    Unknown,
}

/// How a key stands, from its credential (if any) and its newest enrollment (code,
/// state, expiry in Unix ms), at `now_ms`: the one rule every backend applies. A valid
/// credential decides; else the newest enrollment does (a revoked TV that asks again
/// has a newer one than its approval; approved without a credential means another key
/// replaced it).
pub fn decide(
    cred: Option<Credential>,
    latest: Option<(String, String, i64)>,
    now_ms: UnixMillis,
) -> EnrollmentState {
    if let Some(c) = cred.filter(|c| !c.revoked) {
        return EnrollmentState::Enrolled(c.user_id);
    }
    match latest {
        None if cred.is_some() => EnrollmentState::Revoked,
        None => EnrollmentState::Unknown,
        Some((_, st, _)) if st == "refused" => EnrollmentState::Refused,
        Some((_, st, _)) if st == "approved" => EnrollmentState::Revoked,
        Some((code, _, expires)) if expires > now_ms => EnrollmentState::Pending {
            code,
            expires_at_ms: expires,
        },
        Some(_) => EnrollmentState::Expired,
    }
}

/// Whether the enrollment under a code can still be decided: the operator's first step
/// on a code, approving or refusing it, on every backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeState {
    /// Pending and not expired: the TV's fingerprint and certificate.
    Open {
        /// SHA-256 of the certificate.
        fingerprint: Vec<u8>,
        /// The TV's certificate (DER).
        cert: Vec<u8>,
    },
    /// No enrollment has this code.
    Unknown,
    /// Approved or refused already.
    Decided,
    /// Expired before a decision.
    Expired,
}

impl CodeState {
    /// From the code's row (fingerprint, certificate, state, expiry in Unix ms), if any,
    /// at `now_ms`.
    pub fn of(row: Option<(Vec<u8>, Vec<u8>, String, i64)>, now_ms: UnixMillis) -> CodeState {
        match row {
            None => CodeState::Unknown,
            Some((_, _, state, _)) if state != "pending" => CodeState::Decided,
            Some((_, _, _, expires)) if expires <= now_ms => CodeState::Expired,
            Some((fingerprint, cert, _, _)) => CodeState::Open { fingerprint, cert },
        }
    }
}

/// A TV credential, looked up by fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credential {
    /// Whose.
    pub user_id: UserId,
    /// Withdrawn by the operator.
    pub revoked: bool,
}

/// One revocation, in the order they were made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Increasing.
    pub seq: i64,
    /// The user whose TV was revoked.
    pub user_id: UserId,
    /// The revoked certificate's fingerprint.
    pub fingerprint: [u8; 32],
}

/// What approving a code did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    /// The TV is now `user`'s; `replaced` says an earlier TV of that user was revoked.
    Approved {
        /// The user.
        user: UserId,
        /// An earlier credential of this user was revoked by this approval.
        replaced: bool,
    },
    /// No enrollment has this code.
    UnknownCode,
    /// The code expired before it was approved.
    Expired,
    /// The code was approved or refused already.
    AlreadyDecided,
    /// The user has an enrolled TV and `replace` was not asked for.
    UserHasTv,
}

/// What refusing an enrollment code did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The code is refused: the TV's next poll says so, and it never gets a credential
    /// from it.
    Refused,
    /// No enrollment has this code.
    UnknownCode,
    /// The code expired already (nothing to refuse).
    Expired,
    /// The code was approved or refused already.
    AlreadyDecided,
}

/// An enrollment as the operator lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EnrollmentRecord {
    /// As shown (`BCDF-GHJK`).
    pub code: String,
    /// `pending`, `approved`, `refused` or `expired`.
    pub state: String,
    /// The user it was approved for.
    pub user_id: Option<UserId>,
    /// The TV's certificate fingerprint (hex).
    pub fingerprint: String,
    /// The TV's agent version.
    pub agent_version: String,
    /// Where it asked from.
    pub source_ip: String,
    /// When it asked (RFC 3339).
    pub created_at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_8_consonants_typed_any_way() {
        for _ in 0..100 {
            let c = new_user_code();
            assert_eq!(normalise_code(&c).as_deref(), Some(c.as_str()));
            assert_eq!(normalise_code(&display_code(&c).to_lowercase()), Some(c));
        }
        assert_eq!(display_code("BCDFGHJK"), "BCDF-GHJK");
        assert_eq!(normalise_code("bcdf ghjk").as_deref(), Some("BCDFGHJK"));
        assert_eq!(normalise_code("BCDF-GHJA"), None, "a vowel");
        assert_eq!(normalise_code("BCDF-GHJ"), None, "too short");
    }
}
