//! Pushes to a session: the bounded queue between the registry and a TV's connection
//! task, and the one non-blocking send every push goes through.
//!
//! The registry holds its lock while it pushes, so a push must never wait: a full queue
//! (the TV is not reading) or a closed one (its connection task is leaving) drops the
//! message, and the session's own connection task cleans up (its write timeout or its
//! exit ends the session).

use shared_proto::ServerMsg;

/// The sending side of a session's push queue. Messages are boxed so each queue slot
/// is one pointer. The queue is flume's: an idle session's costs about 250 bytes (the
/// channel, its waiting receiver's hook), where tokio's mpsc, with its cache-padded
/// state and 32-slot first block, cost 790 for every idle TV.
pub type PushTx = flume::Sender<Box<ServerMsg>>;
/// The receiving side, owned by the session's connection task.
pub type PushRx = flume::Receiver<Box<ServerMsg>>;
/// Queued pushes per session before it counts as stuck.
pub const PUSH_QUEUE: usize = 16;

/// A new session's push queue.
pub fn channel() -> (PushTx, PushRx) {
    flume::bounded(PUSH_QUEUE)
}

/// What became of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// In the session's queue.
    Queued,
    /// Dropped: the queue was full or closed.
    Dropped,
}

/// Sends `msg` to session `session_id`'s queue without waiting.
pub fn send(tx: &PushTx, session_id: u64, msg: ServerMsg) -> Pushed {
    match tx.try_send(Box::new(msg)) {
        Ok(()) => Pushed::Queued,
        Err(_) => {
            tracing::debug!(session_id, "push queue full or closed; dropping");
            Pushed::Dropped
        }
    }
}

/// Sends `msg` without waiting; a full queue hands it back (for a sender that keeps what
/// it could not send, as presence does), a closed one drops it.
pub fn send_or_keep(tx: &PushTx, msg: ServerMsg) -> Result<(), Option<ServerMsg>> {
    match tx.try_send(Box::new(msg)) {
        Ok(()) => Ok(()),
        Err(flume::TrySendError::Full(msg)) => Err(Some(*msg)),
        Err(flume::TrySendError::Disconnected(_)) => Err(None),
    }
}

#[cfg(test)]
mod tests {
    use shared_proto::Event;

    use super::*;

    fn waiting(count: u32) -> ServerMsg {
        ServerMsg::Event(Event::CachedCallsWaiting { count })
    }

    #[test]
    fn a_full_queue_drops_without_waiting_and_keeps_order() {
        let (tx, rx) = channel();
        for i in 0..PUSH_QUEUE as u32 {
            assert_eq!(send(&tx, 1, waiting(i)), Pushed::Queued);
        }
        assert_eq!(send(&tx, 1, waiting(99)), Pushed::Dropped);
        for i in 0..PUSH_QUEUE as u32 {
            assert_eq!(rx.try_recv().map(|b| *b).ok(), Some(waiting(i)));
        }
        assert!(rx.try_recv().is_err(), "the dropped push never arrives");
        assert_eq!(send(&tx, 1, waiting(5)), Pushed::Queued, "room again");
    }

    #[test]
    fn a_closed_queue_drops() {
        let (tx, rx) = channel();
        drop(rx);
        assert_eq!(send(&tx, 1, waiting(0)), Pushed::Dropped);
    }
}
