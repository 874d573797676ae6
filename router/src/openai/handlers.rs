//! The HTTP handlers: parse and validate the OpenAI request, translate it to a
//! `GenerateRequest`, run it through the dispatcher, and answer as JSON or as an SSE stream.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use switchyard_cluster::telemetry::propagation::RemoteContext;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use serde_json::{Value, json};
use switchyard_proto::v1::{self, server_frame::Frame};
use tokio::sync::mpsc;
use tonic::Code;

use super::choices::{self, ChoiceFrames};
use super::error::ApiError;
use super::logprobs::Logprobs;
use super::stream;
use super::tokenize::{DETOKENIZE_ROUTE, TOKENIZE_ROUTE};
use super::wire::{self, ChatCompletionRequest, CompletionRequest, WithSampling};
use crate::auth::Tenant;
use crate::dispatch::{Dispatcher, FrameReceiver};

/// Frames buffered towards one HTTP client before the dispatcher waits for it to read (flow
/// control keeps the rest on the worker).
const CLIENT_BUFFER: usize = 64;
/// Request header choosing the lane.
pub const CLASS_HEADER: &str = "x-switchyard-class";
/// Largest request body accepted (a 413 names it).
pub const MAX_BODY_BYTES: usize = 2 << 20;
/// The request's id, in a request (the client's, optional) and in every answer.
pub(crate) const REQUEST_ID_HEADER: &str = "x-request-id";

/// Which OpenAI endpoint a generation came through; decides the response shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// What the response of one generation says about it besides the text.
#[derive(Debug, Clone)]
pub struct Meta {
    pub endpoint: Endpoint,
    /// The answer's `id`.
    pub id: String,
    /// The id the request ran under (`x-request-id`): the answer's `id`, but for one stored
    /// under an id of the store's while the client named its own.
    pub request_id: String,
    pub created: u64,
    pub model: String,
    pub lane: String,
    pub pool: String,
    pub worker: String,
}

impl Meta {
    /// Adds the `x-switchyard-*` headers to `response`.
    pub fn decorate(&self, response: &mut Response) {
        tag(
            response,
            &self.lane,
            &self.pool,
            &self.worker,
            &self.request_id,
        );
    }
}

/// Adds the `x-switchyard-*` headers and `x-request-id` to a generation's `response`.
pub(crate) fn tag(response: &mut Response, lane: &str, pool: &str, worker: &str, id: &str) {
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-switchyard-lane", lane),
        ("x-switchyard-pool", pool),
        ("x-switchyard-worker", worker),
        (REQUEST_ID_HEADER, id),
    ] {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
}

pub async fn chat_completions(call: Call) -> Response {
    let mint = call.dispatcher.responses.new_chat_completion_id();
    call.answer(CHAT_ROUTE, Some(mint), |call, id| {
        generate(call, Endpoint::Chat, id)
    })
    .await
}

pub async fn completions(call: Call) -> Response {
    call.answer(COMPLETIONS_ROUTE, None, |call, id| {
        generate(call, Endpoint::Completion, id)
    })
    .await
}

/// What a door's handler is given: the router, the caller's tenant (its API key's), the
/// request's headers and its body (or why it could not be read, which the door answers in its
/// API's words).
pub struct Call {
    pub(crate) dispatcher: Arc<Dispatcher>,
    pub(crate) tenant: Option<Tenant>,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Result<Bytes, BytesRejection>,
}

impl FromRequest<Arc<Dispatcher>> for Call {
    type Rejection = std::convert::Infallible;

    async fn from_request(
        request: axum::extract::Request,
        dispatcher: &Arc<Dispatcher>,
    ) -> Result<Self, Self::Rejection> {
        let tenant = request.extensions().get::<Tenant>().cloned();
        let headers = request.headers().clone();
        Ok(Call {
            dispatcher: dispatcher.clone(),
            tenant,
            headers,
            body: Bytes::from_request(request, dispatcher).await,
        })
    }
}

impl Call {
    /// Answers the call with `respond`, under its request id (see [`answer`]).
    pub(crate) async fn answer<F, Fut>(
        self,
        route: &str,
        mint: Option<String>,
        respond: F,
    ) -> Response
    where
        F: FnOnce(Call, String) -> Fut,
        Fut: std::future::Future<Output = Result<Response, ApiError>>,
    {
        let limits = self.dispatcher.limits().clone();
        let headers = self.headers.clone();
        answer(&headers, &limits, route, mint, |id| respond(self, id)).await
    }
}

/// The generation routes.
pub const CHAT_ROUTE: &str = "/v1/chat/completions";
pub const COMPLETIONS_ROUTE: &str = "/v1/completions";
pub const RESPONSES_ROUTE: &str = "/v1/responses";
/// Anthropic's Messages API (see [`crate::anthropic`]).
pub const MESSAGES_ROUTE: &str = "/v1/messages";
/// Anthropic's token count of a Messages request.
pub const COUNT_TOKENS_ROUTE: &str = "/v1/messages/count_tokens";

/// How the ids a generation route gives its requests begin, as OpenAI's do; `None` for the
/// routes that generate nothing.
fn id_prefix(route: &str) -> Option<&'static str> {
    match route {
        CHAT_ROUTE => Some("chatcmpl-"),
        COMPLETIONS_ROUTE => Some("cmpl-"),
        RESPONSES_ROUTE => Some("resp_"),
        MESSAGES_ROUTE => Some("msg_"),
        super::embeddings::EMBEDDINGS_ROUTE => Some("embd-"),
        _ => None,
    }
}

/// Runs the generation `run` under the request's id; every answer, an error included,
/// carries that id in `x-request-id`, so a user can quote it to whoever reads the decision
/// feed.
///
/// `mint` is the id for a request that names none (`None`: a new one of the route's shape): a
/// door that may store the answer mints it as its store's id, so that a stored answer's `id` is
/// the request's.
pub(crate) async fn answer<F, Fut>(
    headers: &HeaderMap,
    limits: &switchyard_proto::RequestLimits,
    route: &str,
    mint: Option<String>,
    run: F,
) -> Response
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let (id, outcome) = match request_id(headers, route, limits, mint) {
        Ok(id) => {
            let outcome = run(id.clone()).await;
            (id, outcome)
        }
        Err(error) => (new_request_id(route), Err(error)),
    };
    outcome.unwrap_or_else(|error| {
        let mut response = error_response(route, &error);
        if let Ok(value) = HeaderValue::from_str(&id) {
            response.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        response
    })
}

/// The id a request runs under: the client's `x-request-id` when it sends one (as proxies and
/// tracing setups do), else a new `chatcmpl-…` / `cmpl-…` / `resp_…`.
fn request_id(
    headers: &HeaderMap,
    route: &str,
    limits: &switchyard_proto::RequestLimits,
    mint: Option<String>,
) -> Result<String, ApiError> {
    let Some(value) = headers.get(REQUEST_ID_HEADER) else {
        return Ok(mint.unwrap_or_else(|| new_request_id(route)));
    };
    match value.to_str() {
        Ok(id)
            if !id.is_empty()
                && id.len() <= limits.max_request_id_bytes
                && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(id.to_string())
        }
        _ => Err(ApiError::invalid(
            REQUEST_ID_HEADER,
            format!(
                "header must be 1 to {} visible ASCII characters (no spaces)",
                limits.max_request_id_bytes
            ),
        )),
    }
}

/// A refusal made before a route's handler ran (authentication, an unreadable body, a wrong
/// method), in the shape of the API the route speaks, with its request id.
pub(super) fn refusal(error: &ApiError, headers: &HeaderMap, path: &str) -> Response {
    let mut response = error_response(path, error);
    tag_with_request_id(&mut response, headers, path);
    response
}

/// `error` in the shape of the API `route` speaks: Anthropic's on its Messages routes,
/// OpenAI's everywhere else.
fn error_response(route: &str, error: &ApiError) -> Response {
    if route.starts_with(MESSAGES_ROUTE) {
        crate::anthropic::error_response(error)
    } else {
        error.clone().into_response()
    }
}

/// Gives a refusal made before a generation route's handler ran (authentication, a wrong
/// method) the `x-request-id` every answer of those routes carries: the client's when it is
/// valid, else a new one.
pub(super) fn tag_with_request_id(response: &mut Response, headers: &HeaderMap, path: &str) {
    if id_prefix(path).is_none() {
        return;
    }
    let limits = switchyard_proto::RequestLimits::default();
    let id = request_id(headers, path, &limits, None).unwrap_or_else(|_| new_request_id(path));
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
}

fn new_request_id(route: &str) -> String {
    let prefix = id_prefix(route).unwrap_or("req-");
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// The 413 for a body over [`MAX_BODY_BYTES`].
pub(super) fn body_too_large() -> ApiError {
    let mut error = ApiError::bad_body(format!(
        "larger than the {} MiB this endpoint accepts",
        MAX_BODY_BYTES >> 20
    ));
    error.status = StatusCode::PAYLOAD_TOO_LARGE;
    error
}

/// Why a request body could not be read, as the client is told. One that stopped arriving
/// until the connection's idle timeout closed it is a 408 saying so (found from outside: a
/// client that sent less than its `content-length` got a 400 "Failed to buffer the request
/// body: error reading a body from connection" after five silent minutes).
pub(crate) fn body_unread(rejection: BytesRejection) -> ApiError {
    let status = rejection.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return body_too_large();
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&rejection);
    while let Some(error) = source {
        if error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|error| error.kind() == std::io::ErrorKind::TimedOut)
        {
            let mut error = ApiError::bad_body(
                "stopped arriving before its content-length was reached (idle timeout)",
            );
            error.status = StatusCode::REQUEST_TIMEOUT;
            return error;
        }
        source = error.source();
    }
    let mut error = ApiError::bad_body(rejection.body_text());
    error.status = status;
    error
}

fn parse<T: WithSampling>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    wire::parse_body(&read_body(body)?)
}

/// A request body that must hold a JSON object: read whole, and not empty.
pub(crate) fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    let body = body.map_err(body_unread)?;
    if body.is_empty() {
        return Err(ApiError::bad_body("is empty; send a JSON object"));
    }
    Ok(body)
}

/// The request class from `x-switchyard-class`, `None` when absent.
fn class_from_headers(headers: &HeaderMap) -> Result<Option<v1::RequestClass>, ApiError> {
    let Some(value) = headers.get(CLASS_HEADER) else {
        return Ok(None);
    };
    match value.to_str().map(str::trim) {
        Ok("latency-critical") => Ok(Some(v1::RequestClass::LatencyCritical)),
        Ok("cost-sensitive") => Ok(Some(v1::RequestClass::CostSensitive)),
        Ok("auto") => Ok(Some(v1::RequestClass::Auto)),
        _ => Err(ApiError::invalid(
            CLASS_HEADER,
            format!("header value {value:?} is not one of latency-critical, cost-sensitive, auto"),
        )),
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The next frame from the dispatcher.
async fn next_frame(rx: &mut FrameReceiver) -> Result<Frame, ApiError> {
    match rx.recv().await {
        Some(Ok(v1::ServerFrame { frame: Some(frame) })) => Ok(frame),
        Some(Ok(v1::ServerFrame { frame: None })) => Err(ApiError::from_code(
            Code::Internal,
            "dispatcher sent an empty frame",
        )),
        Some(Err(status)) => Err(ApiError::from_status(&status)),
        None => Err(ApiError::from_code(
            Code::Internal,
            "the request ended without a result",
        )),
    }
}

fn failed(failed: &v1::Failed) -> ApiError {
    ApiError::from_failed(failed)
}

async fn generate(call: Call, endpoint: Endpoint, id: String) -> Result<Response, ApiError> {
    let Call {
        dispatcher,
        tenant,
        headers,
        body,
    } = call;
    let cap = dispatcher.limits().max_tokens_cap;
    let tenant_name = tenant.as_ref().map(|t| t.0.clone());
    let (requests, mode, keep) = match endpoint {
        Endpoint::Chat => {
            let request = parse::<ChatCompletionRequest>(body)?;
            // The id minted for it is its store's shape; one the client named is not ours to
            // store under (it could name another's).
            let store_as = (!headers.contains_key(REQUEST_ID_HEADER)).then(|| id.clone());
            let keep =
                super::stored_chat::Keep::asked(&request, &dispatcher, tenant_name, store_as)?;
            let (request, mode) = request.into_proto(cap)?;
            (vec![request], mode, keep)
        }
        Endpoint::Completion => {
            let (requests, mode) = parse::<CompletionRequest>(body)?.into_proto(cap)?;
            (requests, mode, None)
        }
    };
    let (placed, frames) = place(
        &dispatcher,
        tenant,
        &headers,
        requests,
        Choices {
            count: mode.per_prompt,
            max_tokens_field: mode.max_tokens_field,
            affinity_field: mode.affinity_field,
        },
        id,
    )
    .await?;
    let mut frames = match mode.score_only {
        true => choices::score_only(frames),
        false => frames,
    };
    let meta = Meta {
        endpoint,
        // A stored completion's id names the replica that keeps it.
        id: keep
            .as_ref()
            .map_or_else(|| placed.id.clone(), |keep| keep.id.clone()),
        request_id: placed.id,
        created: unix_now(),
        model: placed.model,
        lane: placed.lane,
        pool: placed.pool,
        worker: placed.worker,
    };

    if mode.stream {
        // Hold the headers until the first token (or the end): a request that fails before
        // producing anything — every worker full, say — still gets its proper HTTP status.
        let (index, first) = next_choice_frame(&mut frames).await?;
        if let Frame::Failed(f) = &first {
            return Err(failed(f));
        }
        let frames = match keep {
            Some(keep) => keep.stream_through(meta.clone(), mode, (index, &first), frames),
            None => frames,
        };
        Ok(stream::sse_response(meta, mode, (index, first), frames))
    } else {
        complete(meta, mode, frames, keep).await
    }
}

/// How many generations a request asks for, and the field that bounded their output.
pub(crate) struct Choices {
    /// For each prompt (`n`).
    pub count: u32,
    /// `None` when the client gave no bound and the door's default applies.
    pub max_tokens_field: Option<&'static str>,
    /// The field the affinity key came from, when not `user` (the name the dispatcher's
    /// `affinity_key` goes by otherwise).
    pub affinity_field: &'static str,
}

/// Where a request's generations were placed.
pub(crate) struct Placement {
    pub id: String,
    pub model: String,
    pub lane: String,
    pub pool: String,
    pub worker: String,
}

impl Placement {
    /// Adds the placement's `x-switchyard-*` headers and `x-request-id` to `response`.
    pub(crate) fn tag(&self, response: &mut Response) {
        tag(response, &self.lane, &self.pool, &self.worker, &self.id);
    }
}

/// The next frame of a request of one choice.
pub(crate) async fn next_frame_of_one(frames: &mut ChoiceFrames) -> Result<Frame, ApiError> {
    next_choice_frame(frames).await.map(|(_, frame)| frame)
}

/// [`place`] for a door whose requests are one generation each (no `n`, no batch of prompts);
/// `max_tokens_field` names the client's bound, `None` when it gave none.
pub(crate) async fn place_one(
    dispatcher: &Arc<Dispatcher>,
    tenant: Option<Tenant>,
    headers: &HeaderMap,
    request: v1::GenerateRequest,
    max_tokens_field: Option<&'static str>,
    id: String,
) -> Result<(Placement, ChoiceFrames), ApiError> {
    let choices = Choices {
        count: 1,
        max_tokens_field,
        affinity_field: "",
    };
    place(dispatcher, tenant, headers, vec![request], choices, id).await
}

/// Classifies and places each of `requests` (its class from the headers, its tenant's key)
/// once per choice, the same path as gRPC's, and waits until every choice is placed or one
/// fails. Returns where they run and every choice's frames after its `Accepted`: choice
/// `p · count + i` is choice `i` of `requests[p]`.
pub(crate) async fn place(
    dispatcher: &Arc<Dispatcher>,
    tenant: Option<Tenant>,
    headers: &HeaderMap,
    requests: Vec<v1::GenerateRequest>,
    choices: Choices,
    id: String,
) -> Result<(Placement, ChoiceFrames), ApiError> {
    // The header overrides a class the request's body chose.
    let class = class_from_headers(headers)?;
    let generations = requests.len() * choices.count as usize;
    // Choice `i` of several runs as `<id>-<i>` (ids name one generation each) and, when the
    // client gave a seed, with the seed plus its index among its prompt's choices:
    // reproducible, yet not `n` copies of one answer.
    let parent = RemoteContext::from_headers(headers);
    let mut receivers = Vec::with_capacity(generations);
    let batch = requests.len() > 1;
    for (prompt, mut prompt_request) in requests.into_iter().enumerate() {
        if let Some(class) = class {
            prompt_request.class = class as i32;
        }
        if let Some(tenant) = &tenant {
            tenant.apply(&mut prompt_request);
        }
        for choice in 0..choices.count {
            let mut request = prompt_request.clone();
            request.request_id = match generations {
                1 => id.clone(),
                _ => format!("{id}-{}", receivers.len()),
            };
            if let Some(seed) = request.sampling.as_mut().and_then(|s| s.seed.as_mut()) {
                *seed = seed.wrapping_add(u64::from(choice));
            }
            let prepared = dispatcher
                .prepare(request, parent.clone())
                .await
                .map_err(|error| {
                    let mut error = ApiError::from(&error);
                    if let Some(field) = choices.max_tokens_field {
                        error = error.naming_max_tokens(field);
                    }
                    if !matches!(choices.affinity_field, "" | "user") {
                        let field = choices.affinity_field;
                        error = error.renaming_param(|p| (p == "user").then(|| field.into()));
                    }
                    if batch {
                        // Which prompt of the batch.
                        error = error.renaming_param(|param| {
                            let rest = param.strip_prefix("prompt")?;
                            Some(format!("prompt[{prompt}]{rest}"))
                        });
                    }
                    error
                })?;
            // HTTP has no control frames: cancellation comes from the receiver being dropped
            // (client gone).
            let (_, controls) = mpsc::unbounded_channel();
            receivers.push(dispatcher.drive(prepared, controls, CLIENT_BUFFER));
        }
    }

    // Every choice placed, or the request's error (the others are cancelled as they drop).
    let mut placements = Vec::with_capacity(receivers.len());
    for rx in &mut receivers {
        match next_frame(rx).await? {
            Frame::Accepted(accepted) => placements.push(accepted),
            Frame::Failed(f) => return Err(failed(&f)),
            _ => {
                return Err(ApiError::from_code(
                    Code::Internal,
                    "dispatcher did not accept the request first",
                ));
            }
        }
    }
    let first = &placements[0];
    let placement = Placement {
        id,
        model: first.model.clone(),
        lane: v1::Lane::try_from(first.lane)
            .unwrap_or(v1::Lane::Unspecified)
            .label()
            .to_string(),
        pool: distinct(placements.iter().map(|a| a.pool.as_str())),
        worker: distinct(placements.iter().map(|a| a.worker_id.as_str())),
    };
    Ok((placement, choices::merge(receivers)))
}

/// `values` without repeats, in order, comma-separated: the pools or workers of a request's
/// choices for its headers.
pub(crate) fn distinct<'a>(values: impl Iterator<Item = &'a str>) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for value in values {
        if !seen.contains(&value) {
            seen.push(value);
        }
    }
    seen.join(",")
}

/// The next frame of any choice, with the choice's index.
pub(crate) async fn next_choice_frame(frames: &mut ChoiceFrames) -> Result<(u32, Frame), ApiError> {
    match frames.next().await {
        Some((index, Ok(v1::ServerFrame { frame: Some(frame) }))) => Ok((index, frame)),
        Some((_, Ok(v1::ServerFrame { frame: None }))) => Err(ApiError::from_code(
            Code::Internal,
            "dispatcher sent an empty frame",
        )),
        Some((_, Err(status))) => Err(ApiError::from_status(&status)),
        None => Err(ApiError::from_code(
            Code::Internal,
            "the request ended without a result",
        )),
    }
}

/// One choice of a whole (not streamed) answer, as it is collected.
#[derive(Default)]
struct Collected {
    text: String,
    /// Log probabilities of the tokens whose text came out; a stop sequence's tokens (text
    /// held back, then dropped) are not listed, so the tokens add up to the text.
    token_logprobs: Vec<v1::TokenLogprobs>,
    unsent: Vec<v1::TokenLogprobs>,
    tool_calls: super::tools::CollectedCalls,
    /// The scored prompt (an echoing text completion's).
    prompt: Vec<v1::TokenLogprobs>,
    finished: Option<v1::Finished>,
}

/// A whole answer's assistant message: `content` is null when the model only called tools,
/// as OpenAI's is, and `tool_calls` is there only when it called any.
fn message(text: String, calls: &super::tools::CollectedCalls) -> Value {
    if calls.is_empty() {
        return json!({"role": "assistant", "content": text, "refusal": Value::Null});
    }
    let content = if text.is_empty() {
        Value::Null
    } else {
        Value::from(text)
    };
    json!({
        "role": "assistant",
        "content": content,
        "refusal": Value::Null,
        "tool_calls": calls.to_json(),
    })
}

/// Collects every choice's whole generation into one JSON response.
async fn complete(
    meta: Meta,
    mode: wire::StreamMode,
    mut frames: ChoiceFrames,
    keep: Option<super::stored_chat::Keep>,
) -> Result<Response, ApiError> {
    let mut whole = Whole::new(mode);
    while !whole.ended() {
        let (index, frame) = next_choice_frame(&mut frames).await?;
        if let Frame::Failed(f) = &frame {
            return Err(failed(f));
        }
        whole.push(index, frame);
    }
    let (meta, mut body) = whole.answer(meta);
    if let Some(keep) = keep {
        keep.store(&mut body);
    }
    let mut response = Json(body).into_response();
    meta.decorate(&mut response);
    Ok(response)
}

/// A whole (not streamed) answer, as its choices' frames come.
pub(crate) struct Whole {
    mode: wire::StreamMode,
    collected: Vec<Collected>,
    open: usize,
}

impl Whole {
    pub(crate) fn new(mode: wire::StreamMode) -> Self {
        let collected: Vec<Collected> = (0..mode.choices).map(|_| Collected::default()).collect();
        Self {
            mode,
            open: collected.len(),
            collected,
        }
    }

    /// Whether every choice has finished.
    pub(crate) fn ended(&self) -> bool {
        self.open == 0
    }

    /// Takes in choice `index`'s next frame (a failure is the caller's to answer).
    pub(crate) fn push(&mut self, index: u32, frame: Frame) {
        let Some(choice) = self.collected.get_mut(index as usize) else {
            return;
        };
        match frame {
            Frame::Tokens(tokens) => {
                choice.prompt.extend(tokens.prompt_logprobs);
                choice.unsent.extend(tokens.logprobs);
                choice.tool_calls.push(&tokens.tool_calls);
                if !tokens.text.is_empty() {
                    choice.text.push_str(&tokens.text);
                    let unsent = std::mem::take(&mut choice.unsent);
                    choice.token_logprobs.extend(unsent);
                }
            }
            Frame::Finished(finished) => {
                if choice.finished.replace(finished).is_none() {
                    self.open -= 1;
                }
            }
            // HTTP sends no client frames, so none is rejected.
            Frame::Failed(_) | Frame::Accepted(_) | Frame::Moved(_) | Frame::Rejected(_) => {}
        }
    }

    /// The answer's object, and `meta` naming the workers that finished it.
    pub(crate) fn answer(self, mut meta: Meta) -> (Meta, Value) {
        let Self {
            mode,
            mut collected,
            ..
        } = self;
        let finished: Vec<v1::Finished> = collected
            .iter_mut()
            .map(|c| c.finished.take().unwrap_or_default())
            .collect();
        // The headers name the workers that finished it (others than `Accepted`'s after a
        // failover or a move).
        if finished.iter().all(|f| !f.worker_id.is_empty()) {
            meta.worker = distinct(finished.iter().map(|f| f.worker_id.as_str()));
            meta.pool = distinct(finished.iter().map(|f| f.pool.as_str()));
        }
        let usages: Vec<_> = finished.iter().map(|f| f.usage).collect();
        let usage = choices::usage(&usages, mode.per_prompt);
        let choices: Vec<Value> = collected
            .into_iter()
            .zip(&finished)
            .zip(0u32..)
            .map(|((choice, finished), index)| {
                let end = super::stream::Ending::of(finished);
                let logprobs = match (mode.logprobs, meta.endpoint) {
                    (false, _) => Value::Null,
                    (true, Endpoint::Completion) => {
                        Logprobs::default().completion(&choice.prompt, &choice.token_logprobs)
                    }
                    (true, endpoint) => {
                        Logprobs::default().render(endpoint, &choice.token_logprobs)
                    }
                };
                let mut body = match meta.endpoint {
                    Endpoint::Chat => json!({
                        "index": index,
                        "message": message(choice.text, &choice.tool_calls),
                        "logprobs": logprobs,
                        "finish_reason": end.reason,
                    }),
                    Endpoint::Completion => json!({
                        "index": index,
                        "text": super::logprobs::prompt_text(&choice.prompt) + &choice.text,
                        "logprobs": logprobs,
                        "finish_reason": end.reason,
                    }),
                };
                if let (Some(stop), Value::Object(body)) = (end.stop_sequence, &mut body) {
                    body.insert("stop_reason".into(), Value::from(stop));
                }
                body
            })
            .collect();
        let object = match meta.endpoint {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completion => "text_completion",
        };
        let mut body = json!({
            "id": meta.id,
            "object": object,
            "created": meta.created,
            "model": meta.model,
            "system_fingerprint": Value::Null,
            "choices": choices,
            "usage": usage,
        });
        if meta.endpoint == Endpoint::Chat {
            // The lane it ran in, in OpenAI's words.
            body["service_tier"] = Value::from(wire::service_tier_of(&meta.lane));
        }
        (meta, body)
    }
}

/// Model ids and whether a ready worker serves each.
pub(crate) fn models(dispatcher: &Dispatcher) -> BTreeMap<String, usize> {
    let mut models = BTreeMap::new();
    for worker in dispatcher.links.states() {
        for model in &worker.models {
            *models.entry(model.clone()).or_default() += usize::from(worker.available);
        }
    }
    models
}

/// A model as OpenAI lists it, with how many ready workers serve it and, as vLLM's do, how
/// many tokens a sequence may hold (`max_model_len`, when the router has the model's
/// tokenizer: its workers said).
fn model_object(dispatcher: &Dispatcher, id: &str, ready_workers: usize) -> Value {
    let mut model = json!({
        "id": id,
        "object": "model",
        "created": 0,
        "owned_by": "switchyard",
        "ready_workers": ready_workers,
    });
    if let Some(length) = dispatcher.links.tokenizers().context_length(id) {
        model["max_model_len"] = json!(length);
    }
    model
}

pub async fn list_models(State(dispatcher): State<Arc<Dispatcher>>) -> Response {
    let data: Vec<Value> = models(&dispatcher)
        .iter()
        .map(|(id, ready)| model_object(&dispatcher, id, *ready))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

pub async fn get_model(
    State(dispatcher): State<Arc<Dispatcher>>,
    Path(model): Path<String>,
) -> Response {
    match models(&dispatcher).get(&model) {
        Some(ready) => Json(model_object(&dispatcher, &model, *ready)).into_response(),
        None => ApiError::not_found(
            Some("model"),
            format!("model: {model:?} is not served by any worker"),
        )
        .into_response(),
    }
}

pub async fn health(State(dispatcher): State<Arc<Dispatcher>>) -> Response {
    let states = dispatcher.links.states();
    let ready = states.iter().filter(|w| w.available).count();
    let workers = json!({"ready": ready, "known": states.len()});
    match dispatcher.readiness.reason() {
        // Started, but the cluster registry has not answered yet: not routable.
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "starting", "reason": reason, "workers": workers})),
        )
            .into_response(),
        None => (
            StatusCode::OK,
            Json(json!({"status": "ok", "workers": workers})),
        )
            .into_response(),
    }
}

/// A known route asked with the wrong method: 405 in OpenAI's shape, with `allow` (and the
/// request id on the generation endpoints, as on their every answer).
pub async fn wrong_method(
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let allowed = allowed_methods(uri.path());
    let error = ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("{method} is not allowed on {}: use {allowed}", uri.path()),
        kind: "invalid_request_error",
        param: None,
        code: None,
        retry_after_secs: None,
    };
    let mut response = refusal(&error, &headers, uri.path());
    response
        .headers_mut()
        .insert(axum::http::header::ALLOW, HeaderValue::from_static(allowed));
    response
}

/// The methods a route answers (GET routes answer HEAD too), as an `Allow` header lists them.
fn allowed_methods(path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(2).collect();
    match segments.as_slice() {
        ["models", ..] => "GET, HEAD",
        ["chat", "completions"] | ["conversations", _, "items"] | ["files"] | ["batches"] => {
            "GET, HEAD, POST"
        }
        ["chat", "completions", _] | ["conversations", _] => "GET, HEAD, POST, DELETE",
        ["chat", "completions", _, "messages"]
        | ["responses", _, "input_items"]
        | ["files", _, "content"]
        | ["batches", _] => "GET, HEAD",
        ["responses", _] | ["conversations", _, "items", _] | ["files", _] => "GET, HEAD, DELETE",
        _ if ["/health", "/metrics"].contains(&path) => "GET, HEAD",
        _ => "POST",
    }
}

pub async fn unknown_route(uri: axum::http::Uri) -> Response {
    ApiError::not_found(None, unknown_route_message(uri.path())).into_response()
}

/// What a client that called a path the router does not serve can do instead: the stored
/// responses' endpoints there are, or every endpoint.
fn unknown_route_message(path: &str) -> String {
    if path.starts_with(RESPONSES_ROUTE) {
        return format!(
            "no such endpoint: {path}: a stored response is read at GET \
             {RESPONSES_ROUTE}/{{id}} and GET {RESPONSES_ROUTE}/{{id}}/input_items, deleted at \
             DELETE {RESPONSES_ROUTE}/{{id}}, and a background one cancelled at POST \
             {RESPONSES_ROUTE}/{{id}}/cancel; responses are not listed"
        );
    }
    if path.starts_with(CHAT_ROUTE) {
        return format!(
            "no such endpoint: {path}: stored chat completions (store: true) are listed at GET \
             {CHAT_ROUTE}, read at GET {CHAT_ROUTE}/{{id}} and GET {CHAT_ROUTE}/{{id}}/messages, \
             their metadata replaced at POST {CHAT_ROUTE}/{{id}}, deleted at DELETE \
             {CHAT_ROUTE}/{{id}}"
        );
    }
    let embeddings = super::embeddings::EMBEDDINGS_ROUTE;
    format!(
        "no such endpoint: {path}; this router serves POST {CHAT_ROUTE}, {COMPLETIONS_ROUTE}, \
         {RESPONSES_ROUTE}, {embeddings}, {MESSAGES_ROUTE}, {COUNT_TOKENS_ROUTE}, {TOKENIZE_ROUTE}, \
         {DETOKENIZE_ROUTE}, the Files and Batches APIs (/v1/files, /v1/batches) and GET \
         /v1/models, /health, /metrics"
    )
}

#[cfg(test)]
mod allowed_tests {
    use super::allowed_methods;

    #[test]
    fn a_wrong_method_is_told_the_routes_methods() {
        for (path, allowed) in [
            ("/v1/chat/completions", "GET, HEAD, POST"),
            ("/v1/chat/completions/chatcmpl-1", "GET, HEAD, POST, DELETE"),
            ("/v1/chat/completions/chatcmpl-1/messages", "GET, HEAD"),
            ("/v1/completions", "POST"),
            ("/v1/responses", "POST"),
            ("/v1/responses/resp_1", "GET, HEAD, DELETE"),
            ("/v1/responses/resp_1/cancel", "POST"),
            ("/v1/conversations/conv_1/items/msg_1", "GET, HEAD, DELETE"),
            ("/v1/models/org/name", "GET, HEAD"),
            ("/v1/files", "GET, HEAD, POST"),
            ("/v1/files/file-1", "GET, HEAD, DELETE"),
            ("/v1/files/file-1/content", "GET, HEAD"),
            ("/v1/batches", "GET, HEAD, POST"),
            ("/v1/batches/batch_1", "GET, HEAD"),
            ("/v1/batches/batch_1/cancel", "POST"),
            ("/metrics", "GET, HEAD"),
        ] {
            assert_eq!(allowed_methods(path), allowed, "{path}");
        }
    }
}
