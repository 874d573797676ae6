//! The gateway engine against a real TCP upstream that misbehaves on purpose: HTTP errors,
//! malformed SSE, a stream cut off midway, silence, and a well-behaved stream split at awkward
//! byte boundaries. Every case must end with a clean event, never a hang. Tool calls pass
//! through both ways: the request in OpenAI's shape, streamed call pieces back as events.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use switchyard_proto::v1;
use switchyard_worker::{Engine, StopReason, Tools};
use switchyard_worker::{EngineError, EngineEvent, EngineRequest, Message, Prompt, Sampling};
use switchyard_worker_wse::{ApiKey, GatewayConfig, GatewayEngine};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// What the scripted upstream does after reading one request.
enum Script {
    /// Write these pieces (flushed one by one) and close the connection.
    Send(Vec<Vec<u8>>),
    /// Write these pieces, then keep the connection open and silent.
    SendAndHang(Vec<Vec<u8>>),
    /// Write these pieces this far apart (a slow but steady upstream) and close.
    SendSpaced(Vec<Vec<u8>>, Duration),
}

/// Serves one connection with `script`; the request it saw goes to the returned receiver.
async fn upstream(script: Script) -> (SocketAddr, oneshot::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (seen_tx, seen_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        // Read the head and the body (its length from content-length).
        loop {
            let n = socket.read(&mut buf).await.expect("read");
            if n == 0 {
                return;
            }
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request).to_string();
            if let Some(head_end) = text.find("\r\n\r\n") {
                let length = text[..head_end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().expect("length"))
                    })
                    .unwrap_or(0);
                if request.len() >= head_end + 4 + length {
                    let _ = seen_tx.send(text);
                    break;
                }
            }
        }
        let (pieces, hang, gap) = match script {
            Script::Send(p) => (p, false, Duration::ZERO),
            Script::SendAndHang(p) => (p, true, Duration::ZERO),
            Script::SendSpaced(p, gap) => (p, false, gap),
        };
        for piece in pieces {
            if socket.write_all(&piece).await.is_err() {
                return;
            }
            let _ = socket.flush().await;
            tokio::task::yield_now().await;
            // The upstream's pace, not synchronisation: the client must not wait for it.
            tokio::time::sleep(gap).await;
        }
        if hang {
            // Hold the connection until the client drops it.
            let _ = socket.read(&mut buf).await;
        }
    });
    (addr, seen_rx)
}

fn sse_head() -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n".to_vec()
}

fn engine(addr: SocketAddr, chunk_timeout: Duration) -> GatewayEngine {
    GatewayEngine::new(GatewayConfig {
        base_url: format!("http://{addr}/v1"),
        models: vec![("fast".into(), "wafer-model".into())],
        api_key: Some(ApiKey::new("sk-test-key").expect("key")),
        max_concurrent: 2,
        connect_timeout: Duration::from_secs(2),
        chunk_timeout,
        tokens_per_s: 1000.0,
    })
    .expect("engine")
}

fn chat_request() -> EngineRequest {
    EngineRequest {
        request_id: "r1".into(),
        model: "fast".into(),
        prompt: Prompt::Chat(vec![Message {
            role: "user".into(),
            content: "hello wafer".into(),
            ..Default::default()
        }]),
        sampling: Sampling {
            max_tokens: 8,
            seed: Some(3),
            ..Default::default()
        },
        resume_tokens: vec![],
        latency_critical: false,
        min_tokens_per_s: 0.0,
        prompt_ids: None,
        tools: Default::default(),
        embed: false,
    }
}

/// Every event of a generation, within 10 s.
async fn events(engine: &GatewayEngine) -> Vec<Result<EngineEvent, EngineError>> {
    events_of(engine, chat_request()).await
}

/// Every event of `request`'s generation, within 10 s.
async fn events_of(
    engine: &GatewayEngine,
    request: EngineRequest,
) -> Vec<Result<EngineEvent, EngineError>> {
    let mut rx = engine
        .submit(request, CancellationToken::new())
        .expect("admitted");
    let mut out = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the generation ended in time")
    {
        out.push(event);
    }
    out
}

fn texts(events: &[Result<EngineEvent, EngineError>]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Ok(EngineEvent::Token { text, .. }) => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_good_stream_split_anywhere_becomes_tokens_and_usage() {
    let body = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        ": comment\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo \u{e9}\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n"
    )
    .as_bytes();
    // Split inside "\r\n", inside the two bytes of "é", and every 7 bytes after it.
    let crlf = body.iter().position(|&b| b == b'\r').expect("crlf") + 1;
    let e_acute = body.iter().position(|&b| b == 0xc3).expect("é") + 1;
    let mut pieces = vec![
        sse_head(),
        body[..crlf].to_vec(),
        body[crlf..e_acute].to_vec(),
    ];
    pieces.extend(body[e_acute..].chunks(7).map(<[u8]>::to_vec));
    let (addr, seen) = upstream(Script::Send(pieces)).await;
    let events = events(&engine(addr, Duration::from_secs(5))).await;
    assert_eq!(texts(&events), "Hello \u{e9}");
    assert_eq!(
        events.last(),
        Some(&Ok(EngineEvent::Done {
            reason: StopReason::Length,
            prompt_tokens: 11,
            completion_tokens: 2,
            cached_prompt_tokens: 0,
        }))
    );
    let request = seen.await.expect("request seen");
    assert!(
        request.starts_with("POST /v1/chat/completions HTTP/1.1"),
        "{request}"
    );
    assert!(
        request
            .to_ascii_lowercase()
            .contains("authorization: bearer sk-test-key")
    );
    assert!(request.contains("\"model\":\"wafer-model\""), "{request}");
    assert!(request.contains("\"stream\":true"), "{request}");
    assert!(request.contains("\"seed\":3"), "{request}");
}

#[tokio::test]
async fn http_5xx_is_unavailable_with_the_upstream_message() {
    let body = r#"{"error":{"message":"wafer on fire","type":"server_error"}}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let (addr, _) = upstream(Script::Send(vec![response.into_bytes()])).await;
    let events = events(&engine(addr, Duration::from_secs(5))).await;
    match &events[..] {
        [Err(EngineError::Unavailable(m))] => {
            assert!(m.contains("503") && m.contains("wafer on fire"), "{m}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// A JSON error response with `status` and `body`.
fn json_error(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A context overflow, in each form common OpenAI-compatible servers send it, is the
/// client's to fix (`INVALID_ARGUMENT` naming the prompt's field and the reason), not a fault
/// to fail over from; any other 400 stays one.
#[tokio::test]
async fn a_context_overflow_from_the_upstream_names_the_prompt() {
    let overflows = [
        // OpenAI, Cerebras.
        r#"{"error":{"message":"This model's maximum context length is 8192 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
        // llama.cpp's llama-server.
        r#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error","n_prompt_tokens":9000,"n_ctx":8192}}"#,
        // vLLM (older servers put the error at the top level).
        r#"{"object":"error","message":"This model's maximum context length is 2048 tokens. However, you requested 3000 tokens.","type":"BadRequestError","param":null,"code":400}"#,
        // SGLang.
        r#"{"object":"error","message":"The input (9000 tokens) is longer than the model's context length (8192 tokens).","type":"BadRequestError","code":400}"#,
    ];
    for body in overflows {
        let (addr, _) = upstream(Script::Send(vec![json_error("400 Bad Request", body)])).await;
        let events = events(&engine(addr, Duration::from_secs(5))).await;
        match &events[..] {
            [Err(error @ EngineError::ExceedsContext { field, detail })] => {
                assert_eq!(field, "messages", "{body}");
                assert!(detail.contains("400"), "{detail}");
                assert_eq!(
                    error.reason(),
                    Some(switchyard_proto::CONTEXT_LENGTH_EXCEEDED)
                );
            }
            other => panic!("{body}: expected ExceedsContext, got {other:?}"),
        }
    }
    let other =
        r#"{"error":{"message":"unknown parameter: top_k","type":"invalid_request_error"}}"#;
    let (addr, _) = upstream(Script::Send(vec![json_error("400 Bad Request", other)])).await;
    let events = events(&engine(addr, Duration::from_secs(5))).await;
    assert!(
        matches!(&events[..], [Err(EngineError::Unavailable(m))] if m.contains("top_k")),
        "{events:?}"
    );
}

#[tokio::test]
async fn http_429_is_resource_exhausted() {
    let response =
        "HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    let (addr, _) = upstream(Script::Send(vec![response.as_bytes().to_vec()])).await;
    let events = events(&engine(addr, Duration::from_secs(5))).await;
    assert!(
        matches!(&events[..], [Err(EngineError::ResourceExhausted(_))]),
        "{events:?}"
    );
}

#[tokio::test]
async fn malformed_sse_after_a_token_is_a_clean_internal_error() {
    let pieces = vec![
        sse_head(),
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"}}]}\n\n".to_vec(),
        b"data: {not json at all\n\n".to_vec(),
    ];
    let (addr, _) = upstream(Script::SendAndHang(pieces)).await;
    let events = events(&engine(addr, Duration::from_secs(5))).await;
    assert_eq!(texts(&events), "ok");
    match events.last() {
        Some(Err(EngineError::Internal(m))) => assert!(m.contains("malformed chunk"), "{m}"),
        other => panic!("expected Internal, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_utf8_in_the_stream_is_malformed() {
    let pieces = vec![sse_head(), b"data: \xff\xfe\n\n".to_vec()];
    let (addr, _) = upstream(Script::SendAndHang(pieces)).await;
    let events = events(&engine(addr, Duration::from_secs(5))).await;
    match &events[..] {
        [Err(EngineError::Unavailable(m))] => assert!(m.contains("not valid UTF-8"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn a_stream_cut_off_before_done_fails() {
    let pieces = vec![
        sse_head(),
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"par\"}}]}\n\n".to_vec(),
        b"data: {\"choi".to_vec(),
    ];
    let (addr, _) = upstream(Script::Send(pieces)).await;
    let events = events(&engine(addr, Duration::from_secs(5))).await;
    assert_eq!(texts(&events), "par");
    match events.last() {
        Some(Err(EngineError::Internal(m))) => assert!(m.contains("before it finished"), "{m}"),
        other => panic!("expected Internal, got {other:?}"),
    }
}

#[tokio::test]
async fn silence_hits_the_chunk_timeout() {
    let (addr, _) = upstream(Script::SendAndHang(vec![sse_head()])).await;
    let events = events(&engine(addr, Duration::from_millis(300))).await;
    match &events[..] {
        [Err(EngineError::Unavailable(m))] => assert!(m.contains("sent nothing"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// An SSE content chunk.
fn token_chunk(text: &str) -> Vec<u8> {
    format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n")
        .into_bytes()
}

#[tokio::test]
async fn silence_after_tokens_hits_the_chunk_timeout_too() {
    let pieces = vec![sse_head(), token_chunk("a"), token_chunk("b")];
    let (addr, _) = upstream(Script::SendAndHang(pieces)).await;
    let events = events(&engine(addr, Duration::from_millis(300))).await;
    assert_eq!(texts(&events), "ab");
    match events.last() {
        Some(Err(EngineError::Internal(m))) => assert!(m.contains("sent nothing"), "{m}"),
        other => panic!("expected Internal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_slow_steady_stream_outlasting_the_chunk_timeout_completes() {
    // Six chunks 150 ms apart: the stream takes three times the 300 ms timeout, no gap does.
    let mut pieces = vec![sse_head()];
    pieces.extend(["a", "b", "c", "d"].map(token_chunk));
    pieces.push(
        b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n".to_vec(),
    );
    pieces.push(b"data: [DONE]\n\n".to_vec());
    let (addr, _) = upstream(Script::SendSpaced(pieces, Duration::from_millis(150))).await;
    let events = events(&engine(addr, Duration::from_millis(300))).await;
    assert_eq!(texts(&events), "abcd");
    assert!(
        matches!(
            events.last(),
            Some(Ok(EngineEvent::Done {
                reason: StopReason::Stop,
                ..
            }))
        ),
        "{events:?}"
    );
}

#[tokio::test]
async fn cancel_ends_at_once_and_frees_the_slot() {
    let pieces = vec![
        sse_head(),
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"first\"}}]}\n\n".to_vec(),
    ];
    let (addr, _) = upstream(Script::SendAndHang(pieces)).await;
    let engine = engine(addr, Duration::from_secs(30));
    let cancel = CancellationToken::new();
    let mut rx = engine
        .submit(chat_request(), cancel.clone())
        .expect("admitted");
    let first = rx.recv().await.expect("an event");
    assert!(matches!(first, Ok(EngineEvent::Token { .. })), "{first:?}");
    assert_eq!(engine.active(), 1);
    cancel.cancel();
    let last = tokio::time::timeout(Duration::from_secs(2), rx.recv())
        .await
        .expect("cancel is prompt");
    assert!(
        matches!(
            last,
            Some(Ok(EngineEvent::Done {
                reason: StopReason::Cancelled,
                ..
            }))
        ),
        "{last:?}"
    );
    assert_eq!(engine.active(), 0);
}

#[tokio::test]
async fn load_counts_prompts_until_their_first_token_and_measures_the_prefill_rate() {
    // An upstream that answers the head and then thinks forever: the prompt stays unprefilled.
    let (addr, _seen) = upstream(Script::SendAndHang(vec![sse_head()])).await;
    let slow = engine(addr, Duration::from_secs(30));
    assert_eq!(slow.load().queued_prompt_tokens, 0);
    let cancel = CancellationToken::new();
    let mut rx = slow
        .submit(chat_request(), cancel.clone())
        .expect("admitted");
    // "hello wafer" (11 bytes) + 4 bytes of message framing, at 4 bytes a token.
    assert_eq!(slow.load().queued_prompt_tokens, 4);
    assert_eq!(
        slow.load().prefill_tokens_per_s,
        0.0,
        "nothing measured yet"
    );
    cancel.cancel();
    while rx.recv().await.is_some() {}
    assert_eq!(
        slow.load().queued_prompt_tokens,
        0,
        "a cancelled prompt is not counted"
    );

    // A first token arrives: counted out, and its rate measured.
    let body = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n",
        "data: [DONE]\n\n"
    );
    let (addr, _seen) = upstream(Script::Send(vec![sse_head(), body.as_bytes().to_vec()])).await;
    let fast = engine(addr, Duration::from_secs(5));
    let events = events(&fast).await;
    assert_eq!(texts(&events), "hi");
    assert_eq!(fast.load().queued_prompt_tokens, 0);
    assert!(fast.load().prefill_tokens_per_s > 0.0, "{:?}", fast.load());
}

/// A chat that has already called a tool once and may call two.
fn tool_request() -> EngineRequest {
    let mut request = chat_request();
    request.prompt = Prompt::Chat(vec![
        Message {
            role: "system".into(),
            content: "Use the tools.".into(),
            ..Default::default()
        },
        Message {
            role: "user".into(),
            content: "Weather in Paris and Lyon?".into(),
            ..Default::default()
        },
        Message {
            role: "assistant".into(),
            tool_calls: vec![v1::ToolCall {
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            }],
            ..Default::default()
        },
        Message {
            role: "tool".into(),
            content: "18C".into(),
            tool_call_id: "call_1".into(),
            ..Default::default()
        },
    ]);
    request.tools = Tools {
        tools: vec![
            v1::Tool {
                name: "get_weather".into(),
                description: "The weather in a city now".into(),
                parameters_json:
                    r#"{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}"#
                        .into(),
            },
            v1::Tool {
                name: "now".into(),
                ..Default::default()
            },
        ],
        choice: v1::ToolChoice::default(),
    };
    request
}

/// The JSON body of a request the upstream saw.
fn body_of(request: &str) -> Value {
    let (_, body) = request.split_once("\r\n\r\n").expect("a head and a body");
    serde_json::from_str(body).expect("the body is JSON")
}

fn tool_calls(events: &[Result<EngineEvent, EngineError>]) -> Vec<v1::ToolCallDelta> {
    events
        .iter()
        .filter_map(|e| match e {
            Ok(EngineEvent::ToolCall(delta)) => Some(delta.clone()),
            _ => None,
        })
        .collect()
}

fn delta(index: u32, id: &str, name: &str, arguments: &str) -> v1::ToolCallDelta {
    v1::ToolCallDelta {
        index,
        id: id.into(),
        name: name.into(),
        arguments: arguments.into(),
    }
}

/// An SSE chat chunk whose delta is `delta` (JSON) and whose finish reason is `finish`.
fn delta_chunk(delta: &str, finish: Option<&str>) -> String {
    let finish = finish.map_or("null".to_string(), |f| format!("\"{f}\""));
    format!(
        "data: {{\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]}}\n\n"
    )
}

fn done_with(
    reason: StopReason,
    completion_tokens: u32,
) -> Option<Result<EngineEvent, EngineError>> {
    Some(Ok(EngineEvent::Done {
        reason,
        prompt_tokens: 0,
        completion_tokens,
        cached_prompt_tokens: 0,
    }))
}

#[tokio::test]
async fn tools_tool_choice_and_tool_messages_reach_the_upstream_in_openai_shape() {
    let finish = delta_chunk("{}", Some("stop")) + "data: [DONE]\n\n";
    let choices = [
        (
            v1::ToolChoice {
                function: "get_weather".into(),
                single_call: true,
                ..Default::default()
            },
            json!({"type": "function", "function": {"name": "get_weather"}}),
        ),
        (v1::ToolChoice::default(), json!("auto")),
        (
            v1::ToolChoice {
                mode: v1::ToolChoiceMode::Required as i32,
                ..Default::default()
            },
            json!("required"),
        ),
        (
            v1::ToolChoice {
                mode: v1::ToolChoiceMode::None as i32,
                ..Default::default()
            },
            json!("none"),
        ),
    ];
    for (choice, expected) in choices {
        let (addr, seen) =
            upstream(Script::Send(vec![sse_head(), finish.clone().into_bytes()])).await;
        let mut request = tool_request();
        request.tools.choice = choice.clone();
        let events = events_of(&engine(addr, Duration::from_secs(5)), request).await;
        assert!(
            matches!(events.last(), Some(Ok(EngineEvent::Done { .. }))),
            "{events:?}"
        );
        let body = body_of(&seen.await.expect("request seen"));
        assert_eq!(body["tool_choice"], expected, "{choice:?}");
        assert_eq!(
            body.get("parallel_tool_calls"),
            choice.single_call.then_some(&json!(false)),
            "{choice:?}"
        );
        assert_eq!(
            body["tools"],
            json!([
                {"type": "function", "function": {"name": "get_weather",
                    "description": "The weather in a city now",
                    "parameters": {"type": "object",
                        "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
                {"type": "function", "function": {"name": "now"}}
            ])
        );
        assert_eq!(
            body["messages"],
            json!([
                {"role": "system", "content": "Use the tools."},
                {"role": "user", "content": "Weather in Paris and Lyon?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "content": "18C", "tool_call_id": "call_1"}
            ])
        );
        assert_eq!(body["stream"], true);
    }

    // Without tools the body is what it always was.
    let (addr, seen) = upstream(Script::Send(vec![sse_head(), finish.into_bytes()])).await;
    events(&engine(addr, Duration::from_secs(5))).await;
    let request = seen.await.expect("request seen");
    let (_, body) = request.split_once("\r\n\r\n").expect("a body");
    assert_eq!(
        body,
        r#"{"model":"wafer-model","messages":[{"role":"user","content":"hello wafer"}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":8,"temperature":0.0,"seed":3}"#
    );

    // Tools need a chat: a text prompt with them is the client's to fix.
    let mut text = tool_request();
    text.prompt = Prompt::Text("weather?".into());
    match engine(addr, Duration::from_secs(5)).submit(text, CancellationToken::new()) {
        Err(EngineError::InvalidField { field, .. }) => assert_eq!(field, "tools"),
        other => panic!("expected InvalidField, got {other:?}"),
    }
}

#[tokio::test]
async fn a_streamed_call_split_at_every_byte_becomes_tool_call_events() {
    let body = [
        delta_chunk(
            r#"{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_7","type":"function","function":{"name":"get_weather","arguments":""}}]}"#,
            None,
        ),
        delta_chunk(
            r#"{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]}"#,
            None,
        ),
        ": keep-alive\r\n\r\n".to_string(),
        delta_chunk(
            r#"{"tool_calls":[{"index":0,"function":{"arguments":"\"Par"}}]}"#,
            None,
        ),
        delta_chunk(
            "{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"is \u{e9}\\u00e9\\\"}\"}}]}",
            None,
        ),
        delta_chunk("{}", Some("tool_calls")),
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":9}}\n\n"
            .to_string(),
        "data: [DONE]\n\n".to_string(),
    ]
    .concat();
    let mut pieces = vec![sse_head()];
    pieces.extend(body.as_bytes().chunks(1).map(<[u8]>::to_vec));
    let (addr, _) = upstream(Script::Send(pieces)).await;
    let events = events_of(&engine(addr, Duration::from_secs(5)), tool_request()).await;
    assert_eq!(
        tool_calls(&events),
        [
            delta(0, "call_7", "get_weather", ""),
            delta(0, "", "", "{\"city\":"),
            delta(0, "", "", "\"Par"),
            delta(0, "", "", "is \u{e9}\u{e9}\"}"),
        ]
    );
    assert_eq!(texts(&events), "");
    assert_eq!(
        events.last(),
        Some(&Ok(EngineEvent::Done {
            reason: StopReason::ToolCalls,
            prompt_tokens: 20,
            completion_tokens: 9,
            cached_prompt_tokens: 0,
        }))
    );
}

#[tokio::test]
async fn parallel_calls_and_a_whole_call_in_one_delta_pass_through() {
    // Two calls, indices 0 and 1, their pieces interleaved and one delta carrying both.
    let parallel = [
        delta_chunk(
            r#"{"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"get_weather","arguments":""}}]}"#,
            None,
        ),
        delta_chunk(
            r#"{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":\"Paris\"}"}},{"index":1,"id":"call_b","type":"function","function":{"name":"get_weather","arguments":"{\"ci"}}]}"#,
            None,
        ),
        delta_chunk(
            r#"{"tool_calls":[{"index":1,"function":{"arguments":"ty\":\"Lyon\"}"}}]}"#,
            Some("tool_calls"),
        ),
        "data: [DONE]\n\n".to_string(),
    ]
    .concat();
    // The whole call in one delta with an empty content beside it, finishing in the same chunk.
    let whole = [
        delta_chunk(
            r#"{"role":"assistant","content":"","tool_calls":[{"index":0,"id":"call_w","type":"function","function":{"name":"now","arguments":"{}"}}]}"#,
            Some("tool_calls"),
        ),
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":30,\"completion_tokens\":4}}\n\n"
            .to_string(),
        "data: [DONE]\n\n".to_string(),
    ]
    .concat();
    let cases = [
        (
            parallel,
            vec![
                delta(0, "call_a", "get_weather", ""),
                delta(0, "", "", "{\"city\":\"Paris\"}"),
                delta(1, "call_b", "get_weather", "{\"ci"),
                delta(1, "", "", "ty\":\"Lyon\"}"),
            ],
            // No usage: the chunks of output.
            done_with(StopReason::ToolCalls, 3),
        ),
        (
            whole,
            vec![delta(0, "call_w", "now", "{}")],
            Some(Ok(EngineEvent::Done {
                reason: StopReason::ToolCalls,
                prompt_tokens: 30,
                completion_tokens: 4,
                cached_prompt_tokens: 0,
            })),
        ),
    ];
    for (body, expected, done) in cases {
        let (addr, _) = upstream(Script::Send(vec![sse_head(), body.into_bytes()])).await;
        let engine = engine(addr, Duration::from_secs(5));
        let events = events_of(&engine, tool_request()).await;
        assert_eq!(tool_calls(&events), expected);
        assert_eq!(texts(&events), "", "an empty content is no token");
        assert_eq!(events.last().cloned(), done);
        // A call is the first output: the prompt's prefill was measured by it.
        assert_eq!(engine.load().queued_prompt_tokens, 0);
        assert!(
            engine.load().prefill_tokens_per_s > 0.0,
            "{:?}",
            engine.load()
        );
    }
}

#[tokio::test]
async fn text_then_a_call_ends_with_tool_calls_whatever_the_finish_is_called() {
    // `function_call` is the pre-`tools` name; some servers say `stop` after calling.
    for finish in ["tool_calls", "function_call", "stop"] {
        let body = [
            delta_chunk(r#"{"role":"assistant","content":"Let me "}"#, None),
            delta_chunk(r#"{"content":"check."}"#, None),
            delta_chunk(
                r#"{"tool_calls":[{"index":0,"id":"call_t","type":"function","function":{"name":"now","arguments":"{}"}}]}"#,
                None,
            ),
            delta_chunk("{}", Some(finish)),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat();
        let (addr, _) = upstream(Script::Send(vec![sse_head(), body.into_bytes()])).await;
        let events = events_of(&engine(addr, Duration::from_secs(5)), tool_request()).await;
        let kinds: Vec<&str> = events
            .iter()
            .map(|e| match e {
                Ok(EngineEvent::Token { .. }) => "token",
                Ok(EngineEvent::ToolCall(_)) => "call",
                Ok(EngineEvent::StopSequence(_)) => "stop",
                Ok(EngineEvent::PromptLogprobs(_)) => "prompt",
                Ok(EngineEvent::Embedding(_)) => "embedding",
                Ok(EngineEvent::Done { .. }) => "done",
                Err(_) => "error",
            })
            .collect();
        assert_eq!(kinds, ["token", "token", "call", "done"], "{finish}");
        assert_eq!(texts(&events), "Let me check.");
        assert_eq!(tool_calls(&events), [delta(0, "call_t", "now", "{}")]);
        assert_eq!(
            events.last().cloned(),
            done_with(StopReason::ToolCalls, 3),
            "{finish}"
        );
    }
    // Without a call, `stop` stays a stop.
    let body = delta_chunk(r#"{"content":"Sunny."}"#, Some("stop")) + "data: [DONE]\n\n";
    let (addr, _) = upstream(Script::Send(vec![sse_head(), body.into_bytes()])).await;
    let events = events_of(&engine(addr, Duration::from_secs(5)), tool_request()).await;
    assert_eq!(events.last().cloned(), done_with(StopReason::Stop, 1));
}

#[tokio::test]
async fn a_malformed_tool_call_fails_cleanly() {
    let call = delta_chunk(
        r#"{"tool_calls":[{"index":0,"id":"call_m","type":"function","function":{"name":"now","arguments":""}}]}"#,
        None,
    );
    let cases = [
        // After text: INTERNAL (a retry would repeat it).
        (
            delta_chunk(r#"{"content":"ok"}"#, None)
                + &delta_chunk(r#"{"tool_calls":{"index":0}}"#, None),
            "tool_calls is not an array",
            true,
        ),
        // Before any output: UNAVAILABLE (the router may place it elsewhere).
        (
            delta_chunk(
                r#"{"content":"","tool_calls":[{"id":"c","function":{"name":"now"}}]}"#,
                None,
            ),
            "tool_calls[0].index is missing or not a number",
            false,
        ),
        (
            delta_chunk(r#"{"tool_calls":[{"index":"0"}]}"#, None),
            "tool_calls[0].index is missing or not a number",
            false,
        ),
        // After a call alone: output started just the same.
        (
            call + &delta_chunk(
                r#"{"tool_calls":[{"index":0,"function":{"arguments":{"a":1}}}]}"#,
                None,
            ),
            "tool_calls[0].function.arguments is not a string",
            true,
        ),
    ];
    for (body, problem, after_output) in cases {
        let (addr, _) = upstream(Script::SendAndHang(vec![sse_head(), body.into_bytes()])).await;
        let events = events_of(&engine(addr, Duration::from_secs(5)), tool_request()).await;
        let message = match (events.last(), after_output) {
            (Some(Err(EngineError::Internal(m))), true) => m,
            (Some(Err(EngineError::Unavailable(m))), false) => m,
            other => panic!("{problem}: unexpected end {other:?}"),
        };
        assert!(
            message.contains("malformed chunk") && message.contains(problem),
            "{message}"
        );
        assert_eq!(events.len(), 1 + usize::from(after_output), "{events:?}");
    }
}
