//! Asking the distribution service for a node ([`assign`]): on a fresh connection, the
//! preambles, one `ASSIGN` ([`shared_proto::dispatch`]), its answer. A peer that is a
//! node, not a dispatcher, answers `UNSUPPORTED`; the connection is then handed back,
//! ready for `Register` on the same link (a single node needs no extra setting).

use shared_proto::dispatch::{
    assign_frame, decode_assign_reply, is_not_a_dispatcher, Assign, AssignReply, Assignment,
};
use shared_proto::{Features, Preamble};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::connection::Connection;
use crate::error::ClientError;

/// Largest answer accepted (an assignment is a few hundred bytes).
const MAX_ANSWER_LEN: usize = 4096;

/// What the peer at `--server` turned out to be.
pub enum Assigned<S> {
    /// A dispatcher: go to this node with this token.
    Node(Assignment),
    /// A node (it does not know `ASSIGN`): register on this connection.
    AtNode(Connection<S>),
}

/// Sends `ASSIGN` on a fresh `stream` (asking for `features` should it be a node) and
/// reads the answer. A dispatcher's refusal is [`ClientError::Server`].
pub async fn assign<S>(
    mut stream: S,
    features: Features,
    request: &Assign,
) -> Result<Assigned<S>, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    stream
        .write_all(&Preamble::client_with(features).encode())
        .await?;
    let frame = assign_frame(1, request)?;
    stream.write_all(&frame).await?;
    stream.flush().await?;
    crate::connection::read_accept(&mut stream).await?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
    if len > MAX_ANSWER_LEN {
        return Err(ClientError::Protocol(format!(
            "a {len}-byte answer to ASSIGN"
        )));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    match decode_assign_reply(&payload)?.1 {
        AssignReply::Assigned(a) => Ok(Assigned::Node(a)),
        AssignReply::Error(e) if is_not_a_dispatcher(&e) => {
            Ok(Assigned::AtNode(Connection::handshaken(stream)))
        }
        AssignReply::Error(e) => Err(ClientError::Server(e)),
    }
}
