//! The `tv-agent` command: `run` is the TV daemon; `missed`, `call`, `answer`, `watch`
//! and `send` are scripted modes that power on, do one thing, print JSON and exit with a meaningful
//! code (0: answered or durably cached; 1: another outcome; 2: the missed calls could not
//! be printed; 3: server unreachable; 4: not enrolled; 5: the server's storage is full,
//! nothing placed). `enroll` asks for a code and waits for its approval.
//!
//! A TV switched on without a credential (`run`, TLS) does not exit: it activates
//! itself, showing its code on the UI's screen (and printing it as `enroll` does) and
//! asking for a fresh one whenever a code expires, then carries on as the daemon. It
//! exits 4 only when it has no CA to enroll against, or (without a UI, where nobody
//! can ask for another code) when the operator refuses it.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tokio::sync::broadcast;
use tokio::time::{timeout_at, Instant};
use tv_agent::agent::inbox::{Inbox, KeptMessage};
use tv_agent::agent::transfer::{Outgoing, TransferError, TransferLink};
use tv_agent::agent::{Agent, AgentConfig, AgentEvent, DialResult, MissedKeeping, PresenceSetup};
use tv_agent::media::AudioSpec;
use tv_agent::ui::activation::{self, ActivationState, EnrollConfig, EnrollError, EnrollMode};
use tv_agent::ui::UiServer;

#[derive(Parser)]
#[command(
    version,
    about = "TV agent: registers at power-on, shows calls missed while off, places and answers calls"
)]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Run the TV daemon with its local control API. A TV not enrolled yet enrolls
    /// first (it needs --server-ca): it shows its code and waits for the approval.
    Run {
        #[command(flatten)]
        tv: TvArgs,
        #[command(flatten)]
        audio: AudioArgs,
        /// Local control API (JSON lines), loopback only.
        #[arg(long, default_value = "127.0.0.1:7601")]
        control_listen: SocketAddr,
        /// Serve the on-screen remote-control UI here (loopback only), for the TV's
        /// browser: http://ADDR/.
        #[arg(long)]
        ui_listen: Option<SocketAddr>,
    },
    /// Enroll this TV with a server: show a code for the operator to approve, wait for
    /// it, keep the TV's credential in --data-dir.
    Enroll {
        /// The call-proxy server, host:port (the name or address its certificate is for).
        #[arg(long)]
        server: String,
        /// The server's CA certificate (PEM), e.g. its <data dir>/tls/ca.crt.
        #[arg(long)]
        server_ca: std::path::PathBuf,
        /// Where the TV keeps its own files (its key and credential go in identity/).
        #[arg(long, default_value = "/var/lib/tv-agent")]
        data_dir: std::path::PathBuf,
    },
    /// Power on, print the cached (missed) calls as JSON lines, acknowledge them, exit.
    Missed {
        #[command(flatten)]
        tv: TvArgs,
    },
    /// Power on, call a user, talk for some seconds, hang up, print the outcome.
    Call {
        #[command(flatten)]
        tv: TvArgs,
        #[command(flatten)]
        audio: AudioArgs,
        /// Who to call.
        #[arg(long)]
        to: u64,
        /// Seconds of conversation once answered.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Power on, watch users' presence for some seconds: one JSON line per state
    /// received, `{"user": 1001, "state": "busy", "seq": 3}` (a subscription's full
    /// state, at the start and after a recovery, marked `"full": true`).
    Watch {
        #[command(flatten)]
        tv: TvArgs,
        /// Users to watch besides the address book (--data-dir's contacts.json, which is
        /// also who may see this TV), comma-separated.
        #[arg(long, value_delimiter = ',')]
        users: Vec<u64>,
        /// Seconds to watch.
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
    },
    /// Leave a message for another TV (kept for it while it is off): one of --text,
    /// --voice (recorded for --seconds from an audio source), --picture (JPEG or PNG),
    /// --video (MP4). Prints `{"message_id": …, "outcome": "stored" | "delivered"}`, or a
    /// refusal's outcome (`too_large`, `bad_media`, `quota_exceeded`, `unknown_user`, …)
    /// with exit 1. Does not register: a daemon of the same TV stays on.
    Send {
        #[command(flatten)]
        tv: TvArgs,
        /// Who it is for.
        #[arg(long)]
        to: u64,
        /// A text message.
        #[arg(long, group = "body")]
        text: Option<String>,
        /// Record a voice message from this audio source: tone:HZ, wav:PATH, device.
        #[arg(long, group = "body")]
        voice: Option<AudioSpec>,
        /// Seconds of voice to record.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// A picture (JPEG or PNG).
        #[arg(long, group = "body")]
        picture: Option<std::path::PathBuf>,
        /// A video clip (MP4).
        #[arg(long, group = "body")]
        video: Option<std::path::PathBuf>,
        /// A caption for a voice message, picture or clip.
        #[arg(long, default_value = "")]
        caption: String,
    },
    /// Power on, wait for a call, answer it, talk for some seconds, hang up.
    Answer {
        #[command(flatten)]
        tv: TvArgs,
        #[command(flatten)]
        audio: AudioArgs,
        /// Seconds of conversation (less if the caller hangs up first).
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Seconds to wait for a call.
        #[arg(long, default_value_t = 60.0)]
        wait: f64,
    },
}

#[derive(Args)]
struct TvArgs {
    /// This TV's user number [default: the one it was enrolled as; required with
    /// --insecure-plaintext]. A number other than the enrolled one is an error.
    #[arg(long)]
    user: Option<u64>,
    /// The call-proxy server, host:port.
    #[arg(long)]
    server: String,
    /// Where the TV keeps its own files: its key and credential (identity/), the
    /// missed-call list (written before the server is told the calls were delivered)
    /// and, with --ui-listen, the address book.
    #[arg(long, default_value = "/var/lib/tv-agent")]
    data_dir: std::path::PathBuf,
    /// The server's CA certificate (PEM) [default: the one saved at enrollment].
    #[arg(long)]
    server_ca: Option<std::path::PathBuf>,
    /// Plain TCP to the server, for lab use only: nothing is encrypted, and the server
    /// must run with --insecure-plaintext too.
    #[arg(long)]
    insecure_plaintext: bool,
    /// UDP media port to bind (0: any free port).
    #[arg(long, default_value_t = 0)]
    media_port: u16,
    /// Address to bind the media socket on.
    #[arg(long, default_value = "0.0.0.0")]
    media_ip: IpAddr,
    /// Media port to register instead of the bound one (port forwarded by a router).
    #[arg(long)]
    advertise_port: Option<u16>,
    /// No ICE: offer no candidates, send media to the address the server saw (as agents
    /// before ICE did; with --advertise-port behind a forwarded port).
    #[arg(long)]
    no_ice: bool,
    /// Scripted modes: seconds to keep trying to reach the server.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
}

#[derive(Args)]
struct AudioArgs {
    /// Audio in: tone:HZ, wav:PATH, null, device[:NAME].
    #[arg(long, default_value = "device")]
    audio_in: AudioSpec,
    /// Audio out: wav:PATH, null, device[:NAME].
    #[arg(long, default_value = "device")]
    audio_out: AudioSpec,
}

/// The exit code of a TV without a valid credential (not enrolled, revoked, another
/// user's, a wrong CA file).
const NOT_ENROLLED_EXIT: u8 = 4;

fn not_enrolled_exit(reason: &str) -> ExitCode {
    println!("{}", json!({"outcome": "not_enrolled", "reason": reason}));
    eprintln!("tv-agent: {reason}");
    ExitCode::from(NOT_ENROLLED_EXIT)
}

/// How this TV reaches its server and who it is: TLS with its enrolled credential, or
/// plain TCP with `--user` (lab use).
fn transport(tv: &TvArgs) -> Result<(control_client::Transport, u64), String> {
    if tv.insecure_plaintext {
        tracing::warn!("INSECURE: plain TCP to the server, nothing is encrypted or authenticated");
        let user = tv
            .user
            .ok_or_else(|| "--insecure-plaintext needs --user".to_string())?;
        return Ok((control_client::Transport::Plaintext, user));
    }
    let ca = match &tv.server_ca {
        Some(path) => Some(control_client::tls::read_file(path).map_err(|e| e.to_string())?),
        None => None,
    };
    tv_agent::identity::IdentityDir::new(&tv.data_dir)
        .transport(ca.as_deref(), tv.user)
        .map_err(|e| e.to_string())
}

fn config(tv: &TvArgs, audio: Option<&AudioArgs>) -> Result<AgentConfig, String> {
    let (transport, user) = transport(tv)?;
    Ok(AgentConfig {
        user,
        server: tv.server.clone(),
        media_bind: SocketAddr::new(tv.media_ip, tv.media_port),
        advertise_port: tv.advertise_port,
        ice: !tv.no_ice,
        audio_in: audio.map_or(AudioSpec::Null, |a| a.audio_in.clone()),
        audio_out: audio.map_or(AudioSpec::Null, |a| a.audio_out.clone()),
        missed: MissedKeeping::WhenShown,
        transport,
        presence: None,
        inbox: None,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs what happens (events, call quality at hang-up); scripted modes
    // keep stderr for warnings and print their results as JSON on stdout.
    let default_level = match cli.command {
        Mode::Run { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tv-agent: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tv-agent: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn dispatch(mode: Mode) -> anyhow::Result<ExitCode> {
    match mode {
        Mode::Run {
            tv,
            audio,
            control_listen,
            ui_listen,
        } => run(&tv, &audio, control_listen, ui_listen).await,
        Mode::Enroll {
            server,
            server_ca,
            data_dir,
        } => enroll(&server, &server_ca, &data_dir).await,
        Mode::Missed { tv } => missed(&tv).await,
        Mode::Watch { tv, users, seconds } => watch(&tv, users, seconds).await,
        Mode::Call {
            tv,
            audio,
            to,
            seconds,
        } => call(&tv, &audio, to, seconds).await,
        Mode::Answer {
            tv,
            audio,
            seconds,
            wait,
        } => answer(&tv, &audio, seconds, wait).await,
        Mode::Send {
            tv,
            to,
            text,
            voice,
            seconds,
            picture,
            video,
            caption,
        } => {
            let body = match (text, voice, picture, video) {
                (Some(t), None, None, None) => Body::Text(t),
                (None, Some(v), None, None) => Body::Voice(v, seconds),
                (None, None, Some(p), None) => Body::Picture(p),
                (None, None, None, Some(v)) => Body::Video(v),
                _ => anyhow::bail!("give exactly one of --text, --voice, --picture, --video"),
            };
            send(&tv, to, body, caption).await
        }
    }
}

/// Binds a loopback-only listener for a local interface.
async fn bind_local(what: &str, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "the {what} must listen on loopback, not {addr}"
    );
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the {what}"))
}

async fn run(
    tv: &TvArgs,
    audio: &AudioArgs,
    control_listen: SocketAddr,
    ui_listen: Option<SocketAddr>,
) -> anyhow::Result<ExitCode> {
    // The credential (or, not enrolled yet, the CA to enroll against) is checked
    // first: exit 4 before anything else.
    let (ready, activate_with) = if needs_activation(tv) {
        match activation_ca(tv) {
            Ok(ca) => (None, Some(ca)),
            Err(reason) => return Ok(not_enrolled_exit(&reason)),
        }
    } else {
        match config(tv, Some(audio)) {
            Ok(cfg) => (Some(cfg), None),
            Err(reason) => return Ok(not_enrolled_exit(&reason)),
        }
    };
    let listener = bind_local("control API", control_listen).await?;
    // Everything that can fail at start-up is checked before powering on. The address
    // book is whom the TV watches and who may see it (the UI edits it).
    let book = open_book(tv)?;
    let contacts: Vec<u64> = book.list().iter().map(|c| c.user_id).collect();
    let ui = match ui_listen {
        Some(addr) => {
            let listener = bind_local("UI", addr).await?;
            let addr = listener.local_addr()?;
            let (ui, serve) = UiServer::new(listener, book);
            Some((ui, addr, serve))
        }
        None => None,
    };
    let (ui, ui_addr, mut serve_ui) = match ui {
        Some((ui, addr, serve)) => (Some(ui), Some(addr), Some(serve)),
        None => (None, None, None),
    };
    if let Some(ca) = activate_with {
        // The activation screen shows at once, before there is an agent.
        if let Some(serve) = serve_ui.take() {
            tokio::spawn(serve_ui_task(serve));
        }
        tracing::info!(ui = ?ui_addr, "this TV is not enrolled: activating it");
        let cfg = EnrollConfig {
            server: tv.server.clone(),
            ca_pem: ca,
            data_dir: tv.data_dir.clone(),
            mode: EnrollMode::Tv,
        };
        let screen = ui.clone();
        let mut show = move |s: &ActivationState| {
            if let Some(ui) = &screen {
                ui.show_activation(s);
            }
            print_activation(s);
        };
        let new_code = ui.as_ref().map(UiServer::new_code_requests);
        tokio::select! {
            () = shutdown_signal() => return Ok(ExitCode::SUCCESS),
            r = activation::enroll(&cfg, &mut show, new_code.as_deref()) => match r {
                Ok(user) => tracing::info!(user, "activated; starting"),
                Err(e) => return Ok(not_enrolled_exit(&e.to_string())),
            },
        }
    }
    let mut cfg = match ready.map_or_else(|| config(tv, Some(audio)), Ok) {
        Ok(cfg) => cfg,
        Err(reason) => return Ok(not_enrolled_exit(&reason)),
    };
    // The missed-call list outlives a restart: calls are kept on the TV before the
    // server forgets them, whether a UI or a control-API client shows them.
    cfg.missed = MissedKeeping::File(tv.data_dir.join("missed.json"));
    cfg.presence = Some(PresenceSetup {
        contacts,
        others: Vec::new(),
        settings_file: Some(tv.data_dir.join("presence.json")),
    });
    // Messages left for this TV are kept in the data directory before the server is
    // told they were taken.
    cfg.inbox = Some(Inbox::in_data_dir(&tv.data_dir));
    let user = cfg.user;
    let (agent, mut events) = Agent::power_on(cfg).await?;
    tracing::info!(
        user,
        media = %agent.media_addr(),
        control = %listener.local_addr()?,
        ui = ?ui_addr,
        "tv-agent running"
    );
    let in_flight = tv_agent::api::InFlight::default();
    tokio::spawn(tv_agent::api::serve(
        listener,
        agent.clone(),
        in_flight.clone(),
    ));
    if let Some(ui) = &ui {
        ui.attach(agent.clone());
    }
    if let Some(serve) = serve_ui.take() {
        tokio::spawn(serve_ui_task(serve));
    }
    let log_events = async move {
        // Ends when the agent powers off (from the control API) or its channel closes.
        while let Ok(ev) = events.recv().await {
            tracing::info!(event = %serde_json::to_string(&ev).unwrap_or_default(), "agent");
            if ev == AgentEvent::PoweredOff {
                break;
            }
        }
    };
    tokio::select! {
        () = shutdown_signal() => agent.power_off().await,
        () = log_events => {}
    }
    // A power-off asked for through the control API gets its answer before the exit.
    in_flight.drained(Duration::from_secs(1)).await;
    Ok(ExitCode::SUCCESS)
}

async fn serve_ui_task(serve: impl std::future::Future<Output = std::io::Result<()>>) {
    if let Err(e) = serve.await {
        tracing::error!(error = %e, "the UI server stopped");
    }
}

/// Whether `run` must enroll this TV first: TLS, and no enrollment in its data
/// directory (a damaged one is an error later, not a reason to enroll again).
fn needs_activation(tv: &TvArgs) -> bool {
    !tv.insecure_plaintext
        && matches!(
            tv_agent::identity::IdentityDir::new(&tv.data_dir).enrolled(),
            Ok(None)
        )
}

/// The CA to enroll against: `--server-ca`, or one saved in the data directory.
fn activation_ca(tv: &TvArgs) -> Result<Vec<u8>, String> {
    if let Some(path) = &tv.server_ca {
        return control_client::tls::read_file(path).map_err(|e| e.to_string());
    }
    match tv_agent::identity::IdentityDir::new(&tv.data_dir).ca() {
        Ok(Some(ca)) => Ok(ca),
        Ok(None) => Err(format!(
            "this TV is not enrolled and knows no server CA to enroll against: run it with \
             --server-ca (the server's <data dir>/tls/ca.crt), or `tv-agent enroll` first \
             (no credential in {})",
            tv.data_dir.join("identity").display()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Prints what `enroll` prints: `{"user_code": …, "expires_in": S}` for each code, and
/// `{"enrolled": USER}` on approval (one JSON line each, flushed).
fn print_activation(s: &ActivationState) {
    use std::io::Write;
    let line = match s {
        ActivationState::Code {
            user_code,
            expires_in_s,
            ..
        } => json!({"user_code": user_code, "expires_in": expires_in_s}),
        ActivationState::Enrolled { user_id } => json!({"enrolled": user_id}),
        _ => return,
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Waits for the first event that `pick` accepts, until `deadline`.
async fn wait_for<T>(
    events: &mut broadcast::Receiver<AgentEvent>,
    deadline: Instant,
    mut pick: impl FnMut(&AgentEvent) -> Option<T>,
) -> Option<T> {
    loop {
        match timeout_at(deadline, events.recv()).await {
            Ok(Ok(ev)) => {
                if let Some(t) = pick(&ev) {
                    return Some(t);
                }
            }
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(_)) | Err(_) => return None,
        }
    }
}

/// Powers on and waits until registered and the cached calls are presented.
async fn boot(
    tv: &TvArgs,
    audio: Option<&AudioArgs>,
) -> anyhow::Result<
    Result<
        (
            Agent,
            broadcast::Receiver<AgentEvent>,
            Vec<tv_agent::agent::MissedCall>,
        ),
        BootFailure,
    >,
> {
    let cfg = match config(tv, audio) {
        Ok(cfg) => cfg,
        Err(reason) => return Ok(Err(BootFailure::NotEnrolled(reason))),
    };
    let (agent, mut events) = Agent::power_on(cfg).await?;
    let deadline = Instant::now() + Duration::from_secs_f64(tv.connect_timeout.max(0.1));
    let mut last_reason = String::from("no answer from the server");
    let got = wait_for(&mut events, deadline, |ev| match ev {
        AgentEvent::CachedCalls { calls } => Some(Ok(calls.clone())),
        AgentEvent::LinkDown { reason, .. } => match fatal_link_down(reason) {
            Some(failure) => Some(Err(failure)),
            None => {
                last_reason = reason.clone();
                None
            }
        },
        _ => None,
    })
    .await;
    match got {
        Some(Ok(calls)) => Ok(Ok((agent, events, calls))),
        Some(Err(failure)) => {
            agent.power_off().await;
            Ok(Err(failure))
        }
        None => {
            agent.power_off().await;
            Ok(Err(BootFailure::Unreachable(last_reason)))
        }
    }
}

/// The link-down reasons a scripted mode gives up on at once: refused for its credential
/// (retrying does not help), or not entitled (until the operator raises the allowance or
/// the period ends).
fn fatal_link_down(reason: &str) -> Option<BootFailure> {
    if reason.starts_with(tv_agent::link::UNAUTHENTICATED_REASON) {
        Some(BootFailure::NotEnrolled(reason.to_string()))
    } else if reason.starts_with(tv_agent::link::ALLOWANCE_REASON) {
        Some(BootFailure::NotEntitled(reason.to_string()))
    } else {
        None
    }
}

/// Why a scripted mode could not power on.
enum BootFailure {
    /// No valid credential (exit 4).
    NotEnrolled(String),
    /// The account's traffic allowance is used up (exit 6).
    NotEntitled(String),
    /// The server could not be reached (exit 3).
    Unreachable(String),
}

fn boot_exit(f: BootFailure) -> ExitCode {
    match f {
        BootFailure::NotEnrolled(reason) => not_enrolled_exit(&reason),
        BootFailure::NotEntitled(reason) => {
            println!(
                "{}",
                json!({"outcome": "allowance_exhausted", "reason": reason})
            );
            eprintln!("tv-agent: {reason}");
            ExitCode::from(ALLOWANCE_EXIT)
        }
        BootFailure::Unreachable(reason) => unreachable_exit(&reason),
    }
}

/// `tv-agent enroll`: asks the server for a code, prints it, waits for the operator's
/// approval (or the code's expiry), keeps the credential. Exit 0 enrolled, 4 expired or
/// refused, 3 server unreachable.
async fn enroll(
    server: &str,
    ca_path: &std::path::Path,
    data_dir: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let ca = match control_client::tls::read_file(ca_path) {
        Ok(ca) => ca,
        Err(e) => return Ok(not_enrolled_exit(&e.to_string())),
    };
    let cfg = EnrollConfig {
        server: server.to_string(),
        ca_pem: ca,
        data_dir: data_dir.to_path_buf(),
        mode: EnrollMode::Once,
    };
    Ok(
        match activation::enroll(&cfg, &mut print_activation, None).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(EnrollError::Unreachable(reason)) => unreachable_exit(&reason),
            Err(e) => not_enrolled_exit(&e.to_string()),
        },
    )
}

/// The exit code of a call the server could not store (its disk is full): not the
/// same as unreachable (3), since the server answered and nothing was placed.
const STORAGE_FULL_EXIT: u8 = 5;

/// The exit code of a TV whose account used its traffic allowance for the period (the
/// distribution service assigned it no node).
const ALLOWANCE_EXIT: u8 = 6;

fn unreachable_exit(reason: &str) -> ExitCode {
    println!("{}", json!({"outcome": "unreachable", "reason": reason}));
    ExitCode::from(3)
}

async fn missed(tv: &TvArgs) -> anyhow::Result<ExitCode> {
    let (agent, _events, calls) = match boot(tv, None).await? {
        Ok(v) => v,
        Err(f) => return Ok(boot_exit(f)),
    };
    // Shown first: every line printed and flushed before the server hears that the calls
    // were delivered. Killed before the acknowledgement, they come again next time.
    let printed = print_lines(&calls);
    let code = match printed {
        Ok(()) => {
            let ids = calls.iter().map(|c| c.call_id).collect();
            if let Err(e) = agent.shown(ids).await {
                eprintln!("tv-agent: calls shown but not acknowledged (they will come again): {e}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tv-agent: cannot print the missed calls, not acknowledged: {e}");
            ExitCode::from(2)
        }
    };
    // Then the messages, on a transfer link of their own.
    let code = match fetch_messages(tv).await {
        Ok(()) => code,
        Err(f) => transfer_exit(f),
    };
    agent.power_off().await;
    Ok(code)
}

/// The address book in `--data-dir`.
fn open_book(tv: &TvArgs) -> anyhow::Result<tv_agent::contacts::ContactBook> {
    let path = tv.data_dir.join("contacts.json");
    tv_agent::contacts::ContactBook::open(&path)
        .with_context(|| format!("cannot open the address book {}", path.display()))
}

/// `tv-agent watch`: subscribes to the address book and `users`, prints one JSON line per
/// state received until `seconds` pass. Exit 0 after watching, 3 if the server was never
/// reached, 4 not enrolled, 6 allowance used up.
async fn watch(tv: &TvArgs, users: Vec<u64>, seconds: f64) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let mut cfg = match config(tv, None) {
        Ok(cfg) => cfg,
        Err(reason) => return Ok(not_enrolled_exit(&reason)),
    };
    let contacts = open_book(tv)?.list().iter().map(|c| c.user_id).collect();
    cfg.presence = Some(PresenceSetup {
        contacts,
        others: users,
        settings_file: None,
    });
    let (agent, mut events) = Agent::power_on(cfg).await?;
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds.max(0.0));
    let connect_by = started + Duration::from_secs_f64(tv.connect_timeout.max(0.1));
    let mut registered = false;
    let mut last_reason = String::from("no answer from the server");
    let failure = loop {
        let deadline = if registered {
            until
        } else {
            until.min(connect_by)
        };
        let ev = match timeout_at(deadline, events.recv()).await {
            Ok(Ok(ev)) => ev,
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                eprintln!("tv-agent: {n} events were missed (output too slow)");
                continue;
            }
            Ok(Err(_)) => break None,
            Err(_) if registered || Instant::now() >= until => break None,
            Err(_) => break Some(BootFailure::Unreachable(last_reason)),
        };
        match ev {
            AgentEvent::Registered { .. } => registered = true,
            AgentEvent::Presence {
                user,
                state,
                seq,
                full,
            } => {
                let mut line = json!({"user": user, "state": state, "seq": seq});
                if full {
                    line["full"] = json!(true);
                }
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            AgentEvent::PresenceLost { reason } => {
                eprintln!("tv-agent: the server ended the presence subscription ({reason}); subscribing again");
            }
            AgentEvent::LinkDown { reason, .. } => {
                if let Some(failure) = fatal_link_down(&reason) {
                    break Some(failure);
                }
                if registered {
                    eprintln!("tv-agent: control link down ({reason}); reconnecting");
                }
                last_reason = reason;
            }
            _ => {}
        }
    };
    agent.power_off().await;
    Ok(failure.map_or(ExitCode::SUCCESS, boot_exit))
}

/// Writes one JSON line per call to stdout and flushes it.
fn print_lines(calls: &[tv_agent::agent::MissedCall]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for c in calls {
        let mut line = serde_json::to_value(c)?;
        line["kind"] = json!("call");
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// One JSON line per message (`"kind"`: text, voice, picture, video), with the `file`
/// its body was saved as; flushed.
fn print_messages(inbox: &Inbox, messages: &[KeptMessage]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for m in messages {
        let line = json!({
            "kind": m.kind,
            "message_id": m.message_id,
            "from": m.sender,
            "sent_at": tv_agent::agent::rfc3339(m.sent_ms),
            "sent_ms": m.sent_ms,
            "text": m.text,
            "file": inbox.body_path(m).map(|p| p.display().to_string()),
            "mime": m.mime,
            "size": m.size,
            "duration_ms": m.duration_ms,
            "width": m.width,
            "height": m.height,
            "sender_state": m.sender_state,
        });
        writeln!(out, "{line}")?;
    }
    out.flush()
}

/// The transfer link settings of this TV (`--server`, its credential).
fn transfer_config(tv: &TvArgs) -> Result<tv_agent::link::LinkConfig, String> {
    let (transport, user) = transport(tv)?;
    let mut cfg = tv_agent::link::LinkConfig::new(tv.server.clone(), user, 0);
    cfg.transport = transport;
    cfg.request_timeout = Duration::from_secs_f64(tv.connect_timeout.max(1.0));
    Ok(cfg)
}

/// Takes the messages waiting for this TV into `--data-dir/messages`, printing each
/// before the server hears it was kept. A server without messages: nothing to do.
async fn fetch_messages(tv: &TvArgs) -> Result<(), TransferFailure> {
    let cfg = transfer_config(tv).map_err(TransferFailure::NotEnrolled)?;
    let inbox = Inbox::in_data_dir(&tv.data_dir);
    let mut link = match TransferLink::open(&cfg).await {
        Ok(link) => link,
        Err(TransferError::Unsupported(_)) => return Ok(()),
        Err(e) => return Err(TransferFailure::from(e)),
    };
    let printer = inbox.clone();
    tv_agent::agent::inbox::fetch_into(&mut link, &inbox, move |all| print_messages(&printer, all))
        .await
        .map(|_| ())
        .map_err(TransferFailure::from)
}

/// Why a transfer failed, for the exit code.
enum TransferFailure {
    /// No valid credential (exit 4).
    NotEnrolled(String),
    /// Refused by the server (exit 1), with its outcome word.
    Refused(&'static str, String),
    /// Unreachable, or the link broke (exit 3).
    Unreachable(String),
    /// A local file (exit 2).
    File(String),
}

impl From<TransferError> for TransferFailure {
    fn from(e: TransferError) -> Self {
        match &e {
            TransferError::Refused(w) if w.code == shared_proto::ErrorCode::UNAUTHENTICATED => {
                TransferFailure::NotEnrolled(w.message.clone())
            }
            TransferError::Link(r) if r.starts_with(tv_agent::link::UNAUTHENTICATED_REASON) => {
                TransferFailure::NotEnrolled(r.clone())
            }
            TransferError::Refused(_) | TransferError::Unsupported(_) => {
                TransferFailure::Refused(e.outcome(), e.to_string())
            }
            TransferError::Link(r) => TransferFailure::Unreachable(r.clone()),
            TransferError::File(f) => TransferFailure::File(f.to_string()),
        }
    }
}

fn transfer_exit(f: TransferFailure) -> ExitCode {
    match f {
        TransferFailure::NotEnrolled(reason) => not_enrolled_exit(&reason),
        TransferFailure::Unreachable(reason) => unreachable_exit(&reason),
        TransferFailure::Refused(outcome, reason) => {
            println!("{}", json!({"outcome": outcome, "reason": reason}));
            eprintln!("tv-agent: {reason}");
            ExitCode::from(1)
        }
        TransferFailure::File(reason) => {
            eprintln!("tv-agent: {reason}");
            ExitCode::from(2)
        }
    }
}

/// What `tv-agent send` leaves.
enum Body {
    Text(String),
    Voice(AudioSpec, f64),
    Picture(std::path::PathBuf),
    Video(std::path::PathBuf),
}

/// `tv-agent send`: leaves a message for `to` (recording a voice message first), prints
/// `{"message_id": …, "outcome": "stored" | "delivered"}`; a refusal prints its outcome
/// (`too_large`, `bad_media`, `quota_exceeded`, `unknown_user`, …) and exits 1.
async fn send(tv: &TvArgs, to: u64, body: Body, caption: String) -> anyhow::Result<ExitCode> {
    let cfg = match transfer_config(tv) {
        Ok(cfg) => cfg,
        Err(reason) => return Ok(not_enrolled_exit(&reason)),
    };
    let key: u64 = rand::random();
    let outbox = tv.data_dir.join("outbox");
    let (kind, text, file, temp) = match body {
        Body::Text(t) => (shared_proto::MessageKind::TEXT, t, None, None),
        Body::Voice(spec, seconds) => {
            std::fs::create_dir_all(&outbox)?;
            let path = outbox.join(format!("{key:016x}.opus"));
            let duration = Duration::from_secs_f64(seconds.max(0.0));
            let rec = {
                let (spec, path) = (spec.clone(), path.clone());
                tokio::task::spawn_blocking(move || {
                    tv_agent::media::voice_note::record(&spec, duration, &path)
                })
                .await?
            };
            if let Err(e) = rec {
                println!(
                    "{}",
                    json!({"outcome": "bad_media", "reason": format!("{e:#}")})
                );
                return Ok(ExitCode::from(1));
            }
            (
                shared_proto::MessageKind::VOICE,
                caption,
                Some(path.clone()),
                Some(path),
            )
        }
        Body::Picture(p) => (shared_proto::MessageKind::PICTURE, caption, Some(p), None),
        Body::Video(p) => (shared_proto::MessageKind::VIDEO, caption, Some(p), None),
    };
    let msg = Outgoing {
        to,
        key,
        kind,
        text,
    };
    let result = async {
        let mut link = TransferLink::open(&cfg).await?;
        link.send(&msg, file.as_deref()).await
    }
    .await;
    if let Some(t) = temp {
        let _ = std::fs::remove_file(t);
    }
    Ok(match result {
        Ok(sent) => {
            println!(
                "{}",
                json!({"message_id": sent.message_id, "outcome": sent.outcome.name(), "to": to, "kind": kind.name()})
            );
            ExitCode::SUCCESS
        }
        Err(e) => transfer_exit(TransferFailure::from(e)),
    })
}

/// Talks until `seconds` pass or the call ends; then hangs up; returns the `Ended` event.
async fn converse(
    agent: &Agent,
    events: &mut broadcast::Receiver<AgentEvent>,
    seconds: f64,
) -> Option<AgentEvent> {
    let talk_until = Instant::now() + Duration::from_secs_f64(seconds.max(0.0));
    if let Some(ended) = wait_for(events, talk_until, |ev| {
        matches!(ev, AgentEvent::Ended { .. }).then(|| ev.clone())
    })
    .await
    {
        return Some(ended);
    }
    let _ = agent.hang_up().await;
    wait_for(events, Instant::now() + Duration::from_secs(5), |ev| {
        matches!(ev, AgentEvent::Ended { .. }).then(|| ev.clone())
    })
    .await
}

fn report(outcome: &str, call_id: Option<u64>, peer: u64, ended: Option<&AgentEvent>) -> ExitCode {
    let (end, quality) = match ended {
        Some(AgentEvent::Ended {
            outcome, quality, ..
        }) => (Some(*outcome), quality.clone()),
        _ => (None, None),
    };
    println!(
        "{}",
        json!({"outcome": outcome, "call_id": call_id, "peer": peer, "ended": end,
               "path": quality.as_ref().and_then(|q| q.path), "quality": quality})
    );
    if matches!(outcome, "answered" | "cached") {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn call(tv: &TvArgs, audio: &AudioArgs, to: u64, seconds: f64) -> anyhow::Result<ExitCode> {
    let (agent, mut events, _) = match boot(tv, Some(audio)).await? {
        Ok(v) => v,
        Err(f) => return Ok(boot_exit(f)),
    };
    let code = match agent.dial(to).await {
        DialResult::Ringing(call_id) => {
            // The server's ring timeout bounds the wait; a minute is a backstop.
            let answered = wait_for(
                &mut events,
                Instant::now() + Duration::from_secs(120),
                |ev| match ev {
                    AgentEvent::Answered { .. } => Some(None),
                    AgentEvent::Ended { .. } => Some(Some(ev.clone())),
                    _ => None,
                },
            )
            .await;
            match answered {
                Some(None) => {
                    let ended = converse(&agent, &mut events, seconds).await;
                    report("answered", Some(call_id), to, ended.as_ref())
                }
                Some(Some(ended)) => {
                    let outcome = match &ended {
                        AgentEvent::Ended { outcome, .. } => outcome.as_str(),
                        _ => "ended",
                    };
                    report(outcome, Some(call_id), to, Some(&ended))
                }
                None => report("no_answer", Some(call_id), to, None),
            }
        }
        DialResult::Cached(call_id) => report("cached", Some(call_id), to, None),
        DialResult::Busy(call_id) => report("busy", Some(call_id), to, None),
        DialResult::Unreachable(reason) => unreachable_exit(&reason),
        DialResult::StorageFull => {
            println!(
                "{}",
                json!({"outcome": "storage_full", "call_id": null, "peer": to,
                       "reason": "the server's storage is full: the call was not placed or recorded; try again later"})
            );
            ExitCode::from(STORAGE_FULL_EXIT)
        }
        other => report(other.outcome(), None, to, None),
    };
    agent.power_off().await;
    Ok(code)
}

async fn answer(
    tv: &TvArgs,
    audio: &AudioArgs,
    seconds: f64,
    wait: f64,
) -> anyhow::Result<ExitCode> {
    let (agent, mut events, _) = match boot(tv, Some(audio)).await? {
        Ok(v) => v,
        Err(f) => return Ok(boot_exit(f)),
    };
    let incoming = wait_for(
        &mut events,
        Instant::now() + Duration::from_secs_f64(wait),
        |ev| match ev {
            AgentEvent::Incoming { call_id, caller } => Some((*call_id, *caller)),
            _ => None,
        },
    )
    .await;
    let code = match incoming {
        None => {
            println!("{}", json!({"outcome": "no_call"}));
            ExitCode::from(1)
        }
        Some((call_id, caller)) => match agent.answer().await {
            Ok(()) => {
                let ended = converse(&agent, &mut events, seconds).await;
                report("answered", Some(call_id), caller, ended.as_ref())
            }
            Err(e) => {
                println!(
                    "{}",
                    json!({"outcome": "answer_failed", "call_id": call_id, "reason": e.to_string()})
                );
                ExitCode::from(1)
            }
        },
    };
    agent.power_off().await;
    Ok(code)
}
