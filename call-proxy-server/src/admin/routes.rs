//! The operator API's handlers: the call log with filters and cursor pages (JSON or
//! CSV), the users table, one user with its recent calls, and statistics. A bad
//! parameter is refused with 400 and a JSON body naming the parameter and its value.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{api, AdminState};
use crate::clock;
use crate::storage::operator::{
    CallQuery, MessageLogQuery, OperatorStore, OutcomeFilter, MAX_PAGE,
};
use crate::storage::{Store, StoreError};

/// Calls listed with one user (`GET /api/users/{id}`).
pub const RECENT_CALLS: usize = 20;

/// Page size of `GET /api/calls` without `limit`.
const DEFAULT_CALLS_LIMIT: usize = 50;

/// Page size of `GET /api/users` without `limit`.
const DEFAULT_USERS_LIMIT: usize = 1000;

/// The response header that carries the next page's cursor (also in the JSON body).
pub const NEXT_BEFORE_HEADER: &str = "x-next-before";

/// Why a request was not answered.
pub(super) enum ApiError {
    /// A query parameter's value is not acceptable.
    BadParam {
        /// Its name.
        parameter: &'static str,
        /// Its value as sent.
        value: String,
        /// What is expected.
        message: String,
    },
    /// The query string does not parse (unknown or repeated parameter).
    BadQuery(String),
    /// No such user.
    NotFound(String),
    /// The database failed the query.
    Store(StoreError),
    /// The answer could not be encoded.
    Encode(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Store(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::BadParam {
                parameter,
                value,
                message,
            } => (
                StatusCode::BAD_REQUEST,
                api::ErrorBody {
                    error: format!("bad {parameter} {value:?}: {message}"),
                    parameter: Some(parameter.to_string()),
                    value: Some(value),
                },
            ),
            ApiError::BadQuery(message) => (StatusCode::BAD_REQUEST, plain(message)),
            ApiError::NotFound(message) => (StatusCode::NOT_FOUND, plain(message)),
            ApiError::Store(e @ StoreError::Closed) => {
                (StatusCode::SERVICE_UNAVAILABLE, plain(e.to_string()))
            }
            ApiError::Store(e) => (StatusCode::INTERNAL_SERVER_ERROR, plain(e.to_string())),
            ApiError::Encode(message) => (StatusCode::INTERNAL_SERVER_ERROR, plain(message)),
        };
        (status, Json(body)).into_response()
    }
}

fn plain(error: String) -> api::ErrorBody {
    api::ErrorBody {
        error,
        parameter: None,
        value: None,
    }
}

/// Parses an optional parameter; a value that does not parse is a [`ApiError::BadParam`].
fn param<T>(
    parameter: &'static str,
    raw: Option<String>,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, ApiError> {
    raw.map(|value| {
        parse(&value).map_err(|message| ApiError::BadParam {
            parameter,
            value,
            message,
        })
    })
    .transpose()
}

fn user_id(s: &str) -> Result<u64, String> {
    s.parse().map_err(|_| "not a user number".to_string())
}

fn page_size(raw: Option<String>, default: usize) -> Result<usize, ApiError> {
    let limit = param("limit", raw, |s| match s.parse::<usize>() {
        Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        _ => Err(format!("must be a whole number from 1 to {MAX_PAGE}")),
    })?;
    Ok(limit.unwrap_or(default))
}

/// `GET /api/calls` parameters, as sent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CallsParams {
    /// Calls placed by this user.
    caller: Option<String>,
    /// Calls to this user.
    callee: Option<String>,
    /// Calls with this user on either side.
    user: Option<String>,
    /// Placed at or after (RFC 3339).
    since: Option<String>,
    /// Placed before (RFC 3339).
    until: Option<String>,
    /// What happened to them ([`OutcomeFilter`]).
    outcome: Option<String>,
    /// Page size.
    limit: Option<String>,
    /// Cursor: only calls with a smaller id.
    before: Option<String>,
    /// `json` or `csv` (else the `Accept` header decides).
    format: Option<String>,
}

/// Whether the answer is CSV: `format=csv`, or no `format` and `Accept: text/csv`.
fn wants_csv(format: Option<String>, headers: &HeaderMap) -> Result<bool, ApiError> {
    let csv = param("format", format, |f| match f {
        "json" => Ok(false),
        "csv" => Ok(true),
        _ => Err("use json or csv".into()),
    })?;
    Ok(csv.unwrap_or_else(|| {
        headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/csv"))
    }))
}

/// `GET /api/calls`: a page of the call log, newest first.
pub(super) async fn calls<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
    headers: HeaderMap,
    params: Result<Query<CallsParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::BadQuery(e.body_text()))?;
    let csv = wants_csv(p.format, &headers)?;
    let query = CallQuery {
        caller: param("caller", p.caller, user_id)?,
        callee: param("callee", p.callee, user_id)?,
        party: param("user", p.user, user_id)?,
        since_ms: param("since", p.since, clock::parse_rfc3339_ms)?,
        until_ms: param("until", p.until, clock::parse_rfc3339_ms)?,
        outcome: param("outcome", p.outcome, str::parse::<OutcomeFilter>)?,
        before: param("before", p.before, |s| {
            s.parse()
                .map_err(|_| "not a call id (use next_before of the previous page)".to_string())
        })?,
        limit: page_size(p.limit, DEFAULT_CALLS_LIMIT)?,
    };
    let limit = query.limit;
    let rows = state.ops.calls(query).await?;
    let calls: Vec<api::Call> = rows.into_iter().map(api::Call::from).collect();
    let next_before = if calls.len() == limit {
        calls.last().map(|c| c.id)
    } else {
        None
    };
    let mut resp = if csv {
        csv_response(&calls)?
    } else {
        Json(api::CallsPage { calls, next_before }).into_response()
    };
    if let Some(next) = next_before {
        resp.headers_mut()
            .insert(NEXT_BEFORE_HEADER, HeaderValue::from(next));
    }
    Ok(resp)
}

/// `GET /api/users` parameters, as sent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UsersParams {
    /// `true`: only TVs online now.
    online: Option<String>,
    /// Most rows.
    limit: Option<String>,
}

/// `GET /api/users`: users by id.
pub(super) async fn users<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
    params: Result<Query<UsersParams>, QueryRejection>,
) -> Result<Json<api::Users>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::BadQuery(e.body_text()))?;
    let online = param("online", p.online, |s| match s {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err("use true or false".into()),
    })?
    .unwrap_or(false);
    let limit = page_size(p.limit, DEFAULT_USERS_LIMIT)?;
    let rows = state.ops.users(online, limit).await?;
    Ok(Json(api::Users {
        users: rows.into_iter().map(api::User::from).collect(),
    }))
}

/// `GET /api/users/{id}`: one user's state and its recent calls; 404 if unknown.
pub(super) async fn user<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
    Path(id): Path<String>,
) -> Result<Json<api::UserDetail>, ApiError> {
    let id = user_id(&id).map_err(|message| ApiError::BadParam {
        parameter: "id",
        value: id,
        message,
    })?;
    let user = state
        .ops
        .user(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no user {id}")))?;
    let calls = state
        .ops
        .calls(CallQuery {
            party: Some(id),
            limit: RECENT_CALLS,
            ..CallQuery::default()
        })
        .await?;
    let mailbox = state.ops.mailbox_totals(Some(id)).await?;
    Ok(Json(api::UserDetail {
        user: user.into(),
        recent_calls: calls.into_iter().map(api::Call::from).collect(),
        mailbox: mailbox.into(),
    }))
}

/// `GET /api/messages` parameters, as sent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MessagesParams {
    /// Left by this user.
    sender: Option<String>,
    /// Left for this user.
    recipient: Option<String>,
    /// With this user on either side.
    user: Option<String>,
    /// `text`, `voice`, `picture` or `video`.
    kind: Option<String>,
    /// `waiting` or `delivered`.
    state: Option<String>,
    /// Page size.
    limit: Option<String>,
    /// Cursor: only messages with a smaller id.
    before: Option<String>,
    /// `json` or `csv` (else the `Accept` header decides).
    format: Option<String>,
}

/// `GET /api/messages`: a page of the message log, newest first — who left what kind
/// of message for whom, its size and whether it was taken; never its contents.
pub(super) async fn messages<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
    headers: HeaderMap,
    params: Result<Query<MessagesParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::BadQuery(e.body_text()))?;
    let csv = wants_csv(p.format, &headers)?;
    let query = MessageLogQuery {
        sender: param("sender", p.sender, user_id)?,
        recipient: param("recipient", p.recipient, user_id)?,
        party: param("user", p.user, user_id)?,
        kind: param("kind", p.kind, api::message_kind)?,
        delivered: param("state", p.state, api::message_state)?,
        before: param("before", p.before, |s| {
            s.parse()
                .map_err(|_| "not a message id (use next_before of the previous page)".to_string())
        })?,
        limit: page_size(p.limit, DEFAULT_CALLS_LIMIT)?,
    };
    let limit = query.limit;
    let rows = state.ops.messages(query).await?;
    let messages: Vec<api::Message> = rows.into_iter().map(api::Message::from).collect();
    let next_before = if messages.len() == limit {
        messages.last().map(|m| m.id)
    } else {
        None
    };
    let mut resp = if csv {
        csv_response(&messages)?
    } else {
        Json(api::MessagesPage {
            messages,
            next_before,
        })
        .into_response()
    };
    if let Some(next) = next_before {
        resp.headers_mut()
            .insert(NEXT_BEFORE_HEADER, HeaderValue::from(next));
    }
    Ok(resp)
}

/// Rows as a CSV answer with a header line.
fn csv_response<T: serde::Serialize>(rows: &[T]) -> Result<Response, ApiError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r)
            .map_err(|e| ApiError::Encode(e.to_string()))?;
    }
    let body = w
        .into_inner()
        .map_err(|e| ApiError::Encode(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response())
}

/// `GET /api/stats`: service statistics.
pub(super) async fn stats<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
) -> Result<Json<api::Stats>, ApiError> {
    let stats = state.ops.stats(clock::now_ms()).await?;
    Ok(Json(stats.into()))
}

/// The body of `POST /api/enrollments/{code}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApproveBody {
    /// The user number the TV gets.
    user: u64,
    /// Revoke a TV the user has already (a replaced TV).
    #[serde(default)]
    replace: bool,
}

/// `POST /api/enrollments/{code}` with `{"user": ID}`: approves the code a TV shows.
/// 404: no such code; 409: expired, decided already, or the user has a TV (without
/// `"replace": true`).
pub(super) async fn approve<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
    Path(code): Path<String>,
    body: Result<Json<ApproveBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    use crate::storage::enroll::{display_code, normalise_code, Approval};
    let Json(body) = body.map_err(|e| ApiError::BadQuery(format!("bad body: {e}")))?;
    let stored = normalise_code(&code).ok_or_else(|| ApiError::BadParam {
        parameter: "code",
        value: code.clone(),
        message: "an enrollment code is 8 letters like BCDF-GHJK".into(),
    })?;
    if !shared_proto::valid_user_id(body.user) {
        return Err(ApiError::BadParam {
            parameter: "user",
            value: body.user.to_string(),
            message: "out of range".into(),
        });
    }
    let shown = display_code(&stored);
    let conflict = |m: String| (StatusCode::CONFLICT, Json(plain(m))).into_response();
    Ok(
        match state
            .ops
            .approve(stored, body.user, body.replace, clock::now_ms())
            .await?
        {
            Approval::Approved { user, replaced } => Json(serde_json::json!({
                "approved": shown, "user": user, "replaced": replaced
            }))
            .into_response(),
            Approval::UnknownCode => {
                return Err(ApiError::NotFound(format!(
                    "no enrollment has the code {shown}"
                )))
            }
            Approval::Expired => conflict(format!("the code {shown} has expired")),
            Approval::AlreadyDecided => conflict(format!("the code {shown} was decided already")),
            Approval::UserHasTv => conflict(format!(
                "user {} has an enrolled TV already; send \"replace\": true to replace it",
                body.user
            )),
        },
    )
}

/// `DELETE /api/enrollments/{code}`: refuses the code a TV shows. 404: no such code;
/// 409: expired or decided already.
pub(super) async fn refuse<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
    Path(code): Path<String>,
) -> Result<Response, ApiError> {
    use crate::storage::enroll::{display_code, normalise_code, Refusal};
    let stored = normalise_code(&code).ok_or_else(|| ApiError::BadParam {
        parameter: "code",
        value: code.clone(),
        message: "an enrollment code is 8 letters like BCDF-GHJK".into(),
    })?;
    let shown = display_code(&stored);
    let conflict = |m: String| (StatusCode::CONFLICT, Json(plain(m))).into_response();
    Ok(match state.ops.refuse(stored, clock::now_ms()).await? {
        Refusal::Refused => Json(serde_json::json!({ "refused": shown })).into_response(),
        Refusal::UnknownCode => {
            return Err(ApiError::NotFound(format!(
                "no enrollment has the code {shown}"
            )))
        }
        Refusal::Expired => conflict(format!("the code {shown} has expired")),
        Refusal::AlreadyDecided => conflict(format!("the code {shown} was decided already")),
    })
}

/// `POST /api/users/{id}/revoke`: withdraws the user's TV credential (404 if none).
pub(super) async fn revoke<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let user = param("id", Some(id), user_id)?.unwrap_or_default();
    if state.ops.revoke(user, clock::now_ms()).await? {
        Ok(Json(serde_json::json!({ "revoked": user })).into_response())
    } else {
        Err(ApiError::NotFound(format!(
            "user {user} has no enrolled TV"
        )))
    }
}

/// `GET /api/enrollments`: the newest enrollment requests.
pub(super) async fn enrollments<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
) -> Result<Response, ApiError> {
    let rows = state.ops.enrollments(clock::now_ms(), 100).await?;
    Ok(Json(serde_json::json!({ "enrollments": rows })).into_response())
}

/// `GET /api/usage` parameters, as sent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UsageParams {
    /// One account only.
    user: Option<String>,
    /// One period only (`2026-12`, `2026-W49`, `2026-12-02`).
    period: Option<String>,
    /// Most rows.
    limit: Option<String>,
}

/// `GET /api/usage`: traffic accounting, each account's usage per period (newest period
/// first) with its allowance and what is left.
pub(super) async fn usage<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
    params: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::BadQuery(e.body_text()))?;
    let user = param("user", p.user, user_id)?;
    let period = param("period", p.period, |s| {
        if !s.is_empty()
            && s.len() <= 16
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            Ok(s.to_string())
        } else {
            Err("a period is like 2026-12, 2026-W49 or 2026-12-02".into())
        }
    })?;
    let limit = page_size(p.limit, DEFAULT_USERS_LIMIT)?;
    let rows = state
        .ops
        .usage(crate::storage::operator::UsageQuery {
            user,
            period,
            limit,
        })
        .await?;
    Ok(Json(serde_json::json!({ "usage": rows })).into_response())
}

/// `PUT /api/allowances/{id}` body: the allowance per period in bytes, `null` for none.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AllowanceBody {
    /// Bytes per period; `null`: not limited.
    bytes: Option<u64>,
}

/// `PUT /api/allowances/{id}`: sets (or, with `{"bytes": null}`, lifts) an account's
/// traffic allowance per period; the dispatcher applies it at the TV's next assignment.
pub(super) async fn set_allowance<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
    Path(id): Path<String>,
    body: Result<Json<AllowanceBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let user = param("id", Some(id), user_id)?.unwrap_or_default();
    if !shared_proto::valid_user_id(user) {
        return Err(ApiError::BadParam {
            parameter: "id",
            value: user.to_string(),
            message: "out of range".into(),
        });
    }
    let Json(body) = body.map_err(|e| ApiError::BadQuery(format!("bad body: {e}")))?;
    state
        .ops
        .set_allowance(user, body.bytes, clock::now_ms())
        .await?;
    Ok(Json(serde_json::json!({ "user": user, "allowance": body.bytes })).into_response())
}

/// `GET /api/alarms` parameters, as sent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AlarmsParams {
    /// `true`: cleared alarms too.
    all: Option<String>,
    /// Most rows.
    limit: Option<String>,
}

/// `GET /api/alarms`: the operator's alarms, newest first; open ones only unless
/// `all=true`.
pub(super) async fn alarms<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
    params: Result<Query<AlarmsParams>, QueryRejection>,
) -> Result<Json<api::Alarms>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::BadQuery(e.body_text()))?;
    let all = param("all", p.all, |s| match s {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err("use true or false".into()),
    })?
    .unwrap_or(false);
    let limit = page_size(p.limit, DEFAULT_USERS_LIMIT)?;
    let rows = state.ops.alarms(all, limit).await?;
    Ok(Json(api::Alarms {
        alarms: rows.into_iter().map(api::Alarm::from).collect(),
    }))
}

/// `POST /api/alarms/{id}/clear`: clears an open alarm (404: no such open alarm).
pub(super) async fn clear_alarm<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = param("id", Some(id), |s| {
        s.parse::<u64>()
            .map_err(|_| "not an alarm number".to_string())
    })?
    .unwrap_or_default();
    if state.ops.clear_alarm(id, clock::now_ms()).await? {
        Ok(Json(serde_json::json!({ "cleared": id })).into_response())
    } else {
        Err(ApiError::NotFound(format!(
            "no open alarm {id} (unknown, or cleared already)"
        )))
    }
}

/// `PUT /api/users/{id}/phone` with `{"phone": "+4930123456"}` (E.164) or
/// `{"phone": null}`: sets or clears the user's phone number on file (404: no such user).
pub(super) async fn set_phone<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
    Path(id): Path<String>,
    body: Result<Json<api::PhoneBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let user = param("id", Some(id), user_id)?.unwrap_or_default();
    let Json(body) = body.map_err(|e| ApiError::BadQuery(format!("bad body: {e}")))?;
    if let Some(p) = &body.phone {
        api::check_phone(p).map_err(|message| ApiError::BadParam {
            parameter: "phone",
            value: p.clone(),
            message,
        })?;
    }
    if state
        .ops
        .set_phone(user, body.phone.clone(), clock::now_ms())
        .await?
    {
        Ok(Json(serde_json::json!({ "user": user, "phone": body.phone })).into_response())
    } else {
        Err(ApiError::NotFound(format!("no user {user}")))
    }
}
