//! The local control API: JSON lines over TCP, bound to loopback, for the TV's UI and
//! for operators on the box. Each line a client sends is a command; the agent answers
//! each with one `{"ok": …}` line, and streams every agent event as an `{"event": …}`
//! line.
//!
//! Commands: `{"cmd":"dial","to":2002}`, `{"cmd":"answer"}`, `{"cmd":"reject"}`,
//! `{"cmd":"hangup"}`, `{"cmd":"mute","muted":true}`, `{"cmd":"query","users":[2002]}`,
//! `{"cmd":"missed"}`, `{"cmd":"clear_missed"}`, `{"cmd":"status"}`, `{"cmd":"power_off"}`,
//! and for presence `{"cmd":"presence"}` (the watched users' states as last pushed),
//! `{"cmd":"dnd","on":true}` (do not disturb) and `{"cmd":"hide","on":true}` (hide my
//! state); both answer with the settings as they are now. Messages (a TV that keeps
//! them): `{"cmd":"messages"}` (the kept ones, newest first), `{"cmd":"read_message",
//! "id":7}`, `{"cmd":"delete_message","id":7}` (on the server and here; `server: false`
//! if the server could not be reached) and `{"cmd":"send_message","to":2002,"text":"…"}`
//! or `{"cmd":"send_message","to":2002,"voice_seconds":10}` (recorded from the TV's
//! audio source), answered with `message_id` and `outcome` (`stored`, `delivered`) or,
//! refused, `ok: false` with the `outcome` word (`too_large`, `quota_exceeded`, …).
//!
//! The on-screen UI ([`crate::ui`]) sends the same commands over HTTP through
//! [`execute`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use shared_proto::{MessageId, UserId};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, Notify};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use crate::agent::messenger::{Leave, Messenger};
use crate::agent::{netstate, Agent, DialResult, PresenceChange, PresenceWord};

/// Longest command line accepted (a 2,000-character text message fits).
const MAX_LINE: usize = 16 * 1024;

/// A command from a client.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum Command {
    Dial {
        to: UserId,
    },
    Answer,
    Reject,
    Hangup,
    Mute {
        muted: bool,
    },
    Query {
        users: Vec<UserId>,
    },
    Missed,
    ClearMissed,
    Status,
    PowerOff,
    Presence,
    Dnd {
        on: bool,
    },
    Hide {
        on: bool,
    },
    Messages,
    ReadMessage {
        id: MessageId,
    },
    DeleteMessage {
        id: MessageId,
    },
    SendMessage {
        to: UserId,
        #[serde(default)]
        text: Option<String>,
        #[serde(default)]
        voice_seconds: Option<f64>,
    },
}

/// The commands being answered now, so the daemon can let a client's `power_off` be
/// answered before the process ends.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<Answers>);

/// The count behind [`InFlight`].
#[derive(Debug, Default)]
struct Answers {
    /// Commands whose reply is not written yet.
    open: AtomicUsize,
    /// Woken when `open` drops to zero.
    none_open: Notify,
}

/// One command being answered; counted until dropped.
struct Answering(Arc<Answers>);

impl InFlight {
    fn begin(&self) -> Answering {
        self.0.open.fetch_add(1, Ordering::SeqCst);
        Answering(Arc::clone(&self.0))
    }

    /// Waits until no command is being answered, for at most `limit`.
    pub async fn drained(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let woken = self.0.none_open.notified();
                if self.0.open.load(Ordering::SeqCst) == 0 {
                    return;
                }
                woken.await;
            }
        })
        .await;
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.none_open.notify_waiters();
        }
    }
}

/// Serves the API on `listener` until the agent powers off; every command counts in
/// `in_flight` until its reply is written.
pub async fn serve(listener: TcpListener, agent: Agent, in_flight: InFlight) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let agent = agent.clone();
        let in_flight = in_flight.clone();
        tokio::spawn(async move {
            if let Err(e) = client(stream, peer, agent, in_flight).await {
                tracing::debug!(%peer, error = %e, "control API client ended");
            }
        });
    }
}

async fn client(
    stream: TcpStream,
    _peer: SocketAddr,
    agent: Agent,
    in_flight: InFlight,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_LINE));
    let mut events = agent.subscribe();
    loop {
        let mut answering = None;
        let out = tokio::select! {
            line = lines.next() => match line {
                None => return Ok(()),
                Some(Ok(line)) => {
                    answering = Some(in_flight.begin());
                    execute(&agent, line.trim()).await
                }
                Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                    let out = json!({"ok": false, "error": format!("command longer than {MAX_LINE} bytes")});
                    write.write_all(format!("{out}\n").as_bytes()).await?;
                    return Ok(());
                }
                Some(Err(LinesCodecError::Io(e))) => return Err(e),
            },
            ev = events.recv() => match ev {
                Ok(ev) => serde_json::to_value(&ev).unwrap_or_default(),
                Err(broadcast::error::RecvError::Lagged(n)) => json!({"event": "lagged", "missed": n}),
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
        };
        write.write_all(format!("{out}\n").as_bytes()).await?;
        drop(answering);
    }
}

/// Runs one command line and returns its `{"ok": …}` reply.
pub async fn execute(agent: &Agent, line: &str) -> Value {
    let cmd: Command = match serde_json::from_str(line) {
        Ok(c) => c,
        Err(e) => return json!({"ok": false, "error": format!("bad command: {e}")}),
    };
    let done = |r: Result<(), crate::agent::AgentError>| match r {
        Ok(()) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    };
    match cmd {
        Command::Dial { to } => {
            let r = agent.dial(to).await;
            let call_id = match &r {
                DialResult::Ringing(id) | DialResult::Cached(id) | DialResult::Busy(id) => {
                    Some(*id)
                }
                _ => None,
            };
            json!({"ok": matches!(r, DialResult::Ringing(_) | DialResult::Cached(_)), "outcome": r.outcome(), "call_id": call_id})
        }
        Command::Answer => done(agent.answer().await),
        Command::Reject => done(agent.reject().await),
        Command::Hangup => done(agent.hang_up().await),
        Command::Mute { muted } => done(agent.set_muted(muted).await),
        Command::Query { users } => match agent.query(users).await {
            Ok(states) => json!({"ok": true, "states": states.iter().map(|s| json!({
                "user_id": s.user_id,
                "user_netstate": netstate(s.state),
            })).collect::<Vec<_>>()}),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        Command::Missed => json!({"ok": true, "calls": agent.missed().await}),
        Command::ClearMissed => done(agent.clear_missed().await),
        Command::Status => match agent.status().await {
            Some(s) => json!({"ok": true, "status": s}),
            None => json!({"ok": false, "error": "the agent is powered off"}),
        },
        Command::PowerOff => {
            agent.power_off().await;
            json!({"ok": true})
        }
        Command::Presence => json!({"ok": true, "states": presence_json(&agent.presence().await)}),
        Command::Dnd { on } => {
            settings(
                agent,
                PresenceChange {
                    do_not_disturb: Some(on),
                    hidden: None,
                },
            )
            .await
        }
        Command::Hide { on } => {
            settings(
                agent,
                PresenceChange {
                    do_not_disturb: None,
                    hidden: Some(on),
                },
            )
            .await
        }
        Command::Messages
        | Command::ReadMessage { .. }
        | Command::DeleteMessage { .. }
        | Command::SendMessage { .. } => match agent.messenger() {
            Some(m) => message_command(m, cmd).await,
            None => json!({"ok": false, "error": "this TV keeps no messages"}),
        },
    }
}

async fn message_command(m: &Messenger, cmd: Command) -> Value {
    match cmd {
        Command::Messages => json!({"ok": true, "messages": m.list().await}),
        Command::ReadMessage { id } => match m.mark_read(id).await {
            Ok(true) => json!({"ok": true}),
            Ok(false) => json!({"ok": false, "error": format!("no message {id}")}),
            Err(e) => json!({"ok": false, "error": e}),
        },
        Command::DeleteMessage { id } => match m.delete(id).await {
            Ok(server) => json!({"ok": true, "server": server}),
            Err(e) => json!({"ok": false, "error": e}),
        },
        Command::SendMessage {
            to,
            text,
            voice_seconds,
        } => {
            let what = match (text, voice_seconds) {
                (Some(t), None) => Leave::Text(t),
                (None, Some(s)) if s.is_finite() && s > 0.0 => {
                    Leave::Voice(Duration::from_secs_f64(s.min(3_600.0)))
                }
                _ => {
                    return json!({"ok": false, "error": "send_message takes a text or voice_seconds above 0"})
                }
            };
            match m.leave(to, what).await {
                Ok(left) => {
                    json!({"ok": true, "message_id": left.message_id, "outcome": left.outcome})
                }
                Err((outcome, error)) => json!({"ok": false, "outcome": outcome, "error": error}),
            }
        }
        _ => json!({"ok": false, "error": "not a message command"}),
    }
}

/// Watched users' states as `[{"user": 2002, "state": "busy"}, …]`.
pub fn presence_json(states: &[shared_proto::Presence]) -> Value {
    Value::Array(
        states
            .iter()
            .map(|p| json!({"user": p.user_id, "state": PresenceWord::from(p.state)}))
            .collect(),
    )
}

async fn settings(agent: &Agent, change: PresenceChange) -> Value {
    match agent.set_presence(change).await {
        Ok(s) => json!({"ok": true, "do_not_disturb": s.do_not_disturb, "hidden": s.hidden}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }
}
