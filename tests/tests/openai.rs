//! End-to-end tests of the OpenAI-compatible HTTP front door and of the wafer-scale worker's
//! `gateway` engine, against real processes: etcd, routers, workers, the official `openai`
//! Python SDK and `curl`. The gateway's upstream is a second Switchyard cluster's HTTP API.

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use serde_json::{Value, json};
use switchyard_proto::v1::{self, router_frame, worker_frame};
use switchyard_tests::{
    Cluster, ClusterSpec, Component, Etcd, list_router_workers, program_output, strings, wait_until,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// The `content` deltas of an SSE chat stream, in order, and whether it ended with `[DONE]`.
fn sse_chat_text(body: &str) -> (String, bool) {
    let mut text = String::new();
    let mut done = false;
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(data).expect("chunk is JSON");
        if let Some(content) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(content);
        }
    }
    (text, done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_and_curl_against_the_router() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 1,
        ..Default::default()
    })
    .await?;
    let base = cluster.router_openai_url();

    // The official SDK: streaming and non-streaming chat, completions, models, 404, 400.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_sdk_check.py");
    let out = program_output(
        "python3",
        &[script.to_string(), base.clone(), "synthetic".into()],
    )
    .await
    .context("the openai SDK checks (pip install -r scripts/test-requirements.txt)")?;
    assert!(out.contains("openai-sdk: 15 passed, 0 failed"), "{out}");
    // The Responses API, text only (the load-test engine refuses tools and schemas).
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/openai_responses_check.py"
    );
    let out = program_output(
        "python3",
        &strings(&[script, &base, "synthetic", "text-only"]),
    )
    .await?;
    assert!(
        out.contains("openai-responses: 15 passed, 0 failed"),
        "{out}"
    );
    // The Conversations API, and responses going on from its conversations.
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/openai_conversations_check.py"
    );
    let out = program_output("python3", &strings(&[script, &base, "synthetic"])).await?;
    assert!(
        out.contains("openai-conversations: 7 passed, 0 failed"),
        "{out}"
    );
    // Stored chat completions: kept, read back, listed, changed and deleted.
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/openai_chat_store_check.py"
    );
    let out = program_output("python3", &strings(&[script, &base, "synthetic"])).await?;
    assert!(
        out.contains("openai-chat-store: 6 passed, 0 failed"),
        "{out}"
    );
    // Embeddings, one text and a batch, floats and base64, refusals naming the input.
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/openai_embeddings_check.py"
    );
    let out = program_output("python3", &strings(&[script, &base, "synthetic"])).await?;
    assert!(
        out.contains("openai-embeddings: 7 passed, 0 failed"),
        "{out}"
    );
    // Anthropic's Messages API on the same port, with Anthropic's SDK, text only.
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/anthropic_messages_check.py"
    );
    let root = base.trim_end_matches("/v1");
    let out = program_output(
        "python3",
        &strings(&[script, root, "synthetic", "text-only"]),
    )
    .await?;
    assert!(
        out.contains("anthropic-messages: 6 passed, 0 failed"),
        "{out}"
    );
    // Operators see which APIs their clients use, and how each fares.
    let metrics = reqwest::get(format!("http://{}/metrics", cluster.router.addr("http")))
        .await?
        .text()
        .await?;
    let answered = |api: &str, status: u16| {
        let series =
            format!("switchyard_router_http_requests_total{{api=\"{api}\",status=\"{status}\"}} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&series)?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    for (api, status) in [
        ("chat_completions", 200),
        ("responses", 200),
        ("responses", 400),
        ("messages", 200),
        ("messages", 400),
        ("messages", 404),
        ("conversations", 200),
        ("conversations", 404),
    ] {
        assert!(answered(api, status) >= 1.0, "{api} {status}:\n{metrics}");
    }

    // The README's `curl -N` example, as written there but for the port.
    let host = cluster.router.addr("http");
    let out = program_output(
        "curl",
        &strings(&[
            "-sS",
            "-N",
            &format!("http://{host}/v1/chat/completions"),
            "-H",
            "content-type: application/json",
            "-H",
            "x-switchyard-class: latency-critical",
            "-d",
            r#"{"model": "synthetic", "stream": true, "max_tokens": 8,
                "messages": [{"role": "user", "content": "Say hello to the wafer"}]}"#,
        ]),
    )
    .await?;
    let (text, done) = sse_chat_text(&out);
    assert_eq!(text, "Say hello to the wafer Say hello to");
    assert!(done, "stream ended without [DONE]:\n{out}");
    assert!(out.ends_with("data: [DONE]\n\n"), "{out}");

    // Health and OpenAI-shaped errors for routes and bodies.
    let client = http();
    let health: Value = client
        .get(format!("http://{host}/health"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["workers"]["ready"], 2);
    let response = client
        .post(format!("{base}/chat/completions"))
        .body("{not json")
        .send()
        .await?;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["type"], "invalid_request_error");
    // A field out of the router's range and one asking for what is not done: each a 400
    // naming it in OpenAI's terms, with the reason.
    for (extra, param, reason) in [
        (
            json!({"logit_bias": {"42": 101}}),
            "logit_bias[42]",
            "between -100 and 100",
        ),
        (
            json!({"presence_penalty": -3}),
            "presence_penalty",
            "between -2 and 2",
        ),
        (json!({"min_p": -0.5}), "min_p", "between 0 and 1"),
        // The synthetic load-test engine refuses what only a model can do, by name.
        (
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
            "cannot promise JSON",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
            "calls no tools",
        ),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
            "from 0 to 20",
        ),
        // The affinity key is named as the client sent it.
        (json!({"user": "u".repeat(300)}), "user", "the limit is 256"),
        (
            json!({"user": "u", "prompt_cache_key": "k".repeat(300)}),
            "prompt_cache_key",
            "the limit is 256",
        ),
    ] {
        let mut request = json!({"model": "synthetic", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]});
        for (field, value) in extra.as_object().into_iter().flatten() {
            request[field] = value.clone();
        }
        let response = client
            .post(format!("{base}/chat/completions"))
            .json(&request)
            .send()
            .await?;
        assert_eq!(response.status(), 400, "{extra}");
        let body: Value = response.json().await?;
        assert_eq!(body["error"]["param"], param, "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with(param) && message.contains(reason),
            "{body}"
        );
    }
    // Every answer names its request: a client's own `x-request-id` is the request's id (in
    // the header, the body's `id` and the decision feed), and an error carries one too.
    let chat = json!({"model": "synthetic", "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}]});
    let response = client
        .post(format!("{base}/chat/completions"))
        .header("x-request-id", "my-req-1")
        .json(&chat)
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "my-req-1");
    let body: Value = response.json().await?;
    assert_eq!(body["id"], "my-req-1", "{body}");
    for (request_id, model, status) in [
        (Some("my-req-2"), "no-such-model", 404),
        (None, "no-such-model", 404),
        (Some("has space"), "synthetic", 400),
    ] {
        let mut request = client.post(format!("{base}/chat/completions"));
        if let Some(id) = request_id {
            request = request.header("x-request-id", id);
        }
        let mut body = chat.clone();
        body["model"] = json!(model);
        let response = request.json(&body).send().await?;
        assert_eq!(response.status(), status);
        let echoed = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        match request_id {
            Some("has space") | None => assert!(echoed.starts_with("chatcmpl-"), "{echoed:?}"),
            Some(id) => assert_eq!(echoed, id),
        }
        if status == 400 {
            let body: Value = response.json().await?;
            assert_eq!(body["error"]["param"], "x-request-id", "{body}");
        }
    }
    // The wrong method and an oversized body get OpenAI-shaped errors that say what to do.
    let response = client
        .put(format!("{base}/chat/completions"))
        .send()
        .await?;
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET, HEAD, POST");
    assert!(
        response.headers()["x-request-id"]
            .to_str()
            .is_ok_and(|id| id.starts_with("chatcmpl-")),
        "{:?}",
        response.headers()
    );
    let body: Value = response.json().await?;
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("use GET, HEAD, POST")),
        "{body}"
    );
    let metrics = format!("{}/metrics", base.trim_end_matches("/v1"));
    let response = client.post(metrics).send().await?;
    assert_eq!(response.status(), 405, "POST /metrics");
    assert_eq!(response.headers()["allow"], "GET, HEAD");
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let response = client
        .post(format!("{base}/chat/completions"))
        .header("content-type", "application/json")
        .body(vec![b' '; 3 << 20])
        .send()
        .await?;
    assert_eq!(response.status(), 413);
    // The rest of the body goes unread: the connection closes, and the answer says so (the
    // client pooled it and failed its next request with a broken pipe).
    assert_eq!(response.headers()["connection"], "close");
    let body: Value = response.json().await?;
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("2 MiB")),
        "{body}"
    );
    let response = client.get(format!("{base}/engines")).send().await?;
    assert_eq!(response.status(), 404);

    // Text engines publish no tokenizer: the router sends their requests as text.
    for worker in [&cluster.gpu[0], &cluster.wse[0]] {
        let mut client =
            v1::worker_client::WorkerClient::connect(format!("http://{}", worker.addr("grpc")))
                .await?;
        let status = client
            .get_tokenizer(v1::TokenizerRequest {
                model: "synthetic".into(),
            })
            .await
            .expect_err("a text engine has no tokenizer");
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        assert!(
            status.message().contains("engine does not tokenize"),
            "{status:?}"
        );
    }
    Ok(())
}

/// One more router replica on `cluster`'s etcd, once it has linked the cluster's worker.
async fn another_router(
    cluster: &Cluster,
    name: &str,
    flags: &[&str],
) -> anyhow::Result<Component> {
    let router = switchyard_tests::start_router(&cluster.etcd.url, name, flags).await?;
    let grpc = router.addr("grpc").to_string();
    wait_until(
        Duration::from_secs(20),
        "the router to link the worker",
        || async {
            list_router_workers(&grpc)
                .await
                .is_ok_and(|ids| ids.len() == cluster.gpu.len() + cluster.wse.len())
        },
    )
    .await?;
    Ok(router)
}

/// `POST {base}/responses` with `body`: the status and the JSON answer.
async fn create_response(
    client: &reqwest::Client,
    base: String,
    body: Value,
) -> anyhow::Result<(u16, Value)> {
    let answer = client
        .post(format!("{base}/responses"))
        .json(&body)
        .send()
        .await?;
    let status = answer.status().as_u16();
    Ok((status, answer.json::<Value>().await?))
}

/// Stored chat completions are one store across the router's replicas: made on one, they are
/// read, listed, changed and deleted through another (the SDK checks, split across two doors),
/// and a listing on either merges what every replica keeps, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_chat_completions_are_read_and_listed_across_router_replicas() -> anyhow::Result<()>
{
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    let keeper = another_router(&cluster, "keeper", &[]).await?;
    let keeper_url = format!("http://{}/v1", keeper.addr("http"));
    let other_url = cluster.router_openai_url();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/openai_chat_store_check.py"
    );
    let out = program_output(
        "python3",
        &strings(&[script, &keeper_url, "synthetic", &other_url]),
    )
    .await?;
    assert!(
        out.contains("openai-chat-store: 6 passed, 0 failed"),
        "{out}"
    );

    // The answer's id is the request's (`x-request-id`, the decision feed's), unless the client
    // named its own: that is echoed, and the completion is kept under an id of the store's.
    let client = http();
    for named in [None, Some("my-trace-7")] {
        let mut ask = client.post(format!("{other_url}/chat/completions"));
        if let Some(named) = named {
            ask = ask.header("x-request-id", named);
        }
        let answer = ask
            .json(
                &json!({"model": "synthetic", "max_tokens": 2, "store": true,
                          "messages": [{"role": "user", "content": "Hi"}]}),
            )
            .send()
            .await?;
        let header = answer.headers()["x-request-id"].to_str()?.to_string();
        let body: Value = answer.json().await?;
        let id = body["id"].as_str().context("an id")?;
        match named {
            None => assert_eq!(header, id),
            Some(named) => assert_eq!(header, named),
        }
        let read = client
            .get(format!("{keeper_url}/chat/completions/{id}"))
            .send()
            .await?;
        assert_eq!(read.status(), 200, "{id}");
    }
    // A stored response's id is its request's too.
    let answer = client
        .post(format!("{other_url}/responses"))
        .json(&json!({"model": "synthetic", "input": "Hi", "max_output_tokens": 2}))
        .send()
        .await?;
    let header = answer.headers()["x-request-id"].to_str()?.to_string();
    let body: Value = answer.json().await?;
    assert_eq!(body["id"].as_str(), Some(header.as_str()), "{body}");
    // One store, two kinds: a chat route does not reach a response, nor the other way round.
    let completion = made_on(&client, &keeper_url).await?;
    for (method, url) in [
        (
            reqwest::Method::GET,
            format!("{other_url}/chat/completions/{header}"),
        ),
        (
            reqwest::Method::DELETE,
            format!("{other_url}/chat/completions/{header}"),
        ),
        (
            reqwest::Method::GET,
            format!("{other_url}/responses/{completion}"),
        ),
        (
            reqwest::Method::DELETE,
            format!("{other_url}/responses/{completion}"),
        ),
    ] {
        let answer = client.request(method.clone(), &url).send().await?;
        assert_eq!(answer.status(), 404, "{method} {url}");
    }
    for url in [
        format!("{other_url}/chat/completions/{completion}"),
        format!("{other_url}/responses/{header}"),
    ] {
        assert_eq!(client.get(&url).send().await?.status(), 200, "{url}");
    }
    // Completions kept by each replica, in turn: either lists them all, oldest first.
    let mut made = Vec::new();
    for base in [&keeper_url, &other_url, &keeper_url] {
        let body: Value = client
            .post(format!("{base}/chat/completions"))
            .json(&json!({
                "model": "synthetic", "max_tokens": 2, "store": true,
                "metadata": {"case": "merged"},
                "messages": [{"role": "user", "content": "Hi"}],
            }))
            .send()
            .await?
            .json()
            .await?;
        let id = body["id"].as_str().context("an id")?.to_string();
        made.push((body["created"].as_u64().context("created")?, id));
    }
    // Oldest first; completions made in the same second by then by id (each replica's are
    // time-ordered, and replicas' tie by their tags).
    made.sort();
    let made: Vec<String> = made.into_iter().map(|(_, id)| id).collect();
    for base in [&keeper_url, &other_url] {
        let listed: Value = client
            .get(format!("{base}/chat/completions?metadata[case]=merged"))
            .send()
            .await?
            .json()
            .await?;
        let ids: Vec<&str> = listed["data"]
            .as_array()
            .context("a list")?
            .iter()
            .filter_map(|c| c["id"].as_str())
            .collect();
        assert_eq!(ids, made, "{listed}");
        assert_eq!(listed["has_more"], false);
        assert_eq!(listed["last_id"], made[2].as_str());
    }
    Ok(())
}

/// A chat completion stored at `base`: its id.
async fn made_on(client: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let body: Value = client
        .post(format!("{base}/chat/completions"))
        .json(
            &json!({"model": "synthetic", "max_tokens": 2, "store": true,
                      "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .send()
        .await?
        .json()
        .await?;
    Ok(body["id"].as_str().context("an id")?.to_string())
}

/// A stored response is one conversation's state, kept by the router replica that answered it;
/// the next turn may land on any replica (a load balancer spreads them): that replica reads
/// the response from its keeper, found through etcd. A replica that stopped took its responses
/// with it, and a client is told so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_goes_on_from_a_response_another_router_replica_stored() -> anyhow::Result<()>
{
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    let mut keeper = another_router(&cluster, "keeper", &[]).await?;
    let keeper_url = format!("http://{}/v1", keeper.addr("http"));
    let other_url = cluster.router_openai_url();
    let client = http();
    let create = |base: String, body: Value| create_response(&client, base, body);
    let get = |url: String| {
        let client = client.clone();
        async move {
            let answer = client.get(url).send().await?;
            let status = answer.status().as_u16();
            anyhow::Ok((status, answer.json::<Value>().await?))
        }
    };

    let (status, first) = create(
        keeper_url.clone(),
        json!({"model": "synthetic", "input": "Remember the word kiwi.", "max_output_tokens": 6}),
    )
    .await?;
    assert_eq!(status, 200, "{first}");
    let id = first["id"].as_str().context("an id")?.to_string();
    assert_eq!(first["store"], true, "{first}");
    // On-call sees what a replica keeps.
    let metrics = reqwest::get(format!("http://{}/metrics", keeper.addr("http")))
        .await?
        .text()
        .await?;
    let gauge = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse::<f64>().ok())
            .unwrap_or_default()
    };
    assert_eq!(
        gauge("switchyard_router_stored_responses"),
        1.0,
        "{metrics}"
    );
    assert!(gauge("switchyard_router_stored_response_bytes") > 0.0);

    // Read on the other replica: the keeper's object, as it was answered.
    let (status, read) = get(format!("{other_url}/responses/{id}")).await?;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["output"], first["output"]);
    assert_eq!(read["usage"], first["usage"]);
    let (status, items) = get(format!("{other_url}/responses/{id}/input_items")).await?;
    assert_eq!(status, 200, "{items}");
    assert_eq!(
        items["data"][0]["content"][0]["text"],
        "Remember the word kiwi."
    );

    // The next turn, on the other replica, runs the whole conversation.
    let (status, second) = create(
        other_url.clone(),
        json!({
            "model": "synthetic", "input": "Which word?", "previous_response_id": id,
            "max_output_tokens": 6,
        }),
    )
    .await?;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["previous_response_id"], id.as_str());
    let tokens = |r: &Value, k: &str| r["usage"][k].as_u64().unwrap_or_default();
    let (_, alone) = create(
        other_url.clone(),
        json!({"model": "synthetic", "input": "Which word?", "max_output_tokens": 6, "store": false}),
    )
    .await?;
    assert!(
        tokens(&second, "input_tokens")
            >= tokens(&alone, "input_tokens") + tokens(&first, "output_tokens"),
        "the second turn read the first: {second} vs {alone}"
    );
    // An item of the keeper's response, referred to on the other replica: read as if sent.
    let said = first["output"][0]["id"]
        .as_str()
        .context("an output item id")?;
    let (status, referred) = create(
        other_url.clone(),
        json!({
            "model": "synthetic", "max_output_tokens": 2, "store": false,
            "input": [{"type": "item_reference", "id": said}, {"role": "user", "content": "Hi"}],
        }),
    )
    .await?;
    assert_eq!(status, 200, "{referred}");
    let said_text = first["output"][0]["content"][0]["text"].clone();
    let (_, inline) = create(
        other_url.clone(),
        json!({
            "model": "synthetic", "max_output_tokens": 2, "store": false,
            "input": [{"role": "assistant", "content": said_text},
                      {"role": "user", "content": "Hi"}],
        }),
    )
    .await?;
    assert_eq!(
        tokens(&referred, "input_tokens"),
        tokens(&inline, "input_tokens"),
        "{referred} vs {inline}"
    );
    // Stored by the replica that answered it, and readable from the first.
    let second_id = second["id"].as_str().context("an id")?;
    let (status, _) = get(format!("{keeper_url}/responses/{second_id}")).await?;
    assert_eq!(status, 200);

    // A conversation the keeper keeps is gone on from, read and changed through the other.
    let conversation: Value = client
        .post(format!("{keeper_url}/conversations"))
        .json(&json!({"items": [{"role": "user", "content": "Remember the word kiwi."}]}))
        .send()
        .await?
        .json()
        .await?;
    let conversation_id = conversation["id"].as_str().context("an id")?.to_string();
    let (status, turn) = create(
        other_url.clone(),
        json!({
            "model": "synthetic", "input": "Which word?", "conversation": conversation_id,
            "max_output_tokens": 6,
        }),
    )
    .await?;
    assert_eq!(status, 200, "{turn}");
    assert!(
        tokens(&turn, "input_tokens") > tokens(&alone, "input_tokens"),
        "the turn read the conversation kept elsewhere: {turn} vs {alone}"
    );
    let items_url = format!("{other_url}/conversations/{conversation_id}/items?order=asc");
    let (status, items) = get(items_url.clone()).await?;
    assert_eq!(status, 200, "{items}");
    let roles: Vec<&str> = items["data"]
        .as_array()
        .context("a list")?
        .iter()
        .filter_map(|i| i["role"].as_str())
        .collect();
    assert_eq!(roles, ["user", "user", "assistant"], "{items}");
    let first_item = items["data"][0]["id"].as_str().context("an item id")?;
    let deleted = client
        .delete(format!(
            "{other_url}/conversations/{conversation_id}/items/{first_item}"
        ))
        .send()
        .await?;
    assert_eq!(deleted.status().as_u16(), 200);
    let (_, items) = get(format!(
        "{keeper_url}/conversations/{conversation_id}/items"
    ))
    .await?;
    assert_eq!(items["data"].as_array().map(Vec::len), Some(2), "{items}");

    // A background response running on the keeper is read and cancelled through the other.
    let (status, started) = create(
        keeper_url.clone(),
        json!({"model": "synthetic", "input": "A long story.", "max_output_tokens": 4000,
               "background": true}),
    )
    .await?;
    assert_eq!(status, 200, "{started}");
    assert_eq!(started["status"], "in_progress", "{started}");
    let running_id = started["id"].as_str().context("an id")?.to_string();
    let (status, running) = get(format!("{other_url}/responses/{running_id}")).await?;
    assert_eq!(
        (status, &running["status"]),
        (200, &json!("in_progress")),
        "{running}"
    );
    let cancelled: Value = client
        .post(format!("{other_url}/responses/{running_id}/cancel"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let (_, kept) = get(format!("{keeper_url}/responses/{running_id}")).await?;
    assert_eq!(kept["status"], "cancelled", "{kept}");
    assert_eq!(kept["output"], cancelled["output"]);

    // A streamed background response on the keeper: its client goes away after a few events,
    // it is picked up through the other replica after the last one seen, and cancelled there;
    // the resumed stream ends with the cancellation.
    let streamed = client
        .post(format!("{keeper_url}/responses"))
        .json(
            &json!({"model": "synthetic", "input": "A long story.", "max_output_tokens": 4000,
                      "background": true, "stream": true}),
        )
        .send()
        .await?;
    assert_eq!(streamed.status(), 200);
    let mut first = SseEvents::new(streamed);
    let created = first.next().await?.context("response.created")?;
    let streamed_id = created["response"]["id"]
        .as_str()
        .context("an id")?
        .to_string();
    while first.seen < 4 {
        first.next().await?.context("the stream went on")?;
    }
    drop(first);
    let resumed = client
        .get(format!(
            "{other_url}/responses/{streamed_id}?stream=true&starting_after=3"
        ))
        .send()
        .await?;
    assert_eq!(resumed.status(), 200);
    let mut resumed = SseEvents::new(resumed);
    let fifth = resumed.next().await?.context("the stream resumed")?;
    assert_eq!(fifth["sequence_number"], 4, "{fifth}");
    let cancelled: Value = client
        .post(format!("{other_url}/responses/{streamed_id}/cancel"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let mut last = fifth;
    while let Some(event) = resumed.next().await? {
        assert_eq!(
            event["sequence_number"].as_u64(),
            last["sequence_number"].as_u64().map(|n| n + 1),
            "numbered in order: {event}"
        );
        last = event;
    }
    assert_eq!(last["type"], "response.cancelled", "{last}");
    assert_eq!(last["response"]["output"], cancelled["output"]);
    let past = last["sequence_number"].as_u64().context("a number")? + 5;
    let (status, refused) = get(format!(
        "{other_url}/responses/{streamed_id}?stream=true&starting_after={past}"
    ))
    .await?;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["param"], "starting_after", "{refused}");
    let (status, refused) = get(format!("{other_url}/responses/{id}?stream=true")).await?;
    assert_eq!(
        status, 400,
        "a response not streamed in the background: {refused}"
    );
    assert_eq!(refused["error"]["param"], "stream", "{refused}");

    // Deleted through the other replica: gone on its keeper too.
    let deleted = client
        .delete(format!("{other_url}/responses/{id}"))
        .send()
        .await?;
    assert_eq!(deleted.status().as_u16(), 200);
    assert_eq!(deleted.json::<Value>().await?["deleted"], true);
    let (status, gone) = get(format!("{keeper_url}/responses/{id}")).await?;
    assert_eq!(status, 404, "{gone}");

    // A keeper that stopped took its responses along; the client is told why.
    let (_, kept) = create(
        keeper_url.clone(),
        json!({"model": "synthetic", "input": "Hi", "max_output_tokens": 2}),
    )
    .await?;
    let kept_id = kept["id"].as_str().context("an id")?.to_string();
    keeper.terminate(Duration::from_secs(30)).await?;
    let (status, error) = create(
        other_url.clone(),
        json!({"model": "synthetic", "input": "And?", "previous_response_id": kept_id}),
    )
    .await?;
    assert_eq!(status, 404, "{error}");
    assert_eq!(error["error"]["param"], "previous_response_id", "{error}");
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("no longer running"), "{message}");
    Ok(())
}

/// A cluster whose routers share a cluster token, another router replica with it, and on that
/// replica a stored conversation with one turn, then a conversation of two stored turns.
struct TwoTurns {
    cluster: Cluster,
    other: switchyard_tests::Component,
    /// The cluster token's file (in `_dir`, which a caller keeps while its routers run).
    token: String,
    /// The stored conversation's id.
    conversation: String,
    first: Value,
    second: Value,
    _dir: tempfile::TempDir,
}

/// [`TwoTurns`] with the other replica named `name`; `metrics`: every component serves them.
async fn two_turns_on_another_replica(name: &str, metrics: bool) -> anyhow::Result<TwoTurns> {
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("cluster-token");
    std::fs::write(&token, "stored-responses-test-token-0123456789\n")?;
    let token = token.display().to_string();
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        router_flags: strings(&["--cluster-token-file", &token]),
        metrics,
        ..Default::default()
    })
    .await?;
    let other = another_router(&cluster, name, &["--cluster-token-file", &token]).await?;
    let client = http();
    let url = format!("http://{}/v1", other.addr("http"));
    let conversation: Value = client
        .post(format!("{url}/conversations"))
        .send()
        .await?
        .json()
        .await?;
    let conversation = conversation["id"].as_str().context("an id")?.to_string();
    let (status, turn) = create_response(
        &client,
        url.clone(),
        json!({"model": "synthetic", "input": "Conversation turn.", "max_output_tokens": 4,
               "conversation": conversation, "store": false}),
    )
    .await?;
    anyhow::ensure!(status == 200, "{turn}");
    let (_, first) = create_response(
        &client,
        url.clone(),
        json!({"model": "synthetic", "input": "First turn.", "max_output_tokens": 4}),
    )
    .await?;
    let (_, second) = create_response(
        &client,
        url,
        json!({"model": "synthetic", "input": "Second turn.", "max_output_tokens": 4,
               "previous_response_id": first["id"]}),
    )
    .await?;
    Ok(TwoTurns {
        cluster,
        other,
        token,
        conversation,
        first,
        second,
        _dir: dir,
    })
}

/// A rollout replaces every router: a stopping one hands its stored responses and
/// conversations to another replica (routers only: the cluster token), which answers for
/// their ids from then on, to clients on any replica, so the conversations go on. A
/// background response still running when it is told to stop ends first and goes along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_router_hands_its_stored_responses_to_another() -> anyhow::Result<()> {
    let TwoTurns {
        cluster,
        other: mut leaving,
        token,
        conversation,
        first,
        second,
        _dir: _token_dir,
    } = two_turns_on_another_replica("leaving", false).await?;
    let flags = ["--cluster-token-file", token.as_str()];
    let client = http();
    let first_id = first["id"].as_str().context("an id")?.to_string();
    let second_id = second["id"].as_str().context("an id")?.to_string();
    // A background response still running when the replica is told to stop: the drain lets
    // it end, and it is handed over with the rest.
    let leaving_url = format!("http://{}/v1", leaving.addr("http"));
    let (status, running) = create_response(
        &client,
        leaving_url.clone(),
        json!({"model": "synthetic", "input": "Keep going.", "max_output_tokens": 150,
               "background": true}),
    )
    .await?;
    assert_eq!(
        (status, &running["status"]),
        (200, &json!("in_progress")),
        "{running}"
    );
    // And a streamed one whose client went away after its first event: its events go along.
    let streamed = client
        .post(format!("{leaving_url}/responses"))
        .json(
            &json!({"model": "synthetic", "input": "Go on.", "max_output_tokens": 30,
                      "background": true, "stream": true}),
        )
        .send()
        .await?;
    let mut events = SseEvents::new(streamed);
    let created = events.next().await?.context("response.created")?;
    let streamed_id = created["response"]["id"]
        .as_str()
        .context("an id")?
        .to_string();
    drop(events);
    // And a stored chat completion.
    let kept: Value = client
        .post(format!("{leaving_url}/chat/completions"))
        .json(
            &json!({"model": "synthetic", "max_tokens": 3, "store": true,
                      "metadata": {"case": "handed"},
                      "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .send()
        .await?
        .json()
        .await?;
    let kept_id = kept["id"].as_str().context("an id")?.to_string();

    leaving.terminate(Duration::from_secs(30)).await?;

    // The replica that stayed answers for them, and the conversation goes on there.
    let staying = cluster.router_openai_url();
    let read = client
        .get(format!("{staying}/responses/{second_id}"))
        .send()
        .await?;
    assert_eq!(read.status().as_u16(), 200);
    assert_eq!(read.json::<Value>().await?["output"], second["output"]);
    a_third_turn_reads_the_first_two(&client, &staying, &second).await?;
    the_conversation_goes_on(&client, &staying, &conversation).await?;
    let ran = client
        .get(format!(
            "{staying}/responses/{}",
            running["id"].as_str().unwrap_or_default()
        ))
        .send()
        .await?;
    assert_eq!(ran.status().as_u16(), 200);
    let ran: Value = ran.json().await?;
    assert_eq!(ran["status"], "incomplete", "ran to its bound: {ran}");
    assert_eq!(ran["usage"]["output_tokens"], 150, "{ran}");
    let resumed = client
        .get(format!(
            "{staying}/responses/{streamed_id}?stream=true&starting_after=0"
        ))
        .send()
        .await?;
    assert_eq!(
        resumed.status().as_u16(),
        200,
        "resumed where it was handed"
    );
    let mut resumed = SseEvents::new(resumed);
    let mut numbers = Vec::new();
    let mut last = Value::Null;
    while let Some(event) = resumed.next().await? {
        numbers.push(event["sequence_number"].as_u64().context("a number")?);
        last = event;
    }
    assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>());
    assert_eq!(last["type"], "response.incomplete", "{last}");
    assert_eq!(last["response"]["usage"]["output_tokens"], 30, "{last}");
    let handed: Value = client
        .get(format!("{staying}/chat/completions?metadata[case]=handed"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(handed["data"][0]["id"], kept_id.as_str(), "{handed}");
    assert_eq!(handed["data"][0]["choices"], kept["choices"], "{handed}");
    // A replica started afterwards finds them at the replica that took them.
    let newcomer = switchyard_tests::start_router(&cluster.etcd.url, "newcomer", &flags).await?;
    let newcomer_url = format!("http://{}/v1/responses/{first_id}", newcomer.addr("http"));
    wait_until(
        Duration::from_secs(30),
        "the newcomer to read a handed-over response",
        || answers_ok(&client, &newcomer_url),
    )
    .await?;
    Ok(())
}

/// A router killed without its drain (OOM, node loss) has no time to hand its stored
/// responses over: another replica has kept a copy all along (its standby, told of each
/// response as it is stored), and answers for them once the dead replica's announcement
/// expires, so the conversations go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_routers_stored_responses_are_answered_by_its_standby() -> anyhow::Result<()> {
    let TwoTurns {
        cluster,
        other: mut dying,
        conversation,
        first,
        second,
        _dir: _token_dir,
        ..
    } = two_turns_on_another_replica("dying", true).await?;
    let client = http();
    let first_id = first["id"].as_str().context("an id")?.to_string();
    let second_id = second["id"].as_str().context("an id")?.to_string();
    // The other replica holds both as the standby copy.
    let staying_metrics = cluster.router.metrics_url();
    wait_until(
        Duration::from_secs(20),
        "the other replica to hold a standby copy of both responses",
        || standby_responses_are(&staying_metrics, 2.0),
    )
    .await?;
    // Each mirrors to the other (a replica looks for a standby every few seconds).
    wait_until(
        Duration::from_secs(20),
        "the first replica to mirror to the second",
        || mirror_state_is(&staying_metrics, "mirrored"),
    )
    .await?;
    // A background response running there when it is killed: the standby is sent it as it
    // would stand cut off, and answers that after the kill instead of "not found".
    let dying_url = format!("http://{}/v1", dying.addr("http"));
    let (status, running) = create_response(
        &client,
        dying_url,
        json!({"model": "synthetic", "input": "A long story.", "max_output_tokens": 4000,
               "background": true}),
    )
    .await?;
    assert_eq!(status, 200, "{running}");
    let running_id = running["id"].as_str().context("an id")?.to_string();
    wait_until(
        Duration::from_secs(20),
        "the standby to hold the running response too",
        || standby_responses_are(&staying_metrics, 3.0),
    )
    .await?;

    dying.kill().await?;

    let staying = cluster.router_openai_url();
    let read_url = format!("{staying}/responses/{second_id}");
    wait_until(
        Duration::from_secs(40),
        "the standby to answer for the killed replica's responses",
        || answers_ok(&client, &read_url),
    )
    .await?;
    let read: Value = client.get(&read_url).send().await?.json().await?;
    assert_eq!(read["output"], second["output"]);
    let cut_off: Value = client
        .get(format!("{staying}/responses/{running_id}"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(cut_off["status"], "failed", "{cut_off}");
    assert!(
        cut_off["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("stopped before it ended")),
        "{cut_off}"
    );
    let items: Value = client
        .get(format!("{staying}/responses/{first_id}/input_items"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        items["data"][0]["content"][0]["text"], "First turn.",
        "{items}"
    );
    a_third_turn_reads_the_first_two(&client, &staying, &second).await?;
    the_conversation_goes_on(&client, &staying, &conversation).await?;
    // The copy became the replica's own: none is held as standby any more. With no other
    // replica left, it has no standby itself.
    assert!(standby_responses_are(&staying_metrics, 0.0).await);
    wait_until(
        Duration::from_secs(20),
        "the replica left alone to say it has no standby",
        || mirror_state_is(&staying_metrics, "alone"),
    )
    .await?;
    Ok(())
}

/// Goes on from `second` (the second turn of a [`TwoTurns`] conversation) at `base`: it is
/// answered, and its prompt holds the first two turns.
async fn a_third_turn_reads_the_first_two(
    client: &reqwest::Client,
    base: &str,
    second: &Value,
) -> anyhow::Result<()> {
    let (status, third) = create_response(
        client,
        base.to_string(),
        json!({"model": "synthetic", "input": "Third turn.", "max_output_tokens": 4,
               "previous_response_id": second["id"]}),
    )
    .await?;
    assert_eq!(status, 200, "{third}");
    let tokens = |r: &Value| r["usage"]["input_tokens"].as_u64().unwrap_or_default();
    assert!(
        tokens(&third) > tokens(second),
        "the third turn read the first two"
    );
    Ok(())
}

/// Goes on from the stored `conversation` of a [`TwoTurns`] at `base`: its first turn is
/// there, and the new one is added after it.
async fn the_conversation_goes_on(
    client: &reqwest::Client,
    base: &str,
    conversation: &str,
) -> anyhow::Result<()> {
    let (status, turn) = create_response(
        client,
        base.to_string(),
        json!({"model": "synthetic", "input": "Next turn.", "max_output_tokens": 4,
               "conversation": conversation}),
    )
    .await?;
    assert_eq!(status, 200, "{turn}");
    let items: Value = client
        .get(format!(
            "{base}/conversations/{conversation}/items?order=asc"
        ))
        .send()
        .await?
        .json()
        .await?;
    let texts: Vec<&str> = items["data"]
        .as_array()
        .context("a list")?
        .iter()
        .filter(|i| i["role"] == "user")
        .filter_map(|i| i["content"][0]["text"].as_str())
        .collect();
    assert_eq!(texts, ["Conversation turn.", "Next turn."], "{items}");
    Ok(())
}

/// Whether `GET url` answers 200.
async fn answers_ok(client: &reqwest::Client, url: &str) -> bool {
    client
        .get(url)
        .send()
        .await
        .is_ok_and(|r| r.status().as_u16() == 200)
}

/// Whether the router at `metrics` says its mirror is in `state`.
async fn mirror_state_is(metrics: &str, state: &str) -> bool {
    let series = format!("switchyard_router_response_mirror{{state=\"{state}\"}} 1");
    match reqwest::get(metrics).await {
        Ok(answer) => answer
            .text()
            .await
            .is_ok_and(|text| text.lines().any(|line| line == series)),
        Err(_) => false,
    }
}

/// Whether the router at `metrics` holds `count` standby copies of other replicas' responses.
async fn standby_responses_are(metrics: &str, count: f64) -> bool {
    let Ok(text) = reqwest::get(metrics)
        .await
        .and_then(|r| r.error_for_status())
    else {
        return false;
    };
    let Ok(text) = text.text().await else {
        return false;
    };
    text.lines()
        .find_map(|line| line.strip_prefix("switchyard_router_standby_responses "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        == Some(count)
}

/// An operator who turns the store off (`--response-store-bytes 0`) gets responses that say
/// `store: false`, and a request naming one is told it is not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_without_a_response_store_stores_nothing() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        router_flags: strings(&["--response-store-bytes", "0"]),
        ..Default::default()
    })
    .await?;
    let base = cluster.router_openai_url();
    let client = http();
    let answer: Value = client
        .post(format!("{base}/responses"))
        .json(&json!({"model": "synthetic", "input": "Hi", "max_output_tokens": 3}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(answer["store"], false, "{answer}");
    let id = answer["id"].as_str().context("an id")?;
    let read = client.get(format!("{base}/responses/{id}")).send().await?;
    assert_eq!(read.status().as_u16(), 404);
    let going_on = client
        .post(format!("{base}/responses"))
        .json(&json!({"model": "synthetic", "input": "And?", "previous_response_id": id}))
        .send()
        .await?;
    assert_eq!(going_on.status().as_u16(), 404);
    let error: Value = going_on.json().await?;
    assert_eq!(
        error["error"]["code"], "previous_response_not_found",
        "{error}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_generation() -> anyhow::Result<()> {
    // One slot at 20 tokens/s: a 2000-token generation would hold it for 100 s.
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        gpu_flags: strings(&["--max-concurrent", "1", "--synthetic-tokens-per-s", "20"]),
        ..Default::default()
    })
    .await?;
    let base = cluster.router_openai_url();
    let client = http();
    let long = json!({"model": "synthetic", "stream": true, "max_tokens": 2000,
        "messages": [{"role": "user", "content": "a long story"}]});
    let response = client
        .post(format!("{base}/chat/completions"))
        .json(&long)
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("\"content\":\"a") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await?
            .context("stream ended early")??;
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    // The client goes away mid-stream.
    drop(body);

    // The slot frees only if the worker stopped generating: a short request now completes
    // long before the abandoned one would have.
    let short = json!({"model": "synthetic", "max_tokens": 3,
        "messages": [{"role": "user", "content": "quick one"}]});
    let response = client
        .post(format!("{base}/chat/completions"))
        .timeout(Duration::from_secs(15))
        .json(&short)
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await?;
    assert_eq!(body["choices"][0]["message"]["content"], "quick one quick");
    Ok(())
}

/// The events of a Responses API stream (`event:` and `data:` lines), one JSON `data` at a
/// time, as they arrive.
struct SseEvents {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffered: String,
    /// How many have been read.
    seen: usize,
}

impl SseEvents {
    fn new(response: reqwest::Response) -> Self {
        Self {
            body: Box::pin(response.bytes_stream()),
            buffered: String::new(),
            seen: 0,
        }
    }

    /// The next event's data; `None` once the stream has ended.
    async fn next(&mut self) -> anyhow::Result<Option<Value>> {
        loop {
            if let Some(end) = self.buffered.find("\n\n") {
                let event: String = self.buffered.drain(..end + 2).collect();
                let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                    continue; // a comment
                };
                self.seen += 1;
                return Ok(Some(serde_json::from_str(data)?));
            }
            match tokio::time::timeout(Duration::from_secs(30), self.body.next()).await? {
                Some(chunk) => self.buffered.push_str(std::str::from_utf8(&chunk?)?),
                None => return Ok(None),
            }
        }
    }
}

/// A raw `Worker.Serve` stream to one worker, as a router holds it.
struct WorkerStream {
    tx: mpsc::Sender<v1::RouterFrame>,
    frames: tonic::Streaming<v1::WorkerFrame>,
}

impl WorkerStream {
    async fn connect(address: std::net::SocketAddr) -> anyhow::Result<Self> {
        let mut client =
            v1::worker_client::WorkerClient::connect(format!("http://{address}")).await?;
        let (tx, rx) = mpsc::channel(16);
        let frames = client.serve(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Self { tx, frames })
    }

    async fn start(&self, id: &str, content: &str, max_tokens: u32) -> anyhow::Result<()> {
        let start = v1::WorkerStart {
            request_id: id.into(),
            model: "fast".into(),
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                content: content.into(),
                ..Default::default()
            }],
            sampling: Some(v1::SamplingParams {
                max_tokens,
                ..Default::default()
            }),
            ..Default::default()
        };
        self.tx
            .send(v1::RouterFrame {
                frame: Some(router_frame::Frame::Start(start)),
            })
            .await?;
        Ok(())
    }

    async fn cancel(&self, id: &str) -> anyhow::Result<()> {
        let cancel = v1::WorkerCancel {
            request_id: id.into(),
            reason: v1::FinishReason::Cancelled as i32,
        };
        self.tx
            .send(v1::RouterFrame {
                frame: Some(router_frame::Frame::Cancel(cancel)),
            })
            .await?;
        Ok(())
    }

    /// The next non-load frame, within `timeout`.
    async fn next(&mut self, timeout: Duration) -> anyhow::Result<worker_frame::Frame> {
        loop {
            let frame = tokio::time::timeout(timeout, self.frames.message())
                .await
                .context("no frame from the worker in time")??
                .context("worker stream ended")?;
            match frame.frame {
                Some(worker_frame::Frame::Load(_)) | None => continue,
                Some(frame) => return Ok(frame),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wse_gateway_against_a_real_upstream() -> anyhow::Result<()> {
    // Upstream: a whole Switchyard cluster serving "synthetic" over HTTP, one slot at 50 tok/s.
    let mut upstream = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        gpu_flags: strings(&["--max-concurrent", "1", "--synthetic-tokens-per-s", "50"]),
        ..Default::default()
    })
    .await?;
    let upstream_url = upstream.router_openai_url();

    // Downstream: its own etcd, a gateway worker-wse (model "fast" = upstream "synthetic",
    // one slot) and a router.
    let etcd = Etcd::start().await?;
    let gateway = Component::start(
        "wse-gateway",
        &strings(&[
            "worker-wse",
            "--etcd",
            &etcd.url,
            "--listen",
            "127.0.0.1:0",
            "--id",
            "wse-gateway",
            "--lease-ttl",
            "2s",
            "--engine",
            "gateway",
            "--gateway-url",
            &upstream_url,
            "--model",
            "fast",
            "--gateway-model-map",
            "fast=synthetic",
            "--max-concurrent",
            "1",
            "--gateway-chunk-timeout",
            "5s",
        ]),
        1,
    )
    .await?;
    let router = Component::start(
        "gateway-router",
        &strings(&[
            "router",
            "--etcd",
            &etcd.url,
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ]),
        2,
    )
    .await?;
    let router_grpc = router.addr("grpc").to_string();
    wait_until(
        Duration::from_secs(20),
        "the router to link the gateway",
        || async {
            list_router_workers(&router_grpc)
                .await
                .is_ok_and(|ids| ids == ["wse-gateway"])
        },
    )
    .await?;

    // 1. Streaming through router → gateway worker → upstream router → upstream worker.
    let client = http();
    let response = client
        .post(format!(
            "http://{}/v1/chat/completions",
            router.addr("http")
        ))
        .json(&json!({"model": "fast", "stream": true, "max_tokens": 6,
            "messages": [{"role": "user", "content": "alpha beta gamma"}]}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-switchyard-pool"], "wse");
    assert_eq!(response.headers()["x-switchyard-worker"], "wse-gateway");
    let (text, done) = sse_chat_text(&response.text().await?);
    assert_eq!(text, "alpha beta gamma alpha beta gamma");
    assert!(done);
    // Non-streaming, with the upstream's usage passed through.
    let body: Value = client
        .post(format!("http://{}/v1/completions", router.addr("http")))
        .json(&json!({"model": "fast", "max_tokens": 4, "prompt": "one two"}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(body["choices"][0]["text"], "one two one two");
    assert_eq!(body["usage"]["prompt_tokens"], 2, "{body}");
    // A gateway embeds nothing: with no other worker of the model, the refusal names it.
    let refused = client
        .post(format!("http://{}/v1/embeddings", router.addr("http")))
        .json(&json!({"model": "fast", "input": "one two"}))
        .send()
        .await?;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await?;
    assert_eq!(body["error"]["param"], "model", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("can embed a prompt")),
        "{body}"
    );
    // Log probabilities asked of the wse pool come from its endpoint, one per token, for
    // both endpoint forms (the upstream's synthetic engine is certain of every token).
    let body: Value = client
        .post(format!(
            "http://{}/v1/chat/completions",
            router.addr("http")
        ))
        .json(
            &json!({"model": "fast", "max_tokens": 3, "logprobs": true, "top_logprobs": 1,
            "messages": [{"role": "user", "content": "red green"}]}),
        )
        .send()
        .await?
        .json()
        .await?;
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let tokens: String = content.iter().filter_map(|e| e["token"].as_str()).collect();
    assert_eq!(content.len(), 3, "{body}");
    assert_eq!(tokens, body["choices"][0]["message"]["content"], "{body}");
    assert!(content.iter().all(|e| e["logprob"] == 0.0), "{body}");
    let body: Value = client
        .post(format!("http://{}/v1/completions", router.addr("http")))
        .json(&json!({"model": "fast", "max_tokens": 2, "prompt": "one two", "logprobs": 1}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        body["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "{body}"
    );

    // 2. Slot limit: the gateway's one slot is taken, a second start is refused.
    let mut worker = WorkerStream::connect(gateway.addr("grpc")).await?;
    worker.start("long", "a very long answer", 2000).await?;
    match worker.next(Duration::from_secs(10)).await? {
        worker_frame::Frame::Tokens(t) => assert_eq!(t.request_id, "long"),
        other => panic!("expected tokens, got {other:?}"),
    }
    worker.start("excess", "no room", 4).await?;
    let refused = loop {
        match worker.next(Duration::from_secs(10)).await? {
            worker_frame::Frame::Failed(f) => break f,
            worker_frame::Frame::Tokens(t) if t.request_id == "long" => continue,
            other => panic!("expected the excess start to fail, got {other:?}"),
        }
    };
    assert_eq!(refused.request_id, "excess");
    assert_eq!(refused.code, tonic::Code::ResourceExhausted as i32);

    // 3. Cancel mid-stream stops the upstream generation: the upstream's only slot frees
    // (a 2000-token generation at 50 tok/s would hold it for 40 s).
    worker.cancel("long").await?;
    loop {
        match worker.next(Duration::from_secs(10)).await? {
            worker_frame::Frame::Finished(f) => {
                assert_eq!(f.request_id, "long");
                assert_eq!(f.reason, v1::FinishReason::Cancelled as i32);
                break;
            }
            worker_frame::Frame::Tokens(_) => continue,
            other => panic!("expected Finished, got {other:?}"),
        }
    }
    let response = client
        .post(format!("{upstream_url}/chat/completions"))
        .timeout(Duration::from_secs(15))
        .json(&json!({"model": "synthetic", "max_tokens": 2,
            "messages": [{"role": "user", "content": "slot free"}]}))
        .send()
        .await?;
    assert_eq!(response.status(), 200, "{:?}", response.text().await);

    // 4. Upstream killed mid-stream: a clean Failed frame, no hang.
    worker.start("doomed", "keep talking", 2000).await?;
    match worker.next(Duration::from_secs(10)).await? {
        worker_frame::Frame::Tokens(t) => assert_eq!(t.request_id, "doomed"),
        other => panic!("expected tokens, got {other:?}"),
    }
    upstream.router.kill().await?;
    let failed = loop {
        match worker.next(Duration::from_secs(10)).await? {
            worker_frame::Frame::Failed(f) => break f,
            worker_frame::Frame::Tokens(_) => continue,
            other => panic!("expected Failed, got {other:?}"),
        }
    };
    assert_eq!(failed.request_id, "doomed");
    assert_eq!(failed.code, tonic::Code::Internal as i32, "{failed:?}");
    assert!(failed.message.contains("upstream"), "{failed:?}");

    // 5. Upstream gone: connection refused before any token → Unavailable (retriable).
    worker.start("refused", "anyone there", 4).await?;
    let failed = match worker.next(Duration::from_secs(10)).await? {
        worker_frame::Frame::Failed(f) => f,
        other => panic!("expected Failed, got {other:?}"),
    };
    assert_eq!(failed.code, tonic::Code::Unavailable as i32, "{failed:?}");
    assert!(failed.message.contains("cannot connect"), "{failed:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_wse_hosts_its_gateway_worker_in_process() -> anyhow::Result<()> {
    // Upstream: a Switchyard cluster serving "synthetic" over HTTP.
    let upstream = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    let upstream_url = upstream.router_openai_url();

    // One process: a router and the gateway worker it hosts; and a plain router beside it.
    let etcd = Etcd::start().await?;
    let hosting = Component::start(
        "router-wse",
        &strings(&[
            "router-wse",
            "--etcd",
            &etcd.url,
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--worker-id",
            "wse-hosted",
            "--worker-listen",
            "127.0.0.1:0",
            "--engine",
            "gateway",
            "--gateway-url",
            &upstream_url,
            "--model",
            "fast",
            "--gateway-model-map",
            "fast=synthetic",
        ]),
        3,
    )
    .await?;
    let other = Component::start(
        "other-router",
        &strings(&[
            "router",
            "--etcd",
            &etcd.url,
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ]),
        2,
    )
    .await?;
    for router in [
        hosting.component_addr("router", "grpc").to_string(),
        other.addr("grpc").to_string(),
    ] {
        wait_until(
            Duration::from_secs(20),
            "both routers to link the hosted worker",
            || async {
                list_router_workers(&router)
                    .await
                    .is_ok_and(|ids| ids == ["wse-hosted"])
            },
        )
        .await?;
    }
    // Its own router dialled it in process; the other one over the network, at the address
    // the worker announced.
    for handed_over in [
        "linking the hosted worker in process",
        "hosting router's stream opened",
    ] {
        hosting
            .wait_for_log(handed_over, Duration::from_secs(5))
            .await?;
    }
    let worker_addr = hosting.component_addr("worker-wse", "grpc");
    assert_ne!(worker_addr, hosting.component_addr("router", "grpc"));

    let client = http();
    for router_http in [hosting.component_addr("router", "http"), other.addr("http")] {
        let response = client
            .post(format!("http://{router_http}/v1/chat/completions"))
            .json(&json!({"model": "fast", "stream": true, "max_tokens": 6,
                "messages": [{"role": "user", "content": "alpha beta gamma"}]}))
            .send()
            .await?;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-switchyard-pool"], "wse");
        assert_eq!(response.headers()["x-switchyard-worker"], "wse-hosted");
        let (text, done) = sse_chat_text(&response.text().await?);
        assert_eq!(
            text, "alpha beta gamma alpha beta gamma",
            "via {router_http}"
        );
        assert!(done);
    }
    // One /metrics for both components, each family once.
    let metrics = client
        .get(format!(
            "http://{}/metrics",
            hosting.component_addr("router", "http")
        ))
        .send()
        .await?
        .text()
        .await?;
    assert!(metrics.contains("switchyard_router_"), "{metrics}");
    assert!(metrics.contains("switchyard_worker_"), "{metrics}");
    let mut families: Vec<&str> = metrics
        .lines()
        .filter(|line| line.starts_with("# TYPE "))
        .collect();
    let listed = families.len();
    families.sort_unstable();
    families.dedup();
    assert_eq!(
        families.len(),
        listed,
        "a metric family is registered twice"
    );
    Ok(())
}

/// A page on an origin the operator allowed (`--http-cors-origin`) calls the router's HTTP API
/// from a real browser, reading the answer and its placement headers; the same page under
/// another origin is kept out by the browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_page_on_an_allowed_origin_calls_the_http_api() -> anyhow::Result<()> {
    let page_port = switchyard_tests::free_port();
    let allowed = format!("http://127.0.0.1:{page_port}");
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        router_flags: strings(&["--http-cors-origin", &allowed]),
        ..Default::default()
    })
    .await?;
    // The page's origin: a plain static server, nothing of Switchyard's.
    let site = tempfile::tempdir()?;
    std::fs::write(
        site.path().join("index.html"),
        "<!doctype html><title>chat page</title>",
    )?;
    let _server = tokio::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            &page_port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(site.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("python3 -m http.server")?;
    let page = format!("{allowed}/");
    wait_until(Duration::from_secs(30), "the page server", || async {
        http().get(&page).send().await.is_ok()
    })
    .await?;

    // What a browser chat client does: a JSON POST with its SDK's own headers (which make the
    // browser ask first, a preflight), then reads the answer and a placement header.
    let call = r#"
        return fetch(arguments[0], {
            method: 'POST',
            headers: {'content-type': 'application/json', 'x-stainless-lang': 'js'},
            body: JSON.stringify({model: 'synthetic', max_tokens: 3,
                                  messages: [{role: 'user', content: 'alpha beta'}]}),
        })
        .then(async r => ({status: r.status, worker: r.headers.get('x-switchyard-worker'),
                           body: await r.json()}))
        .catch(e => ({error: String(e)}));
    "#;
    let title = "return document.title";
    let url = json!(format!("{}/chat/completions", cluster.router_openai_url()));
    let browser = switchyard_tests::browser::Browser::start().await?;
    browser.goto(&page).await?;
    assert_eq!(browser.execute(title, vec![]).await?, "chat page");
    let answer = browser.execute(call, vec![url.clone()]).await?;
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(
        answer["body"]["choices"][0]["message"]["content"], "alpha beta alpha",
        "{answer}"
    );
    assert!(
        answer["worker"].as_str().is_some_and(|w| !w.is_empty()),
        "the page reads the placement headers: {answer}"
    );

    // The same server under another name is another origin, not allowed.
    browser
        .goto(&format!("http://localhost:{page_port}/"))
        .await?;
    assert_eq!(
        browser.execute(title, vec![]).await?,
        "chat page",
        "the page loaded under its other name"
    );
    let refused = browser.execute(call, vec![url]).await?;
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("Failed to fetch")),
        "{refused}"
    );
    browser.close().await?;
    Ok(())
}
