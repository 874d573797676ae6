//! End to end on the real model: a cluster whose GPU worker runs the native candle engine on
//! SmolLM2-135M-Instruct (`scripts/fetch-model.sh` puts it in `models/`; CI runs that script
//! first), asked through the router's OpenAI front door and its gRPC `Generate`; and two such
//! workers, one handing a greedy generation off to the other mid-stream as it drains.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use switchyard_client::{Completion, SessionClient};
use switchyard_proto::v1::{self, admin_client::AdminClient, server_frame};
use switchyard_tests::{Cluster, ClusterSpec};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

async fn real_model_cluster(gpu_workers: usize) -> anyhow::Result<Cluster> {
    real_model_cluster_with(gpu_workers, &[]).await
}

/// [`real_model_cluster`] with more flags for its workers.
async fn real_model_cluster_with(
    gpu_workers: usize,
    worker_flags: &[&str],
) -> anyhow::Result<Cluster> {
    let path = switchyard_tests::real_model_path()?;
    Cluster::start(ClusterSpec {
        gpu_workers,
        wse_workers: 0,
        gpu_flags: vec![
            "--engine".into(),
            "candle".into(),
            "--model-path".into(),
            path,
            "--max-concurrent".into(),
            "4".into(),
        ]
        .into_iter()
        .chain(worker_flags.iter().map(|f| f.to_string()))
        .collect(),
        ..Default::default()
    })
    .await
}

/// Waits until the router has fetched the workers' tokenizer (before that it sends requests as
/// text and knows no prompt's exact length).
async fn router_has_the_tokenizer(cluster: &Cluster) -> anyhow::Result<()> {
    switchyard_tests::wait_until(
        Duration::from_secs(60),
        "the router to fetch the tokenizer",
        || {
            let log = std::fs::read_to_string(&cluster.router.log).unwrap_or_default();
            async move { log.contains("tokenizer fetched") }
        },
    )
    .await
    .map(drop)
}

#[tokio::test]
async fn chat_through_the_router_gets_a_sensible_answer_from_the_real_model() -> anyhow::Result<()>
{
    let cluster = real_model_cluster(1).await?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;

    // The model is listed under the GGUF file's stem.
    let models: Value = client
        .get(format!("{}/models", cluster.router_openai_url()))
        .send()
        .await?
        .json()
        .await?;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, [MODEL], "{models}");

    // Greedy, so the answer is the model's own best one: the project's reference check prompt.
    let response = client
        .post(format!("{}/chat/completions", cluster.router_openai_url()))
        .json(&json!({
            "model": MODEL,
            "max_tokens": 16,
            "temperature": 0,
            "messages": [{"role": "user",
                          "content": "What is the capital of France? Answer in one word."}],
        }))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-switchyard-pool"], "gpu");
    let body: Value = response.json().await?;
    let answer = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(answer.contains("Paris"), "answer {answer:?} in {body}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
    assert!(
        body["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > 10,
        "{body}"
    );
    // With `ignore_eos` (vLLM's, as load tests send it) the same answer goes on to max_tokens.
    let body: Value = client
        .post(format!("{}/chat/completions", cluster.router_openai_url()))
        .json(&json!({
            "model": MODEL,
            "max_tokens": 16,
            "temperature": 0,
            "ignore_eos": true,
            "messages": [{"role": "user",
                          "content": "What is the capital of France? Answer in one word."}],
        }))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 16, "{body}");
    let longer = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(longer.starts_with(answer), "{longer:?} after {answer:?}");

    // `min_p` (vLLM's and llama.cpp's, sent as the SDK's extra_body is) close to 1 keeps only
    // the most likely token: at temperature 1.5, where the same seeds without it leave the
    // greedy answer, every seed gives that answer.
    let poem = |extra: Value| {
        let mut request = json!({
            "model": MODEL,
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
        });
        for (field, value) in extra.as_object().into_iter().flatten() {
            request[field] = value.clone();
        }
        let response = client
            .post(format!("{}/chat/completions", cluster.router_openai_url()))
            .json(&request)
            .send();
        async move {
            let body: Value = response.await?.json().await?;
            anyhow::Ok(
                body["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap_or_else(|| panic!("no answer in {body}"))
                    .to_string(),
            )
        }
    };
    let greedy = poem(json!({"temperature": 0})).await?;
    let mut wandered = 0;
    for seed in 1..=3 {
        let kept = poem(json!({"temperature": 1.5, "seed": seed, "min_p": 0.99})).await?;
        assert_eq!(kept, greedy, "seed {seed}");
        let free = poem(json!({"temperature": 1.5, "seed": seed, "min_p": null})).await?;
        wandered += usize::from(free != greedy);
    }
    assert!(wandered > 0, "temperature 1.5 never left {greedy:?}");

    // `n` choices with a seed: choice i is drawn with the seed plus i, so the choices are not
    // copies of one answer, and the same request gives the same choices again; the first is
    // the answer a request of one choice gets with that seed.
    let choices = |n: u32| {
        let response = client
            .post(format!("{}/chat/completions", cluster.router_openai_url()))
            .json(&json!({
                "model": MODEL, "max_tokens": 12, "temperature": 1.2, "seed": 11, "n": n,
                "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
            }))
            .send();
        async move {
            let body: Value = response.await?.json().await?;
            let texts: Vec<String> = body["choices"]
                .as_array()
                .unwrap_or_else(|| panic!("no choices in {body}"))
                .iter()
                .map(|choice| {
                    choice["message"]["content"]
                        .as_str()
                        .unwrap_or_default()
                        .into()
                })
                .collect();
            assert_eq!(body["usage"]["completion_tokens"], 12 * n, "{body}");
            anyhow::Ok(texts)
        }
    };
    let three = choices(3).await?;
    assert_eq!(three.len(), 3);
    assert!(
        three[0] != three[1] && three[1] != three[2],
        "copies of one answer: {three:?}"
    );
    assert_eq!(choices(3).await?, three, "the same seed, the same choices");
    assert_eq!(
        choices(1).await?,
        three[..1],
        "choice 0 is the seed's own answer"
    );

    // The same question over gRPC streams the same greedy text in sequenced chunks.
    let mut grpc =
        v1::inference_client::InferenceClient::connect(format!("http://{}", cluster.router_addr()))
            .await?;
    let mut stream = grpc
        .generate(v1::GenerateRequest {
            request_id: "real-model-1".into(),
            model: MODEL.into(),
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                content: "What is the capital of France? Answer in one word.".into(),
                ..Default::default()
            }],
            sampling: Some(v1::SamplingParams {
                max_tokens: 16,
                temperature: Some(0.0),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut text = String::new();
    let mut next_seq = 0;
    let mut finished = None;
    while let Some(frame) = stream.message().await? {
        match frame.frame {
            Some(server_frame::Frame::Tokens(t)) => {
                assert_eq!(t.seq, next_seq, "chunks arrive in order, none missing");
                next_seq += 1;
                text.push_str(&t.text);
            }
            Some(server_frame::Frame::Finished(f)) => finished = Some(f),
            Some(server_frame::Frame::Failed(f)) => anyhow::bail!("request failed: {f:?}"),
            _ => {}
        }
    }
    assert!(finished.is_some(), "stream ended without Finished");
    assert_eq!(text, answer, "gRPC and HTTP answers differ");
    Ok(())
}

/// A greedy generation moved to another worker mid-stream (its worker drains with hand-off on)
/// goes on exactly as it would have where it started: the new worker prefills the prompt and
/// the tokens the client already has, then continues greedily.
#[tokio::test]
async fn a_greedy_generation_moved_mid_stream_says_what_it_would_have_said_unmoved()
-> anyhow::Result<()> {
    let cluster = real_model_cluster(2).await?;
    let patience = Duration::from_secs(300);
    cluster
        .set_policy(
            &json!({"migration": {"enabled": true, "drain_handoff": true, "rebalance": false,
                                  "min_remaining_tokens": 4}}),
            patience,
        )
        .await?;

    const MAX_TOKENS: u32 = 96;
    let request = |id: &str| v1::GenerateRequest {
        request_id: id.into(),
        model: MODEL.into(),
        messages: vec![v1::ChatMessage {
            role: "user".into(),
            content: "Write a long story about a lighthouse keeper and a storm.".into(),
            ..Default::default()
        }],
        sampling: Some(v1::SamplingParams {
            max_tokens: MAX_TOKENS,
            temperature: Some(0.0),
            ..Default::default()
        }),
        class: v1::RequestClass::CostSensitive as i32,
        ..Default::default()
    };
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let unmoved = session.start(request("unmoved"))?.collect().await;
    assert!(unmoved.finished.is_some(), "{:?}", unmoved.failed);
    assert!(unmoved.moved.is_empty(), "{:?}", unmoved.moved);
    // Long enough to move in the middle of.
    assert!(unmoved.token_ids.len() >= 48, "{:?}", unmoved.text);

    let mut stream = session.start(request("moved"))?;
    let mut moved = Completion::default();
    while moved.token_ids.len() < 8 {
        moved.absorb(stream.next().await.expect("stream open"));
    }
    let busy = moved.accepted.clone().expect("accepted").worker_id;
    AdminClient::new(
        switchyard_client::connect_channel(&cluster.control_plane.addr("grpc").to_string()).await?,
    )
    .drain(v1::DrainRequest {
        worker_id: busy.clone(),
    })
    .await?;
    while moved.moved.is_empty() {
        let frame = stream.next().await;
        let frame = frame.unwrap_or_else(|| panic!("ended without moving: {moved:?}"));
        moved.absorb(frame);
        assert!(
            moved.finished.is_none(),
            "finished before moving: {moved:?}"
        );
    }
    let at = moved.token_ids.len();
    assert_eq!(moved.moved[0].reason, "drain");
    assert_eq!(moved.moved[0].from_worker_id, busy);
    assert_ne!(moved.moved[0].to_worker_id, busy);
    while let Some(frame) = stream.next().await {
        moved.absorb(frame);
    }
    assert!(moved.finished.is_some(), "{:?}", moved.failed);
    assert!(at < moved.token_ids.len(), "moved after the last token");
    assert_eq!(
        moved.token_ids, unmoved.token_ids,
        "moved at token {at}: {:?} vs {:?}",
        moved.text, unmoved.text
    );
    assert_eq!(moved.text, unmoved.text);
    assert_eq!(
        moved.finished.map(|f| f.reason),
        unmoved.finished.map(|f| f.reason)
    );
    Ok(())
}

/// Tokenizing a long prompt takes the router milliseconds (40 KiB of text ~10 ms in a release
/// build), so it happens off the runtime's threads and off the session's reader: a short
/// request sent right after a long one on the same session is placed while the long one is
/// still being tokenized, not after it (before, it waited: `switchyard-bench long-prompts`).
#[tokio::test]
async fn a_long_prompt_being_tokenized_does_not_hold_up_the_next_request_on_its_session()
-> anyhow::Result<()> {
    let cluster = real_model_cluster(1).await?;
    // The router tokenizes only once it has the workers' tokenizer.
    router_has_the_tokenizer(&cluster).await?;
    let request = |id: &str, content: &str| {
        switchyard_tests::chat_request(MODEL, id, v1::RequestClass::CostSensitive, content, 1)
    };
    // ~6 000 tokens: within the model's context, and (this router is a debug build) hundreds of
    // milliseconds of tokenizing.
    let long_prompt =
        "The lighthouse keeper counted the waves and wrote each one down. ".repeat(400);
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let mut long = session.start(request("long", &long_prompt))?;
    let mut short = session.start(request("short", "Say hello."))?;
    let first = tokio::select! {
        biased;
        frame = long.next() => ("long", frame),
        frame = short.next() => ("short", frame),
    };
    assert!(
        matches!(first, ("short", Some(server_frame::Frame::Accepted(_)))),
        "the short request waited for the long one's tokenizing: {first:?}"
    );
    session.cancel("long")?;
    let short = short.collect().await;
    assert!(short.finished.is_some(), "{:?}", short.failed);
    let long = long.collect().await;
    assert!(
        long.finished.is_some() || long.failed.is_some(),
        "the long request ended: {long:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_long_prompt_being_tokenized_does_not_hold_up_the_next_start_on_a_worker_stream()
-> anyhow::Result<()> {
    let cluster = real_model_cluster(1).await?;
    // Straight on the worker's stream, as a router that has no tokenizer yet sends them: text,
    // no prompt ids, so the engine tokenizes.
    let channel =
        switchyard_client::connect_channel(&cluster.gpu[0].addr("grpc").to_string()).await?;
    let (starts, rx) = tokio::sync::mpsc::channel::<v1::RouterFrame>(4);
    let mut frames = v1::worker_client::WorkerClient::new(channel)
        .serve(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let start = |id: &str, prompt: String| v1::RouterFrame {
        frame: Some(v1::router_frame::Frame::Start(v1::WorkerStart {
            request_id: id.into(),
            model: MODEL.into(),
            prompt,
            sampling: Some(v1::SamplingParams {
                max_tokens: 1,
                ..Default::default()
            }),
            ..Default::default()
        })),
    };
    // ~180 000 tokens, beyond the model's context: refused once tokenized, which (the
    // tokenizer is a debug build here) takes seconds.
    let long_prompt =
        "The lighthouse keeper counted the waves and wrote each one down. ".repeat(12_000);
    starts.send(start("long", long_prompt)).await?;
    starts.send(start("short", "Say hello.".into())).await?;
    let mut order = Vec::new();
    while order.len() < 2 {
        let Some(frame) = frames.message().await? else {
            anyhow::bail!("the worker ended the stream after {order:?}");
        };
        let ended = match frame.frame {
            Some(v1::worker_frame::Frame::Finished(f)) => f.request_id,
            Some(v1::worker_frame::Frame::Failed(f)) => {
                assert!(
                    f.request_id == "long" && f.message.contains("context length"),
                    "{f:?}"
                );
                f.request_id
            }
            _ => continue,
        };
        order.push(ended);
    }
    assert_eq!(
        order,
        ["short", "long"],
        "the short start waited for the long one's tokenizing"
    );
    Ok(())
}

/// Greedy ids and text of a raw-prompt generation over gRPC `Generate`, with `sampling`.
async fn greedy_generation(
    cluster: &Cluster,
    prompt: &str,
    sampling: v1::SamplingParams,
) -> anyhow::Result<(String, Vec<u32>)> {
    let frames = generation(cluster, prompt, sampling)
        .await?
        .map_err(|f| anyhow::anyhow!("request failed: {f:?}"))?;
    let text = frames.iter().map(|t| t.text.as_str()).collect();
    let ids = frames.iter().flat_map(|t| t.token_ids.clone()).collect();
    Ok((text, ids))
}

/// A context overflow found past the router — by the endpoint behind a wafer-scale gateway
/// (here a whole Switchyard cluster whose worker caps the context at 256 tokens), where the
/// router has no tokenizer to check it — reaches clients as the router's own check answers
/// it: OpenAI's `context_length_exceeded` naming the prompt's field, and on a `Session` a
/// `Failed` frame with the field and the reason. It was a retryable upstream fault.
#[tokio::test]
async fn a_context_overflow_found_past_the_router_is_still_context_length_exceeded()
-> anyhow::Result<()> {
    let upstream = real_model_cluster_with(1, &["--max-model-len", "256"]).await?;
    let model_map = format!("fast={MODEL}");
    let front = Cluster::start(ClusterSpec {
        gpu_workers: 0,
        wse_workers: 1,
        wse_flags: [
            "--engine",
            "gateway",
            "--gateway-url",
            &upstream.router_openai_url(),
            "--model",
            "fast",
            "--gateway-model-map",
            &model_map,
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
    .await?;
    let too_long = "hello ".repeat(300);
    let client = reqwest::Client::new();
    for (endpoint, prompt, field) in [
        (
            "chat/completions",
            json!({"messages": [{"role": "user", "content": too_long}]}),
            "messages",
        ),
        ("completions", json!({"prompt": too_long}), "prompt"),
    ] {
        let mut request = json!({"model": "fast", "max_tokens": 4});
        request
            .as_object_mut()
            .expect("an object")
            .extend(prompt.as_object().expect("an object").clone());
        let response = client
            .post(format!("{}/{endpoint}", front.router_openai_url()))
            .json(&request)
            .send()
            .await?;
        assert_eq!(response.status(), 400, "{endpoint}");
        let body: Value = response.json().await?;
        assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
        assert_eq!(body["error"]["param"], field, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("context")),
            "{body}"
        );
    }

    let session = SessionClient::connect(&front.router_addr()).await?;
    let completion = session
        .start(v1::GenerateRequest {
            request_id: "too-long".into(),
            model: "fast".into(),
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                content: too_long,
                ..Default::default()
            }],
            sampling: Some(v1::SamplingParams {
                max_tokens: 4,
                ..Default::default()
            }),
            ..Default::default()
        })?
        .collect()
        .await;
    let failed = completion.failed.expect("the request failed");
    assert_eq!(
        failed.code,
        tonic::Code::InvalidArgument as i32,
        "{failed:?}"
    );
    assert_eq!(
        (failed.field.as_str(), failed.reason.as_str()),
        ("messages", switchyard_proto::CONTEXT_LENGTH_EXCEEDED),
        "{failed:?}"
    );
    Ok(())
}

/// The token frames of a greedy raw-prompt generation over gRPC `Generate`, with `sampling`; a
/// `Failed` frame is the inner error.
async fn generation(
    cluster: &Cluster,
    prompt: &str,
    sampling: v1::SamplingParams,
) -> anyhow::Result<Result<Vec<v1::Tokens>, v1::Failed>> {
    let request = v1::GenerateRequest {
        prompt: prompt.into(),
        ..Default::default()
    };
    grpc_generation(cluster, request, sampling).await
}

/// [`generation`] of `request`'s prompt (text or token ids) on the model.
async fn grpc_generation(
    cluster: &Cluster,
    request: v1::GenerateRequest,
    sampling: v1::SamplingParams,
) -> anyhow::Result<Result<Vec<v1::Tokens>, v1::Failed>> {
    let mut grpc =
        v1::inference_client::InferenceClient::connect(format!("http://{}", cluster.router_addr()))
            .await?;
    let mut stream = grpc
        .generate(v1::GenerateRequest {
            model: MODEL.into(),
            sampling: Some(v1::SamplingParams {
                temperature: Some(0.0),
                ..sampling
            }),
            ..request
        })
        .await?
        .into_inner();
    let mut frames = Vec::new();
    while let Some(frame) = stream.message().await? {
        match frame.frame {
            Some(server_frame::Frame::Tokens(t)) => frames.push(t),
            Some(server_frame::Frame::Failed(f)) => return Ok(Err(f)),
            _ => {}
        }
    }
    Ok(Ok(frames))
}

/// A prompt given as token ids (OpenAI's token-array `prompt`, gRPC's `prompt_token_ids`) is
/// generated from as given: the ids of a text prompt, as the model's own tokenizer writes it,
/// answer as the text does (greedy), alone, in a batch and over gRPC; an id outside the
/// vocabulary is refused naming it.
#[tokio::test]
async fn a_prompt_of_token_ids_answers_as_its_text_does() -> anyhow::Result<()> {
    let cluster = real_model_cluster(1).await?;
    router_has_the_tokenizer(&cluster).await?;
    let prompt = "The capital of France is";
    let path = switchyard_tests::real_model_path()?;
    let file = switchyard_worker_gpu::gguf::GgufFile::open(std::path::Path::new(&path))?;
    let tokenizer = switchyard_worker_gpu::tokenizer::GgufTokenizer::from_gguf(&file.content)?;
    let ids = tokenizer.encode(prompt)?;
    let vocab = tokenizer.vocab_size();

    let http = reqwest::Client::new();
    let complete = |prompt: Value| {
        let request = http
            .post(format!("{}/completions", cluster.router_openai_url()))
            .json(&json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}));
        async move {
            let response = request.send().await?;
            Ok::<_, anyhow::Error>((response.status().as_u16(), response.json::<Value>().await?))
        }
    };
    let (status, as_text) = complete(json!(prompt)).await?;
    assert_eq!(status, 200, "{as_text}");
    let text = as_text["choices"][0]["text"].clone();
    assert!(text.as_str().is_some_and(|t| !t.is_empty()), "{as_text}");
    let (status, as_ids) = complete(json!(ids)).await?;
    assert_eq!(status, 200, "{as_ids}");
    assert_eq!(as_ids["choices"][0]["text"], text, "{as_ids}");
    assert_eq!(as_ids["usage"]["prompt_tokens"], ids.len(), "{as_ids}");

    let (status, batch) = complete(json!([ids, prompt])).await?;
    assert_eq!(status, 200, "{batch}");
    for choice in 0..2 {
        assert_eq!(batch["choices"][choice]["text"], text, "{batch}");
    }

    let frames = grpc_generation(
        &cluster,
        v1::GenerateRequest {
            prompt_token_ids: ids.clone(),
            ..Default::default()
        },
        v1::SamplingParams {
            max_tokens: 8,
            ..Default::default()
        },
    )
    .await?
    .map_err(|f| anyhow::anyhow!("request failed: {f:?}"))?;
    let grpc_text: String = frames.iter().map(|t| t.text.as_str()).collect();
    assert_eq!(Some(grpc_text.as_str()), text.as_str());

    let mut outside = ids.clone();
    outside.push(vocab as u32);
    let (status, refused) = complete(json!(outside)).await?;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(
        refused["error"]["param"],
        format!("prompt[{}]", ids.len()),
        "{refused}"
    );
    Ok(())
}

/// An echoing text completion with `logprobs` scores its prompt, as evaluation harnesses ask
/// (lm-eval's loglikelihood requests: `echo`, `logprobs: 1`, `max_tokens: 1`): the text starts
/// with the prompt, every prompt token is listed with its log probability given those before
/// it (the first `null`), and the last one's equals what generating from the prompt before it
/// reports for that token. Then `tests/python/openai_eval_check.py` asks the same with the
/// official SDK and reads the answers as lm-evaluation-harness does.
#[tokio::test]
async fn an_echoed_prompt_is_scored_as_evaluation_harnesses_ask() -> anyhow::Result<()> {
    let cluster = real_model_cluster(1).await?;
    router_has_the_tokenizer(&cluster).await?;
    let http = reqwest::Client::new();
    let complete = |body: Value| {
        let request = http
            .post(format!("{}/completions", cluster.router_openai_url()))
            .json(&body);
        async move {
            let response = request.send().await?;
            anyhow::ensure!(response.status() == 200, "{}", response.text().await?);
            Ok::<_, anyhow::Error>(response.json::<Value>().await?)
        }
    };
    let (context, continuation) = ("The capital of France is", " Paris");
    let scored = complete(
        json!({"model": MODEL, "prompt": format!("{context}{continuation}"),
        "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": true}),
    )
    .await?;
    let choice = &scored["choices"][0];
    let text = choice["text"].as_str().unwrap_or_default();
    assert!(
        text.starts_with(&format!("{context}{continuation}")),
        "{scored}"
    );
    let logprobs = &choice["logprobs"];
    let tokens: Vec<&str> = logprobs["tokens"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let prompt_tokens = scored["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize;
    assert_eq!(tokens.len(), prompt_tokens + 1, "{scored}");
    assert_eq!(
        tokens[..prompt_tokens].concat(),
        format!("{context}{continuation}")
    );
    let token_logprobs = logprobs["token_logprobs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        token_logprobs[0].is_null() && logprobs["top_logprobs"][0].is_null(),
        "{scored}"
    );
    assert!(
        token_logprobs[1..]
            .iter()
            .all(|l| l.as_f64().is_some_and(|l| l <= 0.0)),
        "{scored}"
    );
    assert_eq!(
        tokens[prompt_tokens - 1],
        continuation,
        "one token: {scored}"
    );
    let scored_continuation = token_logprobs[prompt_tokens - 1].as_f64().unwrap_or(1.0);

    // Generating from the context alone: greedy, it says " Paris" with that probability.
    let generated = complete(json!({"model": MODEL, "prompt": context, "max_tokens": 1,
        "temperature": 0, "logprobs": 1}))
    .await?;
    let said = &generated["choices"][0]["logprobs"];
    assert_eq!(said["tokens"][0], continuation, "{generated}");
    let said = said["token_logprobs"][0].as_f64().unwrap_or(0.0);
    assert!(
        (said - scored_continuation).abs() < 1e-3,
        "scored {scored_continuation}, generated {said}"
    );

    // The same through the official SDK, read as lm-evaluation-harness reads it.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_eval_check.py");
    let out =
        switchyard_tests::program_output("python3", &[script, &cluster.router_openai_url(), MODEL])
            .await?;
    assert!(out.contains("openai-eval: 6 passed, 0 failed"), "{out}");
    Ok(())
}

/// A prompt to score goes only to a worker that can score it. Beside the GPU worker running
/// the model, a second one serves the model's name with the synthetic engine, which cannot
/// score a prompt and, with four times the slots, is the one placement prefers: plain requests
/// go there, every echo goes to the model. A model only such workers serve is refused naming
/// `echo`.
#[tokio::test]
async fn a_prompt_to_score_is_placed_on_a_worker_that_can_score_it() -> anyhow::Result<()> {
    let cluster = real_model_cluster(1).await?;
    let _synthetic = switchyard_tests::Component::start(
        "gpu-synthetic",
        &switchyard_tests::strings(&[
            "worker-gpu",
            "--etcd",
            &cluster.etcd.url,
            "--listen",
            "127.0.0.1:0",
            "--id",
            "gpu-synthetic",
            "--engine",
            "synthetic",
            "--model",
            MODEL,
            "--model",
            "synthetic-only",
            "--max-concurrent",
            "16",
        ]),
        1,
    )
    .await?;
    cluster
        .wait_for_router_workers(2, Duration::from_secs(60))
        .await?;
    let http = reqwest::Client::new();
    let complete = |model: &str, echo: bool, user: usize| {
        http.post(format!("{}/completions", cluster.router_openai_url()))
            .json(
                &json!({"model": model, "prompt": "The capital of France is",
                "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": echo,
                "user": format!("user-{user}")}),
            )
            .send()
    };
    let worker = |response: &reqwest::Response| {
        response
            .headers()
            .get("x-switchyard-worker")
            .and_then(|w| w.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let mut plain_on = Vec::new();
    for user in 0..4 {
        let plain = complete(MODEL, false, user).await?;
        assert_eq!(plain.status(), 200);
        plain_on.push(worker(&plain));
    }
    assert!(
        plain_on.iter().any(|w| w == "gpu-synthetic"),
        "plain requests may go to either worker: {plain_on:?}"
    );
    for user in 0..4 {
        let scored = complete(MODEL, true, user).await?;
        let on = worker(&scored);
        let body: Value = scored.json().await?;
        assert_eq!(on, "gpu-0", "the worker that can score it: {body}");
        assert!(
            body["choices"][0]["logprobs"]["token_logprobs"][0].is_null(),
            "{body}"
        );
    }

    let refused = complete("synthetic-only", true, 0).await?;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await?;
    assert_eq!(body["error"]["param"], "echo", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no worker serving model")),
        "{body}"
    );
    Ok(())
}

/// A latency-critical prompt to score, in a cluster whose wafer-scale pool cannot score one:
/// it borrows the GPU pool at once rather than waiting at the router for a wafer-scale slot
/// that could never take it (and being shed at the end of the lane's queue wait).
#[tokio::test]
async fn a_latency_critical_prompt_to_score_borrows_the_gpu_pool() -> anyhow::Result<()> {
    let path = switchyard_tests::real_model_path()?;
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 1,
        gpu_flags: switchyard_tests::strings(&[
            "--engine",
            "candle",
            "--model-path",
            &path,
            "--max-concurrent",
            "4",
        ]),
        wse_flags: switchyard_tests::strings(&["--engine", "synthetic", "--model", MODEL]),
        ..Default::default()
    })
    .await?;
    let http = reqwest::Client::new();
    let complete = |echo: bool| {
        http.post(format!("{}/completions", cluster.router_openai_url()))
            .header("x-switchyard-class", "latency-critical")
            .json(
                &json!({"model": MODEL, "prompt": "The capital of France is",
                "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": echo}),
            )
            .send()
    };
    let header = |response: &reqwest::Response, name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|w| w.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    // The premise: a plain latency-critical request goes to its home pool.
    let plain = complete(false).await?;
    assert_eq!(plain.status(), 200);
    assert_eq!(header(&plain, "x-switchyard-worker"), "wse-0");

    let scored = complete(true).await?;
    let status = scored.status();
    let on = header(&scored, "x-switchyard-worker");
    let body: Value = scored.json().await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(on, "gpu-0", "{body}");
    assert!(
        body["choices"][0]["logprobs"]["token_logprobs"][0].is_null(),
        "{body}"
    );
    assert!(
        body["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("The capital of France is")),
        "{body}"
    );
    Ok(())
}

/// `/tokenize` counts what the engine sees — a prompt's ids, a conversation's with its chat
/// template and tools — so a client fits its context window by it; `/detokenize` gives the
/// ids' text back; `/v1/models` says how long the context is.
#[tokio::test]
async fn tokenize_counts_the_ids_the_engine_sees() -> anyhow::Result<()> {
    let cluster = real_model_cluster(1).await?;
    router_has_the_tokenizer(&cluster).await?;
    let http = reqwest::Client::new();
    let root = format!("http://{}", cluster.router.addr("http"));
    let post = |path: &str, body: Value| http.post(format!("{root}{path}")).json(&body).send();
    let models: Value = http
        .get(format!("{root}/v1/models"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(models["data"][0]["max_model_len"], 8192, "{models}");

    let prompt = "The capital of France is";
    let tokenized: Value = post(
        "/tokenize",
        json!({"model": MODEL, "prompt": prompt, "return_token_strs": true}),
    )
    .await?
    .json()
    .await?;
    let completion: Value = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 1}),
    )
    .await?
    .json()
    .await?;
    assert_eq!(
        tokenized["count"], completion["usage"]["prompt_tokens"],
        "{tokenized} {completion}"
    );
    assert_eq!(tokenized["max_model_len"], 8192);
    let pieces: Vec<String> = serde_json::from_value(tokenized["token_strs"].clone())?;
    assert_eq!(pieces.concat(), prompt);
    let text: Value = post(
        "/detokenize",
        json!({"model": MODEL, "tokens": tokenized["tokens"]}),
    )
    .await?
    .json()
    .await?;
    assert_eq!(text["prompt"], prompt);

    let conversation = json!({"model": MODEL, "max_tokens": 1,
        "messages": [{"role": "system", "content": "You answer briefly."},
                     {"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]});
    let tokenized: Value = post("/tokenize", conversation.clone())
        .await?
        .json()
        .await?;
    let chat: Value = post("/v1/chat/completions", conversation)
        .await?
        .json()
        .await?;
    assert_eq!(
        tokenized["count"], chat["usage"]["prompt_tokens"],
        "{tokenized} {chat}"
    );
    assert_eq!(tokenized["token_strs"], Value::Null);

    for (path, body, status, param) in [
        (
            "/detokenize",
            json!({"model": MODEL, "tokens": [1, 99999999]}),
            400,
            "tokens[1]",
        ),
        (
            "/tokenize",
            json!({"model": "nope", "prompt": "x"}),
            404,
            "model",
        ),
        (
            "/tokenize",
            json!({"model": MODEL, "prompt": "x", "messages": []}),
            400,
            "prompt",
        ),
        (
            "/tokenize",
            json!({"model": MODEL, "add_special_tokens": true,
                "messages": [{"role": "user", "content": "x"}]}),
            400,
            "add_special_tokens",
        ),
    ] {
        let refused = post(path, body.clone()).await?;
        assert_eq!(refused.status(), status, "{body}");
        let error: Value = refused.json().await?;
        assert_eq!(error["error"]["param"], param, "{error}");
    }
    Ok(())
}

/// How often the most repeated id occurs.
fn most_repeats(ids: &[u32]) -> usize {
    ids.iter()
        .map(|id| ids.iter().filter(|other| *other == id).count())
        .max()
        .unwrap_or(0)
}

#[tokio::test]
async fn penalties_and_a_logit_bias_steer_the_real_models_greedy_choice() -> anyhow::Result<()> {
    let cluster = real_model_cluster(1).await?;
    let prompt = "1, 1, 1, 1, 1, 1, 1, 1,";
    let sampling = |edit: fn(&mut v1::SamplingParams)| {
        let mut s = v1::SamplingParams {
            max_tokens: 16,
            ..Default::default()
        };
        edit(&mut s);
        s
    };
    let (plain_text, plain) = greedy_generation(&cluster, prompt, sampling(|_| {})).await?;
    // The premise: left alone, the model keeps repeating itself.
    assert!(most_repeats(&plain) >= 6, "{plain_text:?} {plain:?}");

    // Banning the greedy first token moves the first choice, and nothing else is needed.
    let banned = plain[0];
    let mut ban = sampling(|_| {});
    ban.logit_bias.insert(banned, -100.0);
    let (ban_text, biased) = greedy_generation(&cluster, prompt, ban).await?;
    assert!(!biased.contains(&banned), "{ban_text:?} {biased:?}");

    // Penalized by what it has produced, it repeats itself less than it did.
    let (frequency_text, frequency) = greedy_generation(
        &cluster,
        prompt,
        sampling(|s| {
            s.frequency_penalty = Some(1.0);
            s.presence_penalty = Some(1.0);
        }),
    )
    .await?;
    assert!(
        most_repeats(&frequency) < most_repeats(&plain),
        "{frequency_text:?} {frequency:?} against {plain_text:?}"
    );

    // The repetition penalty also counts the prompt: the prompt's tokens lose their pull.
    let (repetition_text, repetition) = greedy_generation(
        &cluster,
        prompt,
        sampling(|s| s.repetition_penalty = Some(1.5)),
    )
    .await?;
    assert_ne!(repetition[0], plain[0], "{repetition_text:?}");

    // The same request twice is the same answer: penalties are deterministic.
    let again = greedy_generation(
        &cluster,
        prompt,
        sampling(|s| s.repetition_penalty = Some(1.5)),
    )
    .await?;
    assert_eq!(again.1, repetition);

    // With the workers' tokenizer the router knows the vocabulary: an id past it is refused
    // before placement, the entry named (without it, the worker refuses it the same way).
    router_has_the_tokenizer(&cluster).await?;
    let mut outside = sampling(|_| {});
    outside.logit_bias.insert(1_000_000, 1.0);
    let error = generation(&cluster, prompt, outside)
        .await
        .expect_err("an id outside the vocabulary");
    let status = error
        .downcast_ref::<tonic::Status>()
        .ok_or_else(|| anyhow::anyhow!("not a status: {error:#}"))?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("sampling.logit_bias[1000000]: token id outside the vocabulary of 49152"),
        "{status:?}"
    );
    Ok(())
}

/// With the workers' tokenizer the router knows a prompt's exact length and the model's
/// context (here cut to 256 tokens by the workers' `--max-model-len`): a request that cannot
/// fit is refused before it is placed — a gRPC status from `Generate` (not a stream that is
/// accepted and then fails on the worker) and a 400 naming the field the client used — while
/// an OpenAI request that gives no bound gets the room the prompt leaves, as OpenAI does.
#[tokio::test]
async fn a_request_too_long_for_the_context_is_refused_before_placement() -> anyhow::Result<()> {
    const CONTEXT: u64 = 256;
    let cluster = real_model_cluster_with(1, &["--max-model-len", "256"]).await?;
    router_has_the_tokenizer(&cluster).await?;
    let too_long = "hello ".repeat(300);
    let mut grpc =
        v1::inference_client::InferenceClient::connect(format!("http://{}", cluster.router_addr()))
            .await?;
    let status = grpc
        .generate(v1::GenerateRequest {
            model: MODEL.into(),
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                content: too_long.clone(),
                ..Default::default()
            }],
            sampling: Some(v1::SamplingParams {
                max_tokens: 4,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("refused before the stream starts");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("messages: the prompt is")
            && status.message().contains("context length is 256"),
        "{status:?}"
    );

    // Over HTTP: a prompt that fits, with more output asked for than the rest of the context
    // holds, under either of OpenAI's names for the bound.
    let client = reqwest::Client::new();
    let prompt = "hello ".repeat(200);
    for field in ["max_tokens", "max_completion_tokens"] {
        let response = client
            .post(format!("{}/completions", cluster.router_openai_url()))
            .json(&json!({"model": MODEL, "prompt": prompt, field: 100}))
            .send()
            .await?;
        assert_eq!(response.status(), 400, "{field}");
        let body: Value = response.json().await?;
        assert_eq!(body["error"]["param"], field, "{body}");
        // OpenAI's code for it, which clients that trim old turns and retry look for.
        assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("lower {field} to at most")),
            "{body}"
        );
    }
    // A conversation longer than the context, as OpenAI answers it (it was `invalid_value`).
    let response = client
        .post(format!("{}/chat/completions", cluster.router_openai_url()))
        .json(&json!({"model": MODEL, "max_tokens": 4,
            "messages": [{"role": "user", "content": too_long}]}))
        .send()
        .await?;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["param"], "messages", "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");

    // None was placed: the router made no routing decision.
    let metrics = client
        .get(format!("http://{}/metrics", cluster.router.addr("http")))
        .send()
        .await?
        .text()
        .await?;
    let placed: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("switchyard_router_route_decisions") && !l.ends_with(" 0"))
        .collect();
    assert!(placed.is_empty(), "placed: {placed:?}");

    // Without a bound the default (256) is lowered to the room the prompt leaves: the answer
    // runs to the end of the context.
    let response = client
        .post(format!("{}/completions", cluster.router_openai_url()))
        .json(&json!({"model": MODEL, "prompt": prompt, "temperature": 0}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await?;
    let usage = &body["usage"];
    let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or_default();
    assert!((1..CONTEXT).contains(&prompt_tokens), "{body}");
    assert_eq!(
        usage["completion_tokens"].as_u64(),
        Some(CONTEXT - prompt_tokens),
        "{body}"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    Ok(())
}

/// Log probabilities from the real model: one per generated token, the greedy choice the most
/// likely token at its position, the listed alternatives in order and together no more likely
/// than certain; the OpenAI door reports the same numbers.
#[tokio::test]
async fn log_probabilities_describe_the_real_models_greedy_choices() -> anyhow::Result<()> {
    let cluster = real_model_cluster(1).await?;
    let prompt = "The capital of France is";
    let sampling = v1::SamplingParams {
        max_tokens: 8,
        logprobs: true,
        top_logprobs: 5,
        ..Default::default()
    };
    let frames = generation(&cluster, prompt, sampling)
        .await?
        .map_err(|f| anyhow::anyhow!("request failed: {f:?}"))?;
    let (mut ids, mut logprobs) = (Vec::new(), Vec::new());
    for t in frames {
        assert_eq!(t.logprobs.len(), t.token_ids.len(), "one per token: {t:?}");
        ids.extend(t.token_ids);
        logprobs.extend(t.logprobs);
    }
    assert!(!ids.is_empty());
    for (id, entry) in ids.iter().zip(&logprobs) {
        let chosen = entry.chosen.clone().expect("chosen");
        assert_eq!(chosen.token_id, *id, "{entry:?}");
        assert_eq!(entry.top.len(), 5, "{entry:?}");
        // Greedy: the chosen token is the most likely one.
        assert_eq!(entry.top[0].token_id, *id, "{entry:?}");
        assert_eq!(entry.top[0].logprob, chosen.logprob, "{entry:?}");
        assert!(
            entry.top.windows(2).all(|w| w[0].logprob >= w[1].logprob),
            "{entry:?}"
        );
        let mass: f32 = entry.top.iter().map(|t| t.logprob.exp()).sum();
        assert!(chosen.logprob < 0.0 && mass <= 1.0 + 1e-4, "{entry:?}");
    }

    // The same request over HTTP: the same tokens and numbers in OpenAI's completion form.
    let body: Value = reqwest::Client::new()
        .post(format!("{}/completions", cluster.router_openai_url()))
        .json(
            &json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "logprobs": 5}),
        )
        .send()
        .await?
        .json()
        .await?;
    let http = &body["choices"][0]["logprobs"];
    let http_logprobs: Vec<f64> = http["token_logprobs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let grpc_logprobs: Vec<f64> = logprobs
        .iter()
        .map(|e| f64::from(e.chosen.clone().unwrap_or_default().logprob))
        .collect();
    assert_eq!(http_logprobs.len(), grpc_logprobs.len(), "{body}");
    for (h, g) in http_logprobs.iter().zip(&grpc_logprobs) {
        assert!((h - g).abs() < 1e-5, "{h} vs {g}: {body}");
    }
    assert_eq!(
        http["top_logprobs"]
            .as_array()
            .map(|a| a[0].as_object().map(|o| o.len())),
        Some(Some(5)),
        "{body}"
    );
    Ok(())
}

/// Tool calling and structured output on the real model, as an agent uses them through the
/// official `openai` SDK — chat completions and the Responses API — and Anthropic's
/// Messages API through the official `anthropic` SDK: calls whole and streamed, a named function, one call only, the result
/// sent back and answered, JSON mode and a JSON schema, bad tools and schemas refused by name;
/// stored conversations (the Conversations API) the model's turns are added to, and the OpenAI
/// Agents SDK's conversation-backed session. Straight to
/// the GPU pool, and through a wafer-scale gateway worker
/// whose endpoint is that same cluster's OpenAI API (the gateway passes the tools on and the
/// calls back). Then over gRPC with the Rust client: the calls' pieces put together.
#[tokio::test]
async fn an_agent_calls_tools_on_the_real_model_straight_and_through_a_gateway()
-> anyhow::Result<()> {
    let cluster = real_model_cluster(1).await?;
    router_has_the_tokenizer(&cluster).await?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_tools_check.py");
    let straight =
        switchyard_tests::program_output("python3", &[script, &cluster.router_openai_url(), MODEL])
            .await?;
    assert!(
        straight.contains("openai-tools: 9 passed, 0 failed"),
        "{straight}"
    );
    let responses = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/openai_responses_check.py"
    );
    let straight = switchyard_tests::program_output(
        "python3",
        &[responses, &cluster.router_openai_url(), MODEL],
    )
    .await?;
    assert!(
        straight.contains("openai-responses: 21 passed, 0 failed"),
        "{straight}"
    );
    let conversations = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/openai_conversations_check.py"
    );
    let straight = switchyard_tests::program_output(
        "python3",
        &[conversations, &cluster.router_openai_url(), MODEL],
    )
    .await?;
    assert!(
        straight.contains("openai-conversations: 7 passed, 0 failed"),
        "{straight}"
    );
    let chat_store = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/openai_chat_store_check.py"
    );
    let straight = switchyard_tests::program_output(
        "python3",
        &[chat_store, &cluster.router_openai_url(), MODEL],
    )
    .await?;
    assert!(
        straight.contains("openai-chat-store: 6 passed, 0 failed"),
        "{straight}"
    );
    // The OpenAI Agents SDK keeping an agent's session in a stored conversation.
    let agents = concat!(env!("CARGO_MANIFEST_DIR"), "/python/agents_sdk_check.py");
    let straight =
        switchyard_tests::program_output("python3", &[agents, &cluster.router_openai_url(), MODEL])
            .await?;
    assert!(
        straight.contains("agents-sdk: 1 passed, 0 failed"),
        "{straight}"
    );
    let anthropic = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/anthropic_messages_check.py"
    );
    let straight = switchyard_tests::program_output(
        "python3",
        &[
            anthropic,
            cluster.router_openai_url().trim_end_matches("/v1"),
            MODEL,
        ],
    )
    .await?;
    assert!(
        straight.contains("anthropic-messages: 11 passed, 0 failed"),
        "{straight}"
    );

    let gateway = Cluster::start(ClusterSpec {
        gpu_workers: 0,
        wse_workers: 1,
        wse_flags: vec![
            "--engine".into(),
            "gateway".into(),
            "--gateway-url".into(),
            cluster.router_openai_url(),
            "--model".into(),
            MODEL.into(),
        ],
        ..Default::default()
    })
    .await?;
    let through =
        switchyard_tests::program_output("python3", &[script, &gateway.router_openai_url(), MODEL])
            .await?;
    assert!(
        through.contains("openai-tools: 9 passed, 0 failed"),
        "{through}"
    );
    let through = switchyard_tests::program_output(
        "python3",
        &[responses, &gateway.router_openai_url(), MODEL],
    )
    .await?;
    assert!(
        through.contains("openai-responses: 21 passed, 0 failed"),
        "{through}"
    );
    let through = switchyard_tests::program_output(
        "python3",
        &[
            anthropic,
            gateway.router_openai_url().trim_end_matches("/v1"),
            MODEL,
            "through-gateway",
        ],
    )
    .await?;
    assert!(
        through.contains("anthropic-messages: 10 passed, 0 failed"),
        "{through}"
    );
    // A model behind a gateway has no tokenizer at the router: its tokens cannot be counted,
    // and the answer says so rather than guessing.
    let counted = reqwest::Client::new()
        .post(format!(
            "{}/messages/count_tokens",
            gateway.router_openai_url()
        ))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await?;
    assert_eq!(counted.status(), 501);
    let body: Value = counted.json().await?;
    assert_eq!(body["error"]["type"], "api_error", "{body}");
    // SmolLM2 spells a Japanese character in two byte tokens, which the upstream sends as one
    // chunk: the usage through the gateway counts the upstream's tokens, not the chunks.
    let japanese = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say 日本語 three times."}],
        "max_tokens": 6, "temperature": 0,
    });
    let (straight, through) = futures::future::try_join(
        chat_completion(&cluster.router_openai_url(), &japanese),
        chat_completion(&gateway.router_openai_url(), &japanese),
    )
    .await?;
    assert_eq!(
        straight["choices"][0]["finish_reason"], "length",
        "{straight}"
    );
    assert_eq!(straight["usage"]["completion_tokens"], 6, "{straight}");
    assert_eq!(
        through["choices"][0]["message"]["content"], straight["choices"][0]["message"]["content"],
        "{through}"
    );
    assert_eq!(through["usage"]["completion_tokens"], 6, "{through}");

    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let request = v1::GenerateRequest {
        request_id: "tools-1".into(),
        model: MODEL.into(),
        messages: vec![v1::ChatMessage {
            role: "user".into(),
            content: "What is the weather like in Oslo?".into(),
            ..Default::default()
        }],
        sampling: Some(v1::SamplingParams {
            max_tokens: 64,
            ..Default::default()
        }),
        tools: vec![v1::Tool {
            name: "get_weather".into(),
            description: "The current weather in a city.".into(),
            parameters_json:
                r#"{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}"#
                    .into(),
        }],
        tool_choice: Some(v1::ToolChoice {
            mode: v1::ToolChoiceMode::Required as i32,
            single_call: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let completion = session.start(request)?.collect().await;
    let finished = completion.finished.clone().unwrap_or_else(|| {
        panic!("no Finished frame: {:?}", completion.failed);
    });
    assert_eq!(
        finished.reason,
        v1::FinishReason::ToolCalls as i32,
        "{finished:?}"
    );
    assert_eq!(
        completion.tool_calls.len(),
        1,
        "{:?}",
        completion.tool_calls
    );
    let call = &completion.tool_calls[0];
    assert_eq!(call.name, "get_weather");
    assert!(call.id.starts_with("call_"), "{call:?}");
    let arguments: Value = serde_json::from_str(&call.arguments)?;
    assert!(arguments["city"].is_string(), "{arguments}");
    // The tokens that spelt the call count, and none of them is text.
    assert_eq!(completion.text, "");
    assert_eq!(
        finished.usage.map(|u| u.completion_tokens as usize),
        Some(completion.token_ids.len())
    );

    // The Python gRPC client: tools in OpenAI's form, the call collected whole, and a JSON
    // schema answer.
    let client_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../client/python");
    let program = format!(
        r#"
import asyncio, json, sys
sys.path.insert(0, {client_dir:?})
import switchyard_client as sy
WEATHER = {{"type": "function", "function": {{"name": "get_weather",
    "parameters": {{"type": "object", "properties": {{"city": {{"type": "string"}}}},
                    "required": ["city"]}}}}}}
async def main():
    done = await sy.generate({target:?}, model={MODEL:?}, max_tokens=64,
        messages=[("user", "What is the weather like in Rome?")],
        tools=[WEATHER], tool_choice="required", single_call=True)
    call = done.tool_calls[0]
    assert done.finished.reason == sy.pb.FINISH_REASON_TOOL_CALLS, done.finished
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    schema = {{"type": "object", "properties": {{"capital": {{"type": "string"}}}},
              "required": ["capital"]}}
    answer = await sy.generate({target:?}, model={MODEL:?}, max_tokens=64,
        messages=[("user", "What is the capital of Italy?")],
        response_format=sy.pb.ResponseFormat(kind=sy.pb.ResponseFormat.KIND_JSON_SCHEMA,
                                             schema_json=json.dumps(schema)))
    assert answer.finished.reason == sy.pb.FINISH_REASON_STOP, (answer.finished, answer.text)
    assert isinstance(json.loads(answer.text)["capital"], str), answer.text
    print("python-grpc-tools: ok", call.arguments, answer.text)
asyncio.run(main())
"#,
        target = cluster.router_addr(),
    );
    let out = switchyard_tests::program_output("python3", &["-c", &program]).await?;
    assert!(out.contains("python-grpc-tools: ok"), "{out}");
    Ok(())
}

/// A conversation that outgrows the context (here 256 tokens, the workers'
/// `--max-model-len`) is refused as `context_length_exceeded` unless the Responses request
/// says `truncation: "auto"`: then its oldest turns are dropped until the prompt leaves the
/// answer its room, and a stored conversation going on past the context goes on too, while
/// the store keeps every turn.
#[tokio::test]
async fn truncation_auto_drops_the_oldest_turns_of_a_conversation_longer_than_the_context()
-> anyhow::Result<()> {
    const CONTEXT: u64 = 256;
    let cluster = real_model_cluster_with(1, &["--max-model-len", "256"]).await?;
    router_has_the_tokenizer(&cluster).await?;
    let client = reqwest::Client::new();
    let url = format!("{}/responses", cluster.router_openai_url());
    // Six turns of about 50 tokens each, then the question.
    let mut input = Vec::new();
    for turn in 0..6 {
        input.push(json!({"role": "user", "content": format!("Turn {turn}: {}", "tell me more about the sea ".repeat(8))}));
        input.push(json!({"role": "assistant", "content": format!("Answer {turn}: {}", "the sea is wide and deep ".repeat(8))}));
    }
    input.push(json!({"role": "user", "content": "What is the capital of France?"}));
    let body = |truncation: &str| {
        json!({"model": MODEL, "input": input, "max_output_tokens": 16,
               "truncation": truncation, "instructions": "Answer briefly."})
    };

    let refused = client.post(&url).json(&body("disabled")).send().await?;
    assert_eq!(refused.status(), 400);
    let refused: Value = refused.json().await?;
    assert_eq!(
        refused["error"]["code"], "context_length_exceeded",
        "{refused}"
    );
    // "... the prompt is N tokens ...": six turns and a little more.
    let whole: u64 = refused["error"]["message"]
        .as_str()
        .and_then(|m| m.split("the prompt is ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .context("the refusal names the prompt's length")?;
    let turn_at_most = whole / 6;

    let answered = client.post(&url).json(&body("auto")).send().await?;
    assert_eq!(answered.status(), 200);
    let answered: Value = answered.json().await?;
    assert_eq!(answered["truncation"], "auto");
    assert_eq!(answered["status"], "completed", "{answered}");
    let prompt = answered["usage"]["input_tokens"]
        .as_u64()
        .unwrap_or_default();
    // The room asked for is left, and no more turns went than needed: one more would not
    // have fit.
    assert!(prompt + 16 <= CONTEXT, "{prompt} prompt tokens");
    assert!(
        prompt + 16 + turn_at_most > CONTEXT,
        "{prompt} of {whole} prompt tokens kept: too much went"
    );
    // The store keeps the whole input.
    let id = answered["id"].as_str().unwrap_or_default();
    let items: Value = client
        .get(format!("{url}/{id}/input_items?limit=100"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(items["data"].as_array().map(Vec::len), Some(input.len()));

    // Going on from it, past the context again: truncated again, it is answered.
    let next = client
        .post(&url)
        .json(
            &json!({"model": MODEL, "previous_response_id": id, "max_output_tokens": 16,
                      "truncation": "auto",
                      "input": format!("And Spain? {}", "tell me more ".repeat(10))}),
        )
        .send()
        .await?;
    assert_eq!(next.status(), 200);
    let next: Value = next.json().await?;
    assert_eq!(next["status"], "completed", "{next}");
    let prompt = next["usage"]["input_tokens"].as_u64().unwrap_or_default();
    assert!(prompt + 16 <= CONTEXT, "{prompt} prompt tokens");
    Ok(())
}

/// A Chat Completions answer from the router whose OpenAI base URL is `base`, which must be 200.
async fn chat_completion(base: &str, request: &Value) -> anyhow::Result<Value> {
    let response = reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .json(request)
        .send()
        .await?;
    anyhow::ensure!(response.status() == 200, "{}", response.text().await?);
    Ok(response.json().await?)
}

/// A batch's answers on the real model are the ones its requests get sent straight: greedy,
/// the same words, in the input's order (the batch only changes when and in which lane).
#[tokio::test]
async fn a_batch_answers_as_the_same_requests_sent_straight() -> anyhow::Result<()> {
    let cluster = real_model_cluster(1).await?;
    let base = cluster.router_openai_url();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    let questions = [
        "What is the capital of France? Answer in one word.",
        "Name a primary colour.",
    ];
    let body = |question: &str| {
        json!({"model": MODEL, "max_tokens": 12, "temperature": 0,
               "messages": [{"role": "user", "content": question}]})
    };
    let lines: Vec<Value> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| {
            json!({"custom_id": format!("q{i}"), "method": "POST",
                   "url": "/v1/chat/completions", "body": body(q)})
        })
        .collect();
    let file = switchyard_tests::upload_batch_file(&http, &base, &lines).await?;
    let id = switchyard_tests::create_batch(&http, &base, &file, json!({})).await?;
    let batch = switchyard_tests::wait_for_batch(
        &http,
        &base,
        &id,
        Duration::from_secs(240),
        "the batch to end",
        |b| b["status"] == "completed",
    )
    .await?;
    assert_eq!(batch["request_counts"]["completed"], 2, "{batch}");
    let answers = switchyard_tests::batch_output(&http, &base, &batch).await?;
    assert_eq!(answers.len(), 2, "{answers:?}");
    let content = |answer: &Value| answer["choices"][0]["message"]["content"].clone();
    for (question, line) in questions.iter().zip(&answers) {
        let straight = chat_completion(&base, &body(question)).await?;
        assert_eq!(
            content(&line["response"]["body"]),
            content(&straight),
            "{line}"
        );
    }
    let paris = content(&answers[0]["response"]["body"]);
    assert!(
        paris.as_str().unwrap_or_default().contains("Paris"),
        "{paris}"
    );
    assert_eq!(
        batch["usage"]["input_tokens"],
        answers
            .iter()
            .map(|a| a["response"]["body"]["usage"]["prompt_tokens"]
                .as_u64()
                .unwrap_or(0))
            .sum::<u64>()
    );
    Ok(())
}

/// Embeddings on the real model through the router's OpenAI door: the official SDK's checks
/// (unit vectors, a paraphrase nearer than an unrelated sentence, token ids embedding as their
/// text does); and beside a wafer-scale gateway serving the same model, which cannot embed,
/// every embedding lands on the GPU worker — even one asked latency-critical — while a model
/// only the gateway serves is refused naming `model`.
#[tokio::test]
async fn embeddings_are_placed_on_workers_that_embed_and_answer_as_the_sdk_expects()
-> anyhow::Result<()> {
    let cluster = real_model_cluster(1).await?;
    router_has_the_tokenizer(&cluster).await?;
    let base = cluster.router_openai_url();
    let _gateway = switchyard_tests::Component::start(
        "wse-gateway",
        &switchyard_tests::strings(&[
            "worker-wse",
            "--etcd",
            &cluster.etcd.url,
            "--listen",
            "127.0.0.1:0",
            "--id",
            "wse-gateway",
            "--engine",
            "gateway",
            "--gateway-url",
            &base,
            "--model",
            MODEL,
            "--model",
            "wse-only",
            "--gateway-model-map",
            &format!("wse-only={MODEL}"),
            "--max-concurrent",
            "4",
        ]),
        1,
    )
    .await?;
    cluster
        .wait_for_router_workers(2, Duration::from_secs(60))
        .await?;

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/openai_embeddings_check.py"
    );
    let out = switchyard_tests::program_output(
        "python3",
        &switchyard_tests::strings(&[script, &base, MODEL, "real"]),
    )
    .await?;
    assert!(
        out.contains("openai-embeddings: 7 passed, 0 failed"),
        "{out}"
    );

    let http = reqwest::Client::new();
    let embed = |model: &str, class: &str| {
        http.post(format!("{base}/embeddings"))
            .header("x-switchyard-class", class)
            .json(&json!({"model": model, "input": ["one", "two", "three", "four"]}))
            .send()
    };
    for class in ["latency-critical", "cost-sensitive", "auto"] {
        let answer = embed(MODEL, class).await?;
        assert_eq!(answer.status(), 200, "{class}");
        assert_eq!(answer.headers()["x-switchyard-worker"], "gpu-0", "{class}");
        let body: Value = answer.json().await?;
        assert_eq!(body["data"].as_array().map(Vec::len), Some(4), "{body}");
    }
    let refused = embed("wse-only", "auto").await?;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await?;
    assert_eq!(body["error"]["param"], "model", "{body}");

    // A batch of embeddings answers each line as the same request sent straight.
    let texts = ["The cat sat on the mat.", "fn main() {}"];
    let body = |text: &str| json!({"model": MODEL, "input": text, "encoding_format": "float"});
    let lines: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            json!({"custom_id": format!("e{i}"), "method": "POST",
                   "url": "/v1/embeddings", "body": body(text)})
        })
        .collect();
    let file = switchyard_tests::upload_batch_file(&http, &base, &lines).await?;
    let id =
        switchyard_tests::create_batch(&http, &base, &file, json!({"endpoint": "/v1/embeddings"}))
            .await?;
    let batch = switchyard_tests::wait_for_batch(
        &http,
        &base,
        &id,
        Duration::from_secs(120),
        "the embeddings batch to end",
        |b| b["status"] == "completed",
    )
    .await?;
    let answers = switchyard_tests::batch_output(&http, &base, &batch).await?;
    assert_eq!(answers.len(), 2, "{answers:?}");
    for (text, line) in texts.iter().zip(&answers) {
        let straight: Value = http
            .post(format!("{base}/embeddings"))
            .json(&body(text))
            .send()
            .await?
            .json()
            .await?;
        let vector = |answer: &Value| -> Vec<f64> {
            answer["data"][0]["embedding"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_f64)
                .collect()
        };
        let (batched, straight) = (vector(&line["response"]["body"]), vector(&straight));
        assert_eq!(batched.len(), 576, "{line}");
        let dot: f64 = batched.iter().zip(&straight).map(|(a, b)| a * b).sum();
        assert!(dot > 0.9999, "{text:?}: cosine {dot}");

        // A gRPC client asks `Generate` with `embed` (grpcurl, by the router's reflection):
        // `Accepted`, then `Finished` carrying the same vector.
        let asked = json!({"model": MODEL, "prompt": text, "embed": true}).to_string();
        let out = switchyard_tests::program_output(
            "grpcurl",
            &switchyard_tests::strings(&[
                "-plaintext",
                "-d",
                &asked,
                &cluster.router_addr().to_string(),
                "switchyard.v1.Inference/Generate",
            ]),
        )
        .await?;
        let frames: Vec<Value> = serde_json::Deserializer::from_str(&out)
            .into_iter::<Value>()
            .collect::<Result<_, _>>()?;
        assert!(
            frames.first().is_some_and(|f| f.get("accepted").is_some()),
            "{out}"
        );
        let finished = frames
            .last()
            .map(|f| f["finished"].clone())
            .unwrap_or_default();
        let grpc: Vec<f64> = finished["embedding"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_f64)
            .collect();
        let dot: f64 = grpc.iter().zip(&straight).map(|(a, b)| a * b).sum();
        assert!(grpc.len() == 576 && dot > 0.9999, "{text:?}: {finished}");
    }
    Ok(())
}
