//! `call-proxy-demo`: the whole story of the source documents on one machine, with a
//! real server process on embedded SQLite and simulated TVs over real TCP.
//!
//! TV 1001 calls TV 2002 while 2002 is off (cached); 2002 powers on and is shown the
//! missed calls with 1001's current state; 2002 calls back and 1001 answers; hang-up;
//! both power off. After each step it prints what the TVs saw and the database rows.
//! (Real voice media between the TVs arrives with the tv-agent.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use call_proxy_server::client::Client;
use shared_proto::{DialOutcome, Event, NetState, Reply, Request, UserId};

const A: UserId = 1001;
const B: UserId = 2002;

struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // SIGTERM for a clean shutdown, then reap.
        #[allow(unsafe_code)]
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let data = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("call-proxy-demo-{}", std::process::id()))
        });
    std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
    let db = data.join("call-proxy.sqlite");
    let _ = std::fs::remove_file(&db);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(demo(&db))
}

async fn start_server(db: &Path) -> anyhow::Result<(ServerProcess, SocketAddr)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let exe = std::env::current_exe()?.with_file_name("call-proxy-server");
    let child = Command::new(&exe)
        .args(["serve", "--listen", &addr.to_string(), "--db"])
        .arg(db)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let server = ServerProcess(child);
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok((server, addr));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("the server did not start listening on {addr}")
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn show(db: &Path, sql: &str) -> anyhow::Result<()> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut stmt = conn.prepare(sql)?;
    let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
    println!("   {}", names.join(" | "));
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let mut cells = Vec::new();
        for i in 0..names.len() {
            let v: rusqlite::types::Value = row.get(i)?;
            cells.push(match v {
                rusqlite::types::Value::Null => "NULL".to_string(),
                rusqlite::types::Value::Integer(i) => i.to_string(),
                rusqlite::types::Value::Real(f) => f.to_string(),
                rusqlite::types::Value::Text(t) => t,
                rusqlite::types::Value::Blob(b) => format!("<{} bytes>", b.len()),
            });
        }
        println!("   {}", cells.join(" | "));
    }
    Ok(())
}

const PROPERTY: &str =
    "SELECT user_id, user_ip, user_netstate, media_port, last_seen FROM user_property ORDER BY user_id";
const CALLS: &str =
    "SELECT id, user_id, otheruser_id, call_date, outcome, delivered FROM user_call ORDER BY id";

async fn power_on(addr: SocketAddr, user: UserId, port: u16) -> anyhow::Result<Client> {
    let mut tv = Client::connect(addr).await?;
    let reg = tv.register(user, port).await?;
    println!(
        "   TV {user} registered from {} (media port {port}); {} cached call(s) waiting",
        reg.observed_ip, reg.cached_waiting
    );
    Ok(tv)
}

async fn next_event(tv: &mut Client) -> anyhow::Result<Event> {
    Ok(
        tokio::time::timeout(Duration::from_secs(5), tv.next_event())
            .await
            .context("no event in time")??,
    )
}

async fn demo(db: &Path) -> anyhow::Result<()> {
    let (_server, addr) = start_server(db).await?;
    println!("call-proxy-server on {addr}, database {}", db.display());

    step("TV 2002 was set up earlier and is switched off now");
    let b = power_on(addr, B, 6004).await?;
    b.bye().await?;
    show(db, PROPERTY)?;

    step("Flow 1: TV 1001 powers on and registers");
    let mut a = power_on(addr, A, 5004).await?;
    show(db, PROPERTY)?;

    step("Flow 3: TV 1001 asks for 2002's state");
    if let Reply::States(s) = a.request(Request::QueryState { users: vec![B] }).await? {
        println!("   TV 1001 shows: 2002 is {:?}", s[0].state);
    }

    step("Flow 5: TV 1001 calls 2002, which is off: the server caches the call");
    for _ in 0..2 {
        match a.request(Request::Dial { callee: B }).await? {
            Reply::Dial(DialOutcome::Cached { call_id }) => {
                println!(
                    "   TV 1001 shows: call {call_id} cached; 2002 will see it when switched on"
                )
            }
            other => bail!("expected a cached call, got {other:?}"),
        }
    }
    show(db, CALLS)?;

    step("Flow 6: TV 2002 powers on and fetches the calls cached while it was off");
    let mut b = power_on(addr, B, 6004).await?;
    let calls = b.fetch_all_cached().await?;
    for c in &calls {
        println!(
            "   TV 2002 shows: missed call from {} at {} ({:?}); caller is {:?} now",
            c.caller,
            call_proxy_server::clock::to_db_text(c.call_date_ms),
            c.reason,
            c.caller_state
        );
    }
    let ids: Vec<u64> = calls.iter().map(|c| c.call_id).collect();
    println!(
        "   TV 2002 acknowledged {} call(s)",
        b.ack_cached(&ids).await?
    );
    show(db, CALLS)?;

    step("Flow 4: the viewer on 2002 calls 1001 back; 1001 is online");
    let caller_online = calls.first().map(|c| c.caller_state) == Some(NetState::Online);
    println!("   caller online: {caller_online}");
    let call_id = match b.request(Request::Dial { callee: A }).await? {
        Reply::Dial(DialOutcome::Ringing {
            call_id,
            callee_media,
        }) => {
            println!("   TV 2002 got 1001's media address {callee_media}; ringing");
            call_id
        }
        other => bail!("expected ringing, got {other:?}"),
    };
    match next_event(&mut a).await? {
        Event::IncomingCall {
            caller,
            caller_media,
            ..
        } => {
            println!("   TV 1001 rings: call from {caller}, media at {caller_media}")
        }
        other => bail!("expected an incoming call, got {other:?}"),
    }
    a.request(Request::Answer { call_id }).await?;
    println!("   TV 1001 answered");
    if let Event::CallAnswered { .. } = next_event(&mut b).await? {
        println!("   TV 2002 sees the answer: media flows TV to TV over UDP");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.request(Request::HangUp { call_id }).await?;
    if let Event::CallEnded { reason, .. } = next_event(&mut a).await? {
        println!("   TV 1001 sees the call end: {reason:?}");
    }

    step("Flow 2: both TVs power off");
    a.bye().await?;
    b.bye().await?;
    show(db, PROPERTY)?;

    step("Call log (user_call)");
    show(
        db,
        "SELECT id, user_id, otheruser_id, call_date, outcome, answered_at, ended_at, delivered FROM user_call ORDER BY id",
    )?;
    println!("\ndemo complete");
    Ok(())
}
