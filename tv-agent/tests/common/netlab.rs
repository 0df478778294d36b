//! A lab of network namespaces for the NAT tests: an "internet" (a bridge, 203.0.113.0/24,
//! holding the call-proxy server and coturn), homes whose routers do NAT (nftables) between
//! it and their LAN (192.0.2.0/24, 198.51.100.0/24), and TVs on those LANs. Only the
//! documentation ranges, only inside namespaces the lab made, no route out of them; every
//! namespace is removed when the lab is dropped (a failed test too), and namespaces left by
//! a test process that died are removed when the next lab starts.
//!
//! The server runs in this test process on a thread that entered the internet namespace
//! (its sockets belong to it); the agents run as `tv-agent` processes under
//! `ip netns exec`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use call_proxy_server::{Config, SqliteOptions, SqliteStore};

/// The server's address on the lab's internet.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The prefix of every lab namespace's name (then the test process's pid).
const PREFIX: &str = "tvnat";

/// How a home's router treats traffic leaving the home (every router also drops what
/// comes from outside unasked, as home routers do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Linux `masquerade`: endpoint-independent mapping (the source port kept when
    /// free), filtering by the destination's address and port (conntrack).
    Masquerade,
    /// `masquerade random-fully`: a new outside port for every destination (symmetric).
    Symmetric,
    /// Masquerade, and outgoing UDP dropped (a network that allows only TCP out).
    BlockUdp,
}

/// Runs `ip` (or any program) and fails the test with its output if it fails.
pub fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Gives `dev` in namespace `ns` the address `cidr`.
fn addr_add(ns: &str, cidr: &str, dev: &str) {
    run(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev]);
}

/// A bridge `name` in namespace `ns`, up.
fn bridge(ns: &str, name: &str) {
    run(&["ip", "-n", ns, "link", "add", name, "type", "bridge"]);
    run(&["ip", "-n", ns, "link", "set", name, "up"]);
}

/// Whether this process may build namespaces (root with `ip` and `nft`).
pub fn available() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("the NAT tests need root (network namespaces)".into());
    }
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Err(format!(
                "the NAT tests need `{tool}` (scripts/setup.sh installs it)"
            ));
        }
    }
    Ok(())
}

/// The namespaces of one test.
pub struct Lab {
    tag: String,
    namespaces: Vec<String>,
    links: u32,
}

impl Lab {
    /// A new lab (removing what dead test processes left).
    pub fn new() -> Lab {
        static N: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let n = N.fetch_add(1, Ordering::Relaxed);
        Lab {
            tag: format!("{PREFIX}{}x{n}", std::process::id()),
            namespaces: Vec::new(),
            links: 0,
        }
    }

    /// A new namespace called `role` in this lab, its loopback up.
    pub fn ns(&mut self, role: &str) -> String {
        let name = format!("{}{role}", self.tag);
        run(&["ip", "netns", "add", &name]);
        self.namespaces.push(name.clone());
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// A veth pair: `a_if` in `a`, `b_if` in `b`, both up.
    pub fn veth(&mut self, a: &str, a_if: &str, b: &str, b_if: &str) {
        self.links += 1;
        run(&[
            "ip", "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b,
        ]);
        run(&["ip", "-n", a, "link", "set", a_if, "up"]);
        run(&["ip", "-n", b, "link", "set", b_if, "up"]);
    }

    /// The internet: a namespace with a bridge holding the server's address.
    pub fn internet(&mut self) -> String {
        let inet = self.ns("inet");
        bridge(&inet, "br0");
        addr_add(&inet, &format!("{SERVER_IP}/24"), "br0");
        inet
    }

    /// A home router `n` on `inet` at 203.0.113.`wan`, with the LAN `lan`.0/24 (its own
    /// address `lan`.1) on a bridge, doing `nat` for what leaves through its WAN.
    pub fn router(&mut self, inet: &str, n: u32, wan: u8, lan: &str, nat: Nat) -> String {
        let r = self.ns(&format!("r{n}"));
        let port = format!("w{n}");
        self.veth(&r, "wan", inet, &port);
        run(&["ip", "-n", inet, "link", "set", &port, "master", "br0"]);
        addr_add(&r, &format!("203.0.113.{wan}/24"), "wan");
        bridge(&r, "lan");
        addr_add(&r, &format!("{lan}.1/24"), "lan");
        run(&[
            "ip",
            "netns",
            "exec",
            &r,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ]);
        let masq = match nat {
            Nat::Symmetric => "masquerade random,fully-random",
            Nat::Masquerade | Nat::BlockUdp => "masquerade",
        };
        let mut rules = format!(
            "table ip nat {{\n chain post {{\n  type nat hook postrouting priority 100;\n  oifname \"wan\" {masq}\n }}\n}}\n"
        );
        // A home router's firewall: nothing unsolicited from outside, to the router or
        // through it (dropped before conntrack confirms it, so an unsolicited packet
        // leaves no entry behind that a later outgoing flow would clash with).
        let block_udp = if nat == Nat::BlockUdp {
            "  iifname \"lan\" meta l4proto udp drop\n"
        } else {
            ""
        };
        rules.push_str(&format!(
            "table inet filter {{\n chain input {{\n  type filter hook input priority 0;\n  iifname \"wan\" ct state new drop\n }}\n chain through {{\n  type filter hook forward priority 0;\n  iifname \"wan\" ct state new drop\n{block_udp} }}\n}}\n"
        ));
        let file = std::env::temp_dir().join(format!("{r}.nft"));
        std::fs::write(&file, rules).unwrap();
        run(&[
            "ip",
            "netns",
            "exec",
            &r,
            "nft",
            "-f",
            file.to_str().unwrap(),
        ]);
        let _ = std::fs::remove_file(&file);
        r
    }

    /// A TV `name` on `router`'s LAN `lan`.0/24 at `lan`.`host`, routed through it.
    pub fn tv(&mut self, router: &str, lan: &str, host: u8, name: &str) -> (String, IpAddr) {
        let tv = self.ns(name);
        let port = format!("l{}", self.links + 1);
        self.veth(&tv, "eth0", router, &port);
        run(&["ip", "-n", router, "link", "set", &port, "master", "lan"]);
        let ip = format!("{lan}.{host}");
        addr_add(&tv, &format!("{ip}/24"), "eth0");
        run(&[
            "ip",
            "-n",
            &tv,
            "route",
            "add",
            "default",
            "via",
            &format!("{lan}.1"),
        ]);
        (tv, ip.parse().unwrap())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Removes lab namespaces of test processes that are gone.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let alive = !pid.is_empty() && Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// A call-proxy server running in namespace `ns` (on a thread of its own that entered
/// it), over TLS with the lab's CA; dropped, it stops.
pub struct NsServer {
    pub addr: SocketAddr,
    pub shared: Arc<call_proxy_server::Shared<SqliteStore>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsServer {
    /// Starts `config` (its `listen` and `db` set) in `ns`.
    pub fn start(ns: &str, config: Config) -> NsServer {
        let ns = ns.to_string();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            enter(&ns);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let db = config.db.clone().unwrap();
                let store = SqliteStore::open(&db, SqliteOptions::default()).unwrap();
                let server = super::Server::start_with(config, store);
                ready_tx
                    .send((server.addr, Arc::clone(server.shared())))
                    .unwrap();
                let _ = stop_rx.await;
                server.stop().await;
            });
        });
        let (addr, shared) = ready_rx.recv().expect("the server started");
        NsServer {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for NsServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Moves this thread into the network namespace `ns`.
fn enter(ns: &str) {
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {ns}: {e}"));
}

/// coturn's address on the lab's internet (beside the server's).
pub const TURN_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);

/// Debian's coturn running in namespace `ns` at [`TURN_IP`]:3478, with the shared-secret
/// scheme (`use-auth-secret`) the call-proxy server makes credentials for; killed when
/// dropped.
pub struct Coturn {
    child: std::process::Child,
    /// The shared secret, in a file for the server's `turn_secret_file`.
    pub secret_file: std::path::PathBuf,
}

impl Coturn {
    /// Starts coturn (adding [`TURN_IP`] to the internet's bridge) with its files in `dir`.
    pub fn start(inet: &str, dir: &Path) -> Coturn {
        addr_add(inet, &format!("{TURN_IP}/24"), "br0");
        let secret = format!("lab-secret-{}", std::process::id());
        let secret_file = dir.join("turn-secret");
        std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", inet, "turnserver", "-n"])
            .arg(format!("--listening-ip={TURN_IP}"))
            .arg(format!("--relay-ip={TURN_IP}"))
            .args([
                "--listening-port=3478",
                "--min-port=49152",
                "--max-port=49400",
            ])
            .args([
                "--use-auth-secret",
                &format!("--static-auth-secret={secret}"),
            ])
            .args(["--realm=tvcall.test", "--no-tls", "--no-dtls", "--no-cli"])
            .arg(format!("--log-file={}", dir.join("turn.log").display()))
            .args(["--simple-log", "--no-software-attribute"])
            .arg(format!(
                "--pidfile={}",
                dir.join("turnserver.pid").display()
            ))
            .arg(format!("--userdb={}", dir.join("turndb").display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("turnserver (Debian's coturn; scripts/setup.sh installs it)");
        // Ready once it answers on its port: a STUN binding through the lab would need
        // a namespace of our own, so wait for its listening socket instead.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", inet, "ss", "-Hlun", "sport", "= :3478"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains(&TURN_IP.to_string()) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "coturn did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Coturn { child, secret_file }
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
