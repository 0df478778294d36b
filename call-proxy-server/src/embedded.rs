//! A server running inside the calling process: bound, serving on a task, stopped on
//! request with the same two-phase shutdown as the daemon. Tests of every crate and
//! programs that embed the server use this instead of wiring `bind`, `Shared` and
//! `run` by hand.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::server::{bind, run, Shared};
use crate::storage::Store;

/// A server serving on a task of the current runtime.
pub struct RunningServer<S> {
    /// The address it listens on (the port the OS chose when `config.listen` had 0).
    pub addr: SocketAddr,
    /// Its state (registry, metrics, store), for tests and admin listeners.
    pub shared: Arc<Shared<S>>,
    /// Starts the shutdown when sent (or dropped).
    stop: Option<oneshot::Sender<()>>,
    /// The serving task; done when the shutdown is complete.
    task: Option<JoinHandle<()>>,
}

impl<S: Store> RunningServer<S> {
    /// Binds `config.listen` and serves `store` until [`RunningServer::stop`].
    pub fn start(config: Config, store: S) -> std::io::Result<RunningServer<S>> {
        let listener = bind(config.listen)?;
        let addr = listener.local_addr()?;
        let shared = Shared::new(store, config)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e:#}")))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(listener, Arc::clone(&shared), async move {
            let _ = stopped.await;
        }));
        Ok(RunningServer {
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Shuts down (calls ended and recorded, TVs told, the store flushed) and waits for
    /// it. Fails only if the serving task panicked.
    pub async fn stop(mut self) -> Result<(), tokio::task::JoinError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.task.take() {
            Some(t) => t.await,
            None => Ok(()),
        }
    }
}
