//! `AckCached` (flow 6): the TV has shown these cached calls; stop delivering them.
//! Until this arrives, the calls are delivered again on every fetch.

use std::sync::Arc;

use shared_proto::{CallId, Reply, WireError};

use super::{storage_error, SessionKey};
use crate::clock::now_ms;
use crate::server::Shared;
use crate::storage::Store;

pub async fn handle<S: Store>(
    shared: &Arc<Shared<S>>,
    me: SessionKey,
    call_ids: Vec<CallId>,
) -> Result<Reply, WireError> {
    let count = shared
        .store
        .ack_cached(me.user, call_ids, now_ms())
        .await
        .map_err(storage_error)?;
    Ok(Reply::Acked { count })
}
