//! Child processes in tests and benchmarks: signals, bounded waits for an exit, a guard
//! that kills a child left running, and the `main` of a benchmark binary
//! ([`bench_main`]).

use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// Sends `signal` (e.g. `libc::SIGTERM`) to process `pid`.
#[allow(unsafe_code)]
pub fn signal(pid: u32, signal: i32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::other(format!("process id {pid} out of range")))?;
    // SAFETY: kill only sends a signal to the given process id.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Asks a process to stop the way an operator does.
pub fn sigterm(pid: u32) -> std::io::Result<()> {
    signal(pid, libc::SIGTERM)
}

/// Polls `child` until it exits or `limit` passes; `None` if it is still running.
pub fn wait_exit(child: &mut Child, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// [`wait_exit`] without blocking the async runtime's thread.
pub async fn wait_exit_async(
    child: &mut Child,
    limit: Duration,
) -> std::io::Result<Option<ExitStatus>> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Kills (SIGKILL) and reaps a child; harmless if it already exited.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A child process that is killed and reaped when the guard is dropped (a failing test
/// leaves nothing running).
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill(&mut self.0);
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Starts `cmd` and waits (at most `limit`) until something accepts TCP connections at
/// `addr`: a server process ready for its test. The child is killed when the guard drops,
/// and at once if it never starts listening.
pub async fn spawn_listening(
    cmd: &mut Command,
    addr: SocketAddr,
    limit: Duration,
) -> std::io::Result<KillOnDrop> {
    let child = KillOnDrop(cmd.spawn()?);
    if crate::net::wait_listening(addr, limit).await {
        Ok(child)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("nothing listened at {addr} within {limit:?}"),
        ))
    }
}

/// Runs a benchmark binary's `body` on a Tokio runtime with `threads` workers and turns
/// its result into the exit code: 0 done, 1 the benchmark failed (its error printed with
/// its causes), 2 the runtime could not start. `name` prefixes the messages.
pub fn bench_main<E: std::fmt::Display>(
    name: &str,
    threads: usize,
    body: impl std::future::Future<Output = Result<(), E>>,
) -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match rt.block_on(body) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
