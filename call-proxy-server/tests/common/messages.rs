//! Helpers for the message tests (`tests/messages.rs`, `tests/process.rs`): leaving,
//! listing and fetching messages over a transfer link as a TV does, and the fixtures
//! (real media files made by ffmpeg, kept by the media-check crate).

use std::path::Path;

use shared_proto::*;

use super::Tv;

/// Opens the transfer link on `c`, a fresh connection as `user`'s TV.
pub async fn open_transfer(c: &mut Tv, user: UserId) {
    match c.request(Request::OpenTransfer { user_id: user }).await {
        Ok(Reply::TransferOpen { max_chunk }) => assert!(max_chunk as usize <= MAX_CHUNK),
        other => panic!("OpenTransfer: {other:?}"),
    }
}

/// A body from the media-check crate's fixtures (real files made by ffmpeg).
pub fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../media-check/tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

pub fn message(
    to: UserId,
    key: u64,
    kind: MessageKind,
    text: &str,
    body: Option<&[u8]>,
) -> Request {
    Request::SendMessage(SendMessage {
        to,
        key,
        kind,
        text: text.into(),
        body: body.map(|b| BodyRef {
            size: b.len() as u64,
            sha256: sha256(b),
        }),
    })
}

/// Bytes per chunk these tests send (smaller than the largest, so small fixtures span
/// several).
pub const CHUNK: usize = 4096;

/// Sends `bytes[from..to]` in chunks.
pub async fn put(c: &mut Tv, key: u64, bytes: &[u8], from: usize, to: usize) {
    try_put(c, key, bytes, from, to).await.expect("PutChunk");
}

/// Sends `bytes[from..to]` in chunks; a broken link is an error, any other answer than
/// the server having it all so far a failure.
pub async fn try_put(
    c: &mut Tv,
    key: u64,
    bytes: &[u8],
    from: usize,
    to: usize,
) -> Result<(), control_client::ClientError> {
    let mut at = from;
    while at < to {
        let end = (at + CHUNK).min(to);
        let reply = c
            .request(Request::PutChunk {
                key,
                offset: at as u64,
                bytes: bytes[at..end].to_vec(),
            })
            .await?;
        match reply {
            Reply::ChunkStored { have } => assert_eq!(have, end as u64),
            other => panic!("PutChunk: {other:?}"),
        }
        at = end;
    }
    Ok(())
}

/// Leaves a message with a body in one go; the server's answer to the finishing send.
pub async fn send_body(
    c: &mut Tv,
    to: UserId,
    key: u64,
    kind: MessageKind,
    body: &[u8],
) -> Result<Reply, control_client::ClientError> {
    let req = message(to, key, kind, "", Some(body));
    match c.request(req.clone()).await? {
        Reply::UploadFrom { have } => try_put(c, key, body, have as usize, body.len()).await?,
        other => return Ok(other),
    }
    c.request(req).await
}

pub fn stored(r: Reply) -> MessageId {
    match r {
        Reply::MessageSent(MessageSent {
            message_id,
            outcome: SendOutcome::STORED,
        }) => message_id,
        other => panic!("not stored: {other:?}"),
    }
}

pub fn refused(r: Result<Reply, control_client::ClientError>) -> ErrorCode {
    match r {
        Err(control_client::ClientError::Server(e)) => e.code,
        other => panic!("not refused: {other:?}"),
    }
}

pub async fn list(c: &mut Tv) -> Vec<MessageInfo> {
    match c
        .request(Request::ListMessages {
            before: 0,
            limit: 20,
        })
        .await
        .unwrap()
    {
        Reply::Messages(p) => p.messages,
        other => panic!("{other:?}"),
    }
}

pub async fn fetch_body(c: &mut Tv, id: MessageId, size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        match c
            .request(Request::GetChunk {
                message_id: id,
                offset: out.len() as u64,
                len: MAX_CHUNK as u32,
            })
            .await
            .unwrap()
        {
            Reply::Chunk { bytes } => {
                assert!(!bytes.is_empty());
                out.extend(bytes);
            }
            other => panic!("{other:?}"),
        }
    }
    out
}
