//! A `call-proxy-server` process the load generator starts, waits for, stops with
//! SIGTERM and reads the log of.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use call_proxy_server::client::Client;
use tokio::time::timeout;

use crate::args::Args;

/// A server this program started; killed if still running when dropped.
pub(crate) struct SpawnedServer {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    pub(crate) dir: PathBuf,
    pub(crate) log: PathBuf,
    pub(crate) stopped: bool,
}

impl SpawnedServer {
    pub(crate) fn start(args: &Args) -> Result<SpawnedServer> {
        let bin = match &args.server_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()
                .context("cannot find this executable")?
                .with_file_name("call-proxy-server"),
        };
        ensure!(
            bin.is_file(),
            "server binary {} not found (build it: cargo build --release -p call-proxy-server, \
             or pass --server-bin)",
            bin.display()
        );
        let base = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = base.join(format!("call-proxy-bench-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")
                .context("cannot find a free loopback port")?;
            probe.local_addr()?.port()
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = dir.join("server.log");
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let db = match &args.db {
            Some(url) => url.clone(),
            None => dir.join("bench.sqlite").display().to_string(),
        };
        let mut cmd = Command::new(&bin);
        // Plain TCP: these figures are the protocol's and the store's; TLS is measured on
        // its own.
        cmd.arg("serve")
            .arg("--insecure-plaintext")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--db")
            .arg(&db)
            .arg("--data-dir")
            .arg(&dir)
            .args(
                args.db_password_file
                    .iter()
                    .flat_map(|f| [std::ffi::OsStr::new("--db-password-file"), f.as_os_str()]),
            )
            .args(&args.server_args)
            .stdin(Stdio::null())
            .stdout(
                log_file
                    .try_clone()
                    .context("cannot duplicate the log file")?,
            )
            .stderr(log_file);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        println!(
            "spawned {} serve --listen {addr} --db {} {} (pid {}, log {})",
            bin.display(),
            db,
            args.server_args.join(" "),
            child.id(),
            log.display()
        );
        Ok(SpawnedServer {
            child,
            addr,
            dir,
            log,
            stopped: false,
        })
    }

    /// Waits until the server completes a protocol handshake.
    pub(crate) async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the server exited before accepting connections ({status}); log:\n{}",
                    self.log_tail(30)
                );
            }
            if let Ok(Ok(c)) = timeout(Duration::from_millis(500), Client::connect(self.addr)).await
            {
                drop(c);
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the server did not accept connections within 20 s; log:\n{}",
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits up to 60 s (then SIGKILL). Returns the exit description.
    pub(crate) async fn stop(&mut self) -> Result<String> {
        if let Some(status) = self.child.try_wait()? {
            self.stopped = true;
            bail!("the server had already exited ({status}) before the end of the run");
        }
        let started = Instant::now();
        test_support::process::sigterm(self.child.id()).context("cannot send SIGTERM")?;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.stopped = true;
                let took = started.elapsed();
                ensure!(
                    status.success(),
                    "the server exited with {status} after SIGTERM"
                );
                return Ok(format!(
                    "exited cleanly ({status}) {:.2} s after SIGTERM",
                    took.as_secs_f64()
                ));
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.stopped = true;
                bail!("the server did not stop within 60 s of SIGTERM; killed");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Warning and error lines of the server's log.
    pub(crate) fn log_problems(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
