//! Node to node: the messages nodes on one database send each other so that a TV on one
//! node can call a TV on another, and the tasks that carry them.
//!
//! The transport is the store's [`NodeLink`] (PostgreSQL `NOTIFY` on the receiving node's
//! channel; see `storage/postgres/link.rs` for why). Messages are JSON ([`NodeMsg`]):
//! a request with an id, answered by a response with that id (reserve a TV for a call;
//! a TV's answer, reject or hang-up of a call another node holds), a push to a TV
//! connected to the receiving node, and the registry's notices ([`Notice`]). The call
//! itself lives on the caller's node (see `registry/remote.rs`).
//!
//! Ordering: the pushes to one TV of one call leave from one task, one after another, and
//! each `NOTIFY` commits before the next is sent, so they arrive in order. A request not
//! answered within [`REQUEST_TIMEOUT`] counts as refused (a reservation as "offline", and
//! it is released). SRTP keys ride in the pushes and answers as they do on the TVs' TLS
//! links; between a node and PostgreSQL they travel as every other statement does (see
//! ARCHITECTURE.md, "Several nodes").

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shared_proto::{CallId, ErrorCode, Event, Reply, ServerMsg, UserId, WireError};
use tokio::sync::oneshot;

use crate::handler::SessionKey;
use crate::registry::{MediaOffer, Notice, PushTx, Reserve};
use crate::server::Shared;
use crate::storage::postgres::link::NodeLink;
use crate::storage::Store;

/// How long a request to another node may take before it counts as refused.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A TV's request about a call another node holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// It answers, with its media offer (SRTP sending key, ICE).
    Answer {
        /// The offer (in a node built before ICE, the key alone: `{"srtp": …}`).
        #[serde(flatten)]
        offer: MediaOffer,
    },
    /// It rejects.
    Reject,
    /// It hangs up.
    HangUp,
}

/// A request to another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Request {
    /// Reserve `callee` for the sender's call `call_id` from `caller`.
    Reserve {
        call_id: CallId,
        caller: UserId,
        callee: UserId,
    },
    /// `user` (in its session `session_id` on the sender) acts on call `call_id`.
    Control {
        call_id: CallId,
        user: UserId,
        session_id: u64,
        control: Control,
    },
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Answer {
    Reserve(Reserve),
    Control(Result<(), WireError>),
}

/// One message between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum NodeMsg {
    Request {
        from: u8,
        id: u64,
        request: Request,
    },
    Response {
        id: u64,
        answer: Answer,
    },
    /// Push `event` to `user`'s session `session_id` (any current one if `None`).
    Push {
        from: u8,
        user: UserId,
        session_id: Option<u64>,
        event: Event,
    },
    /// A notice of the sender's registry about a call between the two nodes.
    Notice(Notice),
}

/// This node's end of the node-to-node path.
pub struct Cluster {
    link: NodeLink,
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
}

impl Cluster {
    /// Over the store's link to the other nodes.
    pub fn new(link: NodeLink) -> Self {
        Cluster {
            link,
            next_id: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// Whether another node is alive (otherwise nothing is asked of anyone).
    pub fn others_alive(&self) -> bool {
        self.link.others_alive()
    }

    /// Takes this node out of the dispatcher's choice (it is draining).
    pub async fn withdraw(&self) {
        if let Err(e) = self.link.withdraw().await {
            tracing::warn!(error = %e, "cannot withdraw this node from the dispatcher's choice");
        }
    }

    /// The slot of the other node holding `user`'s live session, if any.
    pub async fn locate(&self, user: UserId) -> Option<u8> {
        if !self.others_alive() {
            return None;
        }
        match self.link.locate(user).await {
            Ok(slot) => slot,
            Err(e) => {
                tracing::warn!(user, error = %e, "cannot ask where a TV is connected");
                None
            }
        }
    }

    async fn send(&self, slot: u8, msg: &NodeMsg) {
        let payload = match serde_json::to_string(msg) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a message to another node");
                return;
            }
        };
        if let Err(e) = self.link.send(slot, &payload).await {
            tracing::warn!(slot, error = %e, "cannot send to another node");
        }
    }

    /// Sends `msg` from a task of its own (the caller does not wait).
    fn send_soon(self: &Arc<Self>, slot: u8, msg: NodeMsg) {
        let me = Arc::clone(self);
        tokio::spawn(async move { me.send(slot, &msg).await });
    }

    async fn request(&self, slot: u8, request: Request) -> Option<Answer> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting_map().insert(id, tx);
        let msg = NodeMsg::Request {
            from: self.link.slot(),
            id,
            request,
        };
        self.send(slot, &msg).await;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, rx).await;
        self.waiting_map().remove(&id);
        match answer {
            Ok(Ok(a)) => Some(a),
            _ => {
                tracing::warn!(slot, "another node did not answer in time");
                None
            }
        }
    }

    fn waiting_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Answer>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the node in `slot` to reserve `callee` for call `call_id`. No answer in time
    /// is `Offline`, and whatever it reserved later is released.
    pub async fn reserve(
        self: &Arc<Self>,
        slot: u8,
        call_id: CallId,
        caller: UserId,
        callee: UserId,
    ) -> Reserve {
        let request = Request::Reserve {
            call_id,
            caller,
            callee,
        };
        match self.request(slot, request).await {
            Some(Answer::Reserve(r)) => r,
            _ => {
                self.send_soon(
                    slot,
                    NodeMsg::Notice(Notice::Release {
                        user: callee,
                        call_id,
                    }),
                );
                Reserve::Offline
            }
        }
    }

    /// Carries `me`'s `control` of call `call_id` to the node in `slot` that holds it.
    pub async fn control(
        &self,
        slot: u8,
        me: SessionKey,
        call_id: CallId,
        control: Control,
    ) -> Result<(), WireError> {
        let request = Request::Control {
            call_id,
            user: me.user,
            session_id: me.session_id,
            control,
        };
        match self.request(slot, request).await {
            Some(Answer::Control(r)) => r,
            _ => Err(WireError::new(
                ErrorCode::INTERNAL,
                "the server holding this call did not answer; try again",
            )),
        }
    }

    /// Pushes `event` to `user`'s session on the node in `slot`.
    pub fn push(self: &Arc<Self>, slot: u8, user: UserId, session_id: Option<u64>, event: Event) {
        self.send_soon(
            slot,
            NodeMsg::Push {
                from: self.link.slot(),
                user,
                session_id,
                event,
            },
        );
    }

    /// Pushes `event` to `user` wherever it is connected (looked up), if on another node.
    pub async fn push_anywhere(self: &Arc<Self>, user: UserId, event: Event) {
        if let Some(slot) = self.locate(user).await {
            self.push(slot, user, None, event);
        }
    }

    /// The push queue of a stand-in for `user`'s session `session_id` on the node in
    /// `slot`: its events are carried there, in order, by a task that ends with the
    /// stand-in (other messages, such as a `Closing` when a registration here replaces
    /// it, are for this node's connections only and go nowhere).
    pub fn stand_in_queue(self: &Arc<Self>, slot: u8, user: UserId, session_id: u64) -> PushTx {
        let (tx, rx) = crate::registry::push_channel();
        let me = Arc::clone(self);
        tokio::spawn(async move {
            while let Ok(msg) = rx.recv_async().await {
                if let ServerMsg::Event(event) = *msg {
                    let msg = NodeMsg::Push {
                        from: me.link.slot(),
                        user,
                        session_id: Some(session_id),
                        event,
                    };
                    me.send(slot, &msg).await;
                }
            }
        });
        tx
    }
}

/// Starts carrying the registry's notices to other nodes (see [`Notice`]).
pub fn start<S: Store + 'static>(shared: &Arc<Shared<S>>) {
    let Some(cluster) = shared.cluster.clone() else {
        return;
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    shared.registry.set_outbox(tx);
    tokio::spawn(async move {
        while let Some((slot, notice)) = rx.recv().await {
            cluster.send(slot, &NodeMsg::Notice(notice)).await;
        }
    });
}

/// Carries out one message from another node.
pub async fn handle<S: Store + 'static>(shared: &Arc<Shared<S>>, payload: &str) {
    let Some(cluster) = shared.cluster.clone() else {
        return;
    };
    let msg: NodeMsg = match serde_json::from_str(payload) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "unreadable message from another node");
            return;
        }
    };
    match msg {
        NodeMsg::Response { id, answer } => {
            if let Some(tx) = cluster.waiting_map().remove(&id) {
                let _ = tx.send(answer);
            }
        }
        NodeMsg::Request { from, id, request } => {
            let shared = Arc::clone(shared);
            tokio::spawn(async move {
                let answer = answer(&shared, from, request).await;
                cluster.send(from, &NodeMsg::Response { id, answer }).await;
            });
        }
        NodeMsg::Push {
            from,
            user,
            session_id,
            event,
        } => {
            let call_id = match &event {
                Event::IncomingCall { call_id, .. }
                | Event::CallAnswered { call_id, .. }
                | Event::CallEnded { call_id, .. } => Some(*call_id),
                Event::CachedCallsWaiting { .. }
                | Event::MessagesWaiting { .. }
                | Event::PresenceChanged { .. }
                | Event::PresenceLost { .. } => None,
            };
            let delivered = match session_id {
                Some(session_id) => shared.registry.deliver(user, session_id, event),
                None => shared.registry.notify(user, event),
            };
            // A call's event for a session gone from here: the call is over for it.
            if let (false, Some(call_id), Some(session_id)) = (delivered, call_id, session_id) {
                cluster.send_soon(
                    from,
                    NodeMsg::Notice(Notice::Lost {
                        user,
                        session_id,
                        call_id,
                    }),
                );
            }
        }
        NodeMsg::Notice(Notice::Lost {
            user,
            session_id,
            call_id,
        }) => {
            if let Some(ended) = shared.registry.remote_party_lost(user, session_id, call_id) {
                if let Err(e) = crate::handler::record_end(shared, ended).await {
                    tracing::error!(call_id, error = %e, "cannot record a call whose party left another node");
                }
            }
        }
        NodeMsg::Notice(Notice::Release { user, call_id }) => {
            shared.registry.release_remote(user, call_id)
        }
    }
}

/// This node's answer to another node's request.
async fn answer<S: Store + 'static>(shared: &Arc<Shared<S>>, from: u8, request: Request) -> Answer {
    match request {
        Request::Reserve {
            call_id,
            caller,
            callee,
        } => {
            let r = shared.registry.reserve(callee, call_id, from);
            tracing::debug!(
                call_id,
                caller,
                callee,
                ?r,
                "reserved for a call on another node"
            );
            Answer::Reserve(r)
        }
        Request::Control {
            call_id,
            user,
            session_id,
            control,
        } => {
            let me = SessionKey { user, session_id };
            Answer::Control(
                crate::handler::control(shared, me, call_id, control)
                    .await
                    .map(|_: Reply| ()),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back_as_written_and_stay_far_below_the_notify_limit() {
        let key = shared_proto::SrtpKey {
            suite: shared_proto::SrtpSuite::AES_CM_128_HMAC_SHA1_80,
            key_salt: vec![0xA5; 30],
        };
        let msgs = [
            NodeMsg::Push {
                from: 63,
                user: u64::MAX,
                session_id: Some(u64::MAX),
                event: Event::IncomingCall {
                    call_id: u64::MAX,
                    caller: u64::MAX,
                    caller_media: "[2001:db8::1]:65535".parse().unwrap(),
                    call_date_ms: i64::MAX,
                    srtp: Some(key.clone()),
                    ice: None,
                },
            },
            NodeMsg::Request {
                from: 1,
                id: 7,
                request: Request::Control {
                    call_id: 9,
                    user: 2,
                    session_id: 3,
                    control: Control::Answer {
                        offer: MediaOffer {
                            srtp: Some(key),
                            ice: Some(Box::new(shared_proto::IceParams {
                                ufrag: "u".repeat(256),
                                pwd: "p".repeat(256),
                                candidates: vec![
                                    shared_proto::IceCandidate {
                                        kind: shared_proto::CandidateKind::RELAYED,
                                        addr: "[2001:db8::1]:65535".parse().unwrap(),
                                        priority: u32::MAX,
                                        foundation: "f".repeat(32),
                                    };
                                    shared_proto::MAX_ICE_CANDIDATES
                                ],
                            })),
                        },
                    },
                },
            },
            NodeMsg::Response {
                id: 7,
                answer: Answer::Control(Err(WireError::new(
                    ErrorCode::NO_SUCH_CALL,
                    "x".repeat(200),
                ))),
            },
        ];
        for m in msgs {
            let s = serde_json::to_string(&m).unwrap();
            assert!(s.starts_with('{'), "{s}");
            // The largest (an answer with 16 candidates and the longest ICE
            // credentials) stays under half of NOTIFY's 8,000-byte cap.
            assert!(s.len() < 4_000, "{} bytes", s.len());
            assert_eq!(serde_json::from_str::<NodeMsg>(&s).unwrap(), m);
        }
        // An answer from a node built before ICE (the key alone) still reads.
        assert_eq!(
            serde_json::from_str::<Control>("{\"Answer\":{\"srtp\":null}}").unwrap(),
            Control::Answer {
                offer: MediaOffer::default()
            }
        );
        assert!(serde_json::from_str::<NodeMsg>("{\"Bogus\":1}").is_err());
    }
}
