//! The distribution service (issue 18, section D): the `dispatch` role, and the
//! temporary tokens it issues and nodes verify.
//!
//! A TV at power-on connects to the dispatcher over TLS 1.3 with its credential (its
//! client certificate, as on the control link) and asks `ASSIGN`
//! ([`shared_proto::dispatch`]). The dispatcher looks the certificate up in
//! `tv_credential`, decides whether the account is entitled to service
//! ([`entitlement`], [`within_allowance`]), picks a live node (sticky, else least
//! loaded: [`choose`] among
//! [`crate::storage::postgres::dispatch::PgDispatch::live_nodes`]) and answers with the
//! node's address and a [`Token`] signed with its Ed25519 key.
//!
//! The TV then connects to that node presenting the token *inside its TLS handshake*,
//! as a second entry of its client certificate chain (after its own certificate). TLS
//! 1.3's CertificateVerify is the TV's signature over the handshake transcript, which
//! contains that chain: the token is bound to this one TLS channel by the key the token
//! names (its fingerprint), so everything sent on the link is covered by it and a token
//! copied off the wire is useless without the TV's private key. A node configured with
//! the dispatcher's public key ([`crate::Config::dispatch_public_key_file`]) checks, at
//! `Register`, the signature, the expiry, that the token is for this node, for the
//! registering user and for the certificate of this connection ([`Token::verify`]),
//! without a database round trip.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use shared_proto::dispatch::{
    assigned_frame, decode_assign, split, Assign, Assignment, ASSIGN, MAX_NODE_TEXT_LEN,
    MAX_TOKEN_LEN,
};
use shared_proto::{
    ErrorCode, Preamble, UnixMillis, UserId, WireError, MIN_PROTOCOL_VERSION, PREAMBLE_LEN,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::clock::now_ms;
use crate::storage::postgres::dispatch::{
    DispatchCredential, NodeCandidate, PgDispatch, PickedNode,
};
use crate::tls::Fingerprint;

/// What a signed token says: who may register, where, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The user the TV is enrolled as.
    pub user_id: UserId,
    /// The node it may register on.
    pub node_id: String,
    /// The SHA-256 fingerprint of the TV's certificate.
    pub fingerprint: [u8; 32],
    /// When it stops admitting a registration (Unix ms).
    pub expires_at_ms: UnixMillis,
}

/// First bytes of every token: format and version.
const TOKEN_MAGIC: &[u8; 4] = b"TVT1";
/// What the signature covers before the token's fields (domain separation).
const SIGNING_CONTEXT: &[u8] = b"tvcall dispatch token v1\0";
/// Bytes of an Ed25519 signature.
const SIGNATURE_LEN: usize = 64;

/// Why a node refuses a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token on a connection to a node that requires one.
    #[error(
        "this node admits TVs sent by the dispatcher only: connect to the dispatcher for a token"
    )]
    Missing,
    /// Not a token at all.
    #[error("malformed dispatch token")]
    Malformed,
    /// The signature does not verify with the dispatcher's key.
    #[error("forged dispatch token (its signature does not verify)")]
    Forged,
    /// Past its expiry.
    #[error("expired dispatch token: ask the dispatcher again")]
    Expired,
    /// Issued for another node.
    #[error("dispatch token for another node ({0}), not this one")]
    OtherNode(String),
    /// Issued for another user.
    #[error("dispatch token for another user ({0})")]
    OtherUser(UserId),
    /// Issued for another TV (certificate).
    #[error("dispatch token for another TV (it names another certificate)")]
    OtherTv,
}

impl Token {
    fn body(&self) -> Vec<u8> {
        let node = self.node_id.as_bytes();
        let mut out = Vec::with_capacity(4 + 8 + 8 + 32 + 1 + node.len());
        out.extend_from_slice(TOKEN_MAGIC);
        out.extend_from_slice(&self.user_id.to_be_bytes());
        out.extend_from_slice(&self.expires_at_ms.to_be_bytes());
        out.extend_from_slice(&self.fingerprint);
        // Node ids are checked short (config validation) before any token is made.
        out.push(u8::try_from(node.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(&node[..node.len().min(usize::from(u8::MAX))]);
        out
    }

    /// The token's bytes, signed with `key`.
    pub fn sign(&self, key: &SigningKey) -> Vec<u8> {
        let mut out = self.body();
        let mut msg = SIGNING_CONTEXT.to_vec();
        msg.extend_from_slice(&out);
        out.extend_from_slice(key.pair.sign(&msg).as_ref());
        out
    }

    /// Parses and checks the signature of `bytes`, with nothing else checked.
    pub fn open(bytes: &[u8], key: &PublicKey) -> Result<Token, TokenError> {
        if bytes.len() > MAX_TOKEN_LEN || bytes.len() < SIGNATURE_LEN {
            return Err(TokenError::Malformed);
        }
        let (body, sig) = bytes.split_at(bytes.len() - SIGNATURE_LEN);
        let fixed = 4 + 8 + 8 + 32 + 1;
        if body.len() < fixed || &body[..4] != TOKEN_MAGIC {
            return Err(TokenError::Malformed);
        }
        let node_len = usize::from(body[fixed - 1]);
        if body.len() != fixed + node_len {
            return Err(TokenError::Malformed);
        }
        let mut msg = SIGNING_CONTEXT.to_vec();
        msg.extend_from_slice(body);
        UnparsedPublicKey::new(&ED25519, key.0)
            .verify(&msg, sig)
            .map_err(|_| TokenError::Forged)?;
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[at..at + 8]);
            b
        };
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(&body[20..52]);
        let node_id = std::str::from_utf8(&body[fixed..])
            .map_err(|_| TokenError::Malformed)?
            .to_string();
        Ok(Token {
            user_id: u64::from_be_bytes(u64_at(4)),
            expires_at_ms: i64::from_be_bytes(u64_at(12)),
            fingerprint,
            node_id,
        })
    }

    /// Checks that `bytes` admit `user`, on the connection whose certificate has
    /// `fingerprint`, to node `node_id` at time `now_ms`.
    pub fn verify(
        bytes: &[u8],
        key: &PublicKey,
        node_id: &str,
        user: UserId,
        fingerprint: &Fingerprint,
        now_ms: UnixMillis,
    ) -> Result<Token, TokenError> {
        let t = Token::open(bytes, key)?;
        if t.expires_at_ms <= now_ms {
            return Err(TokenError::Expired);
        }
        if t.node_id != node_id {
            return Err(TokenError::OtherNode(t.node_id));
        }
        if t.fingerprint != fingerprint.0 {
            return Err(TokenError::OtherTv);
        }
        if t.user_id != user {
            return Err(TokenError::OtherUser(t.user_id));
        }
        Ok(t)
    }
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// Its contents are not a key.
    #[error("{0}")]
    Bad(String),
}

/// The dispatcher's Ed25519 signing key (PKCS#8).
pub struct SigningKey {
    /// The key pair.
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.public().hex())
    }
}

impl SigningKey {
    /// A key from PKCS#8 DER.
    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, KeyError> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(|pair| SigningKey { pair })
            .map_err(|e| KeyError::Bad(format!("not an Ed25519 PKCS#8 key: {e}")))
    }

    /// A new random key and its PKCS#8 DER.
    pub fn generate() -> Result<(SigningKey, Vec<u8>), KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let der = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|e| KeyError::Bad(format!("cannot make a key: {e}")))?;
        let der = der.as_ref().to_vec();
        Ok((SigningKey::from_pkcs8(&der)?, der))
    }

    /// The key in `path` (PKCS#8, DER or PEM). Absent, a new one is made there (owner
    /// only) with its public key beside it in `<path>.pub` ([`public_key_path`]).
    pub fn load_or_create(path: &Path) -> Result<SigningKey, KeyError> {
        let io = |what: &str, p: &Path, e: std::io::Error| {
            KeyError::Io(format!("cannot {what} {}: {e}", p.display()))
        };
        let key = match std::fs::read(path) {
            Ok(bytes) => {
                use rustls::pki_types::pem::PemObject;
                let der = match rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(&bytes) {
                    Ok(k) => k.secret_pkcs8_der().to_vec(),
                    Err(_) => bytes,
                };
                SigningKey::from_pkcs8(&der)
                    .map_err(|e| KeyError::Bad(format!("{}: {e}", path.display())))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (key, der) = SigningKey::generate()?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
                }
                crate::tls::write_atomic(path, &der, true).map_err(|e| io("write", path, e))?;
                tracing::info!(key = %path.display(), "made a dispatch signing key");
                key
            }
            Err(e) => return Err(io("read", path, e)),
        };
        let public = public_key_path(path);
        let hex = format!("{}\n", key.public().hex());
        if std::fs::read_to_string(&public).ok().as_deref() != Some(hex.as_str()) {
            crate::tls::write_atomic(&public, hex.as_bytes(), false)
                .map_err(|e| io("write", &public, e))?;
        }
        Ok(key)
    }

    /// Its public key.
    pub fn public(&self) -> PublicKey {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(out)
    }
}

/// Where the public key of the signing key in `key_path` is written: `<key_path>.pub`.
pub fn public_key_path(key_path: &Path) -> PathBuf {
    let mut p = key_path.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// The dispatcher's Ed25519 public key, as nodes hold it.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct PublicKey(pub [u8; 32]);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.hex())
    }
}

impl PublicKey {
    /// Lower-case hex.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (surrounding white space ignored).
    pub fn from_hex(text: &str) -> Result<PublicKey, KeyError> {
        let t = text.trim();
        if t.len() != 64 || !t.is_ascii() {
            return Err(KeyError::Bad(
                "a dispatch public key is 64 hex digits".into(),
            ));
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16)
                .map_err(|_| KeyError::Bad("a dispatch public key is 64 hex digits".into()))?;
        }
        Ok(PublicKey(out))
    }

    /// Reads the file the dispatcher wrote (`<key>.pub`: 64 hex digits).
    pub fn load(path: &Path) -> Result<PublicKey, KeyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| KeyError::Io(format!("cannot read {}: {e}", path.display())))?;
        PublicKey::from_hex(&text).map_err(|e| KeyError::Bad(format!("{}: {e}", path.display())))
    }
}

/// Whether the TV holding `credential` is entitled to service now, and as which user:
/// enrolled and not revoked. (Its allowance is checked next: [`within_allowance`].)
pub fn entitlement(credential: Option<DispatchCredential>) -> Result<UserId, WireError> {
    match credential {
        Some(c) if !c.revoked => Ok(c.user_id),
        Some(_) => Err(WireError::new(
            ErrorCode::UNAUTHENTICATED,
            "this TV's credential was revoked; enroll it again",
        )),
        None => Err(WireError::new(
            ErrorCode::UNAUTHENTICATED,
            "this TV is not enrolled: run `tv-agent enroll`",
        )),
    }
}

/// Whether an account with `allowance` (its allowance per period and what it used in
/// `period`; `None`: not limited) may be assigned a node: only while what is left is at
/// least `threshold` bytes (section D: "assigned only while the allowance is above a
/// threshold"). The refusal says why, for the TV's screen.
pub fn within_allowance(
    allowance: Option<(u64, u64)>,
    threshold: u64,
    period: &str,
) -> Result<(), WireError> {
    let Some((allowance, used)) = allowance else {
        return Ok(());
    };
    let left = allowance.saturating_sub(used);
    if left >= threshold && left > 0 {
        return Ok(());
    }
    Err(WireError::new(
        ErrorCode::ALLOWANCE_EXHAUSTED,
        format!(
            "this account has used its allowance for {period} ({used} of {allowance} bytes); \
             service resumes next period or when the operator raises it"
        ),
    ))
}

/// The dispatcher's settings and connections.
pub struct Dispatcher {
    /// The shared database.
    pub db: PgDispatch,
    /// The token signing key.
    pub key: SigningKey,
    /// How long a token admits a registration.
    pub token_ttl: Duration,
    /// A node whose heartbeat is older than this is not assigned.
    pub node_lease: Duration,
    /// TLS (the control link's certificate handling).
    pub tls: tokio_rustls::TlsAcceptor,
    /// The accounting period, as the nodes count it.
    pub period: crate::accounting::Period,
    /// Remaining allowance below which an account is not assigned.
    pub allowance_threshold: u64,
    /// TVs this dispatcher sent to each node lately ([`choose`]).
    pub tally: Tally,
}

/// Per node: when this dispatcher sent it a TV, over the last [`Dispatcher::node_lease`].
pub type Tally = std::sync::Mutex<
    std::collections::HashMap<String, std::collections::VecDeque<std::time::Instant>>,
>;

/// The node to send a TV to among the live `candidates`: not the one it could not reach
/// unless it is the only one, the one that held its session last (sticky), else the
/// least loaded, ties by id. A node's load is its TVs online as of its last heartbeat
/// plus the TVs this dispatcher sent it within `window` (`tally`, updated here): nodes
/// count their TVs once a heartbeat, not at every registration, so without the tally a
/// burst of TVs would all go to one node. (A TV sent and already counted counts twice
/// for at most `window`; every node is overcounted alike in a burst.)
pub fn choose(
    candidates: Vec<NodeCandidate>,
    tally: &Tally,
    window: Duration,
) -> Option<PickedNode> {
    let now = std::time::Instant::now();
    let mut tally = tally.lock().unwrap_or_else(|p| p.into_inner());
    for sent in tally.values_mut() {
        while sent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > window)
        {
            sent.pop_front();
        }
    }
    tally.retain(|_, sent| !sent.is_empty());
    let load = |c: &NodeCandidate| {
        let recent = tally.get(&c.node_id).map_or(0, |s| s.len());
        c.online
            .saturating_add(i64::try_from(recent).unwrap_or(i64::MAX))
    };
    let best = candidates.into_iter().min_by(|a, b| {
        (a.avoided, !a.sticky, load(a), &a.node_id).cmp(&(
            b.avoided,
            !b.sticky,
            load(b),
            &b.node_id,
        ))
    })?;
    let picked = PickedNode {
        load: load(&best),
        node_id: best.node_id.clone(),
        addr: best.addr,
    };
    tally.entry(best.node_id).or_default().push_back(now);
    Some(picked)
}

/// The dispatcher's TLS: the control link's configuration (TLS 1.3, a TV certificate
/// required) over the certificate `files`.
pub fn tls_acceptor(
    files: &crate::tls::ServerCertFiles,
) -> Result<tokio_rustls::TlsAcceptor, crate::tls::TlsError> {
    Ok(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
        files,
    )?))
}

/// Most dispatcher connections served at once; beyond, new ones wait for a slot.
const MAX_CONCURRENT: usize = 4096;
/// A whole exchange (TLS, preambles, one request, one answer) must end within this.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request frame accepted (an `ASSIGN` is well under 200 bytes).
const MAX_REQUEST_LEN: usize = 1024;

/// Serves the dispatcher on `listener` until `shutdown` completes; exchanges under way
/// then get a moment to finish.
pub async fn run(
    listener: TcpListener,
    dispatcher: Arc<Dispatcher>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let d = Arc::clone(&dispatcher);
        tasks.spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            if tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(&d, stream, peer))
                .await
                .is_err()
            {
                tracing::debug!(%peer, "dispatcher exchange timed out");
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}

/// One TV's exchange: TLS, preambles, `ASSIGN`, the answer, close.
async fn exchange(d: &Dispatcher, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let mut tls = match d.tls.accept(stream).await {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
    };
    let identity = crate::tls::identity_of(tls.get_ref().1);
    let mut pre = [0u8; PREAMBLE_LEN];
    if tls.read_exact(&mut pre).await.is_err() {
        return;
    }
    let version = match Preamble::decode(pre) {
        Ok(p) if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&p.version) => p.version,
        _ => {
            let _ = tls
                .write_all(&Preamble::server(ErrorCode::UNSUPPORTED_VERSION).encode())
                .await;
            return;
        }
    };
    if tls
        .write_all(&Preamble::server_speaking(version, ErrorCode::OK).encode())
        .await
        .is_err()
    {
        return;
    }
    let Some((kind, id, body)) = read_frame(&mut tls).await else {
        return;
    };
    let answer = if kind != ASSIGN {
        Err(WireError::new(
            ErrorCode::UNSUPPORTED,
            "this is the dispatcher: it answers ASSIGN only (a TV registers at the node it assigns)",
        ))
    } else {
        match decode_assign(&body) {
            Ok(req) => match identity {
                Some(identity) => assign(d, &identity.fingerprint, &req, peer).await,
                None => Err(WireError::new(
                    ErrorCode::UNAUTHENTICATED,
                    "no TV certificate on this connection",
                )),
            },
            Err(e) => Err(WireError::new(ErrorCode::INVALID_ARGUMENT, e.to_string())),
        }
    };
    let Ok(frame) = assigned_frame(id, &answer) else {
        return;
    };
    let _ = tls.write_all(&frame).await;
    let _ = tls.flush().await;
    let _ = tls.shutdown().await;
}

/// Reads one length-prefixed frame: kind, id, body. `None`: closed, or too large.
async fn read_frame<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Option<(u16, u32, Vec<u8>)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.ok()?;
    let len = usize::try_from(u32::from_be_bytes(len)).ok()?;
    if len > MAX_REQUEST_LEN {
        return None;
    }
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.ok()?;
    let (kind, id, body) = split(&payload).ok()?;
    Some((kind, id, body.to_vec()))
}

/// Answers one `ASSIGN`: entitlement, a node, a token.
async fn assign(
    d: &Dispatcher,
    fingerprint: &Fingerprint,
    req: &Assign,
    peer: SocketAddr,
) -> Result<Assignment, WireError> {
    let unavailable = |e: crate::storage::StoreError| {
        tracing::error!(error = %e, "dispatcher database failure");
        WireError::new(
            ErrorCode::INTERNAL,
            "the dispatcher cannot reach its database; retry",
        )
    };
    let credential = d.db.credential(&fingerprint.0).await.map_err(unavailable)?;
    let not_assigned = |e: &WireError| {
        tracing::info!(%peer, tv = %fingerprint, reason = %e.message, "not assigned");
    };
    let user = entitlement(credential).inspect_err(not_assigned)?;
    let period = d.period.key(now_ms());
    let allowance =
        d.db.allowance_left(user, &period)
            .await
            .map_err(unavailable)?;
    within_allowance(allowance, d.allowance_threshold, &period).inspect_err(not_assigned)?;
    let node = choose(
        d.db.live_nodes(user, d.node_lease, &req.unreachable_node)
            .await
            .map_err(unavailable)?,
        &d.tally,
        d.node_lease,
    )
    .ok_or_else(|| {
        WireError::new(
            ErrorCode::SERVER_FULL,
            "no node is in service now; retry shortly",
        )
    })?;
    if node.node_id.len() > MAX_NODE_TEXT_LEN || node.addr.len() > MAX_NODE_TEXT_LEN {
        return Err(WireError::new(
            ErrorCode::INTERNAL,
            "a node's id or address is too long",
        ));
    }
    let ttl = i64::try_from(d.token_ttl.as_millis()).unwrap_or(i64::MAX);
    let expires_at_ms = now_ms().saturating_add(ttl);
    let token = Token {
        user_id: user,
        node_id: node.node_id.clone(),
        fingerprint: fingerprint.0,
        expires_at_ms,
    }
    .sign(&d.key);
    tracing::info!(user, node = %node.node_id, load = node.load, agent = %req.agent_version, "assigned");
    Ok(Assignment {
        node_id: node.node_id,
        node_addr: node.addr,
        token,
        expires_at_ms,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_token_verifies_only_for_its_node_user_tv_and_time_with_its_key() {
        let (key, der) = SigningKey::generate().unwrap();
        let (other, _) = SigningKey::generate().unwrap();
        let fp = Fingerprint([7; 32]);
        let t = Token {
            user_id: 42,
            node_id: "node-a".into(),
            fingerprint: fp.0,
            expires_at_ms: 1_000,
        };
        let bytes = t.sign(&key);
        let pk = SigningKey::from_pkcs8(&der).unwrap().public();
        assert_eq!(
            Token::verify(&bytes, &pk, "node-a", 42, &fp, 999).unwrap(),
            t
        );
        let v = |b: &[u8], node, user, fp: &Fingerprint, now| {
            Token::verify(b, &pk, node, user, fp, now).unwrap_err()
        };
        assert_eq!(v(&bytes, "node-a", 42, &fp, 1_000), TokenError::Expired);
        assert_eq!(
            v(&bytes, "node-b", 42, &fp, 0),
            TokenError::OtherNode("node-a".into())
        );
        assert_eq!(v(&bytes, "node-a", 43, &fp, 0), TokenError::OtherUser(42));
        assert_eq!(
            v(&bytes, "node-a", 42, &Fingerprint([8; 32]), 0),
            TokenError::OtherTv
        );
        assert_eq!(v(&t.sign(&other), "node-a", 42, &fp, 0), TokenError::Forged);
        let mut flipped = bytes.clone();
        flipped[5] ^= 1;
        assert_eq!(v(&flipped, "node-a", 42, &fp, 0), TokenError::Forged);
        assert_eq!(v(&bytes[..40], "node-a", 42, &fp, 0), TokenError::Malformed);
        assert_eq!(v(&[], "node-a", 42, &fp, 0), TokenError::Malformed);
        assert_eq!(PublicKey::from_hex(&pk.hex()).unwrap(), pk);
        assert!(PublicKey::from_hex("zz").is_err());
    }

    #[test]
    fn an_account_is_assigned_only_while_its_allowance_left_is_at_the_threshold_or_above() {
        assert!(within_allowance(None, 1_000, "2026-12").is_ok());
        assert!(within_allowance(Some((10_000, 9_000)), 1_000, "2026-12").is_ok());
        let e = within_allowance(Some((10_000, 9_001)), 1_000, "2026-12").unwrap_err();
        assert_eq!(e.code, ErrorCode::ALLOWANCE_EXHAUSTED);
        assert!(
            e.message.contains("2026-12") && e.message.contains("9001 of 10000"),
            "{}",
            e.message
        );
        // Over it (usage is reported after the fact): still refused, nothing wraps.
        assert!(within_allowance(Some((10_000, 50_000)), 0, "2026-12").is_err());
        // An allowance of nothing admits nothing, whatever the threshold.
        assert!(within_allowance(Some((0, 0)), 0, "2026-12").is_err());
    }

    #[test]
    fn a_burst_of_tvs_is_spread_over_the_nodes_between_their_heartbeats() {
        let node = |id: &str, online, avoided, sticky| NodeCandidate {
            node_id: id.into(),
            addr: format!("{id}:7600"),
            online,
            avoided,
            sticky,
        };
        let tally = Tally::default();
        let window = Duration::from_secs(60);
        let both = || vec![node("a", 10, false, false), node("b", 12, false, false)];
        // a (10 online) takes the first two, then they alternate: what was sent lately
        // is added to each node's last count.
        let picks: Vec<String> = (0..6)
            .map(|_| choose(both(), &tally, window).unwrap().node_id)
            .collect();
        assert_eq!(picks, ["a", "a", "a", "b", "a", "b"]);
        // Past the window, only the nodes' own counts are left.
        let w0 = Duration::ZERO;
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(choose(both(), &tally, w0).unwrap().node_id, "a");
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(choose(both(), &tally, w0).unwrap().node_id, "a");
        // Sticky wins over load, and a node the TV could not reach is taken last.
        let sticky = vec![node("a", 0, false, false), node("b", 99, false, true)];
        assert_eq!(choose(sticky, &tally, window).unwrap().node_id, "b");
        let avoided = vec![node("a", 0, true, true), node("b", 99, false, false)];
        assert_eq!(choose(avoided, &tally, window).unwrap().node_id, "b");
        let only = vec![node("a", 0, true, false)];
        assert_eq!(choose(only, &tally, window).unwrap().node_id, "a");
        assert!(choose(Vec::new(), &tally, window).is_none());
    }

    #[test]
    fn a_key_file_is_made_once_with_its_public_key_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d/dispatch.key");
        let a = SigningKey::load_or_create(&path).unwrap();
        let b = SigningKey::load_or_create(&path).unwrap();
        assert_eq!(a.public(), b.public());
        assert_eq!(
            PublicKey::load(&public_key_path(&path)).unwrap(),
            a.public()
        );
        std::fs::write(&path, b"junk").unwrap();
        assert!(SigningKey::load_or_create(&path).is_err());
    }
}
