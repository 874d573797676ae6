//! End-to-end tests of the Batch API (`/v1/files`, `/v1/batches`) against real processes:
//! etcd, two router replicas, synthetic-engine workers, and the official `openai` Python SDK.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use switchyard_tests::{
    Cluster, ClusterSpec, batch_output, create_batch, get_batch as batch, list_router_workers,
    program_output, start_gpu_worker, strings, upload_batch_file as upload, wait_for_batch,
    wait_until,
};

const PATIENCE: Duration = Duration::from_secs(60);

/// The SDK's batch checks, files uploaded to one replica and batches made, followed and read
/// on the other (which asks the first: a batch runs where its file is kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_runs_batches_across_router_replicas() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    let keeper = linked_router(&cluster, "keeper", &[]).await?;
    let keeper_url = format!("http://{}/v1", keeper.addr("http"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_batch_check.py");
    let out = program_output(
        "python3",
        &strings(&[
            script,
            &keeper_url,
            "synthetic",
            &cluster.router_openai_url(),
        ]),
    )
    .await?;
    assert!(out.contains("openai-batch: 8 passed, 0 failed"), "{out}");
    Ok(())
}

/// A batch whose workers all go away mid-run (killed) waits for workers to come back, and
/// runs every request once they do: none fails for the outage, none is answered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_rides_out_its_workers_going_away() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 0,
        wse_workers: 0,
        metrics: true,
        ..Default::default()
    })
    .await?;
    // 40 tokens at 20 a second: each request runs for 2 s.
    let slow = ["--lease-ttl", "2s", "--synthetic-tokens-per-s", "20"];
    let mut first = start_gpu_worker(&cluster.etcd.url, "first", &slow, 1).await?;
    cluster.wait_for_router_workers(1, PATIENCE).await?;
    let base = cluster.router_openai_url();
    let http = reqwest::Client::new();
    let lines: Vec<Value> = (0..4)
        .map(|i| {
            json!({"custom_id": format!("q{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "synthetic", "max_tokens": 40, "ignore_eos": true,
                            "messages": [{"role": "user", "content": format!("hi {i}")}]}})
        })
        .collect();
    let file = upload(&http, &base, &lines).await?;
    let id = create_batch(&http, &base, &file, json!({})).await?;
    wait_for_batch(&http, &base, &id, PATIENCE, "the batch to run", |b| {
        b["status"] == "in_progress"
    })
    .await?;
    first.kill().await?;
    cluster.wait_for_router_workers(0, PATIENCE).await?;
    // Meanwhile a client's request is refused (no worker serves the model now)...
    let refused = http
        .post(format!("{base}/chat/completions"))
        .json(&lines[0]["body"])
        .send()
        .await?;
    assert!(refused.status().is_client_error() || refused.status().is_server_error());
    // ...and the batch's, refused too, wait: neither answered nor failed.
    let metrics = cluster.router.metrics_url();
    let waited = r#"switchyard_router_batch_requests_total{outcome="waited"}"#;
    wait_until(
        PATIENCE,
        "a batch request to be refused and wait",
        || async { metric(&metrics, waited).await.is_some_and(|n| n > 0.0) },
    )
    .await?;
    let running = batch(&http, &base, &id).await?;
    assert_eq!(running["status"], "in_progress", "{running}");
    assert_eq!(running["request_counts"]["failed"], 0, "{running}");
    let answered_before = running["request_counts"]["completed"].as_u64().unwrap_or(4);
    assert!(answered_before < 4, "{running}");

    let _second = start_gpu_worker(&cluster.etcd.url, "second", &slow, 1).await?;
    let done = wait_for_batch(&http, &base, &id, PATIENCE, "the batch to end", |b| {
        b["status"] == "completed"
    })
    .await?;
    assert_eq!(
        done["request_counts"],
        json!({"total": 4, "completed": 4, "failed": 0}),
        "{done}"
    );
    assert_eq!(done["error_file_id"], Value::Null, "{done}");
    let answers = batch_output(&http, &base, &done).await?;
    let ids: Vec<&str> = answers
        .iter()
        .filter_map(|a| a["custom_id"].as_str())
        .collect();
    assert_eq!(ids, ["q0", "q1", "q2", "q3"]);
    let completed = r#"switchyard_router_batch_requests_total{outcome="completed"}"#;
    assert_eq!(metric(&metrics, completed).await, Some(4.0));
    Ok(())
}

const ACME_KEY: &str = "sk-acme-batch-0001";
const GLOBEX_KEY: &str = "sk-globex-batch-0002";

/// A tenant's files and batches are its own, on the replica that keeps them and on any other:
/// another API key finds nothing (404, not 403: it learns nothing of them) and lists nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_and_batches_are_only_their_tenants() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keys_file = switchyard_tests::write_api_keys(
        dir.path(),
        &[(ACME_KEY, "acme"), (GLOBEX_KEY, "globex")],
    )?;
    let keys_flag = keys_file.display().to_string();
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        router_flags: vec!["--api-keys-file".into(), keys_flag.clone()],
        api_key: Some(ACME_KEY.into()),
        ..Default::default()
    })
    .await?;
    let other = switchyard_tests::start_router(
        &cluster.etcd.url,
        "other",
        &["--api-keys-file", &keys_flag],
    )
    .await?;
    let keeper = cluster.router_openai_url();
    let elsewhere = format!("http://{}/v1", other.addr("http"));
    let acme = client_with(ACME_KEY)?;
    let line = json!({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "synthetic", "max_tokens": 2,
                               "messages": [{"role": "user", "content": "secret plans"}]}});
    let file = upload(&acme, &keeper, &[line]).await?;
    // The other replica finds the keeper once it has reached etcd.
    wait_until(PATIENCE, "the other replica to find the keeper", || async {
        let read = acme.get(format!("{elsewhere}/files/{file}")).send().await;
        read.is_ok_and(|r| r.status() == 200)
    })
    .await?;
    let id = create_batch(&acme, &elsewhere, &file, json!({})).await?;
    wait_for_batch(&acme, &keeper, &id, PATIENCE, "the batch to end", |b| {
        b["status"] == "completed"
    })
    .await?;

    let globex = client_with(GLOBEX_KEY)?;
    let nobody = reqwest::Client::new();
    for base in [&keeper, &elsewhere] {
        for (method, path) in [
            (reqwest::Method::GET, format!("files/{file}")),
            (reqwest::Method::GET, format!("files/{file}/content")),
            (reqwest::Method::DELETE, format!("files/{file}")),
            (reqwest::Method::GET, format!("batches/{id}")),
            (reqwest::Method::POST, format!("batches/{id}/cancel")),
        ] {
            let url = format!("{base}/{path}");
            let status = |client: &reqwest::Client| {
                let request = client.request(method.clone(), &url);
                async move { anyhow::Ok(request.send().await?.status().as_u16()) }
            };
            assert_eq!(status(&globex).await?, 404, "{method} {url}");
            assert_eq!(status(&nobody).await?, 401, "{method} {url}");
        }
        // Nor can it make a batch of the file.
        let refused = create_batch(&globex, base, &file, json!({})).await;
        let refused = refused.expect_err("another tenant made a batch of the file");
        assert!(refused.to_string().contains("404"), "{refused}");
        for listing in ["files", "batches"] {
            let list = |client: &reqwest::Client| {
                let request = client.get(format!("{base}/{listing}"));
                async move { anyhow::Ok(request.send().await?.json::<Value>().await?) }
            };
            assert_eq!(list(&globex).await?["data"], json!([]), "{base}/{listing}");
            let own = list(&acme).await?;
            assert!(
                !own["data"].as_array().context("a list")?.is_empty(),
                "{own}"
            );
        }
    }
    assert_eq!(batch(&acme, &elsewhere, &id).await?["status"], "completed");
    Ok(())
}

/// A client sending `key` with every request.
fn client_with(key: &str) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse()?,
    );
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .build()?)
}

/// A rollout replaces every router: a stopping one hands its files and batches to another
/// replica with its stored responses. A batch still running goes on there from where it got
/// to: the requests answered before the stop are kept (not sent again), the requests running
/// then are let end, the rest run on the other replica, and the output holds each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_router_hands_its_running_batch_to_another() -> anyhow::Result<()> {
    let (cluster, mut leaving, _token) = two_replicas("leaving", false).await?;
    let http = reqwest::Client::new();
    let held = Held::make(&http, &leaving).await?;
    assert!(held.answered_at_stop < 8, "the batch ended before the stop");

    leaving.terminate(Duration::from_secs(30)).await?;

    let made_by_leaving = held
        .all_there(&http, &cluster.router, held.answered_at_stop)
        .await?;
    assert!(
        made_by_leaving < 8,
        "the leaving replica made all {made_by_leaving} answers: nothing ran where it was handed"
    );
    Ok(())
}

/// A router killed without its drain (OOM, node loss) has no time to hand its batches over:
/// its standby replica has kept a copy all along (the batch as it moved on, each answer as it
/// came), takes it over once the killed replica's announcement expires, and runs it to its
/// end: every request answered once in the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_routers_running_batch_goes_on_at_its_standby() -> anyhow::Result<()> {
    let (cluster, mut dying, _token) = two_replicas("dying", true).await?;
    let dying_url = format!("http://{}/v1", dying.addr("http"));
    let http = reqwest::Client::new();
    // Sixteen requests of a second each, two at a time: still running once its mirror is up.
    let lines = second_long_requests(16);
    let file = upload(&http, &dying_url, &lines).await?;
    let id = create_batch(&http, &dying_url, &file, json!({})).await?;
    // The other replica holds a standby copy of the batch (it is the only one to mirror to).
    let staying_metrics = cluster.router.metrics_url();
    wait_until(PATIENCE, "the other replica to hold the batch", || async {
        metric(&staying_metrics, "switchyard_router_standby_batches").await == Some(1.0)
    })
    .await?;
    wait_for_batch(
        &http,
        &dying_url,
        &id,
        PATIENCE,
        "two requests answered",
        |b| b["request_counts"]["completed"].as_u64() >= Some(2),
    )
    .await?;

    dying.kill().await?;

    let staying = cluster.router_openai_url();
    all_answered_once(&http, &staying, &id, 16, "at the standby").await?;
    assert_eq!(
        metric(&staying_metrics, "switchyard_router_standby_batches").await,
        Some(0.0),
        "the copy became the replica's own"
    );
    Ok(())
}

/// The value of series `name` (with its labels, if any) at `metrics`.
async fn metric(metrics: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(metrics).await.ok()?.text().await.ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// A cluster of one worker whose routers share a cluster token (with `metrics`), and a second
/// router replica `name`, linked to the worker, running at most two batch requests at once:
/// the cluster, the replica, and the token's directory (to keep while they run).
async fn two_replicas(
    name: &str,
    metrics: bool,
) -> anyhow::Result<(Cluster, switchyard_tests::Component, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("cluster-token");
    std::fs::write(&token, "batch-replicas-test-token-0123456789\n")?;
    let token = token.display().to_string();
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        router_flags: strings(&["--cluster-token-file", &token]),
        metrics,
        ..Default::default()
    })
    .await?;
    let flags = ["--cluster-token-file", &token, "--batch-concurrency", "2"];
    let replica = linked_router(&cluster, name, &flags).await?;
    Ok((cluster, replica, dir))
}

/// Another router `name` on `cluster` (of one worker), once it has linked the worker.
async fn linked_router(
    cluster: &Cluster,
    name: &str,
    flags: &[&str],
) -> anyhow::Result<switchyard_tests::Component> {
    let router = switchyard_tests::start_router(&cluster.etcd.url, name, flags).await?;
    let grpc = router.addr("grpc").to_string();
    wait_until(
        PATIENCE,
        &format!("router {name} to link the worker"),
        || async {
            list_router_workers(&grpc)
                .await
                .is_ok_and(|ids| ids.len() == 1)
        },
    )
    .await?;
    Ok(router)
}

/// `count` chat requests of a second each on the synthetic engine (60 tokens at its 60 a
/// second), `q0`, `q1`, ….
fn second_long_requests(count: usize) -> Vec<Value> {
    (0..count)
        .map(|i| {
            json!({"custom_id": format!("q{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "synthetic", "max_tokens": 60, "ignore_eos": true,
                            "messages": [{"role": "user", "content": format!("hi {i}")}]}})
        })
        .collect()
}

/// Uploads past the router's bounds are refused saying which bound and what to do: a file
/// over `--batch-max-file-bytes` is a 413, one that would take the replica past
/// `--batch-store-bytes` a 507 until a file is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_past_the_bounds_are_refused_saying_which() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 0,
        wse_workers: 0,
        router_flags: strings(&[
            "--batch-max-file-bytes",
            "1000",
            "--batch-store-bytes",
            "2000",
        ]),
        ..Default::default()
    })
    .await?;
    let base = cluster.router_openai_url();
    let http = reqwest::Client::new();
    let sized = |bytes: usize| {
        let line = json!({"custom_id": "x".repeat(bytes - 80), "method": "POST",
                          "url": "/v1/chat/completions", "body": {}});
        vec![line]
    };
    let refusal = |lines: Vec<Value>| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let error = upload(&http, &base, &lines).await.expect_err("refused");
            anyhow::Ok(error.to_string())
        }
    };
    let too_large = refusal(sized(1500)).await?;
    assert!(too_large.contains("413"), "{too_large}");
    let first = upload(&http, &base, &sized(900)).await?;
    upload(&http, &base, &sized(900)).await?;
    let full = http
        .post(format!("{base}/files"))
        .multipart(
            reqwest::multipart::Form::new()
                .text("purpose", "batch")
                .part("file", reqwest::multipart::Part::bytes(vec![b'{'; 900])),
        )
        .send()
        .await?;
    assert_eq!(full.status(), 507);
    let said: Value = full.json().await?;
    let message = said["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("--batch-store-bytes"), "{said}");
    assert!(message.contains("DELETE /v1/files"), "{said}");
    let deleted = http.delete(format!("{base}/files/{first}")).send().await?;
    assert_eq!(deleted.status(), 200);
    upload(&http, &base, &sized(900)).await?;
    Ok(())
}

/// Waits at `base` until batch `id` of `count` requests (`q0`, `q1`, …) completes `where_`,
/// checks every request was answered once, in input order, and returns the answers.
async fn all_answered_once(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    count: usize,
    where_: &str,
) -> anyhow::Result<Vec<Value>> {
    let done = wait_for_batch(
        http,
        base,
        id,
        PATIENCE,
        &format!("the batch to end {where_}"),
        |b| b["status"] == "completed",
    )
    .await?;
    assert_eq!(
        done["request_counts"],
        json!({"total": count, "completed": count, "failed": 0}),
        "{done}"
    );
    let answers = batch_output(http, base, &done).await?;
    let ids: Vec<&str> = answers
        .iter()
        .filter_map(|a| a["custom_id"].as_str())
        .collect();
    let expected: Vec<String> = (0..count).map(|i| format!("q{i}")).collect();
    assert_eq!(ids, expected);
    Ok(answers)
}

/// A single router restarted with its `--state-dir` keeps what it had: stopping with no other
/// replica to hand them to, it writes its stored responses, files and batches there, and the
/// next run takes them back before it serves — a response is found and continued, the input
/// file read, and the batch that was running goes on from where it got to, every request
/// answered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_restarted_with_its_state_dir_keeps_its_responses_and_batches()
-> anyhow::Result<()> {
    let run = StateDirRun::start().await?;
    let mut first = run.router("first-run").await?;
    let held = Held::make(&run.http, &first).await?;
    first.terminate(Duration::from_secs(30)).await?;
    let log = std::fs::read_to_string(&first.log)?;
    assert!(log.contains("kept for this router's next start"), "{log}");

    let second = run.router("second-run").await?;
    held.all_there(&run.http, &second, held.answered_at_stop)
        .await?;
    // Taken back once: nothing is left to take at the next start.
    assert!(!run.state.path().join("stored-responses.pb").exists());
    Ok(())
}

/// A single router killed without its drain (OOM, a crash) loses nothing either: with no
/// standby replica it journals its store's changes in its `--state-dir` as they happen, and
/// the next run replays the journal — the response, the file and the running batch are
/// there, the batch's answers made before the kill kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_with_its_state_dir_keeps_its_responses_and_batches() -> anyhow::Result<()>
{
    let run = StateDirRun::start().await?;
    let mut first = run.router("killed-run").await?;
    let held = Held::make(&run.http, &first).await?;
    first.kill().await?;

    let second = run.router("after-the-kill").await?;
    // An answer made as the kill came may not have reached the journal: it is asked again.
    held.all_there(&run.http, &second, held.answered_at_stop.saturating_sub(1))
        .await?;
    let log = std::fs::read_to_string(&second.log)?;
    assert!(
        log.contains("taken back from the last run's journal"),
        "{log}"
    );
    Ok(())
}

/// A cluster of one worker, and a state directory for the routers started on it one after
/// another.
struct StateDirRun {
    cluster: Cluster,
    state: tempfile::TempDir,
    http: reqwest::Client,
}

impl StateDirRun {
    async fn start() -> anyhow::Result<Self> {
        let cluster = Cluster::start(ClusterSpec {
            gpu_workers: 1,
            wse_workers: 0,
            ..Default::default()
        })
        .await?;
        Ok(Self {
            cluster,
            state: tempfile::tempdir()?,
            http: reqwest::Client::new(),
        })
    }

    /// A router on the state directory, once it has linked the worker.
    async fn router(&self, name: &str) -> anyhow::Result<switchyard_tests::Component> {
        let dir = self.state.path().display().to_string();
        let flags = ["--state-dir", &dir, "--batch-concurrency", "2"];
        linked_router(&self.cluster, name, &flags).await
    }
}

/// What a router held when it went: a stored response, a batch's input file, and the batch,
/// running.
struct Held {
    response: Value,
    file: String,
    batch: String,
    /// The tag of the ids the router made.
    tag: String,
    /// Batch requests answered when it went, at least.
    answered_at_stop: u64,
}

impl Held {
    /// Stores a response on `router` and starts a batch of eight second-long requests there,
    /// two at a time; returns once two are answered.
    async fn make(
        http: &reqwest::Client,
        router: &switchyard_tests::Component,
    ) -> anyhow::Result<Self> {
        let url = format!("http://{}/v1", router.addr("http"));
        let response: Value = http
            .post(format!("{url}/responses"))
            .json(&json!({"model": "synthetic", "input": "one two three four",
                          "max_output_tokens": 4}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let file = upload(http, &url, &second_long_requests(8)).await?;
        let batch_id =
            create_batch(http, &url, &file, json!({"metadata": {"job": "restart"}})).await?;
        wait_for_batch(
            http,
            &url,
            &batch_id,
            PATIENCE,
            "two requests to be answered",
            |b| b["request_counts"]["completed"].as_u64() >= Some(2),
        )
        .await?;
        let answered_at_stop = batch(http, &url, &batch_id).await?["request_counts"]["completed"]
            .as_u64()
            .context("a count")?;
        let tag = batch_id.strip_prefix("batch_").context("a batch id")?[..12].to_string();
        Ok(Self {
            response,
            file,
            batch: batch_id,
            tag,
            answered_at_stop,
        })
    }

    /// Checks `router` (the next run, or the replica it was handed to) holds it all: the
    /// response found and continued, the file read, the batch run to its end with every
    /// request answered once and at least `kept` of the answers made before the stop kept.
    /// Returns how many answers were made before the stop.
    async fn all_there(
        &self,
        http: &reqwest::Client,
        router: &switchyard_tests::Component,
        kept: u64,
    ) -> anyhow::Result<u64> {
        let url = format!("http://{}/v1", router.addr("http"));
        let id = self.response["id"].as_str().context("a response id")?;
        let found: Value = http
            .get(format!("{url}/responses/{id}"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        assert_eq!(found["output"], self.response["output"], "{found}");
        let continued = http
            .post(format!("{url}/responses"))
            .json(&json!({"model": "synthetic", "input": "and then",
                          "previous_response_id": id, "max_output_tokens": 4}))
            .send()
            .await?;
        assert_eq!(continued.status(), 200, "{}", continued.text().await?);
        let resumed = batch(http, &url, &self.batch).await?;
        assert_eq!(resumed["metadata"], json!({"job": "restart"}), "{resumed}");
        let answers = all_answered_once(http, &url, &self.batch, 8, "in the next run").await?;
        let made_before = answers
            .iter()
            .filter(|a| {
                a["response"]["body"]["id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with(&format!("chatcmpl-{}", self.tag)))
            })
            .count() as u64;
        assert!(
            made_before >= kept,
            "{made_before} answers made before the stop kept, {kept} expected"
        );
        let input = http
            .get(format!("{url}/files/{}/content", self.file))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        assert_eq!(input.lines().count(), 8);
        Ok(made_before)
    }
}
