//! Message rows (issue 15), backend-neutral: what the server stores about a message a TV
//! left for another (`user_message`), the mailbox quota an insert is checked against, and
//! what reads and deletions answer. The bodies themselves are files the server's
//! `messages::bodies` keeps beside the database; a row names its body by a path relative
//! to that directory.

use shared_proto::{IdempotencyKey, MessageId, UnixMillis, UserId};

/// A message to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// Who left it (`user_message.user_id`).
    pub sender: UserId,
    /// Who it is for (`user_message.otheruser_id`).
    pub recipient: UserId,
    /// The sender's idempotency key: stored at most once per sender and key.
    pub key: IdempotencyKey,
    /// [`shared_proto::MessageKind`] number.
    pub kind: u8,
    /// Its text (a text message) or caption.
    pub text: String,
    /// Its body, already durably in place.
    pub body: Option<BodyMeta>,
    /// When it was stored.
    pub at_ms: UnixMillis,
}

/// A stored body: what the check found and where the file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyMeta {
    /// Bytes.
    pub size: u64,
    /// SHA-256.
    pub sha256: [u8; 32],
    /// MIME type.
    pub mime: String,
    /// Length of a voice message or clip.
    pub duration_ms: Option<u32>,
    /// Width of a picture or clip.
    pub width: Option<u32>,
    /// Height of a picture or clip.
    pub height: Option<u32>,
    /// The file, relative to the body directory.
    pub path: String,
}

/// A recipient's mailbox limits, checked in the insert's own step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Most messages kept for one TV.
    pub max_messages: u32,
    /// Most bytes (bodies and texts) kept for one TV.
    pub max_bytes: u64,
}

/// What became of an insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageInsert {
    /// Stored durably.
    Stored {
        /// Its id.
        id: MessageId,
        /// Messages waiting for the recipient now, this one included.
        waiting: u32,
    },
    /// The sender stored a message under this key already: nothing written.
    AlreadyStored {
        /// That message.
        id: MessageId,
        /// Whether the recipient took it already.
        delivered: bool,
    },
    /// No such recipient: nothing written.
    UnknownRecipient,
    /// The recipient's mailbox has no room: nothing written.
    QuotaExceeded {
        /// Messages kept for the recipient.
        messages: u32,
        /// Bytes kept for the recipient.
        bytes: u64,
    },
}

/// A stored message, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    /// Its id.
    pub id: MessageId,
    /// Who left it.
    pub sender: UserId,
    /// Who it is for.
    pub recipient: UserId,
    /// The sender's key.
    pub key: IdempotencyKey,
    /// [`shared_proto::MessageKind`] number.
    pub kind: u8,
    /// Text or caption.
    pub text: String,
    /// Its body.
    pub body: Option<BodyMeta>,
    /// When it was stored.
    pub at_ms: UnixMillis,
    /// The recipient's TV took it.
    pub delivered: bool,
    /// The sender's network state now (`None`: no row).
    pub sender_online: Option<bool>,
}

/// Which messages to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageQuery {
    /// Up to `limit` undelivered messages for `recipient` with id below `before` (0: no
    /// bound), newest first.
    Waiting {
        /// The TV.
        recipient: UserId,
        /// Cursor.
        before: MessageId,
        /// Page size.
        limit: usize,
    },
    /// One message, if it is for `recipient`.
    One {
        /// The TV.
        recipient: UserId,
        /// The message.
        id: MessageId,
    },
    /// The message `sender` stored under `key`, if any.
    Keyed {
        /// Who left it.
        sender: UserId,
        /// Its key.
        key: IdempotencyKey,
    },
}

/// What a recipient does with messages it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Kept on the TV: stop listing them.
    Ack,
    /// Deleted by the viewer: delete them (and their bodies).
    Delete,
}

/// A message an acknowledgement, a deletion or an expiry changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The message.
    pub id: MessageId,
    /// Its body's file (relative to the body directory), for a deletion to remove.
    pub body_path: Option<String>,
}

/// A TV's mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mailbox {
    /// Messages it has not taken yet.
    pub waiting: u32,
    /// Messages kept for it (taken or not).
    pub messages: u32,
    /// Bytes kept for it (bodies and texts).
    pub bytes: u64,
}
