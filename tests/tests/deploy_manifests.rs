//! The dev overlay's Kubernetes manifests, run for real. Every Switchyard container of
//! `deploy/k8s/overlays/dev` (rendered by `deploy/validate.sh` into `target/deploy/dev.json`) is
//! started as a process with exactly the manifest's args and environment — ConfigMap and
//! Secret values resolved, `$(VAR)` expanded as the kubelet does, the downward API giving the
//! pod name and 127.0.0.1 as pod IP — except what only a cluster provides: listen ports are
//! remapped to free loopback ports (the advertised port with them), etcd is a local process,
//! and mounted volumes are local directories with the same files (the model volume holds the
//! GGUF that scripts/fetch-model.sh, the init container's script, fetched). The `policy` Job's
//! write is replayed from its own ConfigMap reference.
//!
//! It checks that the workers register under their pod names at the advertised pod-IP address
//! and the router reaches them there, that the router enforces the dev API key from the
//! Secret, routes by the policy document from the ConfigMap, serves the real model on the GPU
//! pool, and that a SIGTERM drain ends within the manifest's grace period.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use base64::Engine as _;
use serde_json::{Value, json};
use switchyard_cluster::Registry as _;
use switchyard_cluster::schema::POLICY_KEY;
use switchyard_tests::{Component, Etcd, free_port, list_router_workers_with_key, wait_until};

const DEV_KEY: &str = "sk-switchyard-dev";
const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The objects of one rendered overlay.
struct Rendered {
    objects: Vec<Value>,
}

impl Rendered {
    fn load(overlay: &str) -> anyhow::Result<Self> {
        let path = repo_root().join(format!("target/deploy/{overlay}.json"));
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is missing: run deploy/validate.sh first (scripts/test.sh does)",
                path.display()
            )
        })?;
        Ok(Self {
            objects: serde_json::from_str(&text)?,
        })
    }

    fn find(&self, kind: &str, name: &str) -> anyhow::Result<&Value> {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .with_context(|| format!("no {kind}/{name} in the rendered overlay"))
    }

    /// The value of `key` in ConfigMap or Secret `name` (as referenced: kustomize already put
    /// the generated objects' hash suffixes in the references); Secrets are decoded.
    fn data(&self, kind: &str, name: &str, key: &str) -> anyhow::Result<Option<String>> {
        let object = self.find(kind, name)?;
        let Some(value) = object["data"][key].as_str() else {
            return Ok(None);
        };
        Ok(Some(if kind == "Secret" {
            {
                // kustomize wraps long base64 values over lines.
                let compact: String = value.split_whitespace().collect();
                String::from_utf8(base64::engine::general_purpose::STANDARD.decode(compact)?)?
            }
        } else {
            value.to_string()
        }))
    }
}

/// Kubernetes' `$(VAR)` expansion: variables defined earlier in the container; unknown
/// references stay as written.
fn expand(value: &str, defined: &[(String, String)]) -> String {
    let mut out = value.to_string();
    for (name, resolved) in defined {
        out = out.replace(&format!("$({name})"), resolved);
    }
    out
}

/// A workload's pod spec and its first container.
fn pod(rendered: &Rendered, kind: &str, name: &str) -> anyhow::Result<(Value, Value)> {
    let spec = rendered.find(kind, name)?["spec"]["template"]["spec"].clone();
    let container = spec["containers"][0].clone();
    Ok((spec, container))
}

/// The container's environment as the kubelet would set it.
fn resolve_env(
    rendered: &Rendered,
    pod_name: &str,
    container: &Value,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = Vec::new();
    for entry in container["env"].as_array().into_iter().flatten() {
        let name = entry["name"].as_str().context("env name")?.to_string();
        let from = &entry["valueFrom"];
        let value = if let Some(value) = entry["value"].as_str() {
            Some(expand(value, &env))
        } else if from["configMapKeyRef"].is_object() || from["secretKeyRef"].is_object() {
            let (kind, reference) = if from["configMapKeyRef"].is_object() {
                ("ConfigMap", &from["configMapKeyRef"])
            } else {
                ("Secret", &from["secretKeyRef"])
            };
            let (object, key) = (
                reference["name"].as_str().context("ref name")?,
                reference["key"].as_str().context("ref key")?,
            );
            let value = rendered.data(kind, object, key)?;
            if value.is_none() && reference["optional"] != true {
                bail!("{kind} {object} has no key {key}");
            }
            value
        } else {
            match from["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => Some(pod_name.to_string()),
                Some("status.podIP") => Some("127.0.0.1".to_string()),
                other => bail!("env {name}: unsupported source {other:?}"),
            }
        };
        if let Some(value) = value {
            env.push((name, value));
        }
    }
    Ok(env)
}

/// Local stand-ins for the container's volume mounts: `(mount path, local directory)`.
fn local_volumes(
    rendered: &Rendered,
    spec: &Value,
    container: &Value,
    scratch: &Path,
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut mounts = Vec::new();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let (name, path) = (
            mount["name"].as_str().context("mount name")?,
            mount["mountPath"].as_str().context("mount path")?,
        );
        let volume = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .with_context(|| format!("volume {name} not declared"))?;
        let dir = scratch.join(name);
        std::fs::create_dir_all(&dir)?;
        if let Some(secret) = volume["secret"]["secretName"].as_str() {
            for item in volume["secret"]["items"].as_array().into_iter().flatten() {
                let key = item["key"].as_str().context("item key")?;
                let value = rendered
                    .data("Secret", secret, key)?
                    .with_context(|| format!("Secret {secret} has no key {key}"))?;
                std::fs::write(dir.join(item["path"].as_str().context("item path")?), value)?;
            }
        }
        // An emptyDir that an init container fills with the model (SWITCHYARD_MODEL_DIR):
        // here the same file, fetched by the same script into the repository's models/.
        let fills_model = spec["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|init| {
                init["env"].as_array().into_iter().flatten().any(|e| {
                    e["name"] == "SWITCHYARD_MODEL_DIR" && e["value"].as_str() == Some(path)
                })
            });
        if volume["emptyDir"].is_object() && fills_model {
            let model = repo_root().join(format!("models/{MODEL}.gguf"));
            ensure!(
                model.exists(),
                "{} is missing: run scripts/fetch-model.sh (scripts/test.sh does)",
                model.display()
            );
            std::os::unix::fs::symlink(model, dir.join(format!("{MODEL}.gguf")))?;
        }
        mounts.push((path.to_string(), dir));
    }
    Ok(mounts)
}

/// A manifest container as a local process: its args, and its environment with the
/// cluster-only parts (listen ports, etcd, volume paths) made local.
struct LocalContainer {
    args: Vec<String>,
    env: Vec<(String, String)>,
    grace: Duration,
    _scratch: tempfile::TempDir,
}

fn localise(
    rendered: &Rendered,
    deployment: &str,
    etcd_url: &str,
) -> anyhow::Result<LocalContainer> {
    let (spec, container) = pod(rendered, "Deployment", deployment)?;
    let scratch = tempfile::tempdir()?;
    let mounts = local_volumes(rendered, &spec, &container, scratch.path())?;
    let mut env = resolve_env(rendered, &format!("{deployment}-0"), &container)?;
    let mut ports: HashMap<String, u16> = HashMap::new();
    for (name, value) in env.iter_mut() {
        if name.ends_with("LISTEN") {
            let port = value
                .strip_prefix("0.0.0.0:")
                .with_context(|| format!("{name}={value} does not listen on every interface"))?;
            let local = free_port();
            ports.insert(port.to_string(), local);
            *value = format!("127.0.0.1:{local}");
        }
    }
    for (name, value) in env.iter_mut() {
        if name == "SWITCHYARD_ETCD" {
            *value = etcd_url.to_string();
        }
        if name == "SWITCHYARD_ADVERTISE" {
            let (host, port) = value.rsplit_once(':').context("advertise host:port")?;
            let local = ports
                .get(port)
                .with_context(|| format!("advertised port {port} is not a listen port"))?;
            *value = format!("{host}:{local}");
        }
        // Rewritten once: the local directories themselves lie under /tmp, a mount path too.
        let local = mounts.iter().find_map(|(mount, dir)| {
            value
                .strip_prefix(&format!("{mount}/"))
                .map(|rest| dir.join(rest).display().to_string())
        });
        if let Some(local) = local {
            *value = local;
        }
    }
    let args = container["args"]
        .as_array()
        .context("args")?
        .iter()
        .map(|a| a.as_str().map(str::to_string).context("string arg"))
        .collect::<anyhow::Result<_>>()?;
    let grace = Duration::from_secs(spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30));
    Ok(LocalContainer {
        args,
        env,
        grace,
        _scratch: scratch,
    })
}

async fn start(
    rendered: &Rendered,
    deployment: &str,
    etcd_url: &str,
    lines: usize,
) -> anyhow::Result<(Component, LocalContainer)> {
    let local = localise(rendered, deployment, etcd_url)?;
    let component = Component::start_with_env(deployment, &local.args, &local.env, lines).await?;
    Ok((component, local))
}

/// What the `policy` Job does (`etcdctl put <key> "$(POLICY_DOCUMENT)"`), replayed.
async fn run_policy_job(rendered: &Rendered, etcd: &Etcd) -> anyhow::Result<()> {
    let job = rendered.find("Job", "policy")?;
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["command"], json!(["/usr/local/bin/etcdctl"]));
    let env = resolve_env(rendered, "policy", container)?;
    let args: Vec<String> = container["args"]
        .as_array()
        .context("job args")?
        .iter()
        .map(|a| expand(a.as_str().unwrap_or_default(), &env))
        .collect();
    let [put, key, document] = &args[..] else {
        bail!("unexpected policy Job args {args:?}");
    };
    assert_eq!(put, "put");
    assert_eq!(key, POLICY_KEY, "the Job writes the key routers watch");
    etcd.registry()
        .await?
        .put_policy(document.clone().into_bytes(), None)
        .await?;
    Ok(())
}

async fn chat(
    http: &reqwest::Client,
    base: &str,
    class: Option<&str>,
    max_tokens: u32,
) -> anyhow::Result<(reqwest::header::HeaderMap, Value)> {
    let mut request = http
        .post(format!("{base}/chat/completions"))
        .bearer_auth(DEV_KEY)
        .json(&json!({
            "model": MODEL,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Say hi."}],
        }));
    if let Some(class) = class {
        request = request.header("x-switchyard-class", class);
    }
    let response = request.send().await?;
    let status = response.status();
    let headers = response.headers().clone();
    let body: Value = response.json().await?;
    ensure!(status == 200, "chat answered {status}: {body}");
    Ok((headers, body))
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_overlay_runs_as_rendered() -> anyhow::Result<()> {
    let rendered = Rendered::load("dev")?;
    let etcd = Etcd::start().await?;
    run_policy_job(&rendered, &etcd).await?;

    let (_control_plane, _) = start(&rendered, "control-plane", &etcd.url, 1).await?;
    let (mut gpu, gpu_local) = start(&rendered, "worker-gpu", &etcd.url, 1).await?;
    let (_wse, _) = start(&rendered, "worker-wse", &etcd.url, 1).await?;
    let (router, _) = start(&rendered, "router", &etcd.url, 2).await?;
    let grpc = router.addr("grpc").to_string();
    let base = format!("http://{}/v1", router.addr("http"));

    // Workers are known by their pod names and reached at their advertised (pod IP) address.
    wait_until(Duration::from_secs(20), "both workers routable", || async {
        list_router_workers_with_key(&grpc, Some(DEV_KEY))
            .await
            .map(|ids| ids == ["worker-gpu-0", "worker-wse-0"])
            .unwrap_or(false)
    })
    .await?;

    // The router found the control plane through the leader key at its advertised address.
    router
        .wait_for_log("reporting to the control plane", Duration::from_secs(20))
        .await?;

    let http = reqwest::Client::new();
    let anonymous = http.get(format!("{base}/models")).send().await?;
    assert_eq!(
        anonymous.status(),
        401,
        "the dev Secret's key file turns auth on"
    );

    // An AUTO request for 4 tokens: only the policy's `short-interactive` rule makes it
    // latency-critical (the document's default lane, and the router's, is cost-sensitive).
    let (headers, _) = chat(&http, &base, None, 4).await?;
    assert_eq!(header(&headers, "x-switchyard-lane"), "latency-critical");
    assert_eq!(header(&headers, "x-switchyard-pool"), "wse");
    assert_eq!(header(&headers, "x-switchyard-worker"), "worker-wse-0");

    // Cost-sensitive: the GPU pool's candle engine with the model from the volume.
    let (headers, body) = chat(&http, &base, Some("cost-sensitive"), 2).await?;
    assert_eq!(header(&headers, "x-switchyard-pool"), "gpu");
    assert_eq!(header(&headers, "x-switchyard-worker"), "worker-gpu-0");
    assert_eq!(body["model"], MODEL);
    assert!(
        body["usage"]["completion_tokens"].as_u64().unwrap_or(0) >= 1,
        "{body}"
    );

    // SIGTERM (what the kubelet sends) drains and exits cleanly within the grace period.
    let status = gpu.terminate(gpu_local.grace).await?;
    assert!(status.success(), "worker-gpu exited with {status}");
    wait_until(
        Duration::from_secs(10),
        "the drained worker to leave",
        || async {
            list_router_workers_with_key(&grpc, Some(DEV_KEY))
                .await
                .map(|ids| ids == ["worker-wse-0"])
                .unwrap_or(false)
        },
    )
    .await?;
    Ok(())
}
