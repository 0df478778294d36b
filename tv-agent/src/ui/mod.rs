//! The on-screen 10-foot UI, served over HTTP on loopback to the TV's own browser.
//!
//! - `GET /` with `/app.js`, `/logic.js` and `/app.css`: the page, embedded in the
//!   binary; `/outcomes.js`: the agent's word lists (call outcomes, dial failures, missed
//!   reasons, call states) generated from their enums ([`crate::agent::outcomes_js`]), so
//!   the page's script never spells them itself.
//! - `GET /api/events`: server-sent events. The first is a `snapshot` (status, missed
//!   calls, contacts, the watched users' presence); then every [`AgentEvent`] as the
//!   control API streams it (a `presence` event per pushed state), plus `contacts`
//!   changes. A client that falls behind is
//!   cut off; the browser reconnects and starts again from a new snapshot.
//! - `POST /api/command`: one control-API command (`{"cmd":"dial","to":2002}`, …), run
//!   through [`api::execute`], so the UI acts through the same API as other clients.
//! - `GET /api/contacts`, `PUT /api/contacts/{user}` (`{"name":"Gran"}`),
//!   `DELETE /api/contacts/{user}`: the address book.
//! - `GET /api/messages/{id}/body`: a kept message's body (voice message, picture or
//!   clip) from the TV's inbox, streamed with its MIME type, for the page to play or
//!   show; the snapshot carries the kept messages, `messages` events the new ones.
//!
//! Presence is pushed: the agent subscribes to the address book and the missed callers
//! and streams each change as it comes (no polling); a change to the book here is given
//! to the agent ([`Agent::set_contacts`]), which subscribes again.
//!
//! Requests must name a loopback host (defeats DNS rebinding) and, if they carry an
//! `Origin`, come from this UI; commands must be JSON, which a cross-site form cannot
//! send without a preflight this server never grants.
//!
//! A TV switched on without an identity serves the same page before it has an agent
//! ([`UiServer`]): the event stream then carries `activation` events (the
//! [`activation::ActivationState`]: the code to show, a retry, a refusal) and ends when
//! the agent is attached, so the page reconnects and starts over from a normal
//! snapshot; `POST /api/activation` (`{"cmd":"new_code"}`) asks for a new code after a
//! refusal; commands answer that the TV is not activated yet.

use std::convert::Infallible;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use shared_proto::{MessageId, UserId};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch, Mutex, Notify};

use crate::agent::Agent;
use crate::api;
use crate::contacts::{ContactBook, ContactError};

pub mod activation;

use activation::ActivationState;

/// Largest request body (commands and contact edits are tiny).
const MAX_BODY: usize = 16 * 1024;

const INDEX_HTML: &str = include_str!("../../assets/index.html");
const APP_JS: &str = include_str!("../../assets/app.js");
const LOGIC_JS: &str = include_str!("../../assets/logic.js");
const APP_CSS: &str = include_str!("../../assets/app.css");

/// `/outcomes.js`, generated once from the agent's word enums.
static OUTCOMES_JS: LazyLock<String> = LazyLock::new(crate::agent::outcomes_js);

/// What the UI's handlers share.
struct Ui {
    /// The agent the UI drives, once there is one (a TV being activated has none yet).
    agent: OnceLock<Agent>,
    /// Turns true when the agent is attached: ends the activation event streams.
    attached: watch::Sender<bool>,
    /// What the activation screen shows while there is no agent.
    activation: watch::Sender<ActivationState>,
    /// The viewer asked for a new code (after a refusal).
    new_code: Arc<Notify>,
    /// The address book (file-backed).
    contacts: Mutex<ContactBook>,
    /// UI-only events (`contacts`) for every open event stream.
    events: broadcast::Sender<Value>,
}

/// Serves the UI on `listener` (which must be loopback) for as long as the agent runs.
pub async fn serve(
    listener: TcpListener,
    agent: Agent,
    contacts: ContactBook,
) -> std::io::Result<()> {
    let (ui, server) = UiServer::new(listener, contacts);
    ui.attach(agent);
    server.await
}

/// The UI of a TV that may not have an agent yet: it shows the activation screen
/// ([`UiServer::show_activation`]) until [`UiServer::attach`] gives it the agent.
#[derive(Clone)]
pub struct UiServer {
    ui: Arc<Ui>,
}

impl UiServer {
    /// The UI on `listener` (which must be loopback) and the future that serves it
    /// (spawn it; it ends only on an I/O error).
    pub fn new(
        listener: TcpListener,
        contacts: ContactBook,
    ) -> (
        UiServer,
        impl std::future::Future<Output = std::io::Result<()>> + Send,
    ) {
        let (events, _) = broadcast::channel(64);
        let ui = Arc::new(Ui {
            agent: OnceLock::new(),
            attached: watch::Sender::new(false),
            activation: watch::Sender::new(ActivationState::Requesting),
            new_code: Arc::new(Notify::new()),
            contacts: Mutex::new(contacts),
            events,
        });
        let app = Router::new()
            .route("/", get(|| asset("text/html; charset=utf-8", INDEX_HTML)))
            .route(
                "/app.js",
                get(|| asset("text/javascript; charset=utf-8", APP_JS)),
            )
            .route(
                "/logic.js",
                get(|| asset("text/javascript; charset=utf-8", LOGIC_JS)),
            )
            .route(
                "/outcomes.js",
                get(|| asset("text/javascript; charset=utf-8", OUTCOMES_JS.as_str())),
            )
            .route(
                "/app.css",
                get(|| asset("text/css; charset=utf-8", APP_CSS)),
            )
            .route("/api/events", get(event_stream))
            .route("/api/command", post(command))
            .route("/api/activation", post(activation_command))
            .route("/api/contacts", get(list_contacts))
            .route(
                "/api/contacts/{user}",
                put(set_contact).delete(remove_contact),
            )
            .route("/api/messages/{id}/body", get(message_body))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .layer(middleware::from_fn(same_origin_only))
            .with_state(Arc::clone(&ui));
        let server = async move { axum::serve(listener, app).await };
        (UiServer { ui }, server)
    }

    /// Shows `state` on the activation screen (every open page, at once).
    pub fn show_activation(&self, state: &ActivationState) {
        self.ui.activation.send_replace(state.clone());
    }

    /// Woken when the viewer asks for a new code after a refusal (for
    /// [`activation::enroll`]).
    pub fn new_code_requests(&self) -> Arc<Notify> {
        Arc::clone(&self.ui.new_code)
    }

    /// Gives the UI its agent: the activation screen ends (open pages reconnect and get
    /// the normal screens) and commands reach the agent. Only the first call counts.
    pub fn attach(&self, agent: Agent) {
        if self.ui.agent.set(agent).is_ok() {
            self.ui.attached.send_replace(true);
        }
    }
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'self'; img-src 'self' data:; media-src 'self'; object-src 'none'; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

/// Refuses requests that do not name a loopback host or that come from another origin.
async fn same_origin_only(headers: HeaderMap, request: Request, next: Next) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let hostname = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    if !matches!(hostname, "127.0.0.1" | "localhost" | "[::1]") {
        return (StatusCode::FORBIDDEN, "the TV UI answers on loopback only").into_response();
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        if origin.as_bytes() != format!("http://{host}").as_bytes() {
            return (StatusCode::FORBIDDEN, "cross-origin requests are refused").into_response();
        }
    }
    next.run(request).await
}

async fn event_stream(State(ui): State<Arc<Ui>>) -> impl IntoResponse {
    let stream = match ui.agent.get() {
        Some(agent) => agent_stream(&ui, agent).await.boxed(),
        None => activation_stream(&ui).boxed(),
    };
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

/// While there is no agent: the activation screen's state now and at every change, as
/// `{"event": "activation", "activation": {...}}`; it ends when the agent is attached,
/// and the browser reconnects (after 1 s) to the normal stream.
fn activation_stream(ui: &Arc<Ui>) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    let states = ui.activation.subscribe();
    let attached = ui.attached.subscribe();
    futures::stream::unfold(
        (states, attached, true),
        |(mut states, mut attached, first)| async move {
            if !first {
                tokio::select! {
                    changed = states.changed() => changed.ok()?,
                    done = attached.wait_for(|a| *a) => {
                        drop(done);
                        return None;
                    }
                }
            }
            let state = states.borrow_and_update().clone();
            let data = json!({"event": "activation", "activation": state}).to_string();
            let event = Event::default().data(data);
            let event = if first {
                event.retry(Duration::from_secs(1))
            } else {
                event
            };
            Some((Ok(event), (states, attached, false)))
        },
    )
}

/// The normal stream: a snapshot, then the agent's and the UI's events.
async fn agent_stream(
    ui: &Arc<Ui>,
    agent: &Agent,
) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    // Subscribe before taking the snapshot, so nothing falls between the two; events
    // the snapshot already reflects are harmless to apply again.
    let agent_events = agent.subscribe();
    let ui_events = ui.events.subscribe();
    let snapshot = ui.snapshot(agent).await;
    let agent_stream = futures::stream::unfold(agent_events, |mut rx| async move {
        match rx.recv().await {
            Ok(ev) => Some((serde_json::to_value(&ev).unwrap_or_default(), rx)),
            // Fell behind or the agent is gone: end; the browser reconnects and resyncs.
            Err(_) => None,
        }
    });
    let ui_stream = futures::stream::unfold(ui_events, |mut rx| async move {
        rx.recv().await.ok().map(|v| (v, rx))
    });
    // Either side ending ends the stream, so a lagging client always resyncs.
    let live = futures::stream::select(
        agent_stream
            .map(Some)
            .chain(futures::stream::once(async { None })),
        ui_stream
            .map(Some)
            .chain(futures::stream::once(async { None })),
    )
    .take_while(|v| std::future::ready(v.is_some()))
    .filter_map(std::future::ready);
    // The first event also asks the browser to reconnect after 1 s (not its default 3 s)
    // when the stream ends: a page cut off for lagging, or an agent restarted, resyncs
    // quickly.
    let first = Event::default()
        .retry(Duration::from_secs(1))
        .data(snapshot.to_string());
    futures::stream::once(async move { first })
        .chain(live.map(|v| Event::default().data(v.to_string())))
        .map(Ok)
}

async fn command(State(ui): State<Arc<Ui>>, Json(cmd): Json<Value>) -> Json<Value> {
    match ui.agent.get() {
        Some(agent) => Json(api::execute(agent, &cmd.to_string()).await),
        None => Json(json!({"ok": false, "error": NOT_ACTIVATED})),
    }
}

/// What a command gets before the TV is activated.
const NOT_ACTIVATED: &str = "this TV is not activated yet";

/// Body of `POST /api/activation`.
#[derive(Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum ActivationCommand {
    /// Ask the server for a new code (after a refusal).
    NewCode,
}

async fn activation_command(
    State(ui): State<Arc<Ui>>,
    Json(cmd): Json<ActivationCommand>,
) -> Response {
    match cmd {
        ActivationCommand::NewCode => {
            let refused = matches!(*ui.activation.borrow(), ActivationState::Refused { .. });
            if ui.agent.get().is_some() || !refused {
                let error = "a new code is asked for only after a refusal";
                return (
                    StatusCode::CONFLICT,
                    Json(json!({"ok": false, "error": error})),
                )
                    .into_response();
            }
            ui.new_code.notify_one();
            Json(json!({"ok": true})).into_response()
        }
    }
}

/// A kept message's body, streamed from the inbox (only files the list names).
async fn message_body(State(ui): State<Arc<Ui>>, Path(id): Path<MessageId>) -> Response {
    let Some(m) = ui.agent.get().and_then(|a| a.messenger()) else {
        return (StatusCode::NOT_FOUND, "this TV keeps no messages").into_response();
    };
    let kept = m.list().await.into_iter().find(|k| k.message_id == id);
    let Some((path, mime)) = kept.and_then(|k| {
        let mime = k
            .mime
            .clone()
            .unwrap_or_else(|| "application/octet-stream".into());
        m.inbox().body_path(&k).map(|p| (p, mime))
    }) else {
        return (
            StatusCode::NOT_FOUND,
            format!("message {id} has no body here"),
        )
            .into_response();
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            return (StatusCode::NOT_FOUND, format!("message {id}: {e}")).into_response();
        }
    };
    let len = file.metadata().await.map(|md| md.len()).unwrap_or(0);
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    (
        [
            (header::CONTENT_TYPE, mime),
            (header::CONTENT_LENGTH, len.to_string()),
            (header::CACHE_CONTROL, "private, max-age=3600".to_string()),
        ],
        body,
    )
        .into_response()
}

async fn list_contacts(State(ui): State<Arc<Ui>>) -> Json<Value> {
    Json(json!({"ok": true, "contacts": ui.contacts.lock().await.list()}))
}

/// Body of `PUT /api/contacts/{user}`.
#[derive(Deserialize)]
struct SetContact {
    /// The contact's name.
    name: String,
}

async fn set_contact(
    State(ui): State<Arc<Ui>>,
    Path(user): Path<UserId>,
    Json(body): Json<SetContact>,
) -> Response {
    let r = ui.contacts.lock().await.set(user, &body.name);
    ui.contacts_changed(r).await
}

async fn remove_contact(State(ui): State<Arc<Ui>>, Path(user): Path<UserId>) -> Response {
    let r = ui.contacts.lock().await.remove(user);
    ui.contacts_changed(r).await
}

impl Ui {
    /// Everything a freshly opened page needs.
    async fn snapshot(&self, agent: &Agent) -> Value {
        let status = agent.status().await;
        let missed = agent.missed().await;
        let messages = match agent.messenger() {
            Some(m) => m.list().await,
            None => Vec::new(),
        };
        json!({
            "event": "snapshot",
            "status": status,
            "missed": missed,
            "messages": messages,
            "contacts": self.contacts.lock().await.list(),
            "presence": api::presence_json(&agent.presence().await),
        })
    }

    /// Answers a contact change and tells every open page.
    async fn contacts_changed(&self, r: Result<(), ContactError>) -> Response {
        match r {
            Ok(()) => {
                let (contacts, ids) = {
                    let book = self.contacts.lock().await;
                    let ids: Vec<UserId> = book.list().iter().map(|c| c.user_id).collect();
                    (json!({"event": "contacts", "contacts": book.list()}), ids)
                };
                let _ = self.events.send(contacts.clone());
                // Watched, and allowed to see this TV, from now on.
                if let Some(agent) = self.agent.get() {
                    if let Err(e) = agent.set_contacts(ids).await {
                        tracing::warn!(error = %e, "the agent does not watch the address book");
                    }
                }
                (
                    StatusCode::OK,
                    Json(json!({"ok": true, "contacts": contacts["contacts"]})),
                )
                    .into_response()
            }
            Err(e) => {
                let status = match e {
                    ContactError::NotFound(_) => StatusCode::NOT_FOUND,
                    ContactError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
                    _ => StatusCode::UNPROCESSABLE_ENTITY,
                };
                (status, Json(json!({"ok": false, "error": e.to_string()}))).into_response()
            }
        }
    }
}
