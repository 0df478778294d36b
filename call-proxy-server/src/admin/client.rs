//! A blocking client of the admin API, for the operator CLI's `--admin URL` mode: the
//! same queries as on the database file, answered by a running server.

use std::time::Duration;

use serde::de::DeserializeOwned;

use super::api;
use crate::storage::operator::CallQuery;

/// Largest answer read from the server.
const MAX_ANSWER: u64 = 64 * 1024 * 1024;

/// What a request to the admin API can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// The server answered with an error status (bad filter, bad token, unknown user…).
    #[error("the server answered {status}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The server's `error` text (or its body).
        message: String,
    },
    /// No answer (connection refused, timeout, bad URL).
    #[error("cannot reach the admin API at {url}: {source}")]
    Unreachable {
        /// What was asked.
        url: String,
        /// Why.
        source: ureq::Error,
    },
    /// An answer that is not what the API returns.
    #[error("unexpected answer from {url}: {message}")]
    BadAnswer {
        /// What was asked.
        url: String,
        /// What was wrong with it.
        message: String,
    },
}

impl AdminClientError {
    /// The server refused the request's parameters (400): the operator's usage is wrong.
    pub fn is_bad_request(&self) -> bool {
        matches!(self, AdminClientError::Refused { status: 400, .. })
    }
}

/// A client for one server's admin API.
pub struct AdminClient {
    /// Base URL, without a trailing `/` (`http://127.0.0.1:7680`).
    base: String,
    /// The bearer token.
    token: String,
    /// Connection reuse and timeouts; HTTP error statuses are answers, not errors.
    agent: ureq::Agent,
}

impl AdminClient {
    /// A client for the admin API at `base_url`, authenticating with `token`.
    pub fn new(base_url: &str, token: String) -> AdminClient {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build();
        AdminClient {
            base: base_url.trim_end_matches('/').to_string(),
            token,
            agent: config.into(),
        }
    }

    /// `GET /api/calls` with the query's filters.
    pub fn calls(&self, q: &CallQuery) -> Result<api::CallsPage, AdminClientError> {
        let mut params: Vec<(&str, String)> = vec![("limit", q.limit.to_string())];
        let ids = [
            ("caller", q.caller),
            ("callee", q.callee),
            ("user", q.party),
        ];
        params.extend(
            ids.iter()
                .filter_map(|(k, v)| Some((*k, (*v)?.to_string()))),
        );
        let times = [("since", q.since_ms), ("until", q.until_ms)];
        params.extend(
            times
                .iter()
                .filter_map(|(k, v)| Some((*k, crate::clock::to_db_text((*v)?)))),
        );
        if let Some(o) = q.outcome {
            params.push(("outcome", o.as_str().to_string()));
        }
        if let Some(b) = q.before {
            params.push(("before", b.to_string()));
        }
        self.get("/api/calls", &params)
    }

    /// `GET /api/messages`.
    pub fn messages(
        &self,
        q: &crate::storage::operator::MessageLogQuery,
    ) -> Result<api::MessagesPage, AdminClientError> {
        let mut params = vec![("limit", q.limit.to_string())];
        let ids = [
            ("sender", q.sender),
            ("recipient", q.recipient),
            ("user", q.party),
            ("before", q.before),
        ];
        params.extend(
            ids.iter()
                .filter_map(|(k, v)| Some((*k, (*v)?.to_string()))),
        );
        if let Some(k) = q.kind {
            params.push(("kind", shared_proto::MessageKind(k).name().to_string()));
        }
        if let Some(d) = q.delivered {
            params.push(("state", if d { "delivered" } else { "waiting" }.to_string()));
        }
        self.get("/api/messages", &params)
    }

    /// `GET /api/users`.
    pub fn users(&self, online: bool, limit: usize) -> Result<api::Users, AdminClientError> {
        self.get(
            "/api/users",
            &[("online", online.to_string()), ("limit", limit.to_string())],
        )
    }

    /// `GET /api/stats`.
    pub fn stats(&self) -> Result<api::Stats, AdminClientError> {
        self.get("/api/stats", &[])
    }

    fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        params: &[(&str, String)],
    ) -> Result<T, AdminClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .agent
            .get(&url)
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Accept", "application/json");
        for (k, v) in params {
            req = req.query(k, v);
        }
        let unreachable = |source| AdminClientError::Unreachable {
            url: url.clone(),
            source,
        };
        let mut resp = req.call().map_err(unreachable)?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_string()
            .map_err(unreachable)?;
        if status != 200 {
            let message = serde_json::from_str::<api::ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or(body);
            return Err(AdminClientError::Refused { status, message });
        }
        serde_json::from_str(&body).map_err(|e| AdminClientError::BadAnswer {
            url: url.clone(),
            message: e.to_string(),
        })
    }
}
