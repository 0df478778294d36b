//! The message requests of a transfer link (issue 15): `OpenTransfer` (authenticated as
//! a registration is, but no session), `SendMessage` (stores a text at once; a body
//! once it has all arrived, been checked and sealed), `PutChunk`, `ListMessages`,
//! `GetChunk`, `AckMessages` and `DeleteMessages`.
//!
//! Every refusal says why and leaves nothing behind: a bad body's upload is discarded, a
//! sealed body whose row is refused (quota, unknown recipient) is removed, and nothing
//! is answered `stored` before its row committed.

use std::sync::Arc;

use shared_proto::{
    BodyInfo, ErrorCode, Event, MessageId, MessageInfo, MessageKind, MessagePage, MessageSent,
    NetState, Reply, SendMessage, SendOutcome, UserId, WireError, MAX_CHUNK, MAX_FRAME_LEN,
};

use super::{storage_error, ConnState};
use crate::clock::now_ms;
use crate::messages::bodies::SealError;
use crate::messages::Upload;
use crate::server::Shared;
use crate::storage::{MessageInsert, MessageQuery, MessageRow, NewMessage, Settle, Store};

/// The user of this connection's transfer link.
fn transfer_user(st: &ConnState) -> Result<UserId, WireError> {
    st.transfer.ok_or_else(|| {
        WireError::new(
            ErrorCode::NOT_REGISTERED,
            "open a transfer link (OpenTransfer) before message requests",
        )
    })
}

/// The largest chunk this server gives or takes (what fits its frames).
pub fn max_chunk<S: Store>(shared: &Shared<S>) -> usize {
    MAX_CHUNK.min(
        shared
            .config
            .max_frame_len
            .min(MAX_FRAME_LEN)
            .saturating_sub(1024),
    )
}

/// `OpenTransfer`.
pub async fn open<S: Store>(
    shared: &Arc<Shared<S>>,
    st: &mut ConnState,
    user: UserId,
) -> Result<Reply, WireError> {
    if st.session.is_some() || st.transfer.is_some() {
        return Err(WireError::new(
            ErrorCode::ALREADY_REGISTERED,
            "this connection is registered or a transfer link already",
        ));
    }
    super::enroll::authenticate(shared, st, user).await?;
    super::register::check_token(shared, st, user)?;
    st.transfer = Some(user);
    if let Some(identity) = st.identity.as_mut() {
        identity.cert = Vec::new();
        identity.token = None;
    }
    tracing::debug!(user, "transfer link open");
    Ok(Reply::TransferOpen {
        max_chunk: max_chunk(shared) as u32,
    })
}

/// A refusal, counted by its reason.
fn refuse<S: Store>(shared: &Shared<S>, code: ErrorCode, message: String) -> WireError {
    shared.metrics.message_refused(code.name());
    tracing::info!(reason = code.name(), %message, "message refused");
    WireError::new(code, message)
}

/// `SendMessage`.
pub async fn send<S: Store>(
    shared: &Arc<Shared<S>>,
    st: &mut ConnState,
    m: SendMessage,
) -> Result<Reply, WireError> {
    let me = transfer_user(st)?;
    let msgs = &shared.messages;
    if m.to == me {
        return Err(WireError::new(
            ErrorCode::INVALID_ARGUMENT,
            "a TV cannot leave a message for itself",
        ));
    }
    // A message already stored under this key (a repeat after a lost answer, or the
    // finishing repeat of an upload that was stored already) is answered as stored.
    let prior = shared
        .store
        .messages(MessageQuery::Keyed {
            sender: me,
            key: m.key,
        })
        .await
        .map_err(storage_error)?;
    if let Some(row) = prior.first() {
        return Ok(sent(row.id, row.delivered));
    }
    let chars = m.text.chars().count();
    if chars > msgs.limits.max_text_chars {
        return Err(refuse(
            shared,
            ErrorCode::TOO_LARGE,
            format!(
                "the text has {chars} characters; at most {} are taken",
                msgs.limits.max_text_chars
            ),
        ));
    }
    if shared.store.metrics().is_full() {
        return Err(super::storage_full());
    }
    if shared
        .store
        .users(vec![m.to])
        .await
        .map_err(storage_error)?
        .is_empty()
    {
        return Err(refuse(
            shared,
            ErrorCode::UNKNOWN_USER,
            format!("user {} is not known to this server", m.to),
        ));
    }
    let body = match (&m.body, m.kind.has_body()) {
        (Some(b), true) => Some(b.clone()),
        _ => None,
    };
    let meta = match body {
        None => None,
        Some(b) => {
            let Some(bodies) = msgs.bodies.clone() else {
                return Err(WireError::new(
                    ErrorCode::UNSUPPORTED,
                    "this server keeps no message bodies (no body_dir): send text only",
                ));
            };
            if b.size > msgs.limits.max_body_bytes {
                return Err(refuse(
                    shared,
                    ErrorCode::TOO_LARGE,
                    format!(
                        "the body is {} bytes; at most {} are taken",
                        b.size, msgs.limits.max_body_bytes
                    ),
                ));
            }
            // Refused before any byte is sent when the mailbox cannot take it (the
            // insert checks again in its own step).
            let mailbox = shared.store.mailbox(m.to).await.map_err(storage_error)?;
            let quota = msgs.limits.quota;
            let adds = b.size.saturating_add(m.text.len() as u64);
            if mailbox.messages >= quota.max_messages
                || mailbox.bytes.saturating_add(adds) > quota.max_bytes
            {
                return Err(quota_refusal(shared, m.to, mailbox.messages, mailbox.bytes));
            }
            let have = blocking({
                let bodies = bodies.clone();
                let key = m.key;
                move || bodies.have(me, key)
            })
            .await?;
            if have < b.size {
                let upload = Upload {
                    kind: m.kind,
                    size: b.size,
                    sha256: b.sha256.clone(),
                };
                if !msgs.announce(me, m.key, upload) {
                    return Err(WireError::new(
                        ErrorCode::RATE_LIMITED,
                        format!(
                            "at most {} unfinished uploads per TV",
                            crate::messages::MAX_UPLOADS_PER_TV
                        ),
                    ));
                }
                return Ok(Reply::UploadFrom { have });
            }
            let limits = msgs.limits.media;
            let (kind, key, size, sha) = (m.kind, m.key, b.size, b.sha256.clone());
            let turn = msgs
                .checks
                .acquire()
                .await
                .map_err(|e| internal(format!("body check failed: {e}")))?;
            let sealed = tokio::task::spawn_blocking(move || {
                bodies.seal(me, key, kind, size, &sha, &limits)
            })
            .await
            .map_err(|e| internal(format!("body check failed: {e}")))?;
            drop(turn);
            msgs.forget(me, m.key);
            match sealed {
                Ok(meta) => Some(meta),
                Err(SealError::BadHash(why)) => {
                    return Err(refuse(shared, ErrorCode::BAD_HASH, why));
                }
                Err(SealError::BadMedia { reason, message }) => {
                    shared.metrics.message_bad_media(reason);
                    return Err(refuse(shared, ErrorCode::BAD_MEDIA, message));
                }
                Err(SealError::TooLong(why)) => {
                    return Err(refuse(shared, ErrorCode::TOO_LARGE, why));
                }
                Err(SealError::Io(e)) => {
                    return Err(io_refusal(e));
                }
            }
        }
    };
    let body_name = meta.as_ref().map(|b| b.path.clone());
    let new = NewMessage {
        sender: me,
        recipient: m.to,
        key: m.key,
        kind: m.kind.0,
        text: m.text,
        body: meta,
        at_ms: now_ms(),
    };
    let inserted = shared.store.insert_message(new, msgs.limits.quota).await;
    // A refused row must not leave its sealed body behind.
    let remove_body = || {
        if let (Some(bodies), Some(name)) = (msgs.bodies.clone(), body_name.clone()) {
            tokio::task::spawn_blocking(move || bodies.remove(&name));
        }
    };
    match inserted {
        Err(e) => {
            remove_body();
            Err(storage_error(e))
        }
        Ok(MessageInsert::AlreadyStored { id, delivered }) => Ok(sent(id, delivered)),
        Ok(MessageInsert::UnknownRecipient) => {
            remove_body();
            Err(refuse(
                shared,
                ErrorCode::UNKNOWN_USER,
                format!("user {} is not known to this server", m.to),
            ))
        }
        Ok(MessageInsert::QuotaExceeded { messages, bytes }) => {
            remove_body();
            Err(quota_refusal(shared, m.to, messages, bytes))
        }
        Ok(MessageInsert::Stored { id, waiting }) => {
            shared.metrics.message_stored(m.kind.name());
            tracing::debug!(
                from = me,
                to = m.to,
                id,
                kind = m.kind.name(),
                "message stored"
            );
            let event = Event::MessagesWaiting { count: waiting };
            let here = shared.registry.notify(m.to, event.clone());
            if !here {
                if let Some(cluster) = &shared.cluster {
                    cluster.push_anywhere(m.to, event).await;
                }
            }
            let delivered = here && msgs.delivered_within(id, msgs.limits.delivery_wait).await;
            Ok(sent(id, delivered))
        }
    }
}

fn sent(message_id: MessageId, delivered: bool) -> Reply {
    Reply::MessageSent(MessageSent {
        message_id,
        outcome: if delivered {
            SendOutcome::DELIVERED
        } else {
            SendOutcome::STORED
        },
    })
}

fn quota_refusal<S: Store>(shared: &Shared<S>, to: UserId, messages: u32, bytes: u64) -> WireError {
    let q = shared.messages.limits.quota;
    refuse(
        shared,
        ErrorCode::QUOTA_EXCEEDED,
        format!(
            "TV {to}'s mailbox is full ({messages} of {} messages, {} of {} MiB)",
            q.max_messages,
            bytes >> 20,
            q.max_bytes >> 20
        ),
    )
}

fn internal(why: String) -> WireError {
    tracing::error!(%why, "message failure");
    WireError::new(
        ErrorCode::INTERNAL,
        "the server could not keep this; nothing was stored, retry",
    )
}

fn io_refusal(e: std::io::Error) -> WireError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => super::storage_full(),
        _ => internal(e.to_string()),
    }
}

/// Runs blocking body I/O off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, WireError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal(format!("body task failed: {e}")))?
        .map_err(io_refusal)
}

/// `PutChunk`.
pub async fn put_chunk<S: Store>(
    shared: &Arc<Shared<S>>,
    st: &ConnState,
    key: u64,
    offset: u64,
    bytes: Vec<u8>,
) -> Result<Reply, WireError> {
    let me = transfer_user(st)?;
    let msgs = &shared.messages;
    let (Some(bodies), Some(upload)) = (msgs.bodies.clone(), msgs.upload(me, key)) else {
        return Err(WireError::new(
            ErrorCode::NO_SUCH_MESSAGE,
            "no upload under this key here: send the message (SendMessage) first",
        ));
    };
    let end = offset.saturating_add(bytes.len() as u64);
    if end > upload.size {
        bodies.discard(me, key);
        msgs.forget(me, key);
        return Err(refuse(
            shared,
            ErrorCode::BAD_HASH,
            format!(
                "more bytes than the {} announced; upload discarded",
                upload.size
            ),
        ));
    }
    let have = blocking(move || bodies.append(me, key, offset, &bytes)).await?;
    Ok(Reply::ChunkStored { have })
}

/// `ListMessages`: the page is cut short to fit a frame.
pub async fn list<S: Store>(
    shared: &Arc<Shared<S>>,
    st: &ConnState,
    before: MessageId,
    limit: u16,
) -> Result<Reply, WireError> {
    let me = transfer_user(st)?;
    let limit = usize::from(limit);
    let rows = shared
        .store
        .messages(MessageQuery::Waiting {
            recipient: me,
            before,
            limit: limit + 1,
        })
        .await
        .map_err(storage_error)?;
    let room = shared.config.max_frame_len.min(MAX_FRAME_LEN) / 2;
    let mut used = 0usize;
    let mut messages = Vec::with_capacity(rows.len().min(limit));
    let mut more = false;
    for (i, row) in rows.into_iter().enumerate() {
        let cost = 160 + row.text.len();
        if i == limit || (used + cost > room && !messages.is_empty()) {
            more = true;
            break;
        }
        used += cost;
        messages.push(info(row));
    }
    Ok(Reply::Messages(MessagePage { messages, more }))
}

fn info(r: MessageRow) -> MessageInfo {
    MessageInfo {
        message_id: r.id,
        sender: r.sender,
        sent_ms: r.at_ms,
        kind: MessageKind(r.kind),
        text: r.text,
        body: r.body.map(|b| BodyInfo {
            size: b.size,
            sha256: b.sha256.to_vec(),
            mime: b.mime,
            duration_ms: b.duration_ms,
            width: b.width,
            height: b.height,
        }),
        sender_state: match r.sender_online {
            Some(true) => NetState::Online,
            Some(false) => NetState::Offline,
            None => NetState::Unknown,
        },
    }
}

/// `GetChunk`: the body's name is looked up once per message and connection.
pub async fn get_chunk<S: Store>(
    shared: &Arc<Shared<S>>,
    st: &mut ConnState,
    message_id: MessageId,
    offset: u64,
    len: u32,
) -> Result<Reply, WireError> {
    let me = transfer_user(st)?;
    let no_such = || {
        WireError::new(
            ErrorCode::NO_SUCH_MESSAGE,
            format!("no message {message_id} with a body for this TV"),
        )
    };
    let Some(bodies) = shared.messages.bodies.clone() else {
        return Err(no_such());
    };
    let name = match &st.reading {
        Some((id, name)) if *id == message_id => name.clone(),
        _ => {
            let rows = shared
                .store
                .messages(MessageQuery::One {
                    recipient: me,
                    id: message_id,
                })
                .await
                .map_err(storage_error)?;
            let name = rows
                .into_iter()
                .next()
                .and_then(|r| r.body)
                .map(|b| b.path)
                .ok_or_else(no_such)?;
            st.reading = Some((message_id, name.clone()));
            name
        }
    };
    let len = (len as usize).min(max_chunk(shared));
    let bytes = tokio::task::spawn_blocking(move || bodies.read_at(&name, offset, len))
        .await
        .map_err(|e| internal(format!("body task failed: {e}")))?
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                no_such()
            } else {
                internal(e.to_string())
            }
        })?;
    Ok(Reply::Chunk { bytes })
}

/// `AckMessages` and `DeleteMessages`.
pub async fn settle<S: Store>(
    shared: &Arc<Shared<S>>,
    st: &mut ConnState,
    ids: Vec<MessageId>,
    how: Settle,
) -> Result<Reply, WireError> {
    let me = transfer_user(st)?;
    let done = shared
        .store
        .settle_messages(me, ids, how, now_ms())
        .await
        .map_err(storage_error)?;
    let count = u32::try_from(done.len()).unwrap_or(u32::MAX);
    match how {
        Settle::Ack => {
            for d in &done {
                shared.messages.taken(d.id);
            }
            Ok(Reply::Acked { count })
        }
        Settle::Delete => {
            st.reading = None;
            if let Some(bodies) = shared.messages.bodies.clone() {
                let names: Vec<String> = done.into_iter().filter_map(|d| d.body_path).collect();
                let _ = tokio::task::spawn_blocking(move || {
                    for n in names {
                        bodies.remove(&n);
                    }
                })
                .await;
            }
            Ok(Reply::Deleted { count })
        }
    }
}
