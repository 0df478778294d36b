//! Activating a TV that has no identity yet: the enrollment (RFC 8628's device flow,
//! see call-proxy-server's `handler/enroll.rs`) as both `tv-agent enroll` and a TV
//! switched on without a credential (`tv-agent run`) drive it, and the
//! [`ActivationState`] the TV's screen shows while it runs ("Activate this TV: code
//! BCDF-GHJK").
//!
//! The TV's key is made on the TV (kept in `<data dir>/identity/`, see
//! [`crate::identity`]); the server binds it to a user when the operator approves the
//! code, and the approval's credential is saved before this returns.
//!
//! Two ways to run it ([`EnrollMode`]):
//! - [`EnrollMode::Once`] (`tv-agent enroll`): one code; an unreachable server, a
//!   server error, an expired code or a refusal ends it with an [`EnrollError`].
//! - [`EnrollMode::Tv`] (the daemon): a TV has no keyboard, so it keeps going by
//!   itself: a fresh code when one expires (one request per expiry), the server
//!   retried with capped exponential backoff and jitter, never a tight loop; only a
//!   refusal stops, until the viewer asks for a new code (or, with no screen, it ends).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use control_client::{Client, ClientError, Stream, TlsClient, Transport};
use rand::Rng;
use serde::Serialize;
use shared_proto::{EnrollmentStatus, Reply, Request, UserId};
use tokio::sync::Notify;
use tokio::time::{sleep, timeout, Instant};

use crate::identity::{Enrolled, IdentityDir};

/// How long one connection attempt (TCP, TLS, preamble) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one enrollment request may wait for its reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest and longest wait between polls, whatever the server asks for.
const POLL_MIN: Duration = Duration::from_secs(1);
const POLL_MAX: Duration = Duration::from_secs(60);
/// The shortest wait before asking again after a code expired (a server whose codes
/// live for no time at all still gets at most one request a second).
const RENEW_MIN: Duration = Duration::from_secs(1);
/// `EnrollMode::Once` gives up after this long in all (the old CLI's bound).
const ONCE_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// What the TV's screen shows while it is being activated. Serialised for the page as
/// `{"state": "code", …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ActivationState {
    /// Asking the server for a code.
    Requesting,
    /// A code to show until it is approved or expires.
    Code {
        /// As the operator types it: `BCDF-GHJK`.
        user_code: String,
        /// Seconds it stays valid, as the server said.
        expires_in_s: u32,
        /// When it expires (Unix milliseconds, this TV's clock), for a countdown on a
        /// page opened later.
        expires_at_ms: u64,
        /// How many codes this TV was given since it was switched on (1, 2, …).
        number: u32,
    },
    /// The server cannot be reached (or answered with an error); trying again.
    Retrying {
        /// Why, for the screen and the log.
        reason: String,
        /// When the next attempt is.
        retry_in_ms: u64,
    },
    /// The operator refused this TV (or withdrew its approval): no new code until the
    /// viewer asks for one.
    Refused {
        /// The server's words.
        reason: String,
    },
    /// Approved: the TV's credential is saved and it is starting.
    Enrolled {
        /// The TV's user number.
        user_id: UserId,
    },
}

/// Which policy [`enroll`] follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollMode {
    /// `tv-agent enroll`: one code, every failure ends it.
    Once,
    /// A TV: new codes by itself, the server retried forever, only a refusal stops.
    Tv,
}

/// Where and how to enroll.
#[derive(Debug, Clone)]
pub struct EnrollConfig {
    /// The server, `host:port`.
    pub server: String,
    /// The server's CA certificate (PEM), saved with the credential.
    pub ca_pem: Vec<u8>,
    /// The TV's data directory (its key and credential go in `identity/`).
    pub data_dir: PathBuf,
    /// The policy.
    pub mode: EnrollMode,
}

/// Why enrolling ended without a credential.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The TV's key or the CA could not be used, or the credential not saved.
    #[error("{0}")]
    Setup(String),
    /// The server could not be reached ([`EnrollMode::Once`]).
    #[error("{0}")]
    Unreachable(String),
    /// The code expired before it was approved ([`EnrollMode::Once`]).
    #[error("the code expired before it was approved: run `tv-agent enroll` again")]
    Expired,
    /// The operator refused (or the server refused the request).
    #[error("{0}")]
    Refused(String),
}

/// Waits between attempts: doubling from `min` to `max`, each wait drawn from the upper
/// half (full jitter there), so TVs switched on together after a power cut do not ask
/// in lockstep. Pure: no clock, the caller sleeps.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starting at `min`, never above `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The wait before the next attempt (between half the current step and the step).
    pub fn next_wait(&mut self, rng: &mut impl Rng) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = step / 2;
        half + rng.random_range(Duration::ZERO..=half)
    }

    /// After a success: start again from the shortest wait.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

fn unix_ms_in(d: Duration) -> u64 {
    SystemTime::now()
        .checked_add(d)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Connects and exchanges preambles, within [`CONNECT_TIMEOUT`].
async fn connect(transport: &Transport, server: &str) -> Result<Client<Stream>, String> {
    let attempt = async {
        let stream = transport
            .connect(server, None)
            .await
            .map_err(|e| format!("cannot reach {server}: {e}"))?;
        Client::handshake(stream)
            .await
            .map_err(|e| format!("cannot reach {server}: {e}"))
    };
    timeout(CONNECT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer from {server} in time")))
}

/// Enrolls this TV: asks the server for a code, reports every change of what the
/// screen should show to `show` (a new code, a retry, a refusal, the approval), polls at
/// the server's interval, and on approval saves the credential in the data directory
/// and returns the user. In [`EnrollMode::Tv`] a refusal waits for `new_code` (the
/// viewer asking for another code) if given, and ends with [`EnrollError::Refused`]
/// otherwise.
pub async fn enroll(
    cfg: &EnrollConfig,
    show: &mut (dyn FnMut(&ActivationState) + Send),
    new_code: Option<&Notify>,
) -> Result<UserId, EnrollError> {
    let ids = IdentityDir::new(&cfg.data_dir);
    let key = ids
        .key_or_new()
        .map_err(|e| EnrollError::Setup(e.to_string()))?;
    let transport = Transport::Tls(
        TlsClient::new(&cfg.ca_pem, &key).map_err(|e| EnrollError::Setup(e.to_string()))?,
    );
    let tv = cfg.mode == EnrollMode::Tv;
    let give_up = Instant::now() + ONCE_LIMIT;
    let agent_version = concat!("tv-agent/", env!("CARGO_PKG_VERSION")).to_string();
    let start = Request::StartEnrollment { agent_version };
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut client: Option<Client<Stream>> = None;
    // The server answered on the current connection: a lost link then is the server's
    // limit on connections that do not register (it closes them after a few seconds,
    // polls or not), and is reconnected at once, quietly. The next reply is a poll
    // interval (at least a second) away, so this is at most one connection a second.
    let mut answered = false;
    let mut request = start.clone();
    let mut shown: Option<String> = None;
    let mut codes = 0u32;
    let mut ever_connected = false;
    show(&ActivationState::Requesting);
    loop {
        if !tv && Instant::now() >= give_up {
            return Err(EnrollError::Refused(
                "gave up waiting for the approval".into(),
            ));
        }
        let c = match client.as_mut() {
            Some(c) => c,
            None => match connect(&transport, &cfg.server).await {
                Ok(c) => {
                    ever_connected = true;
                    answered = false;
                    // With a code shown, ask how it stands (a refusal or approval made
                    // meanwhile must not turn into a new code); else ask for one (the
                    // server answers a live code with that code).
                    if shown.is_none() {
                        request = start.clone();
                    }
                    client.insert(c)
                }
                Err(reason) => {
                    if !tv && !ever_connected {
                        return Err(EnrollError::Unreachable(reason));
                    }
                    let wait = backoff.next_wait(&mut rand::rng());
                    tracing::warn!(%reason, retry_in = ?wait, "enrollment: server unreachable");
                    show(&ActivationState::Retrying {
                        reason,
                        retry_in_ms: millis(wait),
                    });
                    sleep(wait).await;
                    continue;
                }
            },
        };
        let reply = match timeout(REQUEST_TIMEOUT, c.request(request.clone())).await {
            Ok(Ok(Reply::Enrollment(s))) => Ok(s),
            Ok(Ok(other)) => Err((
                false,
                format!("unexpected reply to an enrollment request: {other:?}"),
            )),
            Ok(Err(ClientError::Server(e))) => {
                Err((true, format!("the server refused: {}", e.message)))
            }
            Ok(Err(e)) => Err((false, format!("enrollment link lost: {e}"))),
            Err(_) => Err((false, "the server did not answer in time".to_string())),
        };
        let status = match reply {
            Ok(s) => s,
            Err((true, reason)) if !tv => return Err(EnrollError::Refused(reason)),
            Err((false, reason)) if answered => {
                tracing::debug!(%reason, "enrollment link closed; reconnecting");
                client = None;
                continue;
            }
            Err((_, reason)) => {
                // Connect again after a pause, in both modes: the old CLI kept polling
                // the same key's code across a broken link too.
                client = None;
                let wait = backoff.next_wait(&mut rand::rng());
                tracing::warn!(%reason, retry_in = ?wait, "enrollment: retrying");
                if tv {
                    show(&ActivationState::Retrying {
                        reason,
                        retry_in_ms: millis(wait),
                    });
                }
                sleep(wait).await;
                continue;
            }
        };
        backoff.reset();
        answered = true;
        match status {
            EnrollmentStatus::Pending {
                user_code,
                expires_in_s,
                interval_s,
            } => {
                if shown.as_deref() != Some(user_code.as_str()) {
                    codes = codes.saturating_add(1);
                    tracing::info!(code = %user_code, expires_in_s, "enrollment: showing a code");
                    show(&ActivationState::Code {
                        user_code: user_code.clone(),
                        expires_in_s,
                        expires_at_ms: unix_ms_in(Duration::from_secs(u64::from(expires_in_s))),
                        number: codes,
                    });
                    shown = Some(user_code);
                }
                request = Request::PollEnrollment;
                sleep(Duration::from_secs(u64::from(interval_s)).clamp(POLL_MIN, POLL_MAX)).await;
            }
            EnrollmentStatus::Enrolled { user_id } => {
                ids.save_enrolled(
                    &cfg.ca_pem,
                    &Enrolled {
                        user_id,
                        server: cfg.server.clone(),
                    },
                )
                .map_err(|e| EnrollError::Setup(e.to_string()))?;
                tracing::info!(user_id, "enrollment: approved, credential saved");
                show(&ActivationState::Enrolled { user_id });
                return Ok(user_id);
            }
            EnrollmentStatus::Expired => {
                if !tv {
                    return Err(EnrollError::Expired);
                }
                // One fresh code per expiry, and never more than one request a second.
                tracing::info!("enrollment: the code expired; asking for a new one");
                show(&ActivationState::Requesting);
                shown = None;
                request = start.clone();
                sleep(RENEW_MIN).await;
            }
            EnrollmentStatus::Refused { reason } => {
                let Some(asked) = new_code.filter(|_| tv) else {
                    return Err(EnrollError::Refused(reason));
                };
                tracing::warn!(%reason, "enrollment refused; waiting for the viewer");
                show(&ActivationState::Refused { reason });
                // The link may time out meanwhile: the next request reconnects if so.
                asked.notified().await;
                show(&ActivationState::Requesting);
                shown = None;
                request = start.clone();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let steps = [1u64, 2, 4, 8, 8, 8];
        for step in steps {
            let w = b.next_wait(&mut rng);
            let step = Duration::from_secs(step);
            assert!(w >= step / 2 && w <= step, "{w:?} for a step of {step:?}");
        }
        b.reset();
        assert!(b.next_wait(&mut rng) <= Duration::from_secs(1));
    }

    #[test]
    fn the_state_is_serialised_for_the_page() {
        let s = ActivationState::Code {
            user_code: "BCDF-GHJK".into(),
            expires_in_s: 900,
            expires_at_ms: 5,
            number: 1,
        };
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            serde_json::json!({"state": "code", "user_code": "BCDF-GHJK", "expires_in_s": 900,
                               "expires_at_ms": 5, "number": 1})
        );
        assert_eq!(
            serde_json::to_value(ActivationState::Refused {
                reason: "no".into()
            })
            .unwrap(),
            serde_json::json!({"state": "refused", "reason": "no"})
        );
    }
}
