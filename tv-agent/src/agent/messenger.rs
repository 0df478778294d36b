//! What the viewer does with messages, for the UI and the control API: the kept
//! messages, opening one (marked read), deleting one (on the server, then here), and
//! leaving one for another TV (a text, or a voice message recorded from the TV's audio
//! source). Each action opens its own transfer link, so nothing here waits behind, or
//! holds up, the control link's calls.
//!
//! Deleting while the server cannot be reached deletes the message here anyway: it was
//! already acknowledged, so the server never offers it again, and its copy goes at the
//! end of the retention period. The answer says so (`server: false`).

use std::time::Duration;

use shared_proto::{MessageId, MessageKind, SendOutcome, UserId};

use super::inbox::{self, Inbox, KeptMessage};
use super::transfer::{Outgoing, TransferError, TransferLink};
use crate::link::LinkConfig;
use crate::media::AudioSpec;

/// The longest voice message the viewer can record (the server's default limit).
pub const MAX_VOICE: Duration = Duration::from_secs(120);

/// The TV's messages: its inbox, and how it reaches the server's transfer links.
#[derive(Debug, Clone)]
pub struct Messenger {
    link: LinkConfig,
    inbox: Inbox,
    audio_in: AudioSpec,
}

/// What leaving a message came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Left {
    /// The message's id on the server.
    pub message_id: MessageId,
    /// `stored` (for a TV that is off) or `delivered` (the TV took it at once).
    pub outcome: &'static str,
}

/// A message the viewer leaves.
#[derive(Debug, Clone)]
pub enum Leave {
    /// A text.
    Text(String),
    /// A voice message of this length, from the TV's audio source.
    Voice(Duration),
}

impl Messenger {
    /// Messages of the TV `link.user`, kept in `inbox`, voice recorded from `audio_in`.
    pub fn new(link: LinkConfig, inbox: Inbox, audio_in: AudioSpec) -> Messenger {
        Messenger {
            link,
            inbox,
            audio_in,
        }
    }

    /// The inbox.
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    /// The kept messages, newest first (none if the list cannot be read).
    pub async fn list(&self) -> Vec<KeptMessage> {
        let inbox = self.inbox.clone();
        tokio::task::spawn_blocking(move || inbox.load())
            .await
            .ok()
            .and_then(|r| {
                r.map_err(|e| tracing::warn!(error = %e, "cannot read the kept messages"))
                    .ok()
            })
            .unwrap_or_default()
    }

    /// Marks message `id` read; false if there is no such message.
    pub async fn mark_read(&self, id: MessageId) -> Result<bool, String> {
        let inbox = self.inbox.clone();
        tokio::task::spawn_blocking(move || inbox.mark_read(id))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot save the messages list: {e}"))
    }

    /// Deletes message `id` on the server and here. `Ok(true)`: the server deleted it
    /// too; `Ok(false)`: it could not be reached, deleted here only.
    pub async fn delete(&self, id: MessageId) -> Result<bool, String> {
        match TransferLink::open(&self.link).await {
            Ok(mut link) => match inbox::delete(&mut link, &self.inbox, &[id]).await {
                Ok(_) => return Ok(true),
                Err(TransferError::File(e)) => {
                    return Err(format!("cannot delete the message here: {e}"))
                }
                Err(e) => tracing::warn!(error = %e, id, "the server did not delete a message"),
            },
            Err(e) => tracing::warn!(error = %e, id, "cannot reach the server to delete a message"),
        }
        self.delete_here(id).await?;
        Ok(false)
    }

    async fn delete_here(&self, id: MessageId) -> Result<(), String> {
        let inbox = self.inbox.clone();
        tokio::task::spawn_blocking(move || inbox.remove(&[id]))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot delete the message here: {e}"))
    }

    /// Leaves `what` for `to`: records a voice message first (from the TV's audio
    /// source, in real time for a microphone), then sends it on a transfer link. A
    /// refusal (`too_large`, `quota_exceeded`, `unknown_user`, …) is an error with its
    /// outcome word first.
    pub async fn leave(&self, to: UserId, what: Leave) -> Result<Left, (&'static str, String)> {
        let key: u64 = rand::random();
        let (kind, text, file) = match what {
            Leave::Text(t) => (MessageKind::TEXT, t, None),
            Leave::Voice(length) => {
                if length.is_zero() || length > MAX_VOICE {
                    return Err((
                        "too_large",
                        format!("a voice message is 1 to {} s long", MAX_VOICE.as_secs()),
                    ));
                }
                let dir = self.inbox.dir().with_file_name("outbox");
                let path = dir.join(format!("{key:016x}.opus"));
                let spec = self.audio_in.clone();
                let rec = {
                    let path = path.clone();
                    tokio::task::spawn_blocking(move || {
                        std::fs::create_dir_all(&dir)?;
                        crate::media::voice_note::record(&spec, length, &path)
                    })
                    .await
                };
                match rec {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(("bad_media", format!("{e:#}"))),
                    Err(e) => return Err(("bad_media", e.to_string())),
                }
                (MessageKind::VOICE, String::new(), Some(path))
            }
        };
        let msg = Outgoing {
            to,
            key,
            kind,
            text,
        };
        let result = async {
            let mut link = TransferLink::open(&self.link).await?;
            link.send(&msg, file.as_deref()).await
        }
        .await;
        if let Some(f) = &file {
            let _ = tokio::fs::remove_file(f).await;
        }
        match result {
            Ok(sent) => Ok(Left {
                message_id: sent.message_id,
                outcome: if sent.outcome == SendOutcome::DELIVERED {
                    "delivered"
                } else {
                    "stored"
                },
            }),
            Err(e) => Err((e.outcome(), e.to_string())),
        }
    }
}
