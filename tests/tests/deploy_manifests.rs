//! The dev overlay's Kubernetes manifests, run for real. Every Switchyard container of
//! `deploy/k8s/overlays/dev` (rendered by `deploy/validate.sh` into `target/deploy/dev.json`) is
//! started as a process with exactly the manifest's args and environment — ConfigMap and
//! Secret values resolved, `$(VAR)` expanded as the kubelet does, the downward API giving the
//! pod name and 127.0.0.1 as pod IP — except what only a cluster provides: listen ports (the
//! dashboard's and the metrics listeners' too) are remapped to free loopback ports (the
//! advertised port with them), etcd is a local process,
//! and mounted volumes are local directories with the same files (the model volume holds the
//! GGUF that scripts/fetch-model.sh, the init container's script, fetched). The `policy` Job's
//! container runs too, its command as written, against the local etcd.
//!
//! It checks that the workers register under their pod names at the advertised pod-IP address
//! and the router reaches them there, that the router enforces the dev API key from the
//! Secret, routes by the policy document from the ConfigMap, serves the real model on the GPU
//! pool, that every pod serves Prometheus metrics where its annotations say and the control
//! plane its dashboard on the Service's port, that a SIGTERM drain ends within the manifest's
//! grace period, and that the `policy` Job seeds the policy only where none is stored.
//!
//! `deploy/k8s/overlays/dev-tls` (dev with `components/tls`) runs the same way over TLS, with
//! the certificates cert-manager would issue minted by a local CA: each `Certificate`'s names
//! into the Secret volumes that mount it, each csi-driver volume's attributes (`${POD_NAME}`
//! expanded) into a per-pod certificate, and etcd serving TLS with client certificates.
//!
//! `deploy/k8s/overlays/dev-router-wse` (dev with `components/router-wse`) runs its router-wse
//! Deployment's pods — routers that each host a wafer-scale worker — in place of dev's router
//! and worker-wse; the rendered objects of it and of `overlays/router-wse` are also checked
//! for what a cluster would do with them (Services, probes, NetworkPolicies, grace period).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use base64::Engine as _;
use serde_json::{Value, json};
use switchyard_cluster::Registry as _;
use switchyard_cluster::schema::POLICY_KEY;
use switchyard_tests::{
    Component, Etcd, EtcdTls, assert_worker_calls_need_a_client_certificate, free_port,
    list_router_workers_with_key, wait_until,
};

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

/// A local stand-in for cert-manager: a CA that issues what a `Certificate` or a csi-driver
/// volume asks for, written as cert-manager writes it (`tls.crt`, `tls.key`, `ca.crt`).
struct CertManager {
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_pem: String,
}

impl CertManager {
    fn new() -> anyhow::Result<Self> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "switchyard cluster CA");
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            ca_pem: cert.pem(),
            ca: rcgen::Issuer::new(params, key),
        })
    }

    /// Issues a server and client certificate for `dns` names, IP addresses `ips` and URI SANs
    /// `uris` into `dir`.
    fn issue(
        &self,
        dir: &Path,
        common_name: &str,
        dns: &[String],
        ips: &[&str],
        uris: &[String],
    ) -> anyhow::Result<()> {
        let mut params = rcgen::CertificateParams::new(
            dns.iter()
                .cloned()
                .chain(ips.iter().map(|ip| ip.to_string()))
                .collect::<Vec<_>>(),
        )?;
        for uri in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(uri.as_str().try_into()?));
        }
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        std::fs::write(dir.join("tls.crt"), cert.pem())?;
        std::fs::write(dir.join("tls.key"), key.serialize_pem())?;
        std::fs::write(dir.join("ca.crt"), &self.ca_pem)?;
        Ok(())
    }

    /// What cert-manager writes into Secret `secret` for the rendered `Certificate` naming it.
    /// Clients reach every Service at 127.0.0.1 here (in the cluster: by the Service names the
    /// certificate lists), so that address is added; workers' per-pod certificates get none.
    fn issue_secret(&self, rendered: &Rendered, secret: &str, dir: &Path) -> anyhow::Result<bool> {
        let Some(certificate) = rendered
            .objects
            .iter()
            .find(|o| o["kind"] == "Certificate" && o["spec"]["secretName"] == secret)
        else {
            return Ok(false);
        };
        let spec = &certificate["spec"];
        let strings = |field: &str| -> Vec<String> {
            spec[field]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        };
        self.issue(
            dir,
            spec["commonName"].as_str().unwrap_or(secret),
            &strings("dnsNames"),
            &["127.0.0.1"],
            &strings("uris"),
        )?;
        Ok(true)
    }

    /// What cert-manager's csi-driver mounts for a pod named `pod_name` with these volume
    /// attributes (it expands `${POD_NAME}`).
    fn issue_csi(&self, attributes: &Value, pod_name: &str, dir: &Path) -> anyhow::Result<()> {
        let attribute = |key: &str| -> Vec<String> {
            attributes[format!("csi.cert-manager.io/{key}")]
                .as_str()
                .unwrap_or_default()
                .replace("${POD_NAME}", pod_name)
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        ensure!(
            attribute("key-usages").contains(&"server auth".to_string())
                && attribute("key-usages").contains(&"client auth".to_string()),
            "a worker certificate serves and is presented to etcd: {attributes}"
        );
        let common_name = attribute("common-name").join(",");
        // A certificate with DNS names is one clients reach by a Service name (router-wse's):
        // here they reach it at 127.0.0.1, as with issue_secret. A worker's has none (routers
        // check its identity, not its address), and gets no address either.
        let dns = attribute("dns-names");
        let ips: &[&str] = if dns.is_empty() { &[] } else { &["127.0.0.1"] };
        self.issue(dir, &common_name, &dns, ips, &attribute("uri-sans"))
    }
}

/// Local stand-ins for the container's volume mounts: `(mount path, local directory)`.
fn local_volumes(
    rendered: &Rendered,
    spec: &Value,
    container: &Value,
    scratch: &Path,
    pod_name: &str,
    cert_manager: Option<&CertManager>,
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
        if let Some(secret) = volume["secret"]["secretName"].as_str()
            && let Some(cert_manager) = cert_manager
        {
            cert_manager.issue_secret(rendered, secret, &dir)?;
        }
        if volume["csi"]["driver"] == "csi.cert-manager.io" {
            cert_manager
                .context("a csi.cert-manager.io volume without a local cert-manager")?
                .issue_csi(&volume["csi"]["volumeAttributes"], pod_name, &dir)?;
        }
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
    /// Each listen port of the manifest (as written) → the local port it was remapped to.
    ports: HashMap<String, u16>,
    grace: Duration,
    _scratch: tempfile::TempDir,
}

/// Whether the variable holds an address the process listens on: `SWITCHYARD_*LISTEN`, the
/// control plane's dashboard, the Prometheus listener.
fn is_listen_variable(name: &str) -> bool {
    name.ends_with("LISTEN") || ["SWITCHYARD_HTTP_ADDR", "SWITCHYARD_METRICS_ADDR"].contains(&name)
}

fn localise(
    rendered: &Rendered,
    deployment: &str,
    pod_name: &str,
    etcd_url: &str,
    cert_manager: Option<&CertManager>,
) -> anyhow::Result<LocalContainer> {
    let (spec, container) = pod(rendered, "Deployment", deployment)?;
    let scratch = tempfile::tempdir()?;
    let mounts = local_volumes(
        rendered,
        &spec,
        &container,
        scratch.path(),
        pod_name,
        cert_manager,
    )?;
    let mut env = resolve_env(rendered, pod_name, &container)?;
    let mut ports: HashMap<String, u16> = HashMap::new();
    for (name, value) in env.iter_mut() {
        if is_listen_variable(name) {
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
        // SWITCHYARD_ADVERTISE, and router-wse's SWITCHYARD_WORKER_ADVERTISE.
        if name.ends_with("ADVERTISE") {
            let (host, port) = value.rsplit_once(':').context("advertise host:port")?;
            let local = ports
                .get(port)
                .with_context(|| format!("advertised port {port} is not a listen port"))?;
            *value = format!("{host}:{local}");
        }
        // Rewritten once: the local directories themselves lie under /tmp, a mount path too.
        // A value may name a file on a volume or the volume itself (a state directory).
        let local = mounts.iter().find_map(|(mount, dir)| {
            if value == mount {
                return Some(dir.display().to_string());
            }
            value
                .strip_prefix(&format!("{mount}/"))
                .map(|rest| dir.join(rest).display().to_string())
        });
        if let Some(local) = local {
            *value = local;
        }
    }
    let args: Vec<String> = container["args"]
        .as_array()
        .context("args")?
        .iter()
        .map(|a| a.as_str().map(str::to_string).context("string arg"))
        .collect::<anyhow::Result<_>>()?;
    let grace = Duration::from_secs(spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30));
    Ok(LocalContainer {
        args,
        env,
        ports,
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
    start_with(rendered, deployment, etcd_url, lines, None).await
}

async fn start_with(
    rendered: &Rendered,
    deployment: &str,
    etcd_url: &str,
    lines: usize,
    cert_manager: Option<&CertManager>,
) -> anyhow::Result<(Component, LocalContainer)> {
    start_pod(rendered, deployment, 0, etcd_url, lines, cert_manager).await
}

/// Pod `index` of a Deployment (named `<deployment>-<index>`, as the test names pods), once it
/// announced `lines` endpoints besides its metrics listener's (announced first, when set).
async fn start_pod(
    rendered: &Rendered,
    deployment: &str,
    index: usize,
    etcd_url: &str,
    lines: usize,
    cert_manager: Option<&CertManager>,
) -> anyhow::Result<(Component, LocalContainer)> {
    let pod_name = format!("{deployment}-{index}");
    let local = localise(rendered, deployment, &pod_name, etcd_url, cert_manager)?;
    let metrics = local
        .env
        .iter()
        .filter(|(name, _)| name == "SWITCHYARD_METRICS_ADDR")
        .count();
    let component =
        Component::start_with_env(&pod_name, &local.args, &local.env, lines + metrics).await?;
    Ok((component, local))
}

/// The `policy` Job's container as a local process: its command and args as written, its
/// environment resolved, etcd the local one at `etcd_url`, its volumes local directories (with
/// components/tls, its client certificate issued by `cert_manager`). Returns what it printed.
async fn run_policy_job_with(
    rendered: &Rendered,
    etcd_url: &str,
    cert_manager: Option<&CertManager>,
) -> anyhow::Result<String> {
    let (spec, container) = pod(rendered, "Job", "policy")?;
    let scratch = tempfile::tempdir()?;
    let mounts = local_volumes(
        rendered,
        &spec,
        &container,
        scratch.path(),
        "policy",
        cert_manager,
    )?;
    let mut env = resolve_env(rendered, "policy", &container)?;
    for (name, value) in env.iter_mut() {
        if name == "ETCD_ENDPOINTS" {
            *value = etcd_url.to_string();
        }
        let local = mounts.iter().find_map(|(mount, dir)| {
            value
                .strip_prefix(&format!("{mount}/"))
                .map(|rest| dir.join(rest).display().to_string())
        });
        if let Some(local) = local {
            *value = local;
        }
    }
    let command: Vec<String> = ["command", "args"]
        .iter()
        .flat_map(|field| container[*field].as_array().cloned().unwrap_or_default())
        .map(|a| {
            a.as_str()
                .map(|a| expand(a, &env))
                .context("string command")
        })
        .collect::<anyhow::Result<_>>()?;
    let (program, args) = command.split_first().context("the Job runs no command")?;
    let mut process = tokio::process::Command::new(program);
    process.args(args).envs(env.iter().map(|(k, v)| (k, v)));
    // Only what the manifest sets: no TLS files from this environment.
    for name in ["ETCD_CA_FILE", "ETCD_CERT_FILE", "ETCD_KEY_FILE"] {
        if !env.iter().any(|(n, _)| n == name) {
            process.env_remove(name);
        }
    }
    let output = process
        .output()
        .await
        .with_context(|| format!("running the policy Job's {program}"))?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    ensure!(
        output.status.success(),
        "the policy Job failed ({}): {stdout}{stderr}",
        output.status
    );
    Ok(stdout.into_owned())
}

/// The `policy` Job run against a fresh etcd: it seeds the ConfigMap's document.
async fn run_policy_job(rendered: &Rendered, etcd: &Etcd) -> anyhow::Result<()> {
    let printed = run_policy_job_with(rendered, &etcd.url, None).await?;
    ensure!(printed.contains("policy seeded"), "{printed}");
    let stored = etcd.registry().await?.get_policy().await?;
    assert_eq!(
        stored.as_deref(),
        Some(policy_document(rendered)?.as_bytes())
    );
    Ok(())
}

/// The document the `policy` Job seeds (its POLICY_DOCUMENT, from the ConfigMap).
fn policy_document(rendered: &Rendered) -> anyhow::Result<String> {
    let (_, container) = pod(rendered, "Job", "policy")?;
    let env = resolve_env(rendered, "policy", &container)?;
    let setting = |name: &str| {
        env.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .with_context(|| format!("the policy Job sets no {name}"))
    };
    assert_eq!(
        setting("POLICY_KEY")?,
        POLICY_KEY,
        "the Job writes the key routers watch"
    );
    setting("POLICY_DOCUMENT")
}

/// Scrapes the pod of Deployment `name` where its Prometheus annotations say (its annotated
/// port is one of its listen ports, remapped locally): Prometheus's text format.
async fn scrape(rendered: &Rendered, name: &str, local: &LocalContainer) -> anyhow::Result<()> {
    let annotations =
        &rendered.find("Deployment", name)?["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    let port = annotations["prometheus.io/port"]
        .as_str()
        .context("prometheus.io/port")?;
    let path = annotations["prometheus.io/path"]
        .as_str()
        .context("prometheus.io/path")?;
    let local_port = local
        .ports
        .get(port)
        .with_context(|| format!("prometheus.io/port {port} is none of the listen ports"))?;
    let response = reqwest::get(format!("http://127.0.0.1:{local_port}{path}")).await?;
    let status = response.status();
    let body = response.text().await?;
    ensure!(status == 200, "{status}: {body}");
    ensure!(
        body.contains("# TYPE switchyard_"),
        "no Switchyard metric: {body}"
    );
    Ok(())
}

/// The control plane's dashboard as `kubectl port-forward svc/control-plane <port>` reaches it:
/// the Service's `http` port targets the container port SWITCHYARD_HTTP_ADDR listens on, the
/// same number (so the forwarded local port is the dashboard's); here at its local port.
fn dashboard_url(rendered: &Rendered, local: &LocalContainer) -> anyhow::Result<String> {
    let service = rendered.find("Service", "control-plane")?;
    let port = service["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "http")
        .context("Service/control-plane has no http port")?;
    let (_, container) = pod(rendered, "Deployment", "control-plane")?;
    let target = port["targetPort"].as_str().context("a named targetPort")?;
    let container_port = container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == target)
        .and_then(|p| p["containerPort"].as_u64())
        .with_context(|| format!("no container port {target}"))?;
    assert_eq!(port["port"].as_u64(), Some(container_port));
    let listen = env_value(&container, "SWITCHYARD_HTTP_ADDR").context("SWITCHYARD_HTTP_ADDR")?;
    assert_eq!(
        listen,
        format!("0.0.0.0:{container_port}"),
        "the dashboard listens on the pod's interfaces, on the Service's target port"
    );
    let local_port = local
        .ports
        .get(&container_port.to_string())
        .context("the dashboard's port is not a listen port")?;
    Ok(format!("http://127.0.0.1:{local_port}"))
}

/// The dev overlay's operator token: from the Secret the control plane mounts its admin
/// tokens from (kustomize put the generated Secret's hash suffix in the reference).
fn operator_token(rendered: &Rendered) -> anyhow::Result<String> {
    let (spec, _) = pod(rendered, "Deployment", "control-plane")?;
    let secret = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == "admin-tokens")
        .and_then(|v| v["secret"]["secretName"].as_str())
        .context("the control plane mounts no admin-tokens Secret")?;
    let tokens: Value = serde_json::from_str(
        &rendered
            .data("Secret", secret, "tokens.json")?
            .context("tokens.json")?,
    )?;
    tokens["tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["role"] == "operator")
        .and_then(|t| t["token"].as_str())
        .map(str::to_string)
        .context("no operator token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_job_seeds_the_policy_only_where_none_is_stored() -> anyhow::Result<()> {
    let rendered = Rendered::load("dev")?;
    let etcd = Etcd::start().await?;
    let registry = etcd.registry().await?;
    let (control_plane, control_plane_local) =
        start(&rendered, "control-plane", &etcd.url, 2).await?;
    control_plane
        .wait_for_log("became the control-plane leader", Duration::from_secs(20))
        .await?;

    // No policy stored: the Job seeds policy.json.
    run_policy_job(&rendered, &etcd).await?;

    // An operator changes the policy live, through the control plane with an operator token.
    let mut changed: Value = serde_json::from_str(&policy_document(&rendered)?)?;
    changed["max_queued"] = json!(1234);
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", control_plane.addr("grpc")))?
            .connect()
            .await?;
    let mut admin = switchyard_proto::v1::admin_client::AdminClient::new(channel);
    admin
        .set_policy(switchyard_tests::with_bearer(
            switchyard_proto::v1::SetPolicyRequest {
                merge: false,
                document: changed.to_string(),
            },
            Some(&operator_token(&rendered)?),
        ))
        .await?;

    // The Job runs again (its TTL deleted it and `kubectl apply -k` recreated it): it keeps the
    // stored policy.
    let printed = run_policy_job_with(&rendered, &etcd.url, None).await?;
    ensure!(printed.contains("policy kept"), "{printed}");
    let stored: Value =
        serde_json::from_slice(&registry.get_policy().await?.context("the policy is gone")?)?;
    assert_eq!(
        stored["max_queued"], 1234,
        "the Job overwrote the live policy"
    );
    // The dashboard shows the live one.
    let dashboard = dashboard_url(&rendered, &control_plane_local)?;
    let shown: Value = reqwest::get(format!("{dashboard}/api/policy"))
        .await?
        .error_for_status()?
        .json()
        .await?;
    ensure!(shown.to_string().contains("1234"), "{shown}");
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

    let (_control_plane, control_plane_local) =
        start(&rendered, "control-plane", &etcd.url, 2).await?;
    let (mut gpu, gpu_local) = start(&rendered, "worker-gpu", &etcd.url, 1).await?;
    let (_wse, wse_local) = start(&rendered, "worker-wse", &etcd.url, 1).await?;
    let (mut router, router_local) = start(&rendered, "router", &etcd.url, 2).await?;
    let grpc = router.addr("grpc").to_string();
    let base = format!("http://{}/v1", router.addr("http"));

    // Every pod serves Prometheus metrics where its annotations say (the router on its HTTP
    // port), without credentials.
    for (name, local) in [
        ("control-plane", &control_plane_local),
        ("worker-gpu", &gpu_local),
        ("worker-wse", &wse_local),
        ("router", &router_local),
    ] {
        scrape(&rendered, name, local)
            .await
            .with_context(|| format!("scraping {name}"))?;
    }

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

    // The ops dashboard, where `kubectl port-forward svc/control-plane <port>` reaches it: the
    // Service's port, its target the container port the dashboard listens on.
    let dashboard = dashboard_url(&rendered, &control_plane_local)?;
    let workers: Value = reqwest::get(format!("{dashboard}/api/workers"))
        .await?
        .error_for_status()?
        .json()
        .await?;
    ensure!(
        workers.to_string().contains("worker-gpu-0")
            && workers.to_string().contains("worker-wse-0"),
        "the dashboard lists {workers}"
    );

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

    // The one router has no standby: it journals what it stores in its state volume, and its
    // container restarted after a kill (an OOM) takes that back before it serves.
    let stored: Value = http
        .post(format!("{base}/responses"))
        .bearer_auth(DEV_KEY)
        .json(&json!({"model": MODEL, "input": "Remember me.", "max_output_tokens": 2}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = stored["id"].as_str().context("a stored response id")?;
    let state = router_local
        .env
        .iter()
        .find(|(name, _)| name == "SWITCHYARD_STATE_DIR")
        .map(|(_, dir)| PathBuf::from(dir).join("journal.pb"))
        .context("the router has a state directory")?;
    wait_until(
        Duration::from_secs(10),
        "the response journaled",
        || async {
            std::fs::read(&state).is_ok_and(|journal| {
                journal
                    .windows(id.len())
                    .any(|bytes| bytes == id.as_bytes())
            })
        },
    )
    .await?;
    router.kill().await?;
    let restarted =
        Component::start_with_env("router-0", &router_local.args, &router_local.env, 2).await?;
    let again = http
        .get(format!(
            "http://{}/v1/responses/{id}",
            restarted.addr("http")
        ))
        .bearer_auth(DEV_KEY)
        .send()
        .await?;
    assert_eq!(again.status(), 200, "the restarted router answers {id}");

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

/// The router's routable worker ids over TLS, with the dev key.
async fn tls_router_workers(router: &str, ca: &Path) -> anyhow::Result<Vec<String>> {
    let tls = switchyard_cluster::tls::ClientTls::new(ca.to_path_buf());
    let channel = switchyard_cluster::tls::endpoint(router, Some(&tls))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .connect()
        .await?;
    let mut client = switchyard_proto::v1::inference_client::InferenceClient::new(channel);
    let mut request = tonic::Request::new(switchyard_proto::v1::ListModelsRequest {});
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {DEV_KEY}").parse()?);
    let models = client.list_models(request).await?.into_inner();
    Ok(switchyard_client::routable_worker_ids(&models))
}

/// etcd as the rendered StatefulSet's TLS settings have it (its Certificate, client
/// certificates required), with the policy seeded by the `policy` Job's container, with the
/// Job's own client certificate (ETCD_CERT_FILE/KEY_FILE/CA_FILE).
async fn start_tls_etcd_with_policy(
    rendered: &Rendered,
    cert_manager: &CertManager,
    pki: &Path,
) -> anyhow::Result<Etcd> {
    let (etcd_spec, etcd_container) = pod(rendered, "StatefulSet", "etcd")?;
    let etcd_env = resolve_env(rendered, "etcd-0", &etcd_container)?;
    let setting = |name: &str| {
        etcd_env
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(setting("ETCD_CLIENT_CERT_AUTH").as_deref(), Some("true"));
    assert!(setting("ETCD_ADVERTISE_CLIENT_URLS").is_some_and(|u| u.starts_with("https://")));
    let etcd_dir = pki.join("etcd");
    std::fs::create_dir_all(&etcd_dir)?;
    let secret = etcd_spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|v| v["secret"]["secretName"].as_str())
        .context("etcd mounts its certificate")?;
    ensure!(cert_manager.issue_secret(rendered, secret, &etcd_dir)?);
    let etcd = Etcd::start_tls(EtcdTls {
        cert_file: etcd_dir.join("tls.crt"),
        key_file: etcd_dir.join("tls.key"),
        ca_file: etcd_dir.join("ca.crt"),
    })
    .await?;

    // The policy Job, with its own client certificate (ETCD_CERT_FILE/KEY_FILE/CA_FILE).
    let printed = run_policy_job_with(rendered, &etcd.url, Some(cert_manager)).await?;
    ensure!(printed.contains("policy seeded"), "{printed}");

    Ok(etcd)
}

/// A TLS overlay run as processes: its etcd (TLS, the policy stored), control plane and GPU
/// worker started, certificates issued by a local cert-manager stand-in. The local containers
/// are kept: their volumes hold the certificates, read again on every new connection.
struct TlsOverlayRun {
    rendered: Rendered,
    cert_manager: CertManager,
    /// The cluster CA's certificate, as clients trust it.
    ca: PathBuf,
    etcd: Etcd,
    _pki: tempfile::TempDir,
    _control_plane: (Component, LocalContainer),
    _gpu: (Component, LocalContainer),
}

impl TlsOverlayRun {
    async fn start(overlay: &str) -> anyhow::Result<Self> {
        let rendered = Rendered::load(overlay)?;
        let cert_manager = CertManager::new()?;
        let pki = tempfile::tempdir()?;
        let ca = pki.path().join("ca.crt");
        std::fs::write(&ca, &cert_manager.ca_pem)?;
        let etcd = start_tls_etcd_with_policy(&rendered, &cert_manager, pki.path()).await?;
        let cm = Some(&cert_manager);
        let control_plane = start_with(&rendered, "control-plane", &etcd.url, 1, cm).await?;
        let gpu = start_with(&rendered, "worker-gpu", &etcd.url, 1, cm).await?;
        Ok(Self {
            rendered,
            cert_manager,
            ca,
            etcd,
            _pki: pki,
            _control_plane: control_plane,
            _gpu: gpu,
        })
    }

    /// The Deployment's pod 0 with its certificates, announcing `lines` endpoints.
    async fn start_pod(
        &self,
        deployment: &str,
        lines: usize,
    ) -> anyhow::Result<(Component, LocalContainer)> {
        start_with(
            &self.rendered,
            deployment,
            &self.etcd.url,
            lines,
            Some(&self.cert_manager),
        )
        .await
    }

    /// Waits until the router serving gRPC at `grpc` in `component` routes to exactly
    /// `workers` over TLS and reports to the control plane, and checks it refused no worker
    /// record.
    async fn links_over_tls(
        &self,
        component: &Component,
        grpc: std::net::SocketAddr,
        workers: &[impl AsRef<str>],
    ) -> anyhow::Result<()> {
        let grpc = grpc.to_string();
        let workers: Vec<&str> = workers.iter().map(AsRef::as_ref).collect();
        wait_until(
            Duration::from_secs(30),
            "every worker routable over TLS",
            || async {
                tls_router_workers(&grpc, &self.ca)
                    .await
                    .is_ok_and(|ids| ids == workers)
            },
        )
        .await?;
        component
            .wait_for_log("reporting to the control plane", Duration::from_secs(20))
            .await?;
        let log = std::fs::read_to_string(&component.log)?;
        anyhow::ensure!(!log.contains("worker record refused"), "{log}");
        Ok(())
    }

    /// Checks that the router's HTTP door at `http` refuses plaintext, and returns a client
    /// trusting the cluster CA.
    async fn https_only(&self, http: std::net::SocketAddr) -> anyhow::Result<reqwest::Client> {
        let plain = reqwest::Client::new()
            .get(format!("http://{http}/health"))
            .send()
            .await;
        anyhow::ensure!(plain.is_err(), "plaintext HTTP answered: {plain:?}");
        Ok(reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(
                self.cert_manager.ca_pem.as_bytes(),
            )?)
            .build()?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_tls_overlay_runs_as_rendered_with_cert_manager_certificates() -> anyhow::Result<()> {
    let run = TlsOverlayRun::start("dev-tls").await?;
    let _wse = run.start_pod("worker-wse", 1).await?;
    let (router, _router_files) = run.start_pod("router", 2).await?;

    // The router links to both workers: their per-pod certificates name the identity each
    // registered under (no IP address: the links check the identity, not the pod IP).
    run.links_over_tls(
        &router,
        router.addr("grpc"),
        &["worker-gpu-0", "worker-wse-0"],
    )
    .await?;

    // Plaintext is refused; HTTPS with the cluster CA is served, routed by the policy.
    let http = run.https_only(router.addr("http")).await?;
    let base = format!("https://{}/v1", router.addr("http"));
    let (headers, _) = chat(&http, &base, None, 4).await?;
    assert_eq!(header(&headers, "x-switchyard-worker"), "worker-wse-0");
    let (headers, body) = chat(&http, &base, Some("cost-sensitive"), 2).await?;
    assert_eq!(header(&headers, "x-switchyard-worker"), "worker-gpu-0");
    assert_eq!(body["model"], MODEL);
    Ok(())
}

/// The value of `name` in the container's `env`, as written in the manifest.
fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

/// The port of a `host:port` address.
fn port_of(address: &str) -> anyhow::Result<u64> {
    let (_, port) = address
        .rsplit_once(':')
        .with_context(|| format!("{address} is not host:port"))?;
    Ok(port.parse()?)
}

/// The durations the manifests use (`30s`, `2m`), in seconds.
fn seconds(text: &str) -> anyhow::Result<u64> {
    if let Some(minutes) = text.strip_suffix('m') {
        return Ok(minutes.parse::<u64>()? * 60);
    }
    Ok(text
        .strip_suffix('s')
        .with_context(|| format!("duration {text}"))?
        .parse()?)
}

/// A Kubernetes LabelSelector (`matchLabels` and `matchExpressions`) against a label set.
fn selects(selector: &Value, labels: &Value) -> anyhow::Result<bool> {
    for (key, value) in selector["matchLabels"].as_object().into_iter().flatten() {
        if &labels[key] != value {
            return Ok(false);
        }
    }
    for expression in selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let label = &labels[expression["key"].as_str().context("expression key")?];
        let values = expression["values"].as_array().cloned().unwrap_or_default();
        let matched = match expression["operator"].as_str() {
            Some("In") => values.contains(label),
            Some("NotIn") => !values.contains(label),
            Some("Exists") => !label.is_null(),
            Some("DoesNotExist") => label.is_null(),
            other => bail!("selector operator {other:?}"),
        };
        if !matched {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The labels of a workload's pods.
fn pod_labels<'a>(rendered: &'a Rendered, kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    Ok(&rendered.find(kind, name)?["spec"]["template"]["metadata"]["labels"])
}

/// Whether the rendered NetworkPolicies let a TCP connection to `port` through, from a pod of
/// the namespace with labels `from` (None: from outside the namespace, like a client) to one
/// with labels `to` (None: outside, like the wafer-scale endpoint). Kubernetes semantics: a
/// direction is open for a pod no policy of that type selects; otherwise some rule of a policy
/// selecting it must match the peer and the port.
fn network_allows(
    rendered: &Rendered,
    from: Option<&Value>,
    to: Option<&Value>,
    port: u64,
) -> anyhow::Result<bool> {
    let policies: Vec<&Value> = rendered
        .objects
        .iter()
        .filter(|o| o["kind"] == "NetworkPolicy")
        .collect();
    // Whether the rules of `direction` let the connection through for `pod`, talking to `peer`.
    let open = |pod: &Value, peer: Option<&Value>, direction: &str| -> anyhow::Result<bool> {
        let (policy_type, peers_field) = match direction {
            "ingress" => ("Ingress", "from"),
            _ => ("Egress", "to"),
        };
        let mut governed = false;
        for policy in &policies {
            let spec = &policy["spec"];
            let types = spec["policyTypes"].as_array().context("policyTypes")?;
            if !types.iter().any(|t| t == policy_type) || !selects(&spec["podSelector"], pod)? {
                continue;
            }
            governed = true;
            for rule in spec[direction].as_array().into_iter().flatten() {
                let ports = rule["ports"].as_array().cloned().unwrap_or_default();
                let port_ok = ports.is_empty()
                    || ports
                        .iter()
                        .any(|p| p["port"] == port && p["protocol"] == "TCP");
                let peers = rule[peers_field].as_array().cloned().unwrap_or_default();
                let mut peer_ok = peers.is_empty();
                for candidate in &peers {
                    ensure!(
                        candidate["namespaceSelector"].is_null() && candidate["ipBlock"].is_null(),
                        "peer {candidate}: only podSelector peers are evaluated here"
                    );
                    if let Some(peer) = peer {
                        peer_ok |= selects(&candidate["podSelector"], peer)?;
                    }
                }
                if port_ok && peer_ok {
                    return Ok(true);
                }
            }
        }
        Ok(!governed)
    };
    let egress = match from {
        Some(pod) => open(pod, to, "egress")?,
        None => true,
    };
    let ingress = match to {
        Some(pod) => open(pod, from, "ingress")?,
        None => true,
    };
    Ok(egress && ingress)
}

/// Every link the components make, and some they must not, against the rendered policies:
/// `(from, to, port, allowed)` with workloads as `kind/name` (None: outside the namespace).
fn check_links(
    rendered: &Rendered,
    links: &[(Option<&str>, Option<&str>, u64, bool)],
) -> anyhow::Result<()> {
    let labels = |workload: Option<&str>| -> anyhow::Result<Option<&Value>> {
        workload
            .map(|w| {
                let (kind, name) = w.split_once('/').context("kind/name")?;
                pod_labels(rendered, kind, name)
            })
            .transpose()
    };
    for &(from, to, port, allowed) in links {
        let actual = network_allows(rendered, labels(from)?, labels(to)?, port)?;
        ensure!(
            actual == allowed,
            "NetworkPolicies {} {from:?} → {to:?}:{port}",
            if allowed { "block" } else { "allow" }
        );
    }
    Ok(())
}

#[test]
fn dev_network_policies_allow_the_links_the_components_make() -> anyhow::Result<()> {
    let rendered = Rendered::load("dev")?;
    let (router, cp) = (Some("Deployment/router"), Some("Deployment/control-plane"));
    let (gpu, wse) = (Some("Deployment/worker-gpu"), Some("Deployment/worker-wse"));
    let etcd = Some("StatefulSet/etcd");
    check_links(
        &rendered,
        &[
            (None, router, 50051, true),
            (None, router, 8080, true),
            (router, gpu, 50061, true),
            (router, wse, 50061, true),
            (router, cp, 50052, true),
            (router, etcd, 2379, true),
            // The control plane's load streams (a Worker.Serve stream to every worker).
            (cp, gpu, 50061, true),
            (cp, wse, 50061, true),
            (wse, None, 443, true),
            // The ops dashboard: a follower forwards reads to the leader; nothing from outside
            // the namespace (operators port-forward, which NetworkPolicies do not govern).
            (cp, cp, 8090, true),
            (None, cp, 8090, false),
            // Prometheus, wherever it runs: the metrics listeners (the router's is on 8080).
            (None, cp, 9090, true),
            (None, gpu, 9090, true),
            (None, wse, 9090, true),
            (None, gpu, 50061, false),
            (gpu, wse, 50061, false),
            (router, None, 443, false),
        ],
    )
}

/// What `components/router-wse` renders to in an overlay that uses it.
fn check_router_wse_objects(rendered: &Rendered) -> anyhow::Result<()> {
    // One Deployment runs `switchyard router-wse`; nothing runs the router or worker-wse alone.
    let mut commands: Vec<(String, String)> = rendered
        .objects
        .iter()
        .filter(|o| {
            ["Deployment", "StatefulSet", "Job"].contains(&o["kind"].as_str().unwrap_or(""))
        })
        .map(|o| {
            let container = &o["spec"]["template"]["spec"]["containers"][0];
            let command = container["args"][0].as_str().unwrap_or_default();
            (
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap_or_default(),
                    o["metadata"]["name"].as_str().unwrap_or_default()
                ),
                command.to_string(),
            )
        })
        .collect();
    commands.sort();
    let subcommands: Vec<(&str, &str)> = commands
        .iter()
        .map(|(w, c)| (w.as_str(), c.as_str()))
        .filter(|(_, c)| {
            [
                "router",
                "router-wse",
                "worker-gpu",
                "worker-wse",
                "control-plane",
            ]
            .contains(c)
        })
        .collect();
    assert_eq!(
        subcommands,
        [
            ("Deployment/control-plane", "control-plane"),
            ("Deployment/router-wse", "router-wse"),
            ("Deployment/worker-gpu", "worker-gpu"),
        ]
    );
    for (kind, name) in [
        ("Deployment", "router"),
        ("Deployment", "worker-wse"),
        ("PodDisruptionBudget", "worker-wse"),
    ] {
        ensure!(
            rendered.find(kind, name).is_err(),
            "{kind}/{name} is still rendered"
        );
    }

    let deployment = rendered.find("Deployment", "router-wse")?;
    let (spec, container) = pod(rendered, "Deployment", "router-wse")?;
    let labels = pod_labels(rendered, "Deployment", "router-wse")?;
    // Placed and labelled like the base's objects (a component's own objects get neither from
    // the base it is added to).
    let control_plane = rendered.find("Deployment", "control-plane")?;
    ensure!(
        deployment["metadata"]["namespace"].is_string(),
        "no namespace"
    );
    assert_eq!(
        deployment["metadata"]["namespace"],
        control_plane["metadata"]["namespace"]
    );
    for key in ["app.kubernetes.io/part-of", "app.kubernetes.io/version"] {
        assert_eq!(
            deployment["metadata"]["labels"][key], control_plane["metadata"]["labels"][key],
            "{key}"
        );
        assert_eq!(
            labels[key],
            pod_labels(rendered, "Deployment", "control-plane")?[key]
        );
    }
    assert_eq!(
        labels["switchyard.io/etcd-client"], "true",
        "etcd's policy admits it"
    );

    // What the process listens on is what the pod declares, the Service targets and the
    // probes ask.
    let setting = |name: &str| env_value(&container, name).with_context(|| format!("no {name}"));
    for name in [
        "SWITCHYARD_LISTEN",
        "SWITCHYARD_HTTP_LISTEN",
        "SWITCHYARD_WORKER_LISTEN",
    ] {
        ensure!(
            setting(name)?.starts_with("0.0.0.0:"),
            "{name} must listen on the pod's interfaces"
        );
    }
    let grpc = port_of(setting("SWITCHYARD_LISTEN")?)?;
    let http = port_of(setting("SWITCHYARD_HTTP_LISTEN")?)?;
    let worker = port_of(setting("SWITCHYARD_WORKER_LISTEN")?)?;
    let declared: HashMap<&str, u64> = container["ports"]
        .as_array()
        .context("ports")?
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default(),
                p["containerPort"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        declared,
        HashMap::from([("grpc", grpc), ("http", http), ("worker-grpc", worker)])
    );
    let service = rendered.find("Service", "router")?;
    ensure!(
        selects(&json!({"matchLabels": service["spec"]["selector"]}), labels)?,
        "Service/router does not select the router-wse pods"
    );
    for port in service["spec"]["ports"]
        .as_array()
        .context("service ports")?
    {
        let target = port["targetPort"].as_str().context("named targetPort")?;
        assert_eq!(
            Some(&port["port"].as_u64().unwrap_or_default()),
            declared.get(target),
            "Service/router port {port}"
        );
    }
    assert_eq!(
        (grpc, http),
        (50051, 8080),
        "clients keep the router's ports"
    );
    if env_value(&container, "SWITCHYARD_TLS_CERT_FILE").is_some() {
        // The kubelet's gRPC probes speak plaintext only: a TCP check of the router's listener
        // and its HTTPS /health, as components/tls gives the router Deployment.
        for probe in ["livenessProbe", "readinessProbe"] {
            ensure!(
                container[probe]["grpc"].is_null(),
                "{probe} is a gRPC probe against a TLS listener"
            );
        }
        assert_eq!(container["livenessProbe"]["tcpSocket"]["port"], grpc);
        let ready = &container["readinessProbe"]["httpGet"];
        assert_eq!(ready["scheme"], "HTTPS");
        assert_eq!(ready["path"], "/health");
        assert_eq!(
            declared.get(ready["port"].as_str().unwrap_or("-")),
            Some(&http)
        );
    } else {
        assert_eq!(container["readinessProbe"]["grpc"]["port"], grpc);
        assert_eq!(
            container["readinessProbe"]["grpc"]["service"],
            "switchyard.v1.Inference"
        );
        assert_eq!(container["livenessProbe"]["grpc"]["port"], grpc);
    }

    // The hosted worker registers under the pod name at the pod IP (downward API) on its
    // listen port: resolve_env gives 127.0.0.1 for status.podIP only. (Values and the
    // downward API only: the production overlay's Secrets are the operator's.)
    let literal: Vec<Value> = container["env"]
        .as_array()
        .context("env")?
        .iter()
        .filter(|e| e["valueFrom"]["secretKeyRef"].is_null())
        .cloned()
        .collect();
    let resolved: HashMap<String, String> =
        resolve_env(rendered, "router-wse-5d8f7", &json!({ "env": literal }))?
            .into_iter()
            .collect();
    assert_eq!(
        resolved["SWITCHYARD_WORKER_ADVERTISE"],
        format!("127.0.0.1:{worker}")
    );
    assert_eq!(resolved["SWITCHYARD_WORKER_ID"], "router-wse-5d8f7");
    assert_eq!(resolved["POD_IP"], "127.0.0.1");

    // The grace period covers the preStop sleep and then both drains (side by side), with
    // the worker's deregistration and server stops (10 s).
    let grace = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .context("terminationGracePeriodSeconds")?;
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .context("preStop sleep")?;
    let drain = seconds(setting("SWITCHYARD_DRAIN_TIMEOUT")?)?;
    let worker_drain = seconds(setting("SWITCHYARD_WORKER_DRAIN_TIMEOUT")?)?;
    ensure!(
        grace >= pre_stop + drain.max(worker_drain) + 10,
        "grace {grace} s < preStop {pre_stop} s + drain max({drain}, {worker_drain}) s + 10 s"
    );

    // The wafer-scale endpoint from the Secret, its key as a mounted file.
    let gateway = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "SWITCHYARD_GATEWAY_URL")
        .context("no SWITCHYARD_GATEWAY_URL")?;
    let secret = gateway["valueFrom"]["secretKeyRef"]["name"]
        .as_str()
        .context("gateway URL from a Secret")?;
    ensure!(
        secret.starts_with("switchyard-wse"),
        "gateway URL from {secret}"
    );
    let key_file = setting("SWITCHYARD_GATEWAY_API_KEY_FILE")?;
    let mount = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| key_file.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap_or("-"))))
        .context("the key file is on no volume")?;
    let volume = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .context("the key file's volume")?;
    assert_eq!(volume["secret"]["secretName"], secret);

    // The router's budget and autoscaler follow the pods; the autoscaler owns `replicas`.
    let budget = rendered.find("PodDisruptionBudget", "router")?;
    ensure!(selects(&budget["spec"]["selector"], labels)?, "PDB/router");
    if let Ok(hpa) = rendered.find("HorizontalPodAutoscaler", "router") {
        assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "router-wse");
        ensure!(
            deployment["spec"]["replicas"].is_null(),
            "replicas fight the HPA"
        );
    }

    // Clients reach the routers, the routers every worker — the other pods' hosted workers
    // included — and the control plane, which streams every worker's load; the hosted worker
    // reaches the endpoint.
    let (router_wse, cp) = (
        Some("Deployment/router-wse"),
        Some("Deployment/control-plane"),
    );
    let (gpu, etcd, job) = (
        Some("Deployment/worker-gpu"),
        Some("StatefulSet/etcd"),
        Some("Job/policy"),
    );
    check_links(
        rendered,
        &[
            (None, router_wse, grpc, true),
            (None, router_wse, http, true),
            (router_wse, router_wse, worker, true),
            (router_wse, gpu, 50061, true),
            (router_wse, cp, 50052, true),
            (router_wse, etcd, 2379, true),
            (cp, router_wse, worker, true),
            (router_wse, None, 443, true),
            (None, router_wse, worker, false),
            (gpu, router_wse, worker, false),
            (job, router_wse, worker, false),
        ],
    )
}

#[test]
fn router_wse_overlays_run_router_wse_in_place_of_router_and_worker_wse() -> anyhow::Result<()> {
    let production = Rendered::load("router-wse")?;
    check_router_wse_objects(&production).context("overlays/router-wse")?;
    let (_, container) = pod(&production, "Deployment", "router-wse")?;
    assert_eq!(env_value(&container, "SWITCHYARD_ENGINE"), Some("gateway"));

    let dev = Rendered::load("dev-router-wse")?;
    check_router_wse_objects(&dev).context("overlays/dev-router-wse")?;
    let (_, container) = pod(&dev, "Deployment", "router-wse")?;
    assert_eq!(
        env_value(&container, "SWITCHYARD_ENGINE"),
        Some("synthetic")
    );
    assert_eq!(
        dev.find("Deployment", "router-wse")?["spec"]["replicas"],
        2,
        "two routers, so each reaches the other's worker over the network"
    );
    Ok(())
}

/// What `components/router-wse-tls` adds, in an overlay with components/tls and router-wse
/// (`rendered`), against the same overlay without TLS (`plain`).
fn check_router_wse_tls_objects(rendered: &Rendered, plain: &Rendered) -> anyhow::Result<()> {
    check_router_wse_objects(rendered)?;
    let (spec, container) = pod(rendered, "Deployment", "router-wse")?;
    let setting = |name: &str| env_value(&container, name).with_context(|| format!("no {name}"));

    // One certificate, its key and the cluster CA: served on both listeners, presented on the
    // links and to etcd; the hosted worker takes Worker calls only from the CA's certificates.
    let (cert, key, ca) = (
        setting("SWITCHYARD_TLS_CERT_FILE")?,
        setting("SWITCHYARD_TLS_KEY_FILE")?,
        setting("SWITCHYARD_TLS_CA_FILE")?,
    );
    assert_eq!(setting("SWITCHYARD_WORKER_TLS_CLIENT_CA_FILE")?, ca);
    assert_eq!(setting("SWITCHYARD_ETCD_CA_FILE")?, ca);
    assert_eq!(setting("SWITCHYARD_ETCD_CERT_FILE")?, cert);
    assert_eq!(setting("SWITCHYARD_ETCD_KEY_FILE")?, key);
    let (etcd_spec, etcd) = pod(rendered, "StatefulSet", "etcd")?;
    assert_eq!(env_value(&etcd, "ETCD_CLIENT_CERT_AUTH"), Some("true"));
    ensure!(etcd_spec.is_object());
    let endpoints = rendered
        .objects
        .iter()
        .find_map(|o| o["data"]["etcd-endpoints"].as_str())
        .context("etcd-endpoints")?;
    ensure!(
        endpoints.split(',').all(|u| u.starts_with("https://")),
        "etcd-endpoints {endpoints}"
    );

    // All three files from one csi-driver volume: a certificate per pod from the cluster CA.
    let directory = cert.rsplit_once('/').context("cert path")?.0;
    for file in [key, ca] {
        assert_eq!(file.rsplit_once('/').map(|(d, _)| d), Some(directory));
    }
    let mount = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"] == directory)
        .with_context(|| format!("nothing mounted at {directory}"))?;
    let volume = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .context("the certificate's volume")?;
    assert_eq!(volume["csi"]["driver"], "csi.cert-manager.io");
    let attributes = &volume["csi"]["volumeAttributes"];
    let attribute = |name: &str| -> Vec<&str> {
        attributes[format!("csi.cert-manager.io/{name}")]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    };
    assert_eq!(attribute("issuer-kind"), ["Issuer"]);
    let issuer = rendered.find("Issuer", attribute("issuer-name").first().unwrap_or(&"-"))?;
    ensure!(
        issuer["spec"]["ca"].is_object(),
        "not the cluster CA's Issuer"
    );
    for usage in ["server auth", "client auth"] {
        ensure!(attribute("key-usages").contains(&usage), "no {usage}");
    }
    // The router's Service names, as components/tls's router Certificate (which goes with the
    // router Deployment) names them.
    let tls = Rendered::load("tls")?;
    let router_certificate = tls.find("Certificate", "router")?;
    let service_names: Vec<&str> = router_certificate["spec"]["dnsNames"]
        .as_array()
        .context("dnsNames")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(service_names.contains(&"router"));
    assert_eq!(attribute("dns-names"), service_names);
    ensure!(
        rendered.find("Certificate", "router").is_err(),
        "the router Deployment's Certificate is still rendered"
    );
    // The hosted worker's identity, as the links check it (cluster/src/identity.rs), for the
    // pod name the csi-driver expands and the worker registers under.
    assert_eq!(setting("SWITCHYARD_WORKER_ID")?, "$(POD_NAME)");
    let expanded: Vec<String> = attribute("uri-sans")
        .iter()
        .map(|u| u.replace("${POD_NAME}", "router-wse-5d8f7-x2"))
        .collect();
    assert_eq!(
        expanded,
        [switchyard_cluster::identity::worker_uri(
            switchyard_cluster::Pool::Wse,
            "router-wse-5d8f7-x2"
        )]
    );

    // The NetworkPolicies are the plain overlay's; TLS changes the router-wse pods only.
    let policies = |r: &Rendered| -> Vec<Value> {
        r.objects
            .iter()
            .filter(|o| o["kind"] == "NetworkPolicy")
            .cloned()
            .collect()
    };
    assert_eq!(policies(rendered), policies(plain));
    for kind in ["Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"] {
        if let Ok(object) = plain.find(kind, "router") {
            assert_eq!(rendered.find(kind, "router")?, object, "{kind}/router");
        }
    }
    Ok(())
}

#[test]
fn router_wse_tls_overlays_serve_router_and_hosted_worker_with_one_per_pod_certificate()
-> anyhow::Result<()> {
    let production = Rendered::load("router-wse-tls")?;
    check_router_wse_tls_objects(&production, &Rendered::load("router-wse")?)
        .context("overlays/router-wse-tls")?;
    // The other components are exactly as overlays/tls has them (the certificates' specs: the
    // router-wse component labels what it finds, components/tls's objects included, as the
    // base labels its own).
    let tls = Rendered::load("tls")?;
    for (kind, name) in [
        ("Deployment", "control-plane"),
        ("Deployment", "worker-gpu"),
        ("StatefulSet", "etcd"),
        ("Job", "policy"),
    ] {
        assert_eq!(
            production.find(kind, name)?,
            tls.find(kind, name)?,
            "{kind}/{name}"
        );
    }
    for name in ["control-plane", "etcd", "policy-job", "switchyard-ca"] {
        assert_eq!(
            production.find("Certificate", name)?["spec"],
            tls.find("Certificate", name)?["spec"],
            "Certificate/{name}"
        );
    }

    let dev = Rendered::load("dev-router-wse-tls")?;
    check_router_wse_tls_objects(&dev, &Rendered::load("dev-router-wse")?)
        .context("overlays/dev-router-wse-tls")?;
    let (_, container) = pod(&dev, "Deployment", "router-wse")?;
    assert_eq!(
        env_value(&container, "SWITCHYARD_ENGINE"),
        Some("synthetic")
    );
    assert_eq!(dev.find("Deployment", "router-wse")?["spec"]["replicas"], 2);
    Ok(())
}

/// The routable worker ids of a router-wse pod's router.
async fn routable(pod: &Component) -> Vec<String> {
    list_router_workers_with_key(
        &pod.component_addr("router", "grpc").to_string(),
        Some(DEV_KEY),
    )
    .await
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_router_wse_overlay_runs_as_rendered() -> anyhow::Result<()> {
    let rendered = Rendered::load("dev-router-wse")?;
    let etcd = Etcd::start().await?;
    run_policy_job(&rendered, &etcd).await?;

    let (_control_plane, _) = start(&rendered, "control-plane", &etcd.url, 1).await?;
    let (_gpu, _) = start(&rendered, "worker-gpu", &etcd.url, 1).await?;
    let replicas = rendered.find("Deployment", "router-wse")?["spec"]["replicas"]
        .as_u64()
        .context("replicas")? as usize;
    let mut pods = Vec::new();
    for index in 0..replicas {
        // Router gRPC, router HTTP and the hosted worker's gRPC.
        pods.push(start_pod(&rendered, "router-wse", index, &etcd.url, 3, None).await?);
    }
    let ids: Vec<String> = (0..replicas).map(|i| format!("router-wse-{i}")).collect();
    let mut everyone = ids.clone();
    everyone.push("worker-gpu-0".into());

    // Each hosted worker is registered under its pod name at the advertised pod-IP address, on
    // the port its process announced for it.
    let records = etcd.registry().await?.list_workers().await?;
    for ((pod, local), id) in pods.iter().zip(&ids) {
        let advertised = local
            .env
            .iter()
            .find(|(n, _)| n == "SWITCHYARD_WORKER_ADVERTISE")
            .map(|(_, v)| v.clone())
            .context("advertise")?;
        assert_eq!(
            advertised,
            format!(
                "127.0.0.1:{}",
                pod.component_addr("worker-wse", "grpc").port()
            )
        );
        let record = records
            .iter()
            .find(|r| &r.id == id)
            .with_context(|| format!("{id} is not registered"))?;
        assert_eq!(record.address, advertised);
        assert_eq!(record.pool.to_string(), "wse");
    }

    // Every router links every worker: its own in process, the other pod's over the network.
    for (pod, _) in &pods {
        wait_until(Duration::from_secs(20), "every worker routable", || async {
            routable(pod).await == everyone
        })
        .await?;
        pod.wait_for_log("reporting to the control plane", Duration::from_secs(20))
            .await?;
    }
    let (first, _) = &pods[0];
    let line = first
        .wait_for_log(
            "linking the hosted worker in process",
            Duration::from_secs(5),
        )
        .await?;
    assert!(line.contains(&ids[0]), "{line}");

    let http = reqwest::Client::new();
    let base = |pod: &Component| format!("http://{}/v1", pod.component_addr("router", "http"));
    let anonymous = http.get(format!("{}/models", base(first))).send().await?;
    assert_eq!(anonymous.status(), 401, "the dev Secret's key file");

    // AUTO, 4 tokens: the policy's rule sends it to the wafer-scale pool, a hosted worker.
    let (headers, _) = chat(&http, &base(first), None, 4).await?;
    assert_eq!(header(&headers, "x-switchyard-pool"), "wse");
    assert!(ids.contains(&header(&headers, "x-switchyard-worker").to_string()));

    // With its own worker drained (as the control plane drains it, through etcd), the first
    // router serves the wafer-scale lane on the second pod's worker, at its pod-IP address.
    let registry = etcd.registry().await?;
    registry.set_drain(&ids[0], true, None).await?;
    wait_until(
        Duration::from_secs(10),
        "the drained worker unroutable",
        || async { !routable(first).await.contains(&ids[0]) },
    )
    .await?;
    let (headers, _) = chat(&http, &base(first), None, 4).await?;
    assert_eq!(header(&headers, "x-switchyard-worker"), ids[1]);
    registry.set_drain(&ids[0], false, None).await?;

    // Cost-sensitive: the GPU pool's candle engine with the model from the volume.
    let (headers, body) = chat(&http, &base(first), Some("cost-sensitive"), 2).await?;
    assert_eq!(header(&headers, "x-switchyard-worker"), "worker-gpu-0");
    assert_eq!(body["model"], MODEL);

    // SIGTERM (the kubelet's, after the preStop sleep) with a generation in flight on the
    // second pod's own worker: it finishes, and the process exits cleanly within the grace
    // period; its worker leaves the first router's view.
    let (mut second, second_local) = pods.pop().context("two pods")?;
    let (first, _) = &pods[0];
    registry.set_drain(&ids[0], true, None).await?;
    wait_until(
        Duration::from_secs(10),
        "only the second pod's worker in wse",
        || async { !routable(&second).await.contains(&ids[0]) },
    )
    .await?;
    // Streamed: its headers come with the first token, so SIGTERM lands mid-generation (2000
    // tokens at the synthetic engine's 1000 tokens/s).
    let response = http
        .post(format!("{}/chat/completions", base(&second)))
        .bearer_auth(DEV_KEY)
        .header("x-switchyard-class", "latency-critical")
        .json(&json!({
            "model": MODEL,
            "max_tokens": 2000,
            "stream": true,
            "messages": [{"role": "user", "content": "Say hi."}],
        }))
        .send()
        .await?;
    second.sigterm()?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.text().await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "x-switchyard-worker"), ids[1]);
    assert!(
        body.contains(r#""finish_reason":"length""#) && body.ends_with("data: [DONE]\n\n"),
        "the generation in flight did not finish: {:?}",
        body.lines().rev().take(4).collect::<Vec<_>>()
    );
    let drain_log = second
        .wait_for_log("finishing the ones in flight", Duration::from_secs(5))
        .await?;
    assert!(drain_log.contains("in_flight=1"), "{drain_log}");
    let exit = second.exited(second_local.grace).await?;
    assert!(exit.success(), "router-wse exited with {exit}");
    registry.set_drain(&ids[0], false, None).await?;
    wait_until(
        Duration::from_secs(10),
        "the stopped pod's worker to leave",
        || async { routable(first).await == [ids[0].clone(), "worker-gpu-0".to_string()] },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_router_wse_tls_overlay_runs_as_rendered_with_cert_manager_certificates()
-> anyhow::Result<()> {
    let run = TlsOverlayRun::start("dev-router-wse-tls").await?;
    // Each router-wse pod gets its own certificate from its csi-driver volume (${POD_NAME}
    // expanded).
    let replicas = run.rendered.find("Deployment", "router-wse")?["spec"]["replicas"]
        .as_u64()
        .context("replicas")? as usize;
    let mut pods = Vec::new();
    for index in 0..replicas {
        pods.push(
            start_pod(
                &run.rendered,
                "router-wse",
                index,
                &run.etcd.url,
                3,
                Some(&run.cert_manager),
            )
            .await?,
        );
    }
    let mut everyone: Vec<String> = (0..replicas).map(|i| format!("router-wse-{i}")).collect();
    everyone.push("worker-gpu-0".into());

    // Every router links every worker over TLS — its own in process, the other pod's by the
    // identity its per-pod certificate names — and reports to the control plane by its identity.
    for (pod, _) in &pods {
        run.links_over_tls(pod, pod.component_addr("router", "grpc"), &everyone)
            .await?;
    }
    let ca = &run.ca;

    // The hosted worker's listener serves TLS and takes Worker calls only with a client
    // certificate of the cluster CA (SWITCHYARD_WORKER_TLS_CLIENT_CA_FILE).
    let (first, _) = &pods[0];
    let worker = first.component_addr("worker-wse", "grpc").to_string();
    assert_worker_calls_need_a_client_certificate(&worker, ca).await?;

    // Plaintext is refused; HTTPS with the cluster CA is served, routed by the policy.
    let http = run
        .https_only(first.component_addr("router", "http"))
        .await?;
    // The readiness probe's request: HTTPS /health (the kubelet verifies no certificate).
    let health = http
        .get(format!(
            "https://{}/health",
            first.component_addr("router", "http")
        ))
        .send()
        .await?;
    assert_eq!(health.status(), 200);
    let base = format!("https://{}/v1", first.component_addr("router", "http"));
    let (headers, _) = chat(&http, &base, None, 4).await?;
    assert_eq!(header(&headers, "x-switchyard-pool"), "wse");
    assert!(everyone[..replicas].contains(&header(&headers, "x-switchyard-worker").to_string()));
    let (headers, body) = chat(&http, &base, Some("cost-sensitive"), 2).await?;
    assert_eq!(header(&headers, "x-switchyard-worker"), "worker-gpu-0");
    assert_eq!(body["model"], MODEL);
    Ok(())
}
