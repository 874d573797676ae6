//! The ops dashboard: a plain HTML/JS/CSS page embedded in the binary plus the JSON API it
//! polls. The API is usable on its own (curl):
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/api/workers` | workers with state, capacity, hardware, drain request, live load |
//! | GET | `/api/stats` | totals by pool, drains, leader, this replica's role |
//! | GET | `/api/policy` | the routing policy document routers apply |
//! | GET | `/api/events` | the last cluster events (joined/left/draining/ready/policy) |
//! | GET | `/api/history?since=<unix s>` | one point per second for the last hour (see [`crate::history`]) |
//! | GET | `/api/decisions?since=<seq>&request_id=<id>&limit=<n>` | the live decision feed (see [`crate::decisions`]) |
//! | GET | `/api/ledger?window_s=<s>` | the counterfactual ledger per lane, pool and tenant over the last `window_s` seconds (default 300, at most 3600; see [`crate::history::History::ledger`]) |
//! | POST | `/api/workers/{id}/drain` | request a drain (leader only) |
//! | POST | `/api/workers/{id}/undrain` | lift it (leader only) |
//! | GET, POST, DELETE | `/api/session` | who is signed in; sign in with `{"token"}`; sign out |
//!
//! With admin tokens configured, writes need an operator's `authorization: Bearer <token>` or
//! the HttpOnly, SameSite=Strict cookie the sign-in sets (401 without, 403 for a viewer).
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

use axum::extract::{FromRef, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::admin::audit;
use crate::auth::{self, Access, Caller, Denied};
use crate::leader::Role;
use crate::plane::{ControlPlane, OpError};
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
}

impl FromRef<AppState> for ControlPlane {
    fn from_ref(state: &AppState) -> Self {
        state.plane.clone()
    }
}

impl FromRef<AppState> for Access {
    fn from_ref(state: &AppState) -> Self {
        state.access.clone()
    }
}

pub fn router(plane: ControlPlane, security: SecurityConfig) -> Router {
    let state = AppState {
        plane,
        access: security.access,
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
        .route("/api/decisions", get(decisions))
        .route("/api/ledger", get(ledger))
        .route("/api/workers/{id}/drain", post(drain))
        .route("/api/workers/{id}/undrain", post(undrain))
        .route("/api/session", get(session).post(sign_in).delete(sign_out))
        .fallback(not_found)
        .with_state(state)
        // Outermost: no handler (not even a 404) runs for a foreign host or a cross-site write.
        .layer(axum::middleware::from_fn_with_state(
            security.dashboard_hosts,
            guard::guard,
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
        let mut body = json!({ "error": self.0.to_string() });
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

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "no such page or API route" })),
    )
        .into_response()
}

async fn workers(State(plane): State<ControlPlane>) -> Result<Json<Value>, ApiError> {
    let workers = plane.workers("").await?;
    Ok(Json(json!({ "workers": workers })))
}

async fn stats(State(plane): State<ControlPlane>) -> Result<Json<Value>, ApiError> {
    let stats = plane.stats().await?;
    let pools: Vec<Value> = stats
        .pools
        .iter()
        .map(|p| {
            json!({
                "pool": p.pool, "workers": p.workers, "ready": p.ready, "draining": p.draining,
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
    })))
}

async fn policy(State(plane): State<ControlPlane>) -> Result<Json<Value>, ApiError> {
    let policy = plane.policy().await?;
    // Stored documents were validated as JSON; show them as such, or as text if not.
    let document =
        serde_json::from_str::<Value>(&policy.document).unwrap_or(Value::String(policy.document));
    Ok(Json(
        json!({ "document": document, "is_default": policy.is_default }),
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

/// Who keeps the history and the feed: routers report to the leader.
fn keeper(plane: &ControlPlane) -> Value {
    let leadership = plane.leadership();
    json!({
        "role": match leadership.role() {
            Role::Leader => "leader",
            Role::Follower { .. } => "follower",
        },
        "leader": leadership.leader(),
    })
}

fn bad_request(message: String) -> Response {
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
async fn from_leader(plane: &ControlPlane, headers: &HeaderMap, uri: &Uri) -> Option<Value> {
    let leadership = plane.leadership();
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
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(LEADER_TIMEOUT)
            .build()
            .unwrap_or_default()
    });
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let answer = async {
        let response = client
            .get(format!("http://{address}{path}"))
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
    State(plane): State<ControlPlane>,
    headers: HeaderMap,
    uri: Uri,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, Response> {
    let since = number::<i64>(&query, "since", "a unix time in seconds").map_err(bad_request)?;
    if let Some(body) = from_leader(&plane, &headers, &uri).await {
        return Ok(Json(body));
    }
    let points = plane.insights().history.since(since);
    Ok(Json(json!({
        "resolution_s": 1,
        "capacity": crate::history::SECONDS,
        "kept_by": keeper(&plane),
        "points": points,
    })))
}

/// Most entries one `/api/decisions` answer carries.
const DECISIONS_LIMIT: usize = crate::decisions::RECENT;

async fn decisions(
    State(plane): State<ControlPlane>,
    headers: HeaderMap,
    uri: Uri,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, Response> {
    let since = number::<u64>(&query, "since", "a feed sequence number")
        .map_err(bad_request)?
        .unwrap_or(0);
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
    if let Some(body) = from_leader(&plane, &headers, &uri).await {
        return Ok(Json(body));
    }
    let page = plane.insights().decisions.page(since, request_id, limit);
    Ok(Json(json!({
        "seq": page.seq,
        "decisions": page.entries,
        "kept_by": keeper(&plane),
    })))
}

/// Window of `/api/ledger` without `window_s`.
const LEDGER_WINDOW_S: i64 = 300;

async fn ledger(
    State(plane): State<ControlPlane>,
    headers: HeaderMap,
    uri: Uri,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, Response> {
    let window_s = number::<i64>(&query, "window_s", "a number of seconds")
        .map_err(bad_request)?
        .unwrap_or(LEDGER_WINDOW_S);
    let most = crate::history::SECONDS as i64;
    if !(1..=most).contains(&window_s) {
        return Err(bad_request(format!(
            "window_s: {window_s} is out of range, expected 1..={most}"
        )));
    }
    if let Some(body) = from_leader(&plane, &headers, &uri).await {
        return Ok(Json(body));
    }
    let window = plane.insights().history.ledger(window_s);
    Ok(Json(json!({
        "window_s": window_s,
        "from": window.from,
        "to": window.to,
        "rows": window.rows,
        "kept_by": keeper(&plane),
    })))
}

fn leader_json(plane: &ControlPlane) -> Option<Value> {
    plane
        .leadership()
        .leader()
        .and_then(|l| serde_json::to_value(l).ok())
}

/// A refused credential as an HTTP answer: 401 (none or unknown), 403 (not an operator).
fn denied(denied: Denied) -> Response {
    let status = match denied {
        Denied::Forbidden { .. } => StatusCode::FORBIDDEN,
        _ => StatusCode::UNAUTHORIZED,
    };
    (status, Json(json!({ "error": denied.to_string() }))).into_response()
}

/// The admin token in the sign-in cookie, if any.
fn cookie_token(headers: &HeaderMap) -> Option<&str> {
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

/// The operator making a write from the dashboard, or the answer refusing it.
fn operator(access: &Access, headers: &HeaderMap, action: &str) -> Result<Caller, Denied> {
    access.operator(bearer(headers), cookie_token(headers), action)
}

async fn drain(
    State(plane): State<ControlPlane>,
    State(access): State<Access>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, Response> {
    let caller = operator(&access, &headers, "drain workers").map_err(denied)?;
    match plane.drain(&id).await {
        Ok(already) => {
            audit(plane.events(), &caller, "dashboard", "drain", &id);
            Ok(Json(
                json!({ "worker_id": id, "already_draining": already }),
            ))
        }
        Err(error) => Err(ApiError(error, leader_json(&plane)).into_response()),
    }
}

async fn undrain(
    State(plane): State<ControlPlane>,
    State(access): State<Access>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, Response> {
    let caller = operator(&access, &headers, "undrain workers").map_err(denied)?;
    match plane.undrain(&id).await {
        Ok(was) => {
            audit(plane.events(), &caller, "dashboard", "undrain", &id);
            Ok(Json(json!({ "worker_id": id, "was_draining": was })))
        }
        Err(error) => Err(ApiError(error, leader_json(&plane)).into_response()),
    }
}

/// Whether sign-in is needed and who is signed in (the page shows or hides its form).
async fn session(State(access): State<Access>, headers: HeaderMap) -> Json<Value> {
    let caller = access
        .identify(bearer(&headers), cookie_token(&headers))
        .ok();
    Json(json!({
        "required": access.required(),
        "signed_in": access.required() && caller.is_some(),
        "name": caller.as_ref().map(|c| c.name.clone()),
        "role": caller.as_ref().map(|c| c.role.as_str()),
    }))
}

/// How long a sign-in lasts.
const SESSION_SECONDS: u32 = 8 * 3600;

/// Signs in with `{"token": "…"}`: checks it and keeps it in an HttpOnly, SameSite=Strict
/// cookie, so page scripts never hold it and other sites' requests never carry it.
async fn sign_in(State(access): State<Access>, body: axum::body::Bytes) -> Response {
    if !access.required() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "no admin tokens are configured (--admin-tokens-file): nothing to sign in to" })),
        )
            .into_response();
    }
    let token = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["token"].as_str().map(str::to_string));
    let Some(token) = token else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "expected a JSON body {\"token\": \"…\"}" })),
        )
            .into_response();
    };
    match access.identify(None, Some(token.trim())) {
        Ok(caller) => {
            let cookie = format!(
                "{}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_SECONDS}",
                auth::COOKIE,
                token.trim()
            );
            tracing::info!(who = %caller.name, role = caller.role.as_str(), "dashboard sign-in");
            (
                [(header::SET_COOKIE, cookie)],
                Json(json!({ "name": caller.name, "role": caller.role.as_str() })),
            )
                .into_response()
        }
        Err(error) => denied(error),
    }
}

async fn sign_out() -> Response {
    let cookie = format!(
        "{}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
        auth::COOKIE
    );
    ([(header::SET_COOKIE, cookie)], Json(json!({}))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leader::ReplicaInfo;

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
