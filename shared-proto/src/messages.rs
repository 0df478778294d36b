//! Control messages: what a TV asks ([`Request`]), what the server answers ([`Reply`]),
//! and what the server pushes unasked ([`Event`]).
//!
//! These are the Rust types both sides program against; how they travel is decided
//! elsewhere: [`crate::envelope`] (version 2: a stable kind number per variant, then
//! the variant's body) and [`crate::v1`] (version 1, frozen: the whole message in
//! bincode, variants by index).
//!
//! Compatibility rules:
//! - [`Request`], [`Reply`] and [`Event`] may gain variants; each new variant gets a new
//!   kind number in [`crate::envelope::kind`] (never reused), and a new event kind gets
//!   a feature bit ([`crate::Features`]) so the server only pushes it to sessions that
//!   asked for it.
//! - Fields may only be appended to a variant's body; an older peer ignores them.
//! - The enums nested inside bodies ([`DialOutcome`], [`EndReason`], [`MissedReason`],
//!   [`NetState`]) and the structs ([`Register`], [`Registered`], …) never change shape
//!   or order: a new case is a new message kind.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// A user number (the documents' `User_id`: the TV's calling number).
/// Valid ids are `1..=MAX_USER_ID` (they are stored as a signed 64-bit integer).
pub type UserId = u64;
/// Largest valid user id.
pub const MAX_USER_ID: UserId = i64::MAX as u64;
/// A call record's id, assigned by the server (the `user_call` row id).
pub type CallId = u64;
/// A client-chosen request id that the matching reply echoes.
pub type RequestId = u32;
/// Milliseconds since the Unix epoch, UTC.
pub type UnixMillis = i64;
/// A client-chosen idempotency key: a request carrying the key its caller already used
/// (within [`KEY_LIFETIME_MS`]) is answered with the first outcome and stored no second
/// time. Scoped per caller; clients pick them at random (64 random bits: a collision
/// between two different dials of one caller within a day is negligible).
pub type IdempotencyKey = u64;
/// How long a server remembers an idempotency key: a retry within this time gets the
/// first outcome; after it, the key may be reused (24 hours).
pub const KEY_LIFETIME_MS: UnixMillis = 24 * 60 * 60 * 1000;

/// Most users one state query may name.
pub const MAX_QUERY_USERS: usize = 256;
/// Most cached calls one fetch returns, and most ids one acknowledgement may carry.
pub const MAX_PAGE: usize = 256;
/// Longest agent version string accepted at registration.
pub const MAX_AGENT_VERSION_LEN: usize = 64;
/// Longest SRTP master key and salt ([`SrtpKey::key_salt`]) accepted.
pub const MAX_SRTP_KEY_LEN: usize = 64;
/// Most users one TV may watch ([`Request::Subscribe`]: contacts and others together).
pub const MAX_SUBSCRIPTIONS: usize = 500;
/// Longest reason text in a [`Event::PresenceLost`].
pub const MAX_PRESENCE_REASON_LEN: usize = 256;
/// A message's id, assigned by the server (the `user_message` row id).
pub type MessageId = u64;
/// Most body bytes one [`Request::PutChunk`] carries or one [`Request::GetChunk`] asks
/// for (a chunk and its header fit a frame with room to spare).
pub const MAX_CHUNK: usize = 48 * 1024;
/// Longest text a message may carry on the wire, in bytes; the server's own limit (in
/// characters, `max_text_chars`, default 2,000) is usually lower and is answered
/// [`ErrorCode::TOO_LARGE`].
pub const MAX_TEXT_BYTES: usize = 32 * 1024;
/// Longest MIME type in a message listing.
pub const MAX_MIME_LEN: usize = 64;
/// Most ICE candidates one side of a call may offer ([`IceParams::candidates`]).
pub const MAX_ICE_CANDIDATES: usize = 16;
/// Longest ICE username fragment or password (RFC 8445 §5.3: at least 4 and 22
/// characters, at most 256).
pub const MAX_ICE_CREDENTIAL_LEN: usize = 256;
/// Longest ICE candidate foundation (RFC 8445 §5.1.1.3: at most 32 characters).
pub const MAX_ICE_FOUNDATION_LEN: usize = 32;
/// Most STUN or TURN servers one [`IceServers`] answer names, and most URLs per server.
pub const MAX_ICE_SERVERS: usize = 8;
/// Longest STUN/TURN URL or TURN username/credential in an [`IceServers`] answer.
pub const MAX_ICE_SERVER_FIELD_LEN: usize = 512;

/// Every frame a client sends: a request and the id its reply will echo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientMsg {
    /// Echoed in the [`ServerMsg::Reply`] to this request.
    pub id: RequestId,
    /// What the client asks for.
    pub request: Request,
}

/// Every frame the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// The answer to the request with this id.
    Reply {
        /// The request's id.
        id: RequestId,
        /// Success, or a typed error.
        result: Result<Reply, WireError>,
    },
    /// Something that happened without the client asking (a call coming in, ending, …).
    Event(Event),
    /// The server is closing this connection for a reason it can name (bad frame,
    /// session replaced, shutdown, …). No further frames follow.
    Closing(WireError),
}

/// Requests a TV's agent sends on its control link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Flow 1: this TV is on; record it online at the observed IP with this media port.
    /// Must be the first request on a connection.
    Register(Register),
    /// Keeps the session alive; the server answers with its clock.
    Heartbeat,
    /// Flow 3: the network state of one or more users (at most [`MAX_QUERY_USERS`]).
    QueryState {
        /// Users to look up.
        users: Vec<UserId>,
    },
    /// Flows 4 and 5: call a user.
    Dial {
        /// Who to call.
        callee: UserId,
        /// Makes a retry safe: a dial with a key this caller already used is answered
        /// with the first dial's outcome (same call id) and recorded no second time.
        /// `None` (an older client, or protocol version 1): every dial is a new call.
        /// Appended to the version-2 body (absent bytes decode as `None`).
        key: Option<IdempotencyKey>,
        /// The SRTP master key and salt this TV will encrypt its media with (SDES style,
        /// RFC 4568: each side announces its own sending key over the authenticated
        /// control link); relayed to the callee in [`Event::IncomingCall`]. `None`: an
        /// older agent that sends plain RTP. Appended after `key`.
        srtp: Option<SrtpKey>,
        /// This TV's ICE credentials and candidates (RFC 8445), relayed to the callee in
        /// [`Event::IncomingCall`]. `None`: an agent without ICE (media goes to the
        /// address the server saw). Appended after `srtp`.
        ice: Option<Box<IceParams>>,
    },
    /// Answer an incoming call that is ringing on this TV.
    Answer {
        /// The call, from [`Event::IncomingCall`].
        call_id: CallId,
        /// The SRTP key this TV will encrypt its media with, in the caller's suite;
        /// relayed to the caller in [`Event::CallAnswered`]. Appended after `call_id`.
        srtp: Option<SrtpKey>,
        /// This TV's ICE credentials and candidates, relayed to the caller in
        /// [`Event::CallAnswered`]; `None` to a caller that offered none. Appended after
        /// `srtp`.
        ice: Option<Box<IceParams>>,
    },
    /// Reject an incoming call that is ringing on this TV.
    Reject {
        /// The call, from [`Event::IncomingCall`].
        call_id: CallId,
    },
    /// End a call this TV is in (ringing out, or answered), or cancel one it placed.
    HangUp {
        /// The call.
        call_id: CallId,
    },
    /// Flow 6: a page of the calls cached for this TV that it has not acknowledged yet,
    /// oldest first, starting after the call id `after` (0 = from the start).
    FetchCached {
        /// Cursor: only calls with a larger id.
        after: CallId,
        /// Page size, 1..=[`MAX_PAGE`].
        limit: u16,
    },
    /// Flow 6: these cached calls were shown; stop delivering them.
    AckCached {
        /// At most [`MAX_PAGE`] ids, each a call to this TV.
        call_ids: Vec<CallId>,
    },
    /// Flow 2: the TV is powering off. The server records it offline and closes.
    Bye,
    /// Asks to enroll this TV (RFC 8628 style): the TV's identity is the key pair of the
    /// client certificate it presented on this TLS connection. Answered with
    /// [`EnrollmentStatus::Pending`] and a short code for the operator to approve (or
    /// `Enrolled` if that key is enrolled already). Allowed before registering.
    StartEnrollment {
        /// Free-form agent build identifier, at most [`MAX_AGENT_VERSION_LEN`] bytes.
        agent_version: String,
    },
    /// How this TV's enrollment stands (same key as [`Request::StartEnrollment`]); poll
    /// no faster than the `interval_s` it was given.
    PollEnrollment,
    /// Watch these users' presence (replacing any earlier subscription of this session):
    /// answered with [`Reply::Subscribed`] (their states now), then every change is
    /// pushed as [`Event::PresenceChanged`] to a session that asked for
    /// [`crate::Features::PRESENCE`]. `contacts` is this TV's address book, which is also
    /// who may see this TV's own state (with anyone it has called); `others` are users it
    /// watches without listing them (its missed callers). At most [`MAX_SUBSCRIPTIONS`]
    /// users in all.
    Subscribe {
        /// The TV's address book.
        contacts: Vec<UserId>,
        /// Other users to watch (not added to who may see this TV).
        others: Vec<UserId>,
    },
    /// Acknowledges every [`Event::PresenceChanged`] of `subscription` up to and including
    /// `seq` (cumulative), or refuses it (`status` not [`ErrorCode::OK`]: the TV could not
    /// use it). Not answered: the server's next notification, or a
    /// [`Event::PresenceLost`], is the answer.
    PresenceAck {
        /// From [`Subscribed::subscription`].
        subscription: u64,
        /// The highest sequence number received.
        seq: u64,
        /// [`ErrorCode::OK`], or why the TV refused the notification.
        status: ErrorCode,
    },
    /// The viewer's presence settings: "do not disturb" (shown as busy; calls are cached
    /// as missed instead of ringing) and "hide my state" (nobody may watch this TV).
    /// Answered [`Reply::Done`].
    SetPresence {
        /// Do not disturb.
        do_not_disturb: bool,
        /// Hide this TV's state from everyone.
        hidden: bool,
    },
    /// Opens a *transfer link*: a second connection of a TV (authenticated by the same
    /// credential as its registration) that carries messages and their bodies, so that a
    /// large body never queues in front of a dial or a heartbeat on the control link.
    /// Must be the first request on the connection; it never registers a session (the
    /// TV's control link, if any, stays as it is). Answered [`Reply::TransferOpen`].
    OpenTransfer {
        /// The TV's user number.
        user_id: UserId,
    },
    /// Leaves a message for another TV (transfer link). A text-only message is stored
    /// at once; one with a body is stored once the whole body has arrived
    /// ([`Request::PutChunk`]): until then the answer is [`Reply::UploadFrom`] with the
    /// offset to send from (0, or where a broken upload stopped), and the client sends
    /// this request again, unchanged, to finish. Answered [`Reply::MessageSent`] when
    /// stored (also for a repeat with a key already stored: the first message's id).
    SendMessage(SendMessage),
    /// The next bytes of the body of the message sent with `key` (transfer link), at
    /// `offset` (which must be what the server has: [`Reply::UploadFrom`] /
    /// [`Reply::ChunkStored`]). At most [`MAX_CHUNK`] bytes. Answered
    /// [`Reply::ChunkStored`].
    PutChunk {
        /// The [`SendMessage::key`] of the message this body belongs to.
        key: IdempotencyKey,
        /// Where these bytes go in the body.
        offset: u64,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// A page of the messages waiting for this TV (not yet acknowledged), newest first,
    /// starting below message id `before` (0 = from the newest). Transfer link.
    ListMessages {
        /// Cursor: only messages with a smaller id (0: no bound).
        before: MessageId,
        /// Page size, 1..=[`MAX_PAGE`] (the server may return fewer to fit a frame).
        limit: u16,
    },
    /// Up to `len` bytes (at most [`MAX_CHUNK`]) of a message's body from `offset`.
    /// Transfer link; only the recipient may read a body. Answered [`Reply::Chunk`].
    GetChunk {
        /// The message.
        message_id: MessageId,
        /// Where to start.
        offset: u64,
        /// How many bytes at most.
        len: u32,
    },
    /// These messages (to this TV) were kept where the viewer will see them: stop
    /// listing them. The server keeps them until they are deleted or expire.
    /// Answered [`Reply::Acked`].
    AckMessages {
        /// At most [`MAX_PAGE`] ids.
        message_ids: Vec<MessageId>,
    },
    /// The viewer deleted these messages (to this TV): the server deletes them and
    /// their bodies. Answered [`Reply::Deleted`].
    DeleteMessages {
        /// At most [`MAX_PAGE`] ids.
        message_ids: Vec<MessageId>,
    },
    /// The STUN and TURN servers this TV may gather ICE candidates from for a call it is
    /// about to place or answer, with short-lived TURN credentials. Answered with
    /// [`Reply::IceServers`]; an older server answers `UNSUPPORTED` (host candidates
    /// only).
    IceServers,
}

/// What a message is, by a stable number (an unknown one is listed as received, with
/// its body, by a newer server; an older agent shows it as a message of unknown kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MessageKind(pub u8);

impl MessageKind {
    /// Text only (UTF-8), no body.
    pub const TEXT: MessageKind = MessageKind(1);
    /// A voice message: Ogg Opus (RFC 7845).
    pub const VOICE: MessageKind = MessageKind(2);
    /// A picture: JPEG or PNG.
    pub const PICTURE: MessageKind = MessageKind(3);
    /// A video clip: MP4 (H.264, with Opus or AAC audio).
    pub const VIDEO: MessageKind = MessageKind(4);

    /// A short stable name, for JSON and people.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "text",
            2 => "voice",
            3 => "picture",
            4 => "video",
            _ => "unrecognised",
        }
    }

    /// The kind of this name.
    pub fn from_name(name: &str) -> Option<MessageKind> {
        [Self::TEXT, Self::VOICE, Self::PICTURE, Self::VIDEO]
            .into_iter()
            .find(|k| k.name() == name)
    }

    /// Whether this kind carries a body.
    pub fn has_body(self) -> bool {
        self != Self::TEXT
    }
}

/// A message a TV leaves ([`Request::SendMessage`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendMessage {
    /// Who it is for.
    pub to: UserId,
    /// Makes it safe to send again (after a lost answer, a broken upload, a restart):
    /// per sender, a message with a key already stored is stored no second time. Also
    /// names the body being uploaded ([`Request::PutChunk`]).
    pub key: IdempotencyKey,
    /// What it is.
    pub kind: MessageKind,
    /// The text: the message itself for [`MessageKind::TEXT`], else an optional caption.
    pub text: String,
    /// The body, for every kind but text: its length and SHA-256, checked by the server
    /// before it stores the message.
    pub body: Option<BodyRef>,
}

/// A body's length and digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyRef {
    /// Bytes.
    pub size: u64,
    /// SHA-256 of the bytes (32 bytes).
    #[serde(with = "serde_bytes")]
    pub sha256: Vec<u8>,
}

/// A stored message, as told to its sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageSent {
    /// The message's id.
    pub message_id: MessageId,
    /// What became of it.
    pub outcome: SendOutcome,
}

/// What became of a stored message, by a stable number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SendOutcome(pub u8);

impl SendOutcome {
    /// Stored for the recipient, who will get it at their TV's next power-on.
    pub const STORED: SendOutcome = SendOutcome(1);
    /// The recipient's TV was on and took it (saved and acknowledged) at once.
    pub const DELIVERED: SendOutcome = SendOutcome(2);

    /// A short stable name, for JSON and people.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "stored",
            2 => "delivered",
            _ => "unrecognised",
        }
    }
}

/// A message waiting for a TV, as listed ([`Reply::Messages`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageInfo {
    /// The message's id (fetch its body and acknowledge with it).
    pub message_id: MessageId,
    /// Who left it.
    pub sender: UserId,
    /// When it was stored.
    pub sent_ms: UnixMillis,
    /// What it is.
    pub kind: MessageKind,
    /// The text (whole: the server's limit keeps it short), or a body's caption.
    pub text: String,
    /// The body, if the kind has one.
    pub body: Option<BodyInfo>,
    /// The sender's network state now, so the viewer knows whether a call back rings.
    pub sender_state: NetState,
}

/// What the server learned of a body when it checked it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyInfo {
    /// Bytes.
    pub size: u64,
    /// SHA-256 (32 bytes): the TV checks what it downloaded against it.
    #[serde(with = "serde_bytes")]
    pub sha256: Vec<u8>,
    /// `audio/ogg`, `image/jpeg`, `image/png`, `video/mp4`, … (at most [`MAX_MIME_LEN`]).
    pub mime: String,
    /// Length of a voice message or clip.
    pub duration_ms: Option<u32>,
    /// Width of a picture or clip, in pixels.
    pub width: Option<u32>,
    /// Height of a picture or clip, in pixels.
    pub height: Option<u32>,
}

/// A page of waiting messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagePage {
    /// Newest first.
    pub messages: Vec<MessageInfo>,
    /// More wait below the last one of this page.
    pub more: bool,
}

/// How an enrollment stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollmentStatus {
    /// Waiting for the operator to approve `user_code`.
    Pending {
        /// The code the TV shows, e.g. `BCDF-GHJK` (RFC 8628 §6.1: 8 letters without
        /// vowels, case-insensitive, the dash optional when typed).
        user_code: String,
        /// Seconds until the code expires.
        expires_in_s: u32,
        /// Seconds to wait between polls.
        interval_s: u32,
    },
    /// Approved: this TV's key is the credential of `user_id`.
    Enrolled {
        /// The TV's user number.
        user_id: UserId,
    },
    /// The code expired before it was approved; start again.
    Expired,
    /// The operator refused it, or this key's credential was revoked.
    Refused {
        /// Why, for people.
        reason: String,
    },
}

/// An SRTP suite (RFC 3711, RFC 7714), by a stable number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SrtpSuite(pub u16);

impl SrtpSuite {
    /// `AES_CM_128_HMAC_SHA1_80`: 16-byte key, 14-byte salt.
    pub const AES_CM_128_HMAC_SHA1_80: SrtpSuite = SrtpSuite(1);
    /// `AEAD_AES_128_GCM`: 16-byte key, 12-byte salt.
    pub const AEAD_AES_128_GCM: SrtpSuite = SrtpSuite(2);

    /// The suite's name as in SDP (RFC 4568, RFC 7714).
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "AES_CM_128_HMAC_SHA1_80",
            2 => "AEAD_AES_128_GCM",
            _ => "unknown",
        }
    }

    /// Bytes of master key and master salt, if the suite is known.
    pub fn key_salt_len(self) -> Option<usize> {
        match self.0 {
            1 => Some(16 + 14),
            2 => Some(16 + 12),
            _ => None,
        }
    }
}

/// One direction's SRTP keys: the suite and its master key followed by its master salt.
/// It travels only over the authenticated, encrypted control link; the server never
/// stores or logs it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SrtpKey {
    /// The suite.
    pub suite: SrtpSuite,
    /// Master key ‖ master salt ([`SrtpSuite::key_salt_len`] bytes, at most
    /// [`MAX_SRTP_KEY_LEN`]).
    pub key_salt: Vec<u8>,
}

impl std::fmt::Debug for SrtpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key: Debug output ends up in logs.
        write!(
            f,
            "SrtpKey({}, {} bytes)",
            self.suite.name(),
            self.key_salt.len()
        )
    }
}

impl SrtpKey {
    /// Whether the suite is known and the key has its length.
    pub fn is_valid(&self) -> bool {
        self.suite.key_salt_len() == Some(self.key_salt.len())
    }
}

/// One side's ICE parameters for a call (RFC 8445): the credentials the other side's
/// connectivity checks must carry (short-term STUN credentials: username
/// `their_ufrag:our_ufrag`, password `pwd`) and the candidates gathered on the TV's
/// media socket. Travels only over the authenticated control link; the server relays
/// it, never stores or logs it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceParams {
    /// Username fragment (4..=[`MAX_ICE_CREDENTIAL_LEN`] bytes of ICE characters).
    pub ufrag: String,
    /// Password (22..=[`MAX_ICE_CREDENTIAL_LEN`] bytes).
    pub pwd: String,
    /// At most [`MAX_ICE_CANDIDATES`].
    pub candidates: Vec<IceCandidate>,
}

impl std::fmt::Debug for IceParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password: Debug output ends up in logs.
        f.debug_struct("IceParams")
            .field("ufrag", &self.ufrag)
            .field("candidates", &self.candidates)
            .finish_non_exhaustive()
    }
}

/// A transport address a TV can be reached at (RFC 8445 §5.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceCandidate {
    /// How it was found.
    pub kind: CandidateKind,
    /// The address (UDP).
    pub addr: SocketAddr,
    /// Its priority (RFC 8445 §5.1.2).
    pub priority: u32,
    /// Candidates of the same kind from the same base and server share it (1..=
    /// [`MAX_ICE_FOUNDATION_LEN`] bytes).
    pub foundation: String,
}

/// A candidate's type. A newtype so that a kind added later decodes (and is skipped)
/// instead of breaking the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CandidateKind(pub u8);

impl CandidateKind {
    /// An address of the TV's own interface.
    pub const HOST: CandidateKind = CandidateKind(0);
    /// The TV's address as a STUN server saw it (its NAT's outside address).
    pub const SERVER_REFLEXIVE: CandidateKind = CandidateKind(1);
    /// Learned from a connectivity check's source address.
    pub const PEER_REFLEXIVE: CandidateKind = CandidateKind(2);
    /// An address on a TURN relay allocated for this TV.
    pub const RELAYED: CandidateKind = CandidateKind(3);

    /// Its name as in SDP (`host`, `srflx`, `prflx`, `relay`).
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "host",
            1 => "srflx",
            2 => "prflx",
            3 => "relay",
            _ => "unknown",
        }
    }

    /// The type preference of RFC 8445 §5.1.2.2 (host highest, relayed lowest).
    pub fn type_preference(self) -> u32 {
        match self.0 {
            0 => 126,
            2 => 110,
            1 => 100,
            _ => 0,
        }
    }
}

/// Where a TV may gather candidates for one call: STUN servers, and TURN servers with
/// credentials that expire (coturn's shared-secret scheme: the username carries the
/// expiry, the credential is an HMAC of it).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServers {
    /// `stun:HOST:PORT` URLs (RFC 7064).
    pub stun: Vec<String>,
    /// TURN servers (RFC 7065 URLs), each with the credentials to allocate on it.
    pub turn: Vec<TurnServer>,
}

impl std::fmt::Debug for IceServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IceServers")
            .field("stun", &self.stun)
            .field("turn", &self.turn)
            .finish()
    }
}

/// One TURN server and the credentials for it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnServer {
    /// `turn:HOST:PORT[?transport=udp|tcp]` or `turns:…` URLs (RFC 7065).
    pub urls: Vec<String>,
    /// The TURN username (`EXPIRY:USER` for coturn's `use-auth-secret`).
    pub username: String,
    /// The TURN password.
    pub credential: String,
    /// When the credential stops working.
    pub expires_ms: UnixMillis,
}

impl std::fmt::Debug for TurnServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credential.
        f.debug_struct("TurnServer")
            .field("urls", &self.urls)
            .field("username", &self.username)
            .field("expires_ms", &self.expires_ms)
            .finish_non_exhaustive()
    }
}

impl IceServers {
    /// Whether every list and field is within the limits.
    pub fn check(&self) -> Result<(), String> {
        let long = |s: &String| s.len() > MAX_ICE_SERVER_FIELD_LEN;
        if self.stun.len() > MAX_ICE_SERVERS || self.turn.len() > MAX_ICE_SERVERS {
            return Err(format!("at most {MAX_ICE_SERVERS} STUN and TURN servers"));
        }
        let turn_long = self.turn.iter().any(|t| {
            t.urls.len() > MAX_ICE_SERVERS
                || t.urls.iter().any(long)
                || long(&t.username)
                || long(&t.credential)
        });
        if self.stun.iter().any(long) || turn_long {
            return Err(format!(
                "an ICE server field is longer than {MAX_ICE_SERVER_FIELD_LEN} bytes"
            ));
        }
        Ok(())
    }
}

/// A STUN or TURN URL (RFC 7064/7065) split into its parts: `scheme:HOST:PORT`, with at
/// most a `?transport=udp|tcp` parameter. One reading for the server that checks the
/// URLs it hands out and the TV that uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IceUrl<'a> {
    /// `stun`, `turn`, `turns`, …
    pub scheme: &'a str,
    /// `HOST:PORT` (the host may be a bracketed IPv6 address or a name).
    pub host_port: &'a str,
    /// The `transport` parameter, if given.
    pub transport: Option<&'a str>,
}

impl<'a> IceUrl<'a> {
    /// Splits `url`; `None` if it has no scheme, or a parameter other than `transport`.
    pub fn parse(url: &'a str) -> Option<IceUrl<'a>> {
        let (scheme, rest) = url.split_once(':')?;
        let (host_port, transport) = match rest.split_once('?') {
            None => (rest, None),
            Some((hp, q)) => (hp, Some(q.strip_prefix("transport=")?)),
        };
        Some(IceUrl {
            scheme,
            host_port,
            transport,
        })
    }

    /// The port, if the URL names a valid one.
    pub fn port(&self) -> Option<u16> {
        let (_, p) = self.host_port.rsplit_once(':')?;
        p.parse::<u16>().ok().filter(|p| *p > 0)
    }
}

/// ICE characters (RFC 8445 §15.1: ALPHA / DIGIT / "+" / "/").
fn ice_chars(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

impl IceParams {
    /// Whether the credentials and candidates are within the limits.
    pub fn check(&self) -> Result<(), String> {
        let cred = |name: &str, s: &str, min: usize| {
            if s.len() < min || s.len() > MAX_ICE_CREDENTIAL_LEN || !ice_chars(s) {
                Err(format!(
                    "an ICE {name} is {min}..={MAX_ICE_CREDENTIAL_LEN} ICE characters"
                ))
            } else {
                Ok(())
            }
        };
        cred("ufrag", &self.ufrag, 4)?;
        cred("password", &self.pwd, 22)?;
        if self.candidates.len() > MAX_ICE_CANDIDATES {
            return Err(format!(
                "at most {MAX_ICE_CANDIDATES} ICE candidates, not {}",
                self.candidates.len()
            ));
        }
        for c in &self.candidates {
            let f = &c.foundation;
            if f.is_empty() || f.len() > MAX_ICE_FOUNDATION_LEN || !ice_chars(f) {
                return Err(format!(
                    "an ICE foundation is 1..={MAX_ICE_FOUNDATION_LEN} ICE characters"
                ));
            }
        }
        Ok(())
    }
}

/// Registration details (flow 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// This TV's user number.
    pub user_id: UserId,
    /// The UDP port the TV's media socket is bound to.
    pub media_port: u16,
    /// Free-form agent build identifier, at most [`MAX_AGENT_VERSION_LEN`] bytes.
    pub agent_version: String,
}

/// Successful answers, one kind per request kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// To [`Request::Register`].
    Registered(Registered),
    /// To [`Request::Heartbeat`].
    HeartbeatAck {
        /// The server's clock.
        server_time_ms: UnixMillis,
    },
    /// To [`Request::QueryState`], in the order asked.
    States(Vec<UserState>),
    /// To [`Request::Dial`].
    Dial(DialOutcome),
    /// To [`Request::Answer`], [`Request::Reject`], [`Request::HangUp`] and [`Request::Bye`].
    Done,
    /// To [`Request::FetchCached`].
    Cached(CachedPage),
    /// To [`Request::AckCached`]: how many of the ids were newly marked delivered.
    Acked {
        /// Calls marked delivered by this acknowledgement.
        count: u32,
    },
    /// To [`Request::StartEnrollment`] and [`Request::PollEnrollment`].
    Enrollment(EnrollmentStatus),
    /// To [`Request::Subscribe`].
    Subscribed(Subscribed),
    /// To [`Request::OpenTransfer`]: the link carries messages now.
    TransferOpen {
        /// The largest chunk this server takes or gives ([`MAX_CHUNK`] or less).
        max_chunk: u32,
    },
    /// To [`Request::SendMessage`]: stored (or stored before under the same key).
    MessageSent(MessageSent),
    /// To [`Request::SendMessage`]: the body is not (all) here yet; send it from `have`
    /// with [`Request::PutChunk`], then send the same [`Request::SendMessage`] again.
    UploadFrom {
        /// Bytes of the body the server has.
        have: u64,
    },
    /// To [`Request::PutChunk`]: the server has this many bytes of the body now.
    ChunkStored {
        /// Bytes of the body the server has.
        have: u64,
    },
    /// To [`Request::ListMessages`].
    Messages(MessagePage),
    /// To [`Request::GetChunk`]: the bytes (fewer than asked only at the body's end).
    Chunk {
        /// The bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// To [`Request::DeleteMessages`]: how many were deleted.
    Deleted {
        /// Messages deleted.
        count: u32,
    },
    /// To [`Request::IceServers`].
    IceServers(IceServers),
}

/// A presence subscription as it starts: its id and every watched user's state now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribed {
    /// This subscription's id (notifications and acknowledgements name it); a new
    /// subscription of the same session gets a new one.
    pub subscription: u64,
    /// The sequence number the states below count as; the first notification is `seq + 1`.
    pub seq: u64,
    /// One entry per watched user, in the order asked (contacts, then others), duplicates
    /// dropped.
    pub states: Vec<Presence>,
}

/// A presence state: a plain number on the wire so that new states can be added (an older
/// agent shows a state it does not know as [`PresenceState::OFFLINE`]); never renumbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PresenceState(pub u8);

impl PresenceState {
    /// Not connected (`user_netstate = 0`) and no phone number on file.
    pub const OFFLINE: PresenceState = PresenceState(0);
    /// Connected and free (`user_netstate = 1`).
    pub const ONLINE: PresenceState = PresenceState(1);
    /// Connected, and in a call or in "do not disturb".
    pub const BUSY: PresenceState = PresenceState(2);
    /// The TV is off, but its owner has a phone number on file and is reachable by SMS.
    pub const MOBILE: PresenceState = PresenceState(3);
    /// This user does not let this TV see their state (not in their address book and
    /// never called by them, or "hide my state"): a refusal, not a state.
    pub const NOT_ALLOWED: PresenceState = PresenceState(4);
    /// No such user.
    pub const UNKNOWN: PresenceState = PresenceState(5);

    /// A short stable name, for JSON and people.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "offline",
            1 => "online",
            2 => "busy",
            3 => "mobile",
            4 => "not_allowed",
            5 => "unknown",
            _ => "unrecognised",
        }
    }
}

/// One user's presence, in a [`Subscribed`] answer or a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// The user.
    pub user_id: UserId,
    /// Their state.
    pub state: PresenceState,
    /// Since when, if the server knows (the change's time, or when an offline TV was
    /// last heard from).
    pub since_ms: Option<UnixMillis>,
}

/// What a TV learns when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// This session's id; a later registration of the same user gets a larger one.
    pub session_id: u64,
    /// The IP the server sees this TV at (what it stored in `user_property`).
    pub observed_ip: IpAddr,
    /// How often the TV must send something; silence for a few intervals means offline.
    pub heartbeat_interval_ms: u32,
    /// The server's clock.
    pub server_time_ms: UnixMillis,
    /// How many cached calls wait to be fetched.
    pub cached_waiting: u32,
}

/// A user's network state (`user_property.user_netstate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NetState {
    /// Registered before, not connected now (`user_netstate = 0`).
    Offline,
    /// Connected now (`user_netstate = 1`).
    Online,
    /// No such user.
    Unknown,
}

/// One user's state, as answered to a query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserState {
    /// The user asked about.
    pub user_id: UserId,
    /// Their network state.
    pub state: NetState,
    /// When the server last heard from them, if ever.
    pub last_seen_ms: Option<UnixMillis>,
}

/// The result of a dial, as told to the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DialOutcome {
    /// Flow 4: the callee is online and is being rung. Media goes to `callee_media`
    /// once [`Event::CallAnswered`] arrives; [`Event::CallEnded`] says if it never does.
    Ringing {
        /// The call record's id.
        call_id: CallId,
        /// The callee TV's UDP media address.
        callee_media: SocketAddr,
    },
    /// Flow 5: the callee is off. The call is durably cached and will be shown as a missed
    /// call when their TV is switched on.
    Cached {
        /// The call record's id.
        call_id: CallId,
    },
    /// The callee is online but in another call. The attempt is recorded and shown to
    /// them as a missed call.
    Busy {
        /// The call record's id.
        call_id: CallId,
    },
}

/// A page of cached calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedPage {
    /// Oldest first.
    pub calls: Vec<CachedCall>,
    /// More calls wait after the last one of this page.
    pub more: bool,
}

/// A call that reached this TV while it could not take it. These have all ended: a TV
/// shows them as missed and never rings for them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedCall {
    /// The call record's id (acknowledge with it).
    pub call_id: CallId,
    /// Who called (`user_call.user_id`).
    pub caller: UserId,
    /// Who was called: this TV (`user_call.otheruser_id`).
    pub callee: UserId,
    /// When the call was placed (`user_call.call_date`).
    pub call_date_ms: UnixMillis,
    /// Why it was missed.
    pub reason: MissedReason,
    /// The caller's network state now, so the viewer knows whether a call back will ring.
    pub caller_state: NetState,
}

/// Why a call was missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MissedReason {
    /// This TV was off (flow 5).
    Offline,
    /// It rang here and nobody answered, or the caller gave up first.
    NoAnswer,
    /// This TV was in another call.
    Busy,
}

/// Unsolicited server pushes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// Someone is calling this TV: ring. Answer or reject by `call_id`.
    IncomingCall {
        /// The call.
        call_id: CallId,
        /// Who calls.
        caller: UserId,
        /// The caller TV's UDP media address.
        caller_media: SocketAddr,
        /// When the call was placed.
        call_date_ms: UnixMillis,
        /// The caller's SRTP sending key (decrypts what it sends); `None` for a caller
        /// that sends plain RTP (an older agent). Appended.
        srtp: Option<SrtpKey>,
        /// The caller's ICE credentials and candidates; `None` for a caller without ICE.
        /// Appended after `srtp`.
        ice: Option<Box<IceParams>>,
    },
    /// The callee answered: media may flow.
    CallAnswered {
        /// The call.
        call_id: CallId,
        /// The callee's SRTP sending key; `None` for a callee that sends plain RTP.
        /// Appended.
        srtp: Option<SrtpKey>,
        /// The callee's ICE credentials and candidates; `None` for a callee without ICE.
        /// Appended after `srtp`.
        ice: Option<Box<IceParams>>,
    },
    /// The call is over (or never started). Stop ringing and stop media.
    CallEnded {
        /// The call.
        call_id: CallId,
        /// Why.
        reason: EndReason,
    },
    /// New cached calls arrived for this TV after it registered; fetch them.
    CachedCallsWaiting {
        /// How many wait in all.
        count: u32,
    },
    /// Watched users' states changed. Acknowledge with [`Request::PresenceAck`]; a
    /// notification not acknowledged in time ends the subscription
    /// ([`Event::PresenceLost`]).
    PresenceChanged {
        /// The subscription.
        subscription: u64,
        /// One more than the previous notification's (or the [`Subscribed::seq`]).
        seq: u64,
        /// The users whose state changed, each with its new state.
        changes: Vec<Presence>,
    },
    /// The instant message of a failed notification (section E): the server has ended
    /// this subscription because a notification was not acknowledged in time or was
    /// refused. Subscribe again; the answer carries every state afresh.
    PresenceLost {
        /// The subscription that ended.
        subscription: u64,
        /// Why, for people (at most [`MAX_PRESENCE_REASON_LEN`] bytes).
        reason: String,
    },
    /// New messages arrived for this TV (or were waiting when it registered): fetch
    /// them on a transfer link ([`Request::OpenTransfer`]). Pushed to sessions that asked
    /// for [`crate::Features::MESSAGES`].
    MessagesWaiting {
        /// How many wait in all.
        count: u32,
    },
}

/// Why a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// A party hung up (or the caller cancelled before an answer).
    HungUp {
        /// Who hung up.
        by: UserId,
    },
    /// It rang for the whole ring timeout.
    NoAnswer,
    /// The callee rejected it.
    Rejected,
    /// The other party's TV went offline (link lost or powered off).
    PeerLost,
    /// The server is shutting down.
    ServerShutdown,
}

/// A typed error: a stable code for programs and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// Stable, machine-readable.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl WireError {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.code.name(),
            self.code.0,
            self.message
        )
    }
}

impl std::error::Error for WireError {}

/// A stable error code. A plain number on the wire so that a peer still decodes codes
/// newer than itself; the constants below are never renumbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// Not an error (the accepting preamble's status).
    pub const OK: ErrorCode = ErrorCode(0);
    /// A frame could not be decoded, or the preamble's magic was wrong.
    pub const BAD_FRAME: ErrorCode = ErrorCode(1);
    /// The peer's protocol version is not supported.
    pub const UNSUPPORTED_VERSION: ErrorCode = ErrorCode(2);
    /// A frame's length prefix exceeds the maximum frame size.
    pub const FRAME_TOO_LARGE: ErrorCode = ErrorCode(3);
    /// The handshake or registration did not arrive in time.
    pub const HANDSHAKE_TIMEOUT: ErrorCode = ErrorCode(4);
    /// The server has as many connections as it allows.
    pub const SERVER_FULL: ErrorCode = ErrorCode(5);
    /// Too many requests on this connection.
    pub const RATE_LIMITED: ErrorCode = ErrorCode(6);
    /// The request needs a registered session.
    pub const NOT_REGISTERED: ErrorCode = ErrorCode(7);
    /// This connection has registered already.
    pub const ALREADY_REGISTERED: ErrorCode = ErrorCode(8);
    /// A field was out of range (empty list, too many ids, calling oneself, …).
    pub const INVALID_ARGUMENT: ErrorCode = ErrorCode(9);
    /// The user id has never been seen (or is not provisioned).
    pub const UNKNOWN_USER: ErrorCode = ErrorCode(10);
    /// No such call, or not one this TV may act on in its current state.
    pub const NO_SUCH_CALL: ErrorCode = ErrorCode(11);
    /// This TV is already in a call.
    pub const ALREADY_IN_CALL: ErrorCode = ErrorCode(12);
    /// The server could not complete the request (storage failure); nothing was acknowledged.
    pub const INTERNAL: ErrorCode = ErrorCode(13);
    /// The server is shutting down.
    pub const SHUTTING_DOWN: ErrorCode = ErrorCode(14);
    /// A newer registration of the same user replaced this session.
    pub const SESSION_REPLACED: ErrorCode = ErrorCode(15);
    /// Nothing was heard from this TV within the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: ErrorCode = ErrorCode(16);
    /// The request kind is not one this server knows (a newer client); the link stays up.
    pub const UNSUPPORTED: ErrorCode = ErrorCode(17);
    /// The server's storage is full: the call (or message) could not be stored and was
    /// not placed; nothing was recorded. Registrations and state queries still work;
    /// retry later.
    pub const STORAGE_FULL: ErrorCode = ErrorCode(18);
    /// This connection has no valid credential for the request: the TV is not enrolled,
    /// its credential was revoked, or it belongs to another user. Enroll (again).
    pub const UNAUTHENTICATED: ErrorCode = ErrorCode(19);
    /// The account has used its traffic allowance for this period: the distribution
    /// service assigns it no node until the period ends or the operator raises it.
    pub const ALLOWANCE_EXHAUSTED: ErrorCode = ErrorCode(20);
    /// Presence notifications to this TV kept failing (not acknowledged, or refused) up
    /// to the server's threshold: it was signed out. Connecting again starts afresh.
    pub const NOTIFICATIONS_FAILED: ErrorCode = ErrorCode(21);
    /// A message or its body is larger than the server takes (text longer than its
    /// limit, a body over its size limit, a voice message or clip over its duration).
    /// Nothing was stored.
    pub const TOO_LARGE: ErrorCode = ErrorCode(22);
    /// A message's body is not what its kind says (not Ogg Opus, not a JPEG or PNG, a
    /// picture too large, a broken or truncated file). Nothing was stored.
    pub const BAD_MEDIA: ErrorCode = ErrorCode(23);
    /// The recipient's mailbox is full (messages or bytes). Nothing was stored.
    pub const QUOTA_EXCEEDED: ErrorCode = ErrorCode(24);
    /// A body's bytes do not match the SHA-256 (or length) it was announced with; the
    /// server discarded what it had: upload it again from the start.
    pub const BAD_HASH: ErrorCode = ErrorCode(25);
    /// No such message (or upload) for this TV.
    pub const NO_SUCH_MESSAGE: ErrorCode = ErrorCode(26);

    /// A short stable name, for logs and people.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "ok",
            1 => "bad_frame",
            2 => "unsupported_version",
            3 => "frame_too_large",
            4 => "handshake_timeout",
            5 => "server_full",
            6 => "rate_limited",
            7 => "not_registered",
            8 => "already_registered",
            9 => "invalid_argument",
            10 => "unknown_user",
            11 => "no_such_call",
            12 => "already_in_call",
            13 => "internal",
            14 => "shutting_down",
            15 => "session_replaced",
            16 => "heartbeat_timeout",
            17 => "unsupported",
            18 => "storage_full",
            19 => "unauthenticated",
            20 => "allowance_exhausted",
            21 => "notifications_failed",
            22 => "too_large",
            23 => "bad_media",
            24 => "quota_exceeded",
            25 => "bad_hash",
            26 => "no_such_message",
            _ => "unrecognised",
        }
    }
}

/// Checks a user id is in the valid range.
pub fn valid_user_id(id: UserId) -> bool {
    (1..=MAX_USER_ID).contains(&id)
}

impl Request {
    /// Checks the limits this contract sets on a request's fields, so that both sides
    /// reject the same things. Returns a human-readable reason on failure.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Request::Register(r) => {
                if !valid_user_id(r.user_id) {
                    return Err(format!("user id {} is out of range", r.user_id));
                }
                if r.media_port == 0 {
                    return Err("media port 0 is not a bound port".into());
                }
                if r.agent_version.len() > MAX_AGENT_VERSION_LEN {
                    return Err(format!(
                        "agent version is longer than {MAX_AGENT_VERSION_LEN} bytes"
                    ));
                }
            }
            Request::QueryState { users } => {
                if users.is_empty() || users.len() > MAX_QUERY_USERS {
                    return Err(format!(
                        "a state query names 1..={MAX_QUERY_USERS} users, not {}",
                        users.len()
                    ));
                }
            }
            Request::Dial {
                callee, srtp, ice, ..
            } => {
                check_ice(ice.as_deref())?;
                if !valid_user_id(*callee) {
                    return Err(format!("user id {callee} is out of range"));
                }
                check_srtp(srtp.as_ref())?;
            }
            Request::Answer { srtp, ice, .. } => {
                check_srtp(srtp.as_ref())?;
                check_ice(ice.as_deref())?;
            }
            Request::StartEnrollment { agent_version } => {
                if agent_version.len() > MAX_AGENT_VERSION_LEN {
                    return Err(format!(
                        "agent version is longer than {MAX_AGENT_VERSION_LEN} bytes"
                    ));
                }
            }
            Request::FetchCached { limit, .. } => {
                if *limit == 0 || usize::from(*limit) > MAX_PAGE {
                    return Err(format!("page size must be 1..={MAX_PAGE}, not {limit}"));
                }
            }
            Request::AckCached { call_ids } => {
                if call_ids.len() > MAX_PAGE {
                    return Err(format!(
                        "an acknowledgement carries at most {MAX_PAGE} ids, not {}",
                        call_ids.len()
                    ));
                }
            }
            Request::Subscribe { contacts, others } => {
                let n = contacts.len().saturating_add(others.len());
                if n > MAX_SUBSCRIPTIONS {
                    return Err(format!(
                        "a TV watches at most {MAX_SUBSCRIPTIONS} users, not {n}"
                    ));
                }
                if let Some(bad) = contacts.iter().chain(others).find(|u| !valid_user_id(**u)) {
                    return Err(format!("user id {bad} is out of range"));
                }
            }
            Request::OpenTransfer { user_id } => {
                if !valid_user_id(*user_id) {
                    return Err(format!("user id {user_id} is out of range"));
                }
            }
            Request::SendMessage(m) => {
                if !valid_user_id(m.to) {
                    return Err(format!("user id {} is out of range", m.to));
                }
                if m.text.len() > MAX_TEXT_BYTES {
                    return Err(format!(
                        "a message's text is at most {MAX_TEXT_BYTES} bytes, not {}",
                        m.text.len()
                    ));
                }
                match (&m.body, m.kind.has_body()) {
                    (None, true) => {
                        return Err(format!("a {} message needs a body", m.kind.name()))
                    }
                    (Some(_), false) => return Err("a text message has no body".into()),
                    (Some(b), true) if b.sha256.len() != 32 => {
                        return Err(format!(
                            "a body's SHA-256 is 32 bytes, not {}",
                            b.sha256.len()
                        ))
                    }
                    (Some(b), true) if b.size == 0 => return Err("a body is not empty".into()),
                    _ => {}
                }
            }
            Request::PutChunk { bytes, .. } => {
                if bytes.is_empty() || bytes.len() > MAX_CHUNK {
                    return Err(format!(
                        "a chunk carries 1..={MAX_CHUNK} bytes, not {}",
                        bytes.len()
                    ));
                }
            }
            Request::GetChunk { len, .. } => {
                if *len == 0 || *len as usize > MAX_CHUNK {
                    return Err(format!("a chunk is 1..={MAX_CHUNK} bytes, not {len}"));
                }
            }
            Request::ListMessages { limit, .. } => {
                if *limit == 0 || usize::from(*limit) > MAX_PAGE {
                    return Err(format!("page size must be 1..={MAX_PAGE}, not {limit}"));
                }
            }
            Request::AckMessages { message_ids } | Request::DeleteMessages { message_ids } => {
                if message_ids.len() > MAX_PAGE {
                    return Err(format!(
                        "at most {MAX_PAGE} message ids at once, not {}",
                        message_ids.len()
                    ));
                }
            }
            Request::Heartbeat
            | Request::PresenceAck { .. }
            | Request::SetPresence { .. }
            | Request::Reject { .. }
            | Request::HangUp { .. }
            | Request::Bye
            | Request::IceServers
            | Request::PollEnrollment => {}
        }
        Ok(())
    }
}

/// ICE parameters, if given, must be within [`IceParams::check`]'s limits.
fn check_ice(ice: Option<&IceParams>) -> Result<(), String> {
    ice.map_or(Ok(()), IceParams::check)
}

/// An SRTP key, if given, must be of a known suite and of that suite's length.
fn check_srtp(key: Option<&SrtpKey>) -> Result<(), String> {
    match key {
        Some(k) if !k.is_valid() => Err(format!(
            "an SRTP key of suite {} must be {:?} bytes, not {}",
            k.suite.0,
            k.suite.key_salt_len(),
            k.key_salt.len()
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_enforces_limits() {
        let reg = |user_id, media_port, v: &str| {
            Request::Register(Register {
                user_id,
                media_port,
                agent_version: v.into(),
            })
        };
        assert!(reg(1001, 5004, "0.1").validate().is_ok());
        assert!(reg(0, 5004, "0.1").validate().is_err());
        assert!(reg(MAX_USER_ID + 1, 5004, "0.1").validate().is_err());
        assert!(reg(1001, 0, "0.1").validate().is_err());
        assert!(reg(1001, 5004, &"x".repeat(65)).validate().is_err());
        assert!(Request::QueryState { users: vec![] }.validate().is_err());
        assert!(Request::QueryState {
            users: vec![1; MAX_QUERY_USERS + 1]
        }
        .validate()
        .is_err());
        assert!(Request::FetchCached { after: 0, limit: 0 }
            .validate()
            .is_err());
        assert!(Request::FetchCached {
            after: 0,
            limit: 257
        }
        .validate()
        .is_err());
        assert!(Request::AckCached {
            call_ids: vec![1; MAX_PAGE + 1]
        }
        .validate()
        .is_err());
        let sub = |contacts: Vec<UserId>, others: Vec<UserId>| {
            Request::Subscribe { contacts, others }.validate()
        };
        assert!(sub(vec![1; 300], vec![2; 200]).is_ok());
        assert!(sub(vec![1; 300], vec![2; 201]).is_err());
        assert!(sub(vec![], vec![0]).is_err());
        assert!(
            sub(vec![], vec![]).is_ok(),
            "an empty list ends the watching"
        );
    }

    #[test]
    fn error_codes_have_names() {
        assert_eq!(ErrorCode::UNKNOWN_USER.name(), "unknown_user");
        assert_eq!(ErrorCode(999).name(), "unrecognised");
        let e = WireError::new(ErrorCode::BAD_FRAME, "garbage");
        assert_eq!(e.to_string(), "bad_frame (1): garbage");
    }
}
