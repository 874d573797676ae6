//! Runs a batch: reads its input, sends each request through the router's own HTTP API (the
//! same handlers, checks and answers a client gets) in the cost-sensitive lane, a bounded
//! number at a time, and writes the answers in input order: those that succeeded to the
//! output file, the others to the error file.
//!
//! A request refused for want of room (429 Too Many Requests; 503 Service Unavailable: a full
//! queue, no worker reachable; 404 for a model whose workers are all gone for now) is not an
//! answer: it waits and is tried again, with backoff, until the completion window closes. A
//! cancel (or the window closing) stops what runs and writes what has been answered; the
//! requests not answered go to the error file, saying why. When the router stops, the requests
//! running are let end and the batch stays as it is, for the replica it is handed to.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::ServiceExt as _;

use super::input::{self, Line};
use super::{Answer, Batch, Status, Usage};
use crate::auth::Tenant;
use crate::dispatch::Dispatcher;

/// First wait before trying a refused request again; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Largest answer a batch request may have (a whole answer is kept in the output file).
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// One request's line of the output or error file.
#[derive(Debug)]
struct Outcome {
    succeeded: bool,
    line: String,
    usage: Usage,
}

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Done,
    Cancelled,
    Expired,
    /// The router is stopping: the requests running were let end, the others are left for the
    /// replica the batch is handed to.
    Stopping,
}

/// Runs `batch` on this replica: from its start, or (handed over by a stopping replica) from
/// where it got to.
pub fn start(dispatcher: Arc<Dispatcher>, batch: Arc<Batch>) {
    let runs = dispatcher.batches.runs.clone();
    runs.spawn(async move {
        run(&dispatcher, &batch).await;
        dispatcher.batches.changed(&batch);
    });
}

async fn run(dispatcher: &Arc<Dispatcher>, batch: &Arc<Batch>) {
    let elapsed = super::unix_now().saturating_sub(batch.created_at);
    let deadline = Instant::now() + batch.window.saturating_sub(Duration::from_secs(elapsed));
    let status = batch.status();
    if status.ended() {
        return;
    }
    let Some(lines) = read(dispatcher, batch, status == Status::Validating).await else {
        return;
    };
    if status == Status::Validating {
        batch.progress.lock().expect("batch progress").total = lines.len();
        batch.reach(Status::InProgress);
        dispatcher.batches.changed(batch);
    }
    let ending = send_all(dispatcher, batch, &lines, deadline).await;
    if ending == Ending::Stopping {
        tracing::info!(
            batch = %batch.id,
            answered = batch.answers.lock().expect("batch answers").len(),
            total = lines.len(),
            "router stopping with a batch running: it goes on where it is handed over"
        );
        return;
    }
    finish(dispatcher, batch, &lines, ending);
}

/// The batch's requests. A new batch's input is checked (a bad one fails the batch, `None`),
/// the models it names too; one handed over was checked where it began.
async fn read(dispatcher: &Dispatcher, batch: &Batch, new: bool) -> Option<Vec<Line>> {
    let (input, endpoint) = (batch.input.clone(), batch.endpoint.clone());
    let max_requests = match new {
        true => dispatcher.batches.limits().max_requests,
        false => usize::MAX,
    };
    let served = crate::openai::handlers::models(dispatcher);
    let read = tokio::task::spawn_blocking(move || {
        let served = |model: &str| !new || served.contains_key(model);
        input::read(&input, &endpoint, max_requests, &served)
    })
    .await;
    let errors = match read {
        Ok(Ok(lines)) => return Some(lines),
        Ok(Err(errors)) => errors,
        Err(panicked) => {
            tracing::error!(batch = %batch.id, %panicked, "reading a batch's input failed");
            let message = "reading the input file failed inside the router; see its log";
            vec![json!({"code": "internal_error", "message": message})]
        }
    };
    batch.progress.lock().expect("batch progress").errors = errors;
    batch.reach(Status::Failed);
    None
}

/// Sends the requests of `lines` not yet answered until all are, or the batch is cancelled
/// or expires, or the router stops (then the requests running are let end); each answer lands
/// in the batch's answers at its line's place.
async fn send_all(
    dispatcher: &Arc<Dispatcher>,
    batch: &Arc<Batch>,
    lines: &[Line],
    deadline: Instant,
) -> Ending {
    let door = crate::openai::door(dispatcher.clone());
    let slots = dispatcher.batches.slots.clone();
    let pending: Vec<usize> = {
        let answers = batch.answers.lock().expect("batch answers");
        (0..lines.len())
            .filter(|i| !answers.contains_key(i))
            .collect()
    };
    let mut running = FuturesUnordered::new();
    let (mut next, mut stopping) = (0, false);
    loop {
        if running.is_empty() {
            if next == pending.len() {
                return Ending::Done;
            }
            if stopping {
                return Ending::Stopping;
            }
        }
        tokio::select! {
            biased;
            _ = batch.cancel.cancelled() => return Ending::Cancelled,
            _ = tokio::time::sleep_until(deadline) => return Ending::Expired,
            _ = dispatcher.stopping.cancelled(), if !stopping => stopping = true,
            Some((index, outcome)) = running.next(), if !running.is_empty() => {
                let outcome: Option<Outcome> = outcome;
                if let Some(outcome) = outcome {
                    record(batch, index, outcome);
                    dispatcher.batches.answered(batch, index);
                }
            }
            slot = slots.clone().acquire_owned(), if next < pending.len() && !stopping => {
                let slot = slot.expect("the batch slots are never closed");
                let index = pending[next];
                let (door, line) = (door.clone(), lines[index].clone());
                let (endpoint, tenant) = (batch.endpoint.clone(), batch.tenant.clone());
                let (stopping, metrics) = (dispatcher.stopping.clone(), dispatcher.metrics.clone());
                running.push(async move {
                    let outcome = send(door, &endpoint, tenant, &line, stopping, &metrics).await;
                    drop(slot);
                    (index, outcome)
                });
                next += 1;
            }
        }
    }
}

fn record(batch: &Batch, index: usize, outcome: Outcome) {
    let mut progress = batch.progress.lock().expect("batch progress");
    if outcome.succeeded {
        progress.completed += 1;
    } else {
        progress.failed += 1;
    }
    add_usage(&mut progress.usage, outcome.usage);
    let answer = Answer {
        succeeded: outcome.succeeded,
        line: outcome.line,
    };
    batch
        .answers
        .lock()
        .expect("batch answers")
        .insert(index, answer);
}

/// Sends one request until it is answered (a refusal for want of room is tried again);
/// `None` when the router began to stop before it was.
async fn send(
    door: axum::Router,
    endpoint: &str,
    tenant: Option<String>,
    line: &Line,
    stopping: tokio_util::sync::CancellationToken,
    metrics: &crate::metrics::RouterMetrics,
) -> Option<Outcome> {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let mut request = Request::post(endpoint)
            .header(header::CONTENT_TYPE, "application/json")
            .header(crate::openai::handlers::CLASS_HEADER, "cost-sensitive")
            .body(Body::from(line.body.clone()))
            .expect("a valid request");
        if let Some(tenant) = &tenant {
            request.extensions_mut().insert(Tenant(tenant.clone()));
        }
        let response = match door.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let status = response.status();
        let request_id = response
            .headers()
            .get(crate::openai::handlers::REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = match axum::body::to_bytes(response.into_body(), MAX_ANSWER_BYTES).await {
            Ok(body) => serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(&body).into_owned())),
            Err(error) => {
                json!({"error": {"message": format!("the answer could not be read: {error}")}})
            }
        };
        if waits_for_room(status, &body) {
            metrics.batch_request("waited");
            if stopping.is_cancelled() {
                return None;
            }
            let jitter = 0.5 + fastrand::f64() / 2.0;
            tokio::select! {
                _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                _ = stopping.cancelled() => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        let outcome = answered(&line.custom_id, status, request_id, body);
        metrics.batch_request(if outcome.succeeded {
            "completed"
        } else {
            "failed"
        });
        return Some(outcome);
    }
}

/// Whether an answer is a refusal for want of room that a batch waits out: too many requests
/// (429), no worker free or reachable (503), or no worker of the model at all (404 naming the
/// model: the batch checked it was served when it started, so its workers are away, not gone
/// for good).
fn waits_for_room(status: StatusCode, body: &Value) -> bool {
    match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => true,
        StatusCode::NOT_FOUND => body["error"]["param"] == "model",
        _ => false,
    }
}

/// The outcome of a request the endpoint answered with `status` and `body`.
fn answered(
    custom_id: &str,
    status: StatusCode,
    request_id: Option<String>,
    body: Value,
) -> Outcome {
    let succeeded = status.is_success();
    let usage = if succeeded {
        usage_of(&body)
    } else {
        Usage::default()
    };
    let error = if succeeded {
        Value::Null
    } else {
        let error = &body["error"];
        let code = error["code"]
            .as_str()
            .or(error["type"].as_str())
            .unwrap_or("request_failed");
        json!({"code": code, "message": error["message"].as_str().unwrap_or("the request failed")})
    };
    let line = json!({
        "id": request_line_id(),
        "custom_id": custom_id,
        "response": {"status_code": status.as_u16(), "request_id": request_id, "body": body},
        "error": error,
    });
    Outcome {
        succeeded,
        line: line.to_string(),
        usage,
    }
}

/// The line of a request the batch ended before it was answered.
fn unanswered(custom_id: &str, ending: Ending) -> String {
    let (code, message) = match ending {
        Ending::Expired => (
            "batch_expired",
            "the batch's completion window closed before this request was answered",
        ),
        _ => (
            "batch_cancelled",
            "the batch was cancelled before this request was answered",
        ),
    };
    json!({
        "id": request_line_id(),
        "custom_id": custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    })
    .to_string()
}

fn request_line_id() -> String {
    format!("batch_req_{}", uuid::Uuid::now_v7().simple())
}

/// Tokens an answer says it used (Chat Completions' and Completions' names, or Responses').
fn usage_of(body: &Value) -> Usage {
    let usage = &body["usage"];
    let count = |names: [&str; 2]| {
        names
            .iter()
            .find_map(|name| usage[*name].as_u64())
            .unwrap_or_default()
    };
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .or(usage["input_tokens_details"]["cached_tokens"].as_u64())
        .unwrap_or_default();
    Usage {
        input_tokens: count(["prompt_tokens", "input_tokens"]),
        cached_tokens: cached,
        output_tokens: count(["completion_tokens", "output_tokens"]),
    }
}

/// Sets `progress`'s counts and usage to what `answers` hold: a batch received from another
/// replica's mirror may have been sent answers after its counts last were.
pub(super) fn recount(
    progress: &mut super::Progress,
    answers: &std::collections::BTreeMap<usize, Answer>,
) {
    let (mut completed, mut usage) = (0, Usage::default());
    for answer in answers.values().filter(|a| a.succeeded) {
        completed += 1;
        let line: Value = serde_json::from_str(&answer.line).unwrap_or_default();
        add_usage(&mut usage, usage_of(&line["response"]["body"]));
    }
    progress.completed = completed;
    progress.failed = answers.len() - completed;
    progress.usage = usage;
}

fn add_usage(total: &mut Usage, more: Usage) {
    total.input_tokens += more.input_tokens;
    total.cached_tokens += more.cached_tokens;
    total.output_tokens += more.output_tokens;
}

/// Writes the output and error files of a run that ended with `ending`, and its last status.
fn finish(dispatcher: &Dispatcher, batch: &Batch, lines: &[Line], ending: Ending) {
    if ending == Ending::Done {
        batch.reach(Status::Finalizing);
    }
    let (mut output, mut errors) = (String::new(), String::new());
    let mut unanswered_count = 0;
    {
        let answers = batch.answers.lock().expect("batch answers");
        for (index, line) in lines.iter().enumerate() {
            let (file, text) = match answers.get(&index) {
                Some(answer) if answer.succeeded => (&mut output, answer.line.clone()),
                Some(answer) => (&mut errors, answer.line.clone()),
                None => {
                    unanswered_count += 1;
                    (&mut errors, unanswered(&line.custom_id, ending))
                }
            };
            file.push_str(&text);
            file.push('\n');
        }
    }
    let store = &dispatcher.batches;
    let write = |text: String, kind: &str| {
        (!text.is_empty()).then(|| {
            let name = format!("{}_{kind}.jsonl", batch.id);
            store
                .write_output(batch.tenant.clone(), name, Bytes::from(text))
                .id
                .clone()
        })
    };
    let (output_file_id, error_file_id) = (write(output, "output"), write(errors, "error"));
    {
        let mut progress = batch.progress.lock().expect("batch progress");
        progress.failed += unanswered_count;
        progress.output_file_id = output_file_id;
        progress.error_file_id = error_file_id;
    }
    batch.reach(match ending {
        Ending::Done => Status::Completed,
        Ending::Expired => Status::Expired,
        Ending::Cancelled | Ending::Stopping => Status::Cancelled,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_an_output_line_or_an_error_line_with_the_reason() {
        let body = json!({"id": "chatcmpl-1", "usage": {"prompt_tokens": 7, "completion_tokens": 3,
                          "prompt_tokens_details": {"cached_tokens": 4}}});
        let ok = answered("a", StatusCode::OK, Some("req-1".into()), body.clone());
        assert!(ok.succeeded);
        assert_eq!(
            ok.usage,
            Usage {
                input_tokens: 7,
                cached_tokens: 4,
                output_tokens: 3
            }
        );
        let line: Value = serde_json::from_str(&ok.line).unwrap();
        assert_eq!(line["custom_id"], "a");
        assert_eq!(line["response"]["status_code"], 200);
        assert_eq!(line["response"]["request_id"], "req-1");
        assert_eq!(line["response"]["body"], body);
        assert_eq!(line["error"], Value::Null);
        assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));

        let refusal = json!({"error": {"message": "max_tokens is -1", "type": "invalid_request_error",
                             "param": "max_tokens", "code": null}});
        let bad = answered("b", StatusCode::BAD_REQUEST, None, refusal);
        assert!(!bad.succeeded);
        assert_eq!(bad.usage, Usage::default());
        let line: Value = serde_json::from_str(&bad.line).unwrap();
        assert_eq!(line["response"]["status_code"], 400);
        assert_eq!(line["error"]["code"], "invalid_request_error");
        assert_eq!(line["error"]["message"], "max_tokens is -1");
    }

    #[test]
    fn refusals_for_want_of_room_are_waited_out_and_others_are_answers() {
        let model_gone = json!({"error": {"param": "model", "message": "not served"}});
        let no_route = json!({"error": {"param": null, "message": "no such endpoint"}});
        assert!(waits_for_room(StatusCode::TOO_MANY_REQUESTS, &Value::Null));
        assert!(waits_for_room(
            StatusCode::SERVICE_UNAVAILABLE,
            &Value::Null
        ));
        assert!(waits_for_room(StatusCode::NOT_FOUND, &model_gone));
        assert!(!waits_for_room(StatusCode::NOT_FOUND, &no_route));
        assert!(!waits_for_room(StatusCode::BAD_REQUEST, &model_gone));
        assert!(!waits_for_room(StatusCode::OK, &Value::Null));
    }

    #[test]
    fn counts_are_what_the_answers_hold() {
        let ok = answered(
            "a",
            StatusCode::OK,
            None,
            json!({"usage": {"prompt_tokens": 3, "completion_tokens": 2}}),
        );
        let bad = answered(
            "b",
            StatusCode::BAD_REQUEST,
            None,
            json!({"error": {"message": "no"}}),
        );
        let answers = [ok, bad]
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                (
                    i,
                    Answer {
                        succeeded: o.succeeded,
                        line: o.line,
                    },
                )
            })
            .collect();
        let mut progress = super::super::Progress::new();
        progress.completed = 7;
        recount(&mut progress, &answers);
        assert_eq!((progress.completed, progress.failed), (1, 1));
        assert_eq!(
            progress.usage,
            Usage {
                input_tokens: 3,
                cached_tokens: 0,
                output_tokens: 2
            }
        );
    }

    #[test]
    fn responses_usage_counts_too() {
        let body = json!({"usage": {"input_tokens": 5, "output_tokens": 2,
                          "input_tokens_details": {"cached_tokens": 1}}});
        assert_eq!(
            usage_of(&body),
            Usage {
                input_tokens: 5,
                cached_tokens: 1,
                output_tokens: 2
            }
        );
    }

    #[test]
    fn an_unanswered_request_says_why() {
        let expired: Value = serde_json::from_str(&unanswered("x", Ending::Expired)).unwrap();
        assert_eq!(expired["error"]["code"], "batch_expired");
        assert_eq!(expired["response"], Value::Null);
        let cancelled: Value = serde_json::from_str(&unanswered("x", Ending::Cancelled)).unwrap();
        assert_eq!(cancelled["error"]["code"], "batch_cancelled");
    }
}
