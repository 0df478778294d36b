//! `QueryState` (flow 3): users' network state, answered from `user_property`.

use std::sync::Arc;

use shared_proto::{NetState, Reply, UserId, UserState, WireError};

use super::storage_error;
use crate::server::Shared;
use crate::storage::Store;

pub async fn handle<S: Store>(
    shared: &Arc<Shared<S>>,
    users: Vec<UserId>,
) -> Result<Reply, WireError> {
    let rows = shared
        .store
        .users(users.clone())
        .await
        .map_err(storage_error)?;
    let states = users
        .into_iter()
        .map(|user_id| match rows.iter().find(|r| r.user_id == user_id) {
            Some(row) => UserState {
                user_id,
                state: if row.online {
                    NetState::Online
                } else {
                    NetState::Offline
                },
                last_seen_ms: row.last_seen_ms,
            },
            None => UserState {
                user_id,
                state: NetState::Unknown,
                last_seen_ms: None,
            },
        })
        .collect();
    Ok(Reply::States(states))
}
