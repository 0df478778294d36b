//! The TV's messages (issue 15): what it keeps in `<data dir>/messages/` — each body as
//! `<id>.<ext>` beside `messages.json`, the list (newest first) — and the one procedure
//! that takes waiting messages from the server ([`fetch_into`]), in the order that loses
//! nothing: every body downloaded (resuming a `.part`), checked against its SHA-256 and
//! synced, then the list written (atomically), and only then the messages acknowledged.
//! A TV switched off at any point gets again what it had not acknowledged, and keeps
//! nothing twice (the list is keyed by message id).
//!
//! Deleting a message ([`delete`]) deletes it on the server first, then here.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shared_proto::{MessageId, MessageInfo, MessageKind, UserId};

use super::transfer::{TransferError, TransferLink};
use crate::files::{read_json, write_json};

/// Most messages kept on the TV (the server's mailbox default).
pub const MAX_KEPT: usize = 500;
/// Largest `messages.json` read.
const MAX_LIST_FILE: u64 = 8 << 20;

/// A message kept on the TV.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptMessage {
    /// The server's id.
    pub message_id: MessageId,
    /// Who left it.
    pub sender: UserId,
    /// When it was stored (Unix ms).
    pub sent_ms: i64,
    /// `text`, `voice`, `picture`, `video`.
    pub kind: String,
    /// The text, or a caption.
    pub text: String,
    /// The body's file in the messages directory.
    pub file: Option<String>,
    /// Its MIME type.
    pub mime: Option<String>,
    /// Its size.
    pub size: u64,
    /// Length of a voice message or clip.
    pub duration_ms: Option<u32>,
    /// Width of a picture or clip.
    pub width: Option<u32>,
    /// Height of a picture or clip.
    pub height: Option<u32>,
    /// The sender's state when it was fetched (`online`, `offline`, `unknown`).
    pub sender_state: String,
    /// The viewer opened it.
    #[serde(default)]
    pub read: bool,
}

/// The messages directory of a data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbox {
    dir: PathBuf,
}

fn ext(mime: &str) -> &'static str {
    match mime {
        "audio/ogg" => "opus",
        "image/jpeg" => "jpg",
        "image/png" => "png",
        "video/mp4" => "mp4",
        "video/webm" => "webm",
        _ => "bin",
    }
}

impl Inbox {
    /// The inbox in `data_dir/messages`.
    pub fn in_data_dir(data_dir: &Path) -> Inbox {
        Inbox {
            dir: data_dir.join("messages"),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn list_path(&self) -> PathBuf {
        self.dir.join("messages.json")
    }

    /// The kept messages, newest first.
    pub fn load(&self) -> std::io::Result<Vec<KeptMessage>> {
        read_json(&self.list_path(), MAX_LIST_FILE)
    }

    fn save(&self, list: &[KeptMessage]) -> std::io::Result<()> {
        write_json(&self.list_path(), list)
    }

    /// The full path of a kept message's body.
    pub fn body_path(&self, m: &KeptMessage) -> Option<PathBuf> {
        m.file.as_deref().map(|f| self.dir.join(f))
    }

    /// Removes messages from the list and their bodies from the directory (here only).
    pub fn remove(&self, ids: &[MessageId]) -> std::io::Result<()> {
        let mut list = self.load()?;
        let (gone, keep): (Vec<_>, Vec<_>) =
            list.drain(..).partition(|m| ids.contains(&m.message_id));
        self.save(&keep)?;
        for m in gone {
            if let Some(p) = self.body_path(&m) {
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(())
    }

    /// Marks a message opened.
    pub fn mark_read(&self, id: MessageId) -> std::io::Result<bool> {
        let mut list = self.load()?;
        let Some(m) = list.iter_mut().find(|m| m.message_id == id) else {
            return Ok(false);
        };
        if !m.read {
            m.read = true;
            self.save(&list)?;
        }
        Ok(true)
    }
}

/// Takes every waiting message from the server into `inbox`: bodies first (checked and
/// synced), then the list, then `shown` with every waiting message as kept (a scripted
/// mode prints them there; an error stops before the acknowledgement), then the
/// acknowledgement. Returns the waiting messages as kept (newest first). A failure
/// part-way leaves the messages unacknowledged: the next fetch gets them again, and a
/// body or list entry already saved is not saved twice.
pub async fn fetch_into(
    link: &mut TransferLink,
    inbox: &Inbox,
    shown: impl FnOnce(&[KeptMessage]) -> std::io::Result<()>,
) -> Result<Vec<KeptMessage>, TransferError> {
    let waiting = link.list_all().await?;
    if waiting.is_empty() {
        return Ok(Vec::new());
    }
    tokio::fs::create_dir_all(&inbox.dir).await?;
    let mut list = {
        let inbox = inbox.clone();
        tokio::task::spawn_blocking(move || inbox.load())
            .await
            .map_err(|e| TransferError::Link(e.to_string()))??
    };
    let mut fresh = Vec::new();
    let mut kept_before = Vec::new();
    for info in &waiting {
        if let Some(m) = list.iter().find(|m| m.message_id == info.message_id) {
            // Kept already (a fetch cut off after the list was written): only the
            // acknowledgement is missing.
            kept_before.push(m.clone());
            continue;
        }
        let file = match &info.body {
            Some(b) => {
                let name = format!("{}.{}", info.message_id, ext(&b.mime));
                let target = inbox.dir.join(&name);
                if tokio::fs::metadata(&target).await.is_err() {
                    let part = inbox.dir.join(format!("{}.part", info.message_id));
                    link.download(info.message_id, b.size, &b.sha256, &part)
                        .await?;
                    tokio::fs::rename(&part, &target).await?;
                }
                Some(name)
            }
            None => None,
        };
        fresh.push(kept(info, file));
    }
    if !fresh.is_empty() {
        // Make the renames durable before the list names them.
        let dir = inbox.dir.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(&dir).and_then(|d| d.sync_all()))
            .await
            .map_err(|e| TransferError::Link(e.to_string()))??;
        let mut merged = fresh.clone();
        merged.append(&mut list);
        merged.sort_by_key(|m| std::cmp::Reverse(m.message_id));
        let dropped: Vec<KeptMessage> = merged.split_off(merged.len().min(MAX_KEPT));
        let inbox2 = inbox.clone();
        tokio::task::spawn_blocking(move || {
            inbox2.save(&merged)?;
            for m in dropped {
                if let Some(p) = inbox2.body_path(&m) {
                    let _ = std::fs::remove_file(p);
                }
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(|e| TransferError::Link(e.to_string()))??;
    }
    let mut all = fresh;
    all.append(&mut kept_before);
    all.sort_by_key(|m| std::cmp::Reverse(m.message_id));
    shown(&all)?;
    let ids: Vec<MessageId> = waiting.iter().map(|m| m.message_id).collect();
    link.ack(&ids).await?;
    Ok(all)
}

fn kept(info: &MessageInfo, file: Option<String>) -> KeptMessage {
    KeptMessage {
        message_id: info.message_id,
        sender: info.sender,
        sent_ms: info.sent_ms,
        kind: MessageKind::name(info.kind).to_string(),
        text: info.text.clone(),
        file,
        mime: info.body.as_ref().map(|b| b.mime.clone()),
        size: info
            .body
            .as_ref()
            .map_or(info.text.len() as u64, |b| b.size),
        duration_ms: info.body.as_ref().and_then(|b| b.duration_ms),
        width: info.body.as_ref().and_then(|b| b.width),
        height: info.body.as_ref().and_then(|b| b.height),
        sender_state: match info.sender_state {
            shared_proto::NetState::Online => "online",
            shared_proto::NetState::Offline => "offline",
            shared_proto::NetState::Unknown => "unknown",
        }
        .to_string(),
        read: false,
    }
}

/// Deletes messages: on the server first, then here (list and bodies). Returns how
/// many the server deleted.
pub async fn delete(
    link: &mut TransferLink,
    inbox: &Inbox,
    ids: &[MessageId],
) -> Result<u32, TransferError> {
    let n = link.delete(ids).await?;
    let inbox = inbox.clone();
    let ids = ids.to_vec();
    tokio::task::spawn_blocking(move || inbox.remove(&ids))
        .await
        .map_err(|e| TransferError::Link(e.to_string()))??;
    Ok(n)
}
