//! The ops dashboard: a plain HTML/JS/CSS page embedded in the binary plus the JSON API it
//! polls. The API is usable on its own (curl):
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/api/workers?pool=<gpu\|wse>` | workers (of one pool) with state, capacity, hardware, drain request, live load |
//! | GET | `/api/stats` | totals by pool, drains, leader, this replica's role |
//! | GET | `/api/policy` | the stored routing policy document (or the default), and why it is invalid when it is |
//! | GET | `/api/events` | the last cluster events (joined/left/draining/ready/policy) |
//! | GET | `/api/history?since=<unix s>` | one point per second for the last hour (see [`crate::history`]) |
//! | GET | `/api/decisions?since=<seq>&epoch=<ms>&request_id=<id>&limit=<n>` | the live decision feed of the leader's term (see [`crate::decisions`]) |
//! | GET | `/api/ledger?window_s=<s>` | the counterfactual ledger per lane, pool and tenant over the last `window_s` seconds (default 300, at most 3600; see [`crate::history::History::ledger`]) |
//! | POST | `/api/workers/{id}/drain` | request a drain (leader only) |
//! | POST | `/api/workers/{id}/undrain` | lift it (leader only) |
//! | GET, POST, DELETE | `/api/session` | who is signed in; sign in with `{"token"}`; sign out |
//!
//! With admin tokens configured, writes need an operator's `authorization: Bearer <token>` or
//! the session cookie the sign-in sets (401 without, 403 for a viewer): HttpOnly,
//! SameSite=Strict, Secure over TLS, and a signed, expiring session credential
//! ([`crate::session`]), never the token itself.
//!
//! Every write needs `content-type: application/json` and `x-switchyard-csrf`, and must not come
//! from another site or host ([`guard`]: 403 otherwise).
//!
//! Routers report to the leader, so a follower answers `/api/history`, `/api/decisions` and
//! `/api/ledger` with the leader's (`kept_by.via` = `"follower"`), and with its own (empty
//! until it leads) only when the leader cannot be reached.
//!
//! Errors are `{"error": "..."}` with 400 (bad id), 404 (unknown worker), 409 (this replica is
//! not the leader; `leader` names it) or 503 (etcd unreachable).
//!
//! `/api/workers` and `/api/stats` are no such error while etcd is unreachable: past
//! [`crate::plane::REGISTRY_READ_TIMEOUT`] they answer from the membership as last seen, with
//! `"registry": {"reachable": false, "error", "as_of_unix_ms", "since_unix_ms"}` (`reachable:
//! true` normally), and the page says so in its banner (see [`crate::plane`]; the `Admin` gRPC
//! API answers `UNAVAILABLE` instead).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRef, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::admin::audit;
use crate::auth::{self, Access, Caller, Denied};
use crate::forward::LeaderDialer;
use crate::leader::Role;
use crate::plane::{ControlPlane, OpError, clipped};
use crate::session::{self as sessions, Revocations, Sessions};
use crate::spans::{self, admin_span};
use crate::{SecurityConfig, guard};

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const STYLE_CSS: &str = include_str!("../assets/style.css");
const INSIGHTS_JS: &str = include_str!("../assets/insights.js");

/// What the handlers share: the operations and who may write.
#[derive(Clone)]
struct AppState {
    plane: ControlPlane,
    access: Access,
    sessions: Sessions,
    /// Served over TLS: the session cookie is `Secure`.
    https: bool,
    /// How a follower reaches the leader's dashboard.
    leader: LeaderDialer,
}

impl FromRef<AppState> for ControlPlane {
    fn from_ref(state: &AppState) -> Self {
        state.plane.clone()
    }
}

/// The dashboard's routes; `revoked` keeps signed-out sessions (shared through etcd when the
/// replicas elect through it).
pub fn router(plane: ControlPlane, security: SecurityConfig, revoked: Revocations) -> Router {
    let state = AppState {
        plane,
        sessions: Sessions::new(security.access.session_key(), revoked),
        access: security.access,
        https: security.dashboard_hosts.https(),
        leader: LeaderDialer::new(&security.tls, LEADER_TIMEOUT),
    };
    Router::new()
        .route("/", get(index))
        .route("/assets/app.js", get(app_js))
        .route("/assets/style.css", get(style_css))
        .route("/assets/insights.js", get(insights_js))
        .route("/api/workers", get(workers))
        .route("/api/stats", get(stats))
        .route("/api/policy", get(policy))
        .route("/api/events", get(events))
        .route("/api/history", get(history))
        .route("/api/routers", get(routers))
        .route("/api/decisions", get(decisions))
        .route("/api/ledger", get(ledger))
        .route("/api/workers/{id}/drain", post(drain))
        .route("/api/workers/{id}/undrain", post(undrain))
        .route("/api/session", get(session).post(sign_in).delete(sign_out))
        .fallback(not_found)
        // A known path with another method: 405 (axum keeps the `allow` header) with the
        // JSON error every other answer has, not an empty body.
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        // Outermost: no handler (not even a 404) runs for a foreign host or a cross-site write.
        .layer(axum::middleware::from_fn_with_state(
            security.dashboard_hosts,
            guard::guard,
        ))
        // The API's answers are live state (refusals included): no cache or proxy may keep one.
        .layer(axum::middleware::from_fn(no_store_api))
        // No page of another site may frame the dashboard: inside a frame, clicks the user
        // meant for that page would drain workers with the dashboard's own origin, which the
        // guard lets through. Both headers, for browsers that know only the older one.
        .layer(SetResponseHeaderLayer::overriding(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("frame-ancestors 'none'"),
        ))
}

/// An operation's refusal as an HTTP answer.
struct ApiError(OpError, Option<Value>);

impl From<OpError> for ApiError {
    fn from(error: OpError) -> Self {
        Self(error, None)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self.0 {
            OpError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            OpError::NotFound(_) => StatusCode::NOT_FOUND,
            OpError::NotLeader(_) => StatusCode::CONFLICT,
            OpError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let message = self.0.to_string();
        spans::record_error(&message);
        let mut body = json!({ "error": message });
        if let Some(leader) = self.1 {
            body["leader"] = leader;
        }
        (status, Json(body)).into_response()
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Assets change with the binary; a stale cached copy would confuse on-call.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn insights_js() -> Response {
    asset("text/javascript; charset=utf-8", INSIGHTS_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

async fn method_not_allowed(method: axum::http::Method, uri: Uri) -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(json!({ "error": format!("{method} is not allowed on {}; see the allow header", uri.path()) })),
    )
        .into_response()
}

async fn no_store_api(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let api = request.uri().path().starts_with("/api/");
    let mut response = next.run(request).await;
    if api {
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "no such page or API route" })),
    )
        .into_response()
}

/// While etcd does not answer, from the membership as last seen (`registry` says so: see
/// [`crate::plane`]). `?pool=gpu|wse` keeps one pool's, checked as `ListWorkers` checks it.
async fn workers(
    State(plane): State<ControlPlane>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let pool = query.get("pool").map_or("", String::as_str);
    let (workers, registry) = plane.workers_or_last_seen(pool).await?;
    Ok(Json(json!({ "workers": workers, "registry": registry })))
}

/// While etcd does not answer, from the membership as last seen, as `/api/workers`.
async fn stats(State(plane): State<ControlPlane>) -> Result<Json<Value>, ApiError> {
    let (all, registry) = plane.stats_or_last_seen().await?;
    let stats = all.wire;
    let pools: Vec<Value> = stats
        .pools
        .iter()
        .zip(&all.unreachable)
        .map(|(p, unreachable)| {
            json!({
                "pool": p.pool, "workers": p.workers, "ready": p.ready, "draining": p.draining,
                "unreachable": unreachable,
                "ready_slots": p.ready_slots, "total_slots": p.total_slots,
                "active": p.active, "queued": p.queued, "tokens_per_s": p.tokens_per_s,
            })
        })
        .collect();
    let leadership = plane.leadership();
    let role = match leadership.role() {
        Role::Leader => "leader",
        Role::Follower { .. } => "follower",
    };
    Ok(Json(json!({
        "workers": stats.workers,
        "active": stats.active,
        "queued": stats.queued,
        "tokens_per_s": stats.tokens_per_s,
        "pools": pools,
        "drains": stats.drains,
        "replica": leadership.me(),
        "role": role,
        "leader": leadership.leader(),
        // Where to open the leader's dashboard from here (its scheme and a dialable host).
        "leader_dashboard": leadership.leader().and_then(|l| plane.dashboard_url(&l)),
        "registry": registry,
    })))
}

async fn policy(State(plane): State<ControlPlane>) -> Result<Json<Value>, ApiError> {
    let policy = plane.policy().await?;
    // Documents stored through SetPolicy are valid JSON; one written into etcd past it may not
    // be: shown as text then, and `invalid` says why routers do not apply it.
    let document =
        serde_json::from_str::<Value>(&policy.document).unwrap_or(Value::String(policy.document));
    let invalid = (!policy.invalid.is_empty()).then_some(policy.invalid);
    Ok(Json(
        json!({ "document": document, "is_default": policy.is_default, "invalid": invalid }),
    ))
}

async fn events(State(plane): State<ControlPlane>) -> Json<Value> {
    let events: Vec<Value> = plane
        .events()
        .recent()
        .into_iter()
        .map(|e| {
            json!({
                "kind": e.kind().as_str_name().trim_start_matches("KIND_").to_ascii_lowercase(),
                "worker_id": e.worker_id, "pool": e.pool,
                "at_unix_ms": e.at_unix_ms, "message": e.message,
                "actor": e.actor, "role": e.role, "action": e.action, "via": e.via,
            })
        })
        .collect();
    Json(json!({ "events": events }))
}

/// Who keeps the history and the feed: routers report to the leader, from the second it
/// became leader (`since`; earlier points of a replica that led only later have no router
/// data).
fn keeper(plane: &ControlPlane) -> Value {
    let leadership = plane.leadership();
    json!({
        "role": match leadership.role() {
            Role::Leader => "leader",
            Role::Follower { .. } => "follower",
        },
        "leader": leadership.leader(),
        "leader_dashboard": leadership.leader().and_then(|l| plane.dashboard_url(&l)),
        "since": leadership.leading_since(),
    })
}

fn bad_request(message: String) -> Response {
    spans::record_error(&message);
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}

/// An optional numeric query parameter, or why it is not one (naming it).
fn number<T: std::str::FromStr>(
    query: &std::collections::HashMap<String, String>,
    name: &str,
    expected: &str,
) -> Result<Option<T>, String> {
    match query.get(name) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("{name}: {v:?} is not {expected}")),
    }
}

/// Marks a request a follower forwarded: it is answered where it lands, never forwarded on.
const FORWARDED: &str = "x-switchyard-forwarded";
/// How long a follower waits for the leader's answer before giving its own.
const LEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// On a follower, the leader's answer to this GET (routers report to the leader: it holds
/// the history and the feed); `None` to answer from this replica (it leads, the request was
/// forwarded already, or the leader cannot be reached).
async fn from_leader(state: &AppState, headers: &HeaderMap, uri: &Uri) -> Option<Value> {
    let leadership = state.plane.leadership();
    if leadership.is_leader() || headers.contains_key(FORWARDED) {
        return None;
    }
    let leader = leadership.leader()?;
    if leader.id == leadership.me().id {
        return None;
    }
    let address = crate::leader::ReplicaInfo::dashboard_address(&leader)?;
    // Never this replica's own dashboard (replicas in separate network namespaces that
    // advertise loopback addresses): it would answer as if it were the leader.
    if leadership.me().http.as_deref() == Some(address.as_str()) {
        return None;
    }
    let scheme = state.leader.scheme();
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let answer = async {
        let response = state
            .leader
            .client()?
            .get(format!("{scheme}://{address}{path}"))
            .header(FORWARDED, "1")
            .send()
            .await?
            .error_for_status()?;
        let body = response.bytes().await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(serde_json::from_slice::<Value>(&body)?)
    };
    match answer.await {
        Ok(mut body) => {
            body["kept_by"] = json!({
                "role": "leader",
                "leader": leader,
                "via": "follower",
                "since": body["kept_by"]["since"].take(),
            });
            Some(body)
        }
        Err(error) => {
            tracing::debug!(%address, %error, "the leader's dashboard did not answer; serving this follower's own");
            None
        }
    }
}

async fn history(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, Response> {
    let plane = &state.plane;
    // Whole seconds since the epoch, as `/api/decisions`' `since` is a whole number: `-5` is
    // refused as `1e3` is.
    let since = number::<u64>(&query, "since", "a unix time in whole seconds")
        .map_err(bad_request)?
        .map(|s| i64::try_from(s).unwrap_or(i64::MAX));
    if let Some(body) = from_leader(&state, &headers, &uri).await {
        return Ok(Json(body));
    }
    let points = plane.insights().history.since(since);
    Ok(Json(json!({
        "resolution_s": 1,
        "capacity": crate::history::SECONDS,
        "kept_by": keeper(plane),
        "points": points,
    })))
}

/// Each router's last reported state: what it holds, whether a standby keeps a copy, and
/// what that means.
async fn routers(State(state): State<AppState>, headers: HeaderMap, uri: Uri) -> Json<Value> {
    if let Some(body) = from_leader(&state, &headers, &uri).await {
        return Json(body);
    }
    let plane = &state.plane;
    Json(json!({
        "kept_by": keeper(plane),
        "silent_after_s": crate::routers::SILENT_AFTER.as_secs(),
        "routers": plane.insights().routers.rows(),
    }))
}

/// Most entries one `/api/decisions` answer carries.
const DECISIONS_LIMIT: usize = crate::decisions::RECENT;

async fn decisions(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, Response> {
    let plane = &state.plane;
    let since = number::<u64>(&query, "since", "a feed sequence number")
        .map_err(bad_request)?
        .unwrap_or(0);
    // The feed `since` counts in (the `feed.epoch` of the answer it came from).
    let epoch = number::<i64>(&query, "epoch", "a feed epoch (unix ms)").map_err(bad_request)?;
    let limit = number::<usize>(&query, "limit", "a number of entries")
        .map_err(bad_request)?
        .unwrap_or(DECISIONS_LIMIT);
    if limit == 0 || limit > DECISIONS_LIMIT {
        return Err(bad_request(format!(
            "limit: {limit} is out of range, expected 1..={DECISIONS_LIMIT}"
        )));
    }
    let request_id = query.get("request_id").map(String::as_str);
    if request_id.is_some_and(str::is_empty) {
        return Err(bad_request("request_id: must not be empty".into()));
    }
    if let Some(body) = from_leader(&state, &headers, &uri).await {
        return Ok(Json(body));
    }
    let page = plane.insights().feed(epoch, since, request_id, limit);
    Ok(Json(json!({
        // Which feed: this replica's, of its leadership term that began at `epoch` (unix ms).
        // A client following it starts over when it changes (another leader, or this one
        // leading again): `seq` and ids count within one feed.
        "feed": { "replica": plane.leadership().me().id, "epoch": page.epoch },
        "seq": page.seq,
        "reset": page.reset,
        "decisions": page.entries,
        "kept_by": keeper(plane),
    })))
}

/// Window of `/api/ledger` without `window_s`.
const LEDGER_WINDOW_S: i64 = 300;

async fn ledger(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, Response> {
    let plane = &state.plane;
    let window_s = number::<i64>(&query, "window_s", "a number of seconds")
        .map_err(bad_request)?
        .unwrap_or(LEDGER_WINDOW_S);
    let most = crate::history::SECONDS as i64;
    if !(1..=most).contains(&window_s) {
        return Err(bad_request(format!(
            "window_s: {window_s} is out of range, expected 1..={most}"
        )));
    }
    if let Some(body) = from_leader(&state, &headers, &uri).await {
        return Ok(Json(body));
    }
    let window = plane.insights().history.ledger(window_s);
    Ok(Json(json!({
        "window_s": window_s,
        "from": window.from,
        "to": window.to,
        "rows": window.rows,
        "kept_by": keeper(plane),
    })))
}

fn leader_json(plane: &ControlPlane) -> Option<Value> {
    plane
        .leadership()
        .leader()
        .and_then(|l| serde_json::to_value(l).ok())
}

/// A refused credential as an HTTP answer: 401 (none, unknown or ended), 403 (not an
/// operator), 503 (the session could not be checked).
fn denied(denied: Denied) -> Response {
    let status = match denied {
        Denied::Forbidden { .. } => StatusCode::FORBIDDEN,
        Denied::SessionUnchecked(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNAUTHORIZED,
    };
    let message = denied.to_string();
    spans::record_error(&message);
    (status, Json(json!({ "error": message }))).into_response()
}

/// The session credential in the sign-in cookie, if any.
fn cookie_session(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == auth::COOKIE).then_some(value)
        })
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// Who sent the request: an `authorization` header first, else the session cookie.
async fn identify(state: &AppState, headers: &HeaderMap) -> Result<Caller, Denied> {
    match (bearer(headers), cookie_session(headers)) {
        (None, Some(session)) if state.access.required() => state.sessions.caller(session).await,
        (bearer, _) => state.access.identify(bearer),
    }
}

/// The operator making a write from the dashboard, or the answer refusing it (logged with the
/// caller's address `peer`, and counted).
async fn operator(
    state: &AppState,
    headers: &HeaderMap,
    peer: SocketAddr,
    action: &str,
) -> Result<Caller, Response> {
    let caller = identify(state, headers).await;
    let caller = caller
        .and_then(|caller| auth::allowed(caller, action))
        .map_err(|refused| {
            state
                .access
                .refused("dashboard", action, Some(peer), &refused);
            denied(refused)
        })?;
    spans::record_caller(&caller.name, caller.role.as_str());
    Ok(caller)
}

async fn drain(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let span = admin_span!(
        "dashboard",
        "drain",
        clipped(&id).as_str(),
        Some(peer),
        &headers
    );
    spans::http(span, async {
        let plane = &state.plane;
        let caller = operator(&state, &headers, peer, "drain workers").await?;
        match plane.drain(&id).await {
            Ok(already) => {
                audit(plane.events(), &caller, "dashboard", "drain", &id);
                Ok(Json(
                    json!({ "worker_id": id, "already_draining": already }),
                ))
            }
            Err(error) => Err(ApiError(error, leader_json(plane)).into_response()),
        }
    })
    .await
}

async fn undrain(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let span = admin_span!(
        "dashboard",
        "undrain",
        clipped(&id).as_str(),
        Some(peer),
        &headers
    );
    spans::http(span, async {
        let plane = &state.plane;
        let caller = operator(&state, &headers, peer, "undrain workers").await?;
        match plane.undrain(&id).await {
            Ok(was) => {
                audit(plane.events(), &caller, "dashboard", "undrain", &id);
                Ok(Json(json!({ "worker_id": id, "was_draining": was })))
            }
            Err(error) => Err(ApiError(error, leader_json(plane)).into_response()),
        }
    })
    .await
}

/// Whether sign-in is needed and who is signed in (the page shows or hides its form).
async fn session(State(state): State<AppState>, headers: HeaderMap) -> Json<Value> {
    let caller = identify(&state, &headers).await.ok();
    let required = state.access.required();
    Json(json!({
        "required": required,
        "signed_in": required && caller.is_some(),
        "name": caller.as_ref().map(|c| c.name.clone()),
        "role": caller.as_ref().map(|c| c.role.as_str()),
    }))
}

/// The `set-cookie` value carrying `value` for `max_age` seconds (0: delete it). HttpOnly: page
/// scripts never hold it; SameSite=Strict: other sites' requests never carry it; Secure over
/// TLS: the browser never sends it in clear (to this host's plain-HTTP ports either).
fn session_cookie(state: &AppState, value: &str, max_age: u64) -> String {
    let secure = if state.https { "; Secure" } else { "" };
    format!(
        "{}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{secure}",
        auth::COOKIE
    )
}

/// Largest sign-in body read: `{"token": "…"}` with room for any token.
const SIGN_IN_BODY_BYTES: usize = 64 << 10;

/// The sign-in body, or the JSON answer refusing it. One larger than [`SIGN_IN_BODY_BYTES`] is
/// a 413 in the API's shape — before it is read when its `content-length` says so, so a client
/// that sent `expect: 100-continue` is not told to go on and upload it (found from outside:
/// axum's plain-text 413 came after a `100 Continue`, the only non-JSON answer of the API).
async fn sign_in_body(headers: &HeaderMap, body: axum::body::Body) -> Result<Vec<u8>, Response> {
    let too_large = || {
        let message = format!("the body is over {} KiB", SIGN_IN_BODY_BYTES >> 10);
        spans::record_error(&message);
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(json!({ "error": message })),
        )
            .into_response()
    };
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|length| length > SIGN_IN_BODY_BYTES as u64) {
        return Err(too_large());
    }
    match axum::body::to_bytes(body, SIGN_IN_BODY_BYTES).await {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(_) if announced.is_none() => Err(too_large()),
        Err(error) => Err(bad_request(format!("reading the body: {error}"))),
    }
}

/// Signs in with `{"token": "…"}`: checks it and sets a session cookie (not the token).
async fn sign_in(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let span = admin_span!("dashboard", "sign_in", "", Some(peer), &headers);
    spans::http(span, async {
        if !state.access.required() {
            return bad_request(
                "no admin tokens are configured (--admin-tokens-file): nothing to sign in to"
                    .into(),
            );
        }
        let body = match sign_in_body(&headers, body).await {
            Ok(body) => body,
            Err(refused) => return refused,
        };
        let token = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["token"].as_str().map(str::to_string));
        let Some(token) = token else {
            return bad_request("expected a JSON body {\"token\": \"…\"}".into());
        };
        let caller = match state.access.identify_token(token.trim()) {
            Ok(caller) => caller,
            Err(error) => {
                state
                    .access
                    .refused("dashboard", "sign in", Some(peer), &error);
                return denied(error);
            }
        };
        let Some(value) = state.sessions.issue(&caller) else {
            return denied(Denied::Unknown);
        };
        spans::record_caller(&caller.name, caller.role.as_str());
        let cookie = session_cookie(&state, &value, sessions::LIFETIME.as_secs());
        tracing::info!(who = %caller.name, role = caller.role.as_str(), "dashboard sign-in");
        (
            [(header::SET_COOKIE, cookie)],
            Json(json!({ "name": caller.name, "role": caller.role.as_str() })),
        )
            .into_response()
    })
    .await
}

/// Signs out: ends the session for every replica and deletes the cookie.
async fn sign_out(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let span = admin_span!("dashboard", "sign_out", "", Some(peer), &headers);
    spans::http(span, async {
        let clear = [(header::SET_COOKIE, session_cookie(&state, "", 0))];
        let ended = match cookie_session(&headers) {
            Some(session) => state.sessions.end(session).await,
            None => Ok(None),
        };
        match ended {
            Ok(caller) => {
                if let Some(caller) = caller {
                    spans::record_caller(&caller.name, caller.role.as_str());
                }
                (clear, Json(json!({}))).into_response()
            }
            Err(error) => {
                let message = format!(
                    "signed out in this browser, but the session could not be ended on the \
                     server ({error}): it stays valid until it expires if its cookie was copied"
                );
                spans::record_error(&message);
                let body = Json(json!({ "error": message }));
                (StatusCode::SERVICE_UNAVAILABLE, clear, body).into_response()
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leader::ReplicaInfo;
    use axum::body::Body;
    use axum::http::Request;
    use std::sync::Arc;
    use switchyard_cluster::{MemoryRegistry, Registry};
    use tower::ServiceExt as _;

    const OPERATOR: &str = "op-token-0123456789";
    const TOKENS: &str = r#"{"tokens": [
        {"name": "alice", "token": "op-token-0123456789", "role": "operator"},
        {"name": "bob", "token": "view-token-0123456789", "role": "viewer"}
    ]}"#;

    /// A standalone control plane's dashboard over an in-memory registry.
    async fn dashboard(tokens: Option<&str>, https: bool) -> Router {
        dashboard_over(Arc::new(MemoryRegistry::new()), tokens, https).await
    }

    /// A standalone control plane's dashboard over `registry`.
    async fn dashboard_over(
        registry: Arc<dyn Registry>,
        tokens: Option<&str>,
        https: bool,
    ) -> Router {
        let membership = registry.watch_workers().await.unwrap();
        let policy = registry.watch_policy().await.unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let events = crate::events::Events::spawn(membership.clone(), policy, stop.clone());
        let me = ReplicaInfo {
            id: "cp-test".into(),
            grpc: "127.0.0.1:1".into(),
            http: Some("127.0.0.1:2".into()),
        };
        let leadership =
            crate::leader::Leadership::start(crate::ElectionConfig::Standalone, me, stop);
        let plane = ControlPlane::new(registry, Default::default(), events, leadership)
            .with_membership(membership);
        let security = SecurityConfig {
            access: Access::new(tokens.map(|t| auth::AdminTokens::from_json(t).unwrap())),
            dashboard_hosts: guard::HostAllowlist::default().served_over_tls(https),
            ..Default::default()
        };
        // What `serve_http` gives every request: the caller's address.
        router(plane, security, Revocations::default()).layer(
            axum::extract::connect_info::MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))),
        )
    }

    /// One request as the dashboard's own page sends it (writes with the guard's headers).
    async fn call(
        app: &Router,
        method: &str,
        path: &str,
        cookie: Option<&str>,
        body: &str,
    ) -> (StatusCode, HeaderMap, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "127.0.0.1:2");
        if method != "GET" {
            request = request
                .header(header::CONTENT_TYPE, "application/json")
                .header(guard::CSRF_HEADER, "1");
        }
        if let Some(cookie) = cookie {
            request = request.header(header::COOKIE, cookie);
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, json)
    }

    /// The `name=value` part of the response's session cookie, and its attributes.
    fn set_cookie(headers: &HeaderMap) -> (String, String) {
        let cookie = headers
            .get(header::SET_COOKIE)
            .expect("a set-cookie")
            .to_str()
            .unwrap()
            .to_string();
        let (pair, attributes) = cookie.split_once(';').unwrap();
        (pair.to_string(), attributes.to_string())
    }

    /// Signs in as the operator: the session cookie's `name=value` and its attributes.
    async fn sign_in(app: &Router) -> (String, String) {
        let body = json!({ "token": OPERATOR }).to_string();
        let (status, headers, answer) = call(app, "POST", "/api/session", None, &body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        set_cookie(&headers)
    }

    /// How the [`Outage`] registry answers reads of the workers and drains.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Reads {
        Answered,
        /// Never answered, as by a frozen etcd (SIGSTOP: connections accepted, nothing
        /// answered).
        Hang,
        /// Refused, as when etcd's port refuses connections.
        Fail,
    }

    /// An in-memory registry whose reads of the workers and drains hang or fail on demand, as
    /// etcd's do in an outage, while the watched membership keeps what it last saw.
    struct Outage {
        inner: MemoryRegistry,
        reads: std::sync::Mutex<Reads>,
    }

    impl Outage {
        fn new() -> Self {
            Self {
                inner: MemoryRegistry::new(),
                reads: std::sync::Mutex::new(Reads::Answered),
            }
        }

        fn set(&self, reads: Reads) {
            *self.reads.lock().unwrap() = reads;
        }

        async fn read(&self) -> Result<(), switchyard_cluster::RegistryError> {
            let reads = *self.reads.lock().unwrap();
            match reads {
                Reads::Answered => Ok(()),
                Reads::Hang => std::future::pending().await,
                Reads::Fail => Err(switchyard_cluster::RegistryError::Etcd(
                    etcd_client::Error::GRpcStatus(tonic::Status::unavailable("tcp connect error")),
                )),
            }
        }
    }

    #[tonic::async_trait]
    impl Registry for Outage {
        async fn register(
            &self,
            record: switchyard_cluster::WorkerRecord,
            ttl: std::time::Duration,
        ) -> Result<switchyard_cluster::Registration, switchyard_cluster::RegistryError> {
            self.inner.register(record, ttl).await
        }
        fn describe(&self) -> String {
            "etcd at http://127.0.0.1:2379".into()
        }
        async fn list_workers(
            &self,
        ) -> Result<Vec<switchyard_cluster::WorkerRecord>, switchyard_cluster::RegistryError>
        {
            self.read().await?;
            self.inner.list_workers().await
        }
        async fn watch_workers(
            &self,
        ) -> Result<switchyard_cluster::Membership, switchyard_cluster::RegistryError> {
            self.inner.watch_workers().await
        }
        async fn get_policy(&self) -> Result<Option<Vec<u8>>, switchyard_cluster::RegistryError> {
            self.inner.get_policy().await
        }
        async fn put_policy(
            &self,
            document: Vec<u8>,
            fence: Option<&switchyard_cluster::Fence>,
        ) -> Result<(), switchyard_cluster::RegistryError> {
            self.inner.put_policy(document, fence).await
        }
        async fn watch_policy(
            &self,
        ) -> Result<tokio::sync::watch::Receiver<Option<Vec<u8>>>, switchyard_cluster::RegistryError>
        {
            self.inner.watch_policy().await
        }
        async fn set_drain(
            &self,
            worker_id: &str,
            drain: bool,
            fence: Option<&switchyard_cluster::Fence>,
        ) -> Result<bool, switchyard_cluster::RegistryError> {
            self.inner.set_drain(worker_id, drain, fence).await
        }
        async fn list_drains(&self) -> Result<Vec<String>, switchyard_cluster::RegistryError> {
            self.read().await?;
            self.inner.list_drains().await
        }
        async fn watch_drain(
            &self,
            worker_id: &str,
        ) -> Result<tokio::sync::watch::Receiver<bool>, switchyard_cluster::RegistryError> {
            self.inner.watch_drain(worker_id).await
        }
        async fn watch_control_plane(
            &self,
        ) -> Result<tokio::sync::watch::Receiver<Option<Vec<u8>>>, switchyard_cluster::RegistryError>
        {
            self.inner.watch_control_plane().await
        }
        async fn announce_router(
            &self,
            record: switchyard_cluster::RouterRecord,
            ttl: std::time::Duration,
        ) -> Result<switchyard_cluster::RouterPresence, switchyard_cluster::RegistryError> {
            self.inner.announce_router(record, ttl).await
        }
        async fn find_router(
            &self,
            router_id: &str,
        ) -> Result<Option<switchyard_cluster::RouterRecord>, switchyard_cluster::RegistryError>
        {
            self.read().await?;
            self.inner.find_router(router_id).await
        }
        async fn list_routers(
            &self,
        ) -> Result<Vec<switchyard_cluster::RouterRecord>, switchyard_cluster::RegistryError>
        {
            self.read().await?;
            self.inner.list_routers().await
        }
    }

    /// etcd frozen or down: `/api/workers` and `/api/stats` answer within the read bound from
    /// the watched membership and the drains last read, marked `registry.reachable: false`
    /// with an operator's message, and say `reachable: true` again once etcd answers.
    #[tokio::test]
    async fn with_etcd_unreachable_workers_and_stats_answer_from_the_membership_last_seen() {
        let outage = Arc::new(Outage::new());
        let registry: Arc<dyn Registry> = outage.clone();
        let _registration = registry
            .register(
                crate::tests::record("gpu-0"),
                std::time::Duration::from_secs(5),
            )
            .await
            .unwrap();
        registry.set_drain("gpu-0", true, None).await.unwrap();
        let app = dashboard_over(registry, None, false).await;
        let get = |path: &'static str| {
            let app = app.clone();
            async move {
                tokio::time::timeout(
                    std::time::Duration::from_secs(3),
                    call(&app, "GET", path, None, ""),
                )
                .await
                .unwrap_or_else(|_| panic!("{path}: no answer within 3 s"))
            }
        };
        let (status, _, body) = get("/api/workers").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["registry"]["reachable"], json!(true), "{body}");
        assert_eq!(body["registry"]["error"], Value::Null, "{body}");
        let (_, _, stats) = get("/api/stats").await;
        assert_eq!(stats["registry"]["reachable"], json!(true), "{stats}");

        for reads in [Reads::Hang, Reads::Fail] {
            outage.set(reads);
            let (status, _, body) = get("/api/workers").await;
            assert_eq!(status, StatusCode::OK, "{reads:?}: {body}");
            assert_eq!(body["workers"][0]["id"], "gpu-0", "{reads:?}: {body}");
            assert_eq!(
                body["workers"][0]["drain_requested"],
                json!(true),
                "{reads:?}: {body}"
            );
            let registry = &body["registry"];
            assert_eq!(registry["reachable"], json!(false), "{reads:?}: {body}");
            assert!(registry["as_of_unix_ms"].as_u64().unwrap() > 0, "{body}");
            assert!(registry["since_unix_ms"].as_u64().unwrap() > 0, "{body}");
            let error = registry["error"].as_str().unwrap();
            assert!(
                error.contains("etcd at http://127.0.0.1:2379")
                    && error.contains("check that etcd is running"),
                "{reads:?}: {error}"
            );
            if reads == Reads::Hang {
                assert!(error.contains("did not answer within 1 s"), "{error}");
            }
            // An operator's message: no tonic dumps.
            assert!(
                !error.contains("Status {") && !error.contains("metadata"),
                "{reads:?}: {error}"
            );

            let (status, _, stats) = get("/api/stats").await;
            assert_eq!(status, StatusCode::OK, "{reads:?}: {stats}");
            assert_eq!(stats["workers"], json!(1), "{stats}");
            assert_eq!(stats["drains"], json!(["gpu-0"]), "{stats}");
            assert_eq!(stats["registry"]["reachable"], json!(false), "{stats}");
        }

        outage.set(Reads::Answered);
        let (status, _, body) = get("/api/workers").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["registry"]["reachable"], json!(true), "{body}");
        assert_eq!(body["registry"]["since_unix_ms"], Value::Null, "{body}");
    }

    /// Found from outside: a sign-in body over the limit got axum's plain-text 413 (the only
    /// answer of the API not in JSON), and with `expect: 100-continue` only after a
    /// `100 Continue`. It is a JSON 413, before the body is read when `content-length` says so.
    #[tokio::test]
    async fn an_oversized_sign_in_body_is_a_json_413_and_an_announced_one_is_not_read() {
        let app = dashboard(Some(TOKENS), false).await;
        let request = |length: Option<u64>, body: Body| {
            let mut request = Request::post("/api/session")
                .header(header::HOST, "127.0.0.1:2")
                .header(header::CONTENT_TYPE, "application/json")
                .header(guard::CSRF_HEADER, "1");
            if let Some(length) = length {
                request = request.header(header::CONTENT_LENGTH, length);
            }
            request.body(body).unwrap()
        };
        let json_413 = |response: Response| async move {
            assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            let body: Value = serde_json::from_slice(&bytes).expect("a JSON answer");
            assert_eq!(body["error"], json!("the body is over 64 KiB"), "{body}");
        };
        // Announced: answered without polling a body that never comes.
        let never =
            Body::from_stream(futures::stream::pending::<Result<Vec<u8>, std::io::Error>>());
        let announced = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            app.clone().oneshot(request(Some(3 << 20), never)),
        )
        .await
        .expect("answered without reading the body")
        .unwrap();
        json_413(announced).await;
        // Unannounced (chunked): read up to the limit.
        let chunked = app
            .clone()
            .oneshot(request(None, Body::from(vec![b' '; 100 << 10])))
            .await
            .unwrap();
        json_413(chunked).await;
    }

    #[tokio::test]
    async fn the_sign_in_cookie_is_a_session_not_the_token_and_sign_out_ends_it() {
        let app = dashboard(Some(TOKENS), false).await;
        let (cookie, attributes) = sign_in(&app).await;
        assert!(cookie.starts_with("switchyard_admin="), "{cookie}");
        assert!(
            !cookie.contains(OPERATOR),
            "the cookie is the token: {cookie}"
        );
        assert!(
            attributes.contains("HttpOnly") && attributes.contains("SameSite=Strict"),
            "{attributes}"
        );
        assert!(!attributes.contains("Secure"), "plain HTTP: {attributes}");
        let (_, _, who) = call(&app, "GET", "/api/session", Some(&cookie), "").await;
        assert_eq!(
            (who["signed_in"].clone(), who["name"].clone()),
            (json!(true), json!("alice"))
        );
        // The token itself in the cookie is no session.
        let raw = format!("switchyard_admin={OPERATOR}");
        let (_, _, who) = call(&app, "GET", "/api/session", Some(&raw), "").await;
        assert_eq!(who["signed_in"], json!(false), "{who}");
        let (status, _, _) = call(&app, "POST", "/api/workers/gpu-0/drain", Some(&raw), "{}").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        // The session writes (gpu-0 is unknown: past the credential check).
        let (status, _, _) = call(
            &app,
            "POST",
            "/api/workers/gpu-0/drain",
            Some(&cookie),
            "{}",
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        // Sign-out deletes the cookie and ends the session on the server: a copy of the
        // cookie no longer writes.
        let (status, headers, _) = call(&app, "DELETE", "/api/session", Some(&cookie), "{}").await;
        assert_eq!(status, StatusCode::OK);
        let (cleared, attributes) = set_cookie(&headers);
        assert_eq!(cleared, "switchyard_admin=");
        assert!(attributes.contains("Max-Age=0"), "{attributes}");
        let (status, _, body) = call(
            &app,
            "POST",
            "/api/workers/gpu-0/drain",
            Some(&cookie),
            "{}",
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("session has ended"),
            "{body}"
        );
        let (_, _, who) = call(&app, "GET", "/api/session", Some(&cookie), "").await;
        assert_eq!(who["signed_in"], json!(false), "{who}");
    }

    #[tokio::test]
    async fn an_altered_or_foreign_session_cookie_is_told_to_sign_in_again() {
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let app = dashboard(Some(TOKENS), false).await;
        let (cookie, _) = sign_in(&app).await;
        // The claims rewritten (another name) under the original signature.
        let (payload, tag) = cookie
            .trim_start_matches("switchyard_admin=")
            .split_once('.')
            .unwrap();
        let mut claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        claims["name"] = json!("mallory");
        let altered = format!(
            "switchyard_admin={}.{tag}",
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        // A session another control plane signed (another tokens file).
        let elsewhere = dashboard(
            Some(&TOKENS.replace("view-token", "other-view-token")),
            false,
        )
        .await;
        let (foreign, _) = sign_in(&elsewhere).await;
        for cookie in [altered, foreign] {
            let (status, _, body) = call(
                &app,
                "POST",
                "/api/workers/gpu-0/drain",
                Some(&cookie),
                "{}",
            )
            .await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
            let error = body["error"].as_str().unwrap();
            assert!(
                error.contains("session is not valid") && error.contains("sign in again"),
                "{error}"
            );
            assert!(!error.contains("admin token"), "not a token: {error}");
        }
    }

    #[tokio::test]
    async fn api_errors_are_json_uncached_and_since_is_a_whole_unix_second() {
        let app = dashboard(None, false).await;
        let (status, headers, body) = call(&app, "GET", "/api/workers/gpu-0/drain", None, "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers[header::ALLOW], "POST");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("GET is not allowed"),
            "{body}"
        );
        for path in [
            "/api/workers",
            "/api/history",
            "/api/nope",
            "/api/history?since=x",
        ] {
            let (_, headers, _) = call(&app, "GET", path, None, "").await;
            assert_eq!(headers[header::CACHE_CONTROL], "no-store", "{path}");
        }
        let (_, headers, _) = call(&app, "GET", "/", None, "").await;
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache");
        for (since, status) in [
            ("5", StatusCode::OK),
            ("-5", StatusCode::BAD_REQUEST),
            ("1e3", StatusCode::BAD_REQUEST),
            ("1.5", StatusCode::BAD_REQUEST),
        ] {
            let path = format!("/api/history?since={since}");
            let (got, _, body) = call(&app, "GET", &path, None, "").await;
            assert_eq!(got, status, "{path}: {body}");
        }
        // An unknown worker's id is repeated, but not 5 000 characters of it.
        let long = "w".repeat(5000);
        let (status, _, body) = call(
            &app,
            "POST",
            &format!("/api/workers/{long}/drain"),
            None,
            "{}",
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body["error"].as_str().unwrap().len() < 200, "{body}");
    }

    /// `?pool=` keeps one pool's workers and refuses a pool that does not exist, as
    /// `ListWorkers` does: it was ignored, every worker listed (a script counting one pool's
    /// workers counted all).
    #[tokio::test]
    async fn the_workers_api_lists_one_pool_when_asked() {
        use switchyard_cluster::Pool;
        let registry = Arc::new(MemoryRegistry::new());
        let mut registrations = Vec::new();
        for (id, pool) in [("gpu-0", Pool::Gpu), ("wse-0", Pool::Wse)] {
            let mut record = crate::tests::record(id);
            record.pool = pool;
            registrations.push(
                registry
                    .register(record, std::time::Duration::from_secs(60))
                    .await
                    .unwrap(),
            );
        }
        let app = dashboard_over(registry, None, false).await;
        let ids = |body: &Value| {
            body["workers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        let (status, _, all) = call(&app, "GET", "/api/workers", None, "").await;
        assert_eq!(status, StatusCode::OK, "{all}");
        assert_eq!(ids(&all), ["gpu-0", "wse-0"]);
        let (status, _, wse) = call(&app, "GET", "/api/workers?pool=wse", None, "").await;
        assert_eq!(status, StatusCode::OK, "{wse}");
        assert_eq!(ids(&wse), ["wse-0"]);
        let (status, _, refused) = call(&app, "GET", "/api/workers?pool=tpu", None, "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
        assert_eq!(
            refused["error"],
            json!("pool: unknown pool \"tpu\", expected gpu or wse")
        );
    }

    #[tokio::test]
    async fn the_feed_names_itself_and_answers_a_cursor_of_another_feed_from_the_start() {
        let app = dashboard(None, false).await;
        let (status, _, page) = call(&app, "GET", "/api/decisions", None, "").await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(page["feed"]["replica"], "cp-test", "{page}");
        let epoch = page["feed"]["epoch"].as_i64().expect("an epoch");
        assert!(epoch > 0, "{page}");
        assert_eq!((&page["seq"], &page["reset"]), (&json!(0), &json!(false)));
        // A cursor into another feed: beyond this one's seq, or of another epoch.
        for path in [
            "/api/decisions?since=7300".to_string(),
            format!("/api/decisions?since=0&epoch={}", epoch - 1),
        ] {
            let (status, _, page) = call(&app, "GET", &path, None, "").await;
            assert_eq!(
                (status, &page["reset"]),
                (StatusCode::OK, &json!(true)),
                "{path}: {page}"
            );
        }
        let path = format!("/api/decisions?since=0&epoch={epoch}");
        let (_, _, page) = call(&app, "GET", &path, None, "").await;
        assert_eq!(page["reset"], false, "{page}");
        let (status, _, body) = call(&app, "GET", "/api/decisions?epoch=x", None, "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"].as_str().unwrap().starts_with("epoch"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn no_dashboard_answer_may_be_framed() {
        let app = dashboard(None, false).await;
        let foreign_host = Request::builder()
            .uri("/")
            .header(header::HOST, "attacker.example")
            .body(Body::empty())
            .unwrap();
        let refused = app.clone().oneshot(foreign_host).await.unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        let mut answers = vec![refused.headers().clone()];
        for path in ["/", "/assets/app.js", "/api/workers", "/api/nope"] {
            answers.push(call(&app, "GET", path, None, "").await.1);
        }
        answers.push(
            call(&app, "POST", "/api/workers/x/drain", None, "{}")
                .await
                .1,
        );
        for headers in answers {
            assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY", "{headers:?}");
            assert_eq!(
                headers[header::CONTENT_SECURITY_POLICY],
                "frame-ancestors 'none'",
                "{headers:?}"
            );
        }
    }

    #[tokio::test]
    async fn over_tls_the_session_cookie_is_secure_and_another_replica_accepts_it() {
        let app = dashboard(Some(TOKENS), true).await;
        let (cookie, attributes) = sign_in(&app).await;
        assert!(attributes.contains("; Secure"), "{attributes}");
        // A second replica with the same tokens file (behind the same Service).
        let other = dashboard(Some(TOKENS), true).await;
        let (_, _, who) = call(&other, "GET", "/api/session", Some(&cookie), "").await;
        assert_eq!(who["name"], json!("alice"), "{who}");
        let (_, headers, _) = call(&app, "DELETE", "/api/session", Some(&cookie), "{}").await;
        assert!(set_cookie(&headers).1.contains("; Secure"));
    }

    fn replica(grpc: &str, http: Option<&str>) -> ReplicaInfo {
        ReplicaInfo {
            id: "control-plane-0".into(),
            grpc: grpc.into(),
            http: http.map(str::to_string),
        }
    }

    #[test]
    fn the_page_prices_every_token_and_asks_for_no_favicon() {
        // Cost is (prompt + generated tokens) × the price: the tooltip must not say otherwise.
        assert!(!INDEX_HTML.contains("million generated tokens"));
        assert!(INDEX_HTML.contains("(prompt + generated tokens) × this price"));
        // An inline empty icon: the browser requests no /favicon.ico (a 404 in the console).
        assert!(INDEX_HTML.contains(r#"<link rel="icon" href="data:,">"#));
    }

    #[test]
    fn a_follower_dials_the_leaders_dashboard_where_it_can_be_reached() {
        assert_eq!(
            crate::leader::ReplicaInfo::dashboard_address(&replica(
                "10.0.0.5:50052",
                Some("10.0.0.5:8090")
            ))
            .as_deref(),
            Some("10.0.0.5:8090")
        );
        // Bound to every interface: dial the host it advertises for gRPC.
        assert_eq!(
            crate::leader::ReplicaInfo::dashboard_address(&replica(
                "10.0.0.5:50052",
                Some("0.0.0.0:8090")
            ))
            .as_deref(),
            Some("10.0.0.5:8090")
        );
        assert_eq!(
            crate::leader::ReplicaInfo::dashboard_address(&replica(
                "[fd00::5]:50052",
                Some("[::]:8090")
            ))
            .as_deref(),
            Some("[fd00::5]:8090")
        );
        // Nowhere to dial: no dashboard, or nothing but unspecified addresses.
        assert_eq!(
            crate::leader::ReplicaInfo::dashboard_address(&replica("10.0.0.5:50052", None)),
            None
        );
        assert_eq!(
            crate::leader::ReplicaInfo::dashboard_address(&replica(
                "0.0.0.0:50052",
                Some("0.0.0.0:8090")
            )),
            None
        );
    }

    #[test]
    fn a_follower_never_dials_its_own_loopback_for_the_leaders_dashboard() {
        // The leader's dashboard on its loopback (the flag's default) while it advertises its
        // pod IP for gRPC: the follower dials that host, not its own 127.0.0.1, where it would
        // answer itself and pass its own empty history off as the leader's.
        assert_eq!(
            crate::leader::ReplicaInfo::dashboard_address(&replica(
                "10.0.0.5:50052",
                Some("127.0.0.1:8090")
            ))
            .as_deref(),
            Some("10.0.0.5:8090")
        );
        assert_eq!(
            crate::leader::ReplicaInfo::dashboard_address(&replica(
                "[fd00::5]:50052",
                Some("[::1]:8090")
            ))
            .as_deref(),
            Some("[fd00::5]:8090")
        );
        // A leader advertised by name: that name, on the dashboard's port.
        assert_eq!(
            crate::leader::ReplicaInfo::dashboard_address(&replica(
                "control-plane-0.example:50052",
                Some("127.0.0.1:8090")
            ))
            .as_deref(),
            Some("control-plane-0.example:8090")
        );
        // Every replica on one host (gRPC on loopback too): the loopback address is the
        // leader's, and stays.
        assert_eq!(
            crate::leader::ReplicaInfo::dashboard_address(&replica(
                "127.0.0.1:50052",
                Some("127.0.0.1:8090")
            ))
            .as_deref(),
            Some("127.0.0.1:8090")
        );
        assert_eq!(
            crate::leader::ReplicaInfo::dashboard_address(&replica(
                "localhost:50052",
                Some("127.0.0.1:8091")
            ))
            .as_deref(),
            Some("127.0.0.1:8091")
        );
        assert_eq!(
            crate::leader::ReplicaInfo::dashboard_address(&replica(
                "127.0.0.1:50052",
                Some("0.0.0.0:8090")
            ))
            .as_deref(),
            Some("127.0.0.1:8090")
        );
        // Loopback dashboard, unspecified gRPC: no host to dial.
        assert_eq!(
            crate::leader::ReplicaInfo::dashboard_address(&replica(
                "0.0.0.0:50052",
                Some("127.0.0.1:8090")
            )),
            None
        );
    }
}
