//! The TV's transfer link (issue 15): a second connection to the server, authenticated
//! with the same credential as the control link but never registering, which carries
//! messages and their bodies so that a 10 MB body never queues in front of a dial, an
//! answer or a heartbeat (those stay on the control link, in their own TCP stream).
//!
//! Uploads and downloads resume: a `SendMessage` is answered with the offset the server
//! has (`UploadFrom`), and a download continues a `.part` file from its length. Chunks
//! are pipelined (a window of [`WINDOW`] in flight), so loopback throughput is not one
//! round trip per 48 KiB. Every body is checked against its SHA-256 on both ends: the
//! server before it stores it, the TV before it keeps it.

use std::path::Path;
use std::time::Duration;

use control_client::{ClientError, Connection, Incoming, Stream};
use shared_proto::{
    BodyRef, ErrorCode, IdempotencyKey, MessageId, MessageInfo, MessageKind, MessageSent, Reply,
    Request, RequestId, SendMessage, UserId, WireError, MAX_CHUNK, MAX_PAGE,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::link::{reach_transfer_node, LinkConfig};

/// Chunks in flight at once on a transfer link.
pub const WINDOW: usize = 8;
/// Page size of message listings.
const LIST_PAGE: u16 = 50;
/// How often a `SendMessage` round (announce, upload, finish) is tried on one link
/// before giving up (a server that keeps losing the upload).
const ROUNDS: usize = 4;

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The server refused (too large, bad media, quota, unknown user, …): final.
    #[error("{0}")]
    Refused(WireError),
    /// The server has no messages (one release behind: `UNSUPPORTED`).
    #[error("the server does not take messages: {0}")]
    Unsupported(String),
    /// The link failed (unreachable, closed, timed out): try again later.
    #[error("{0}")]
    Link(String),
    /// A local file failed.
    #[error("{0}")]
    File(#[from] std::io::Error),
}

impl TransferError {
    /// The word a scripted mode prints as the outcome.
    pub fn outcome(&self) -> &'static str {
        match self {
            TransferError::Refused(e) => e.code.name(),
            TransferError::Unsupported(_) => "unsupported",
            TransferError::Link(_) => "unreachable",
            TransferError::File(_) => "file_error",
        }
    }
}

fn link_error(e: ClientError) -> TransferError {
    match e {
        ClientError::Server(w) if w.code == ErrorCode::UNSUPPORTED => {
            TransferError::Unsupported(w.message)
        }
        ClientError::Server(w) => TransferError::Refused(w),
        ClientError::Closed(Some(w)) => TransferError::Link(format!("server closed: {w}")),
        e => TransferError::Link(e.to_string()),
    }
}

/// An open transfer link.
pub struct TransferLink {
    conn: Connection<Stream>,
    max_chunk: usize,
    timeout: Duration,
}

/// A message to leave: what it is and, for a body, the file holding it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Who it is for.
    pub to: UserId,
    /// Its key (kept by the caller to resend the same message).
    pub key: IdempotencyKey,
    /// What it is.
    pub kind: MessageKind,
    /// Text or caption.
    pub text: String,
}

impl TransferLink {
    /// Connects (through the dispatcher, if `cfg.server` is one) and opens the link as
    /// `cfg.user`.
    pub async fn open(cfg: &LinkConfig) -> Result<TransferLink, TransferError> {
        let timeout = cfg.request_timeout;
        let attempt = async {
            let mut conn = reach_transfer_node(cfg)
                .await
                .map_err(TransferError::Link)?;
            let open = Request::OpenTransfer { user_id: cfg.user };
            match conn.call(open, |_| {}).await.map_err(link_error)? {
                Reply::TransferOpen { max_chunk } => Ok(TransferLink {
                    conn,
                    max_chunk: (max_chunk as usize).clamp(1, MAX_CHUNK),
                    timeout,
                }),
                other => Err(TransferError::Link(format!(
                    "unexpected answer to OpenTransfer: {other:?}"
                ))),
            }
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(TransferError::Link(format!(
                    "no answer from {} in time",
                    cfg.server
                )))
            })
    }

    async fn call(&mut self, request: Request) -> Result<Reply, TransferError> {
        tokio::time::timeout(self.timeout, self.conn.call(request, |_| {}))
            .await
            .map_err(|_| TransferError::Link("no answer in time".into()))?
            .map_err(link_error)
    }

    async fn recv_reply(&mut self) -> Result<(RequestId, Result<Reply, WireError>), TransferError> {
        loop {
            let got = tokio::time::timeout(self.timeout, self.conn.recv())
                .await
                .map_err(|_| TransferError::Link("no answer in time".into()))?
                .map_err(link_error)?;
            match got {
                Incoming::Reply { id, result } => return Ok((id, result)),
                Incoming::Unreadable { reason, .. } => return Err(TransferError::Link(reason)),
                Incoming::Event(_) => {}
            }
        }
    }

    /// Leaves `msg`, uploading `body` (a file) if the kind has one: announced, sent
    /// from where the server stands (a broken earlier upload resumes), finished.
    pub async fn send(
        &mut self,
        msg: &Outgoing,
        body: Option<&Path>,
    ) -> Result<MessageSent, TransferError> {
        let body_ref = match body {
            Some(path) => {
                let path = path.to_path_buf();
                let (size, sha256) = tokio::task::spawn_blocking(move || file_digest(&path))
                    .await
                    .map_err(|e| TransferError::Link(e.to_string()))??;
                Some(BodyRef { size, sha256 })
            }
            None => None,
        };
        let request = SendMessage {
            to: msg.to,
            key: msg.key,
            kind: msg.kind,
            text: msg.text.clone(),
            body: body_ref.clone(),
        };
        for _ in 0..ROUNDS {
            match self.call(Request::SendMessage(request.clone())).await? {
                Reply::MessageSent(sent) => return Ok(sent),
                Reply::UploadFrom { have } => {
                    let (Some(path), Some(b)) = (body, body_ref.as_ref()) else {
                        return Err(TransferError::Link(
                            "the server asked for a body of a text".into(),
                        ));
                    };
                    match self.upload(msg.key, path, have, b.size).await {
                        Ok(()) => {}
                        // The server lost the announcement (restarted): announce again.
                        Err(TransferError::Refused(e)) if e.code == ErrorCode::NO_SUCH_MESSAGE => {}
                        Err(e) => return Err(e),
                    }
                }
                other => {
                    return Err(TransferError::Link(format!(
                        "unexpected answer to SendMessage: {other:?}"
                    )))
                }
            }
        }
        Err(TransferError::Link("the upload did not finish".into()))
    }

    /// Sends the body from `from` to `size`, [`WINDOW`] chunks in flight.
    async fn upload(
        &mut self,
        key: IdempotencyKey,
        path: &Path,
        from: u64,
        size: u64,
    ) -> Result<(), TransferError> {
        let mut file = tokio::fs::File::open(path).await?;
        file.seek(std::io::SeekFrom::Start(from)).await?;
        let mut next = from;
        let mut in_flight = 0usize;
        let mut buf = vec![0u8; self.max_chunk];
        loop {
            while in_flight < WINDOW && next < size {
                let want = (self.max_chunk as u64).min(size - next) as usize;
                file.read_exact(&mut buf[..want]).await?;
                let request = Request::PutChunk {
                    key,
                    offset: next,
                    bytes: buf[..want].to_vec(),
                };
                self.conn.send(request).await.map_err(link_error)?;
                next += want as u64;
                in_flight += 1;
            }
            if in_flight == 0 {
                return Ok(());
            }
            let (_, result) = self.recv_reply().await?;
            in_flight -= 1;
            match result {
                Ok(Reply::ChunkStored { .. }) => {}
                Ok(other) => {
                    return Err(TransferError::Link(format!(
                        "unexpected answer to PutChunk: {other:?}"
                    )))
                }
                Err(e) => {
                    // Drain what is in flight so the link stays usable, then report.
                    for _ in 0..in_flight {
                        let _ = self.recv_reply().await;
                    }
                    return Err(TransferError::Refused(e));
                }
            }
        }
    }

    /// Every message waiting for this TV, newest first.
    pub async fn list_all(&mut self) -> Result<Vec<MessageInfo>, TransferError> {
        let mut out = Vec::new();
        let mut before: MessageId = 0;
        loop {
            let reply = self
                .call(Request::ListMessages {
                    before,
                    limit: LIST_PAGE,
                })
                .await?;
            let Reply::Messages(page) = reply else {
                return Err(TransferError::Link(format!(
                    "unexpected answer to ListMessages: {reply:?}"
                )));
            };
            let Some(last) = page.messages.last().map(|m| m.message_id) else {
                return Ok(out);
            };
            // Ids only go down; a server that repeats itself is not followed forever.
            if before != 0 && last >= before {
                return Ok(out);
            }
            before = last;
            out.extend(page.messages);
            if !page.more || out.len() >= 10 * MAX_PAGE {
                return Ok(out);
            }
        }
    }

    /// Downloads message `id`'s body of `size` bytes into `part` (continuing what it
    /// holds), [`WINDOW`] chunks in flight; checks it against `sha256` and syncs it.
    /// A part that does not match is deleted (the next try starts over).
    pub async fn download(
        &mut self,
        id: MessageId,
        size: u64,
        sha256: &[u8],
        part: &Path,
    ) -> Result<(), TransferError> {
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .await?;
        let mut have = file.metadata().await?.len();
        if have > size {
            file.set_len(0).await?;
            have = 0;
        }
        let mut next = have;
        let mut in_flight = std::collections::VecDeque::new();
        loop {
            while in_flight.len() < WINDOW && next < size {
                let len = (self.max_chunk as u64).min(size - next) as u32;
                let rid = self
                    .conn
                    .send(Request::GetChunk {
                        message_id: id,
                        offset: next,
                        len,
                    })
                    .await
                    .map_err(link_error)?;
                in_flight.push_back((rid, len));
                next += u64::from(len);
            }
            let Some((rid, len)) = in_flight.pop_front() else {
                break;
            };
            let (got, result) = self.recv_reply().await?;
            if got != rid {
                return Err(TransferError::Link(
                    "a chunk's answer came out of order".into(),
                ));
            }
            match result {
                Ok(Reply::Chunk { bytes }) if bytes.len() == len as usize => {
                    file.write_all(&bytes).await?;
                }
                Ok(Reply::Chunk { bytes }) => {
                    return Err(TransferError::Link(format!(
                        "the server sent {} bytes of a {len}-byte chunk (the body is shorter than listed)",
                        bytes.len()
                    )))
                }
                Ok(other) => {
                    return Err(TransferError::Link(format!(
                        "unexpected answer to GetChunk: {other:?}"
                    )))
                }
                Err(e) => return Err(TransferError::Refused(e)),
            }
        }
        file.sync_all().await?;
        drop(file);
        let p = part.to_path_buf();
        let (len, digest) = tokio::task::spawn_blocking(move || file_digest(&p))
            .await
            .map_err(|e| TransferError::Link(e.to_string()))??;
        if len != size || digest != sha256 {
            let _ = tokio::fs::remove_file(part).await;
            return Err(TransferError::Link(format!(
                "message {id}'s body does not match its SHA-256; it will be fetched again"
            )));
        }
        Ok(())
    }

    /// Tells the server these messages are kept on the TV.
    pub async fn ack(&mut self, ids: &[MessageId]) -> Result<u32, TransferError> {
        let mut n = 0;
        for page in ids.chunks(MAX_PAGE) {
            if let Reply::Acked { count } = self
                .call(Request::AckMessages {
                    message_ids: page.to_vec(),
                })
                .await?
            {
                n += count;
            }
        }
        Ok(n)
    }

    /// Deletes these messages on the server.
    pub async fn delete(&mut self, ids: &[MessageId]) -> Result<u32, TransferError> {
        let mut n = 0;
        for page in ids.chunks(MAX_PAGE) {
            if let Reply::Deleted { count } = self
                .call(Request::DeleteMessages {
                    message_ids: page.to_vec(),
                })
                .await?
            {
                n += count;
            }
        }
        Ok(n)
    }
}

/// A file's length and SHA-256, read as a stream.
pub fn file_digest(path: &Path) -> std::io::Result<(u64, Vec<u8>)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        len += n as u64;
        ctx.update(&buf[..n]);
    }
    Ok((len, ctx.finish().as_ref().to_vec()))
}
