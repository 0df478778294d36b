//! Messages for switched-off TVs (issue 15), the server's side apart from the request
//! handlers (`handler/message.rs`) and the rows (`storage`): the body directory
//! ([`bodies`]), the media check ([`check`]), the uploads announced on this node, the
//! senders waiting to hear that an online recipient took their message, and the sweep
//! that applies retention.
//!
//! Invariants: a message's row commits only after its body is sealed (checked, synced,
//! in place); a refused body leaves nothing behind (its upload is discarded, and a
//! sealed body whose row was refused is removed); a body's bytes pass through memory a
//! chunk at a time.

pub mod bodies;
pub mod check;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared_proto::{IdempotencyKey, MessageId, MessageKind, UserId};
use tokio::sync::oneshot;

use crate::clock::now_ms;
use crate::config::Config;
use crate::server::Shared;
use crate::storage::{Quota, Store};
use bodies::{Bodies, MediaLimits};

/// Most uploads one TV may have announced and unfinished on this node at once.
pub const MAX_UPLOADS_PER_TV: usize = 8;

/// An upload a `SendMessage` announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// The message's kind.
    pub kind: MessageKind,
    /// The body's announced length.
    pub size: u64,
    /// Its announced SHA-256.
    pub sha256: Vec<u8>,
}

/// The limits of messages, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest text, in characters.
    pub max_text_chars: usize,
    /// Largest body.
    pub max_body_bytes: u64,
    /// Media limits.
    pub media: MediaLimits,
    /// Mailbox quota.
    pub quota: Quota,
    /// How long a sender waits for an online recipient to take its message.
    pub delivery_wait: Duration,
    /// How long messages are kept.
    pub retention: Duration,
}

impl Limits {
    /// From the configuration.
    pub fn of(c: &Config) -> Limits {
        Limits {
            max_text_chars: c.max_text_chars as usize,
            max_body_bytes: c.max_body_mb.saturating_mul(1 << 20),
            media: MediaLimits {
                max_voice_ms: c.max_voice_s.saturating_mul(1000),
                max_video_ms: c.max_video_s.saturating_mul(1000),
                max_picture_side: c.max_picture_side,
            },
            quota: Quota {
                max_messages: c.mailbox_messages,
                max_bytes: c.mailbox_mb.saturating_mul(1 << 20),
            },
            delivery_wait: Duration::from_millis(c.message_delivery_wait_ms),
            retention: Duration::from_secs(u64::from(c.message_retention_days) * 86_400),
        }
    }
}

/// The node's message state.
pub struct Messages {
    /// Where bodies are kept (`None`: text messages only).
    pub bodies: Option<Bodies>,
    /// The limits.
    pub limits: Limits,
    /// Turns to check a body: checks decode whole pictures and walk whole files on the
    /// blocking pool, so at most one per core runs at once (which also bounds the memory
    /// they hold together); the others wait for a turn.
    pub checks: tokio::sync::Semaphore,
    uploads: Mutex<HashMap<(UserId, IdempotencyKey), Upload>>,
    waiting_senders: Mutex<HashMap<MessageId, oneshot::Sender<()>>>,
}

impl Messages {
    /// The message state `config` describes; a body directory that cannot be made is
    /// logged and leaves the server with text messages only.
    pub fn new(config: &Config) -> Messages {
        let bodies = config.body_dir().and_then(|dir| match Bodies::open(&dir) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot open the message body directory: text messages only");
                None
            }
        });
        if bodies.is_none() {
            tracing::warn!("no message body directory (set body_dir): text messages only");
        }
        Messages {
            bodies,
            limits: Limits::of(config),
            checks: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
            uploads: Mutex::new(HashMap::new()),
            waiting_senders: Mutex::new(HashMap::new()),
        }
    }

    /// Records an announced upload; `false` if the TV has too many unfinished.
    pub fn announce(&self, sender: UserId, key: IdempotencyKey, upload: Upload) -> bool {
        let Ok(mut uploads) = self.uploads.lock() else {
            return false;
        };
        if !uploads.contains_key(&(sender, key))
            && uploads.keys().filter(|(u, _)| *u == sender).count() >= MAX_UPLOADS_PER_TV
        {
            return false;
        }
        uploads.insert((sender, key), upload);
        true
    }

    /// The upload `sender` announced under `key`, if any.
    pub fn upload(&self, sender: UserId, key: IdempotencyKey) -> Option<Upload> {
        self.uploads.lock().ok()?.get(&(sender, key)).cloned()
    }

    /// Forgets an upload (sealed or refused).
    pub fn forget(&self, sender: UserId, key: IdempotencyKey) {
        if let Ok(mut uploads) = self.uploads.lock() {
            uploads.remove(&(sender, key));
        }
    }

    /// Waits up to the delivery wait for the recipient to take message `id`.
    pub async fn delivered_within(&self, id: MessageId, wait: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiting_senders.lock() {
            w.insert(id, tx);
        }
        let took = matches!(tokio::time::timeout(wait, rx).await, Ok(Ok(())));
        if let Ok(mut w) = self.waiting_senders.lock() {
            w.remove(&id);
        }
        took
    }

    /// The recipient took message `id`: its sender, if waiting, hears it.
    pub fn taken(&self, id: MessageId) {
        let waiter = self
            .waiting_senders
            .lock()
            .ok()
            .and_then(|mut w| w.remove(&id));
        if let Some(tx) = waiter {
            let _ = tx.send(());
        }
    }
}

/// How often retention and the sweeps of abandoned uploads and unclaimed bodies run.
pub const SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// An upload untouched this long is abandoned.
pub const UPLOAD_IDLE: Duration = Duration::from_secs(24 * 3600);
/// A sealed body no row claims after this long is removed (a crash between sealing and
/// the commit; sealing and committing take milliseconds).
pub const UNCLAIMED_AFTER: Duration = Duration::from_secs(3600);

/// Applies retention and sweeps the body directory every [`SWEEP_EVERY`]; at start it
/// also removes bodies no message claims (what a crash between sealing a body and its
/// row's commit leaves). Runs until the server stops.
pub async fn sweep<S: Store>(shared: &Arc<Shared<S>>) {
    sweep_unclaimed(shared).await;
    loop {
        sweep_once(shared).await;
        tokio::time::sleep(SWEEP_EVERY).await;
    }
}

/// One sweep: expired messages deleted with their bodies, abandoned uploads removed.
pub async fn sweep_once<S: Store>(shared: &Arc<Shared<S>>) {
    let m = &shared.messages;
    let before = now_ms().saturating_sub(m.limits.retention.as_millis() as i64);
    loop {
        match shared.store.expire_messages(before, 1000).await {
            Ok(gone) => {
                let n = gone.len();
                if let Some(bodies) = m.bodies.clone() {
                    let names: Vec<String> = gone.into_iter().filter_map(|g| g.body_path).collect();
                    let _ = tokio::task::spawn_blocking(move || {
                        for name in names {
                            bodies.remove(&name);
                        }
                    })
                    .await;
                }
                if n > 0 {
                    tracing::info!(messages = n, "expired messages deleted");
                }
                if n < 1000 {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot apply message retention");
                break;
            }
        }
    }
    if let Some(b) = m.bodies.clone() {
        let _ = tokio::task::spawn_blocking(move || {
            let abandoned = b.sweep_partials(UPLOAD_IDLE);
            if abandoned > 0 {
                tracing::info!(uploads = abandoned, "abandoned uploads removed");
            }
        })
        .await;
    }
}

/// Removes sealed bodies older than [`UNCLAIMED_AFTER`] that no message row claims.
pub async fn sweep_unclaimed<S: Store>(shared: &Arc<Shared<S>>) {
    let Some(bodies) = shared.messages.bodies.clone() else {
        return;
    };
    let b = bodies.clone();
    let candidates = tokio::task::spawn_blocking(move || b.sealed_older_than(UNCLAIMED_AFTER))
        .await
        .unwrap_or_default();
    for (sender, key, name) in candidates {
        match shared
            .store
            .messages(crate::storage::MessageQuery::Keyed { sender, key })
            .await
        {
            Ok(rows) if rows.is_empty() => {
                tracing::info!(body = %name, "removing a body no message claims");
                let b = bodies.clone();
                let _ = tokio::task::spawn_blocking(move || b.remove(&name)).await;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot check message bodies");
                return;
            }
        }
    }
}
