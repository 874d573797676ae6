//! Test harness for end-to-end tests: a real `etcd` process and real `switchyard` component
//! processes on free loopback ports, torn down (SIGKILL) when dropped. Components announce
//! `<component> <protocol> <address>` on stdout when ready; the harness waits for that line
//! instead of sleeping. Logs of every process go to `target/e2e-logs/`.

pub mod alert_rules;
pub mod browser;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use switchyard_cluster::{EtcdRegistry, Registry};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How long a process may take to announce readiness.
// A ceiling, not a wait: a worker loading real weights on a busy 2-core CI machine can take
// a minute before it announces readiness.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The real model's weights (`scripts/fetch-model.sh` puts them in `models/`; CI runs it
/// first), or an error saying to fetch them.
pub fn real_model_path() -> anyhow::Result<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    anyhow::ensure!(
        std::path::Path::new(path).is_file(),
        "{path} is missing: run scripts/fetch-model.sh"
    );
    Ok(path.to_string())
}

/// A free TCP port on 127.0.0.1 (bound and released; the OS does not hand it out again soon).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free port")
}

/// The `switchyard` binary built by `cargo build --bins` (or `$SWITCHYARD_BIN`).
pub fn switchyard_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("SWITCHYARD_BIN") {
        return PathBuf::from(path);
    }
    // Test binaries live in target/<profile>/deps/, other binaries (switchyard-bench) next to
    // `switchyard` in target/<profile>/.
    let exe = std::env::current_exe().expect("current executable");
    let dir = exe.parent().expect("the executable's directory");
    let bin = if dir.join("switchyard").exists() {
        dir.join("switchyard")
    } else {
        dir.parent().expect("target/<profile>").join("switchyard")
    };
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bins` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

pub fn log_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>")
        .join("e2e-logs");
    std::fs::create_dir_all(&dir).expect("creating the e2e log dir");
    dir
}

/// A fresh log file for process `name`: its path and the open file.
pub(crate) fn log_file(name: &str) -> (PathBuf, std::fs::File) {
    let path = log_dir().join(format!("{name}-{}.log", free_port()));
    let file = std::fs::File::create(&path).expect("creating a log file");
    (path, file)
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; how long it took.
pub async fn wait_until<F, Fut>(
    timeout: Duration,
    what: &str,
    mut condition: F,
) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    poll_until(timeout, what, || {
        let holds = condition();
        async move { holds.await.then_some(()) }
    })
    .await?;
    Ok(started.elapsed())
}

/// Polls `probe` every 20 ms until it yields a value or `timeout` passes.
pub async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(20));
    loop {
        ticks.tick().await;
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
    }
}

/// `etcd` as member `name` of `initial_cluster`, its data in `data_dir`, serving clients on
/// `url` and peers on `peer_url`.
fn etcd_member_command(
    name: &str,
    data_dir: &std::path::Path,
    url: &str,
    peer_url: &str,
    initial_cluster: &str,
) -> Command {
    let mut command = Command::new("etcd");
    command
        .args(["--name", name, "--data-dir"])
        .arg(data_dir)
        .args(["--listen-client-urls", url, "--advertise-client-urls", url])
        .args([
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
        ])
        .args(["--initial-cluster", initial_cluster]);
    command
}

/// A real etcd server on free loopback ports with its data in a temporary directory.
pub struct Etcd {
    process: Process,
    _data: tempfile::TempDir,
    pub url: String,
}

impl Etcd {
    pub async fn start() -> anyhow::Result<Self> {
        Self::spawn(None, None).await
    }

    /// Starts etcd serving clients on `client` (a port components may already be dialling).
    pub async fn start_on(client: u16) -> anyhow::Result<Self> {
        Self::spawn(Some(client), None).await
    }

    /// Starts etcd serving clients over TLS only (`https://`), requiring client certificates
    /// of `tls`'s CA (etcd's `--client-cert-auth`); `tls` is also how the readiness probe
    /// connects.
    pub async fn start_tls(tls: EtcdTls) -> anyhow::Result<Self> {
        Self::spawn(None, Some(tls)).await
    }

    /// Starts etcd on `client` (a free port when `None`). A port found free may be taken by
    /// another process before etcd binds it (many tests run at once): etcd then exits at
    /// once, and is started again on other ports.
    async fn spawn(client: Option<u16>, tls: Option<EtcdTls>) -> anyhow::Result<Self> {
        const ATTEMPTS: usize = 5;
        let mut attempt = 1;
        loop {
            match Self::spawn_once(client.unwrap_or_else(free_port), tls.as_ref()).await? {
                Ok(etcd) => return Ok(etcd),
                Err(exited) if attempt < ATTEMPTS => {
                    eprintln!(
                        "etcd exited before answering ({exited}); starting it again on other ports"
                    );
                    attempt += 1;
                }
                Err(exited) => {
                    anyhow::bail!(
                        "etcd exited before answering, {ATTEMPTS} times ({exited}); see its log"
                    )
                }
            }
        }
    }

    /// One start: the running etcd, or how it exited before it answered.
    async fn spawn_once(
        client: u16,
        tls: Option<&EtcdTls>,
    ) -> anyhow::Result<Result<Self, std::process::ExitStatus>> {
        let data = tempfile::tempdir()?;
        let peer = free_port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut command = etcd_member_command(
            "e2e",
            data.path(),
            &url,
            &peer_url,
            &format!("e2e={peer_url}"),
        );
        if let Some(tls) = tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert_file)
                .arg("--key-file")
                .arg(&tls.key_file)
                .arg("--trusted-ca-file")
                .arg(&tls.ca_file)
                .arg("--client-cert-auth");
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(log_file("etcd").1)
            .kill_on_drop(true)
            .spawn()
            .context("starting etcd (install Debian's etcd-server; scripts/test.sh does)")?;
        let security = switchyard_cluster::EtcdSecurity {
            tls: tls.map(|tls| {
                switchyard_cluster::tls::ClientTls::new(tls.ca_file.clone())
                    .with_identity(tls.cert_file.clone(), tls.key_file.clone())
            }),
            user: None,
        };
        let answers = wait_until(Duration::from_secs(20), "etcd to answer", || async {
            match EtcdRegistry::connect_with(std::slice::from_ref(&url), &security).await {
                Ok(registry) => registry.list_workers().await.is_ok(),
                Err(_) => false,
            }
        });
        tokio::select! {
            answered = answers => answered?,
            exited = child.wait() => return Ok(Err(exited?)),
        };
        Ok(Ok(Self {
            process: Process(child),
            _data: data,
            url,
        }))
    }

    pub async fn registry(&self) -> anyhow::Result<EtcdRegistry> {
        Ok(EtcdRegistry::connect(std::slice::from_ref(&self.url)).await?)
    }
}

impl std::ops::Deref for Etcd {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

/// A child process a test can freeze, thaw, signal and kill; [`Etcd`], [`EtcdMember`] and
/// [`Component`] are one (they dereference to it).
pub struct Process(Child);

impl Process {
    pub fn pid(&self) -> Option<u32> {
        self.0.id()
    }

    /// The process's resident memory in KiB (from procfs).
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let pid = self.pid().context("the process has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS in procfs")
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("process already reaped")?;
        kill(Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    /// SIGSTOP: the process freezes — its sockets stay open and accept connections, nothing is
    /// answered — until [`Process::resume`].
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// SIGCONT after [`Process::pause`].
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// SIGKILL, and waits for the process to be gone: it has no chance to deregister, and its
    /// ports refuse connections.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGKILL)?;
        self.0.wait().await?;
        Ok(())
    }

    /// SIGTERM, then wait for the process to exit; returns its exit status.
    pub async fn terminate(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        self.sigterm()?;
        self.exited(timeout).await
    }

    /// SIGTERM, without waiting (see [`Process::exited`]).
    pub fn sigterm(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// Waits for the process to exit; returns its exit status.
    pub async fn exited(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        Ok(tokio::time::timeout(timeout, self.0.wait())
            .await
            .context("process did not exit in time")??)
    }
}

/// One member of an [`EtcdCluster`].
pub struct EtcdMember {
    process: Process,
    /// `e2e-<n>`, its etcd `--name`.
    pub name: String,
    /// Its client URL, `http://127.0.0.1:<port>`.
    pub url: String,
}

impl std::ops::Deref for EtcdMember {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for EtcdMember {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

impl EtcdMember {
    /// An etcd client of this member alone.
    pub async fn client(&self) -> anyhow::Result<etcd_client::Client> {
        Ok(etcd_client::Client::connect([self.url.as_str()], None).await?)
    }
}

/// A multi-member etcd cluster on free loopback ports (peer and client), each member its own
/// process with its data in a temporary directory; every member is SIGKILLed when dropped
/// (a paused one too).
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    _data: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `size` members and waits until each answers a linearizable read (so the cluster
    /// has a leader). Ports found free may be taken before etcd binds them: a member that exits
    /// early makes the whole cluster start again on other ports.
    pub async fn start(size: usize) -> anyhow::Result<Self> {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            match Self::start_once(size).await? {
                Ok(cluster) => return Ok(cluster),
                Err(exited) => eprintln!(
                    "etcd member exited before the cluster answered ({exited}), attempt \
                     {attempt} of {ATTEMPTS}; starting it again on other ports"
                ),
            }
        }
        anyhow::bail!("the etcd cluster did not start in {ATTEMPTS} attempts; see the etcd logs")
    }

    async fn start_once(size: usize) -> anyhow::Result<Result<Self, std::process::ExitStatus>> {
        let data = tempfile::tempdir()?;
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e2e-{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("e2e-{}", ports[0].0);
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("e2e-{i}");
            let url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = etcd_member_command(
                &name,
                &data.path().join(&name),
                &url,
                &peer_url,
                &initial_cluster,
            )
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &token])
            .stdout(Stdio::null())
            .stderr(log_file(&format!("etcd-{name}")).1)
            .kill_on_drop(true)
            .spawn()
            .context("starting etcd (install Debian's etcd-server; scripts/test.sh does)")?;
            members.push(EtcdMember {
                process: Process(child),
                name,
                url,
            });
        }
        let mut cluster = Self {
            members,
            _data: data,
        };
        let urls: Vec<String> = cluster.urls();
        let answers = wait_until(
            Duration::from_secs(30),
            "every etcd member to answer",
            || {
                let urls = urls.clone();
                async move {
                    for url in &urls {
                        let Ok(registry) = EtcdRegistry::connect(std::slice::from_ref(url)).await
                        else {
                            return false;
                        };
                        if registry.list_workers().await.is_err() {
                            return false;
                        }
                    }
                    true
                }
            },
        );
        // A member that cannot start (its port taken since it was picked) exits.
        let exited = futures::future::select_all(
            cluster
                .members
                .iter_mut()
                .map(|member| Box::pin(member.process.0.wait())),
        );
        tokio::select! {
            answered = answers => {
                answered?;
            }
            (exited, _, _) = exited => return Ok(Err(exited?)),
        }
        Ok(Ok(cluster))
    }

    /// Every member's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.url.clone()).collect()
    }

    /// Every member's client URL, comma-separated (a component's `--etcd`).
    pub fn endpoints(&self) -> String {
        self.urls().join(",")
    }

    /// The index of the member that is the raft leader now, as the members themselves say.
    pub async fn leader(&self) -> anyhow::Result<usize> {
        for (i, member) in self.members.iter().enumerate() {
            let Ok(mut client) = member.client().await else {
                continue;
            };
            let Ok(status) = client.status().await else {
                continue;
            };
            if status.header().map(|h| h.member_id()) == Some(status.leader()) {
                return Ok(i);
            }
        }
        anyhow::bail!("no etcd member says it is the leader")
    }
}

/// etcd's TLS files: its server certificate (also the test's client certificate) and the CA
/// of the client certificates it accepts.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
}

/// A running `switchyard <subcommand>` process.
pub struct Component {
    process: Process,
    pub name: String,
    /// Where the process's stderr (its log) goes.
    pub log: PathBuf,
    /// Endpoints announced on stdout, `(protocol, address)`.
    pub endpoints: Vec<(String, String, SocketAddr)>,
    /// Other stdout lines printed before the last endpoint (e.g. `switchyard up`'s admin token).
    pub notes: Vec<String>,
}

impl Component {
    /// Starts `switchyard <args>` and waits until it announced `expected_lines` endpoints.
    pub async fn start(name: &str, args: &[String], expected_lines: usize) -> anyhow::Result<Self> {
        Self::start_with_env(name, args, &[], expected_lines).await
    }

    /// Like [`Component::start`], with extra environment variables (e.g. `SWITCHYARD_*`
    /// settings, as a Kubernetes manifest gives them).
    pub async fn start_with_env(
        name: &str,
        args: &[String],
        env: &[(String, String)],
        expected_lines: usize,
    ) -> anyhow::Result<Self> {
        let (log, log_file) = log_file(name);
        let mut child = Command::new(switchyard_bin())
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "1")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .env("NO_COLOR", "1")
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting switchyard {name}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut endpoints = Vec::new();
        let mut notes = Vec::new();
        let deadline = Instant::now() + READY_TIMEOUT;
        while endpoints.len() < expected_lines {
            let line = tokio::time::timeout_at(deadline, lines.next_line())
                .await
                .with_context(|| {
                    format!("{name} did not announce readiness within {READY_TIMEOUT:?}")
                })??
                .with_context(|| {
                    format!("{name} exited before announcing readiness (see target/*/e2e-logs)")
                })?;
            let parts: Vec<&str> = line.split_whitespace().collect();
            // `tls ca <path>` has three words too: only an address makes an endpoint line.
            if let [component, protocol, address] = parts[..]
                && let Ok(address) = address.parse()
            {
                endpoints.push((component.to_string(), protocol.to_string(), address));
            } else {
                notes.push(line);
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            process: Process(child),
            name: name.to_string(),
            log,
            endpoints,
            notes,
        })
    }

    /// Waits until the process has logged a line containing `needle`; returns that line.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let mut found = None;
        wait_until(timeout, &format!("{} to log {needle:?}", self.name), || {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            found = log.lines().find(|l| l.contains(needle)).map(str::to_string);
            let hit = found.is_some();
            async move { hit }
        })
        .await?;
        Ok(found.expect("found when wait_until succeeds"))
    }

    /// The first announced address of `protocol`.
    pub fn addr(&self, protocol: &str) -> SocketAddr {
        self.endpoints
            .iter()
            .find(|(_, p, _)| p == protocol)
            .map(|(_, _, a)| *a)
            .expect("announced endpoint")
    }

    /// The address `component` announced for `protocol` (a process running two components,
    /// like `router-wse`, announces each one's).
    pub fn component_addr(&self, component: &str, protocol: &str) -> SocketAddr {
        self.endpoints
            .iter()
            .find(|(c, p, _)| c == component && p == protocol)
            .map(|(_, _, a)| *a)
            .expect("announced endpoint")
    }

    /// `http://<address>/metrics` of the `--metrics-addr` listener.
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.addr("metrics"))
    }

    /// The announced address of `component` (for `switchyard up`).
    pub fn addr_of(&self, component: &str, protocol: &str) -> SocketAddr {
        self.endpoints
            .iter()
            .find(|(c, p, _)| c == component && p == protocol)
            .map(|(_, _, a)| *a)
            .expect("announced endpoint")
    }
}

impl std::ops::Deref for Component {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for Component {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// Options of a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub gpu_workers: usize,
    pub wse_workers: usize,
    pub lease_ttl: &'static str,
    /// Extra flags for every GPU worker.
    pub gpu_flags: Vec<String>,
    /// Extra flags for every wafer-scale worker.
    pub wse_flags: Vec<String>,
    pub router_flags: Vec<String>,
    /// An API key the harness itself sends (for its readiness probe) when `router_flags`
    /// turn authentication on.
    pub api_key: Option<String>,
    /// Every component serves Prometheus metrics on a `--metrics-addr` of its own.
    pub metrics: bool,
    /// Environment variables of every component (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub env: Vec<(String, String)>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            gpu_workers: 2,
            wse_workers: 1,
            lease_ttl: "2s",
            gpu_flags: vec![],
            wse_flags: vec![],
            router_flags: vec![],
            api_key: None,
            metrics: false,
            env: vec![],
        }
    }
}

/// etcd plus Switchyard components, each a separate process.
pub struct Cluster {
    pub etcd: Etcd,
    pub router: Component,
    pub control_plane: Component,
    pub gpu: Vec<Component>,
    pub wse: Vec<Component>,
    api_key: Option<String>,
}

/// Owned copies of command-line arguments.
pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

impl Cluster {
    pub async fn start(spec: ClusterSpec) -> anyhow::Result<Self> {
        let etcd = Etcd::start().await?;
        // With metrics, each component announces its metrics listener as one more line.
        let (metrics_flags, metrics_lines) = if spec.metrics {
            (strings(&["--metrics-addr", "127.0.0.1:0"]), 1)
        } else {
            (vec![], 0)
        };
        let start = |name: String, mut args: Vec<String>, lines: usize| {
            args.extend(metrics_flags.iter().cloned());
            let env = spec.env.clone();
            async move { Component::start_with_env(&name, &args, &env, lines + metrics_lines).await }
        };
        let mut gpu = Vec::new();
        for i in 0..spec.gpu_workers {
            let mut args = strings(&["worker-gpu", "--etcd", &etcd.url, "--listen", "127.0.0.1:0"]);
            args.extend(strings(&[
                "--id",
                &format!("gpu-{i}"),
                "--lease-ttl",
                spec.lease_ttl,
            ]));
            args.extend(spec.gpu_flags.iter().cloned());
            gpu.push(start(format!("gpu-{i}"), args, 1).await?);
        }
        let mut wse = Vec::new();
        for i in 0..spec.wse_workers {
            let mut args = strings(&["worker-wse", "--etcd", &etcd.url, "--listen", "127.0.0.1:0"]);
            args.extend(strings(&[
                "--id",
                &format!("wse-{i}"),
                "--lease-ttl",
                spec.lease_ttl,
            ]));
            args.extend(spec.wse_flags.iter().cloned());
            wse.push(start(format!("wse-{i}"), args, 1).await?);
        }
        let mut args = strings(&[
            "router",
            "--etcd",
            &etcd.url,
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ]);
        args.extend(spec.router_flags.iter().cloned());
        // The router announces its gRPC and its OpenAI-compatible HTTP address.
        let router = start("router".into(), args, 2).await?;
        let cp_extra: &[&str] = if spec.metrics {
            &["--metrics-addr", "127.0.0.1:0"]
        } else {
            &[]
        };
        let control_plane = start_control_plane(&etcd.url, "control-plane-0", cp_extra).await?;
        // The only replica: it leads (and accepts writes) once its campaign has won.
        control_plane
            .wait_for_log("became the control-plane leader", READY_TIMEOUT)
            .await?;
        let cluster = Self {
            etcd,
            router,
            control_plane,
            gpu,
            wse,
            api_key: spec.api_key.clone(),
        };
        cluster
            .wait_for_router_workers(spec.gpu_workers + spec.wse_workers, READY_TIMEOUT)
            .await?;
        Ok(cluster)
    }

    pub fn router_addr(&self) -> String {
        self.router.addr("grpc").to_string()
    }

    /// Base URL of the router's OpenAI-compatible API, e.g. `http://127.0.0.1:41651/v1`.
    pub fn router_openai_url(&self) -> String {
        format!("http://{}/v1", self.router.addr("http"))
    }

    /// Stores the routing policy `document` through the control plane (its admin API, as an
    /// operator would) and waits until the router logs that it applied a new policy.
    pub async fn set_policy(
        &self,
        document: &serde_json::Value,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let applied = || {
            std::fs::read_to_string(&self.router.log)
                .unwrap_or_default()
                .matches("routing policy applied")
                .count()
        };
        let before = applied();
        let channel =
            switchyard_client::connect_channel(&self.control_plane.addr("grpc").to_string())
                .await?;
        switchyard_proto::v1::admin_client::AdminClient::new(channel)
            .set_policy(switchyard_proto::v1::SetPolicyRequest {
                merge: false,
                document: document.to_string(),
            })
            .await?;
        wait_until(timeout, "the router to apply the policy", || {
            let applied = applied();
            async move { applied > before }
        })
        .await?;
        Ok(())
    }

    /// Waits until the router routes to exactly `count` workers.
    pub async fn wait_for_router_workers(
        &self,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        wait_until(timeout, "the router to route to every worker", || async {
            self.router_worker_ids()
                .await
                .is_ok_and(|ids| ids.len() == count)
        })
        .await?;
        Ok(())
    }

    /// Worker ids the router currently routes to (from `ListModels`).
    pub async fn router_worker_ids(&self) -> anyhow::Result<Vec<String>> {
        list_router_workers_with_key(&self.router_addr(), self.api_key.as_deref()).await
    }
}

/// Starts a control-plane replica `id` on free ports; it announces its gRPC and dashboard
/// (HTTP) addresses.
pub async fn start_control_plane(
    etcd: &str,
    id: &str,
    extra: &[&str],
) -> anyhow::Result<Component> {
    start_control_plane_with_env(etcd, id, extra, &[]).await
}

/// [`start_control_plane`] with extra environment variables (e.g. `OTEL_*`).
pub async fn start_control_plane_with_env(
    etcd: &str,
    id: &str,
    extra: &[&str],
    env: &[(String, String)],
) -> anyhow::Result<Component> {
    let mut args = strings(&[
        "control-plane",
        "--etcd",
        etcd,
        "--id",
        id,
        "--listen",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ]);
    args.extend(strings(extra));
    // gRPC and dashboard addresses, plus the metrics listener when asked for.
    let lines = 2 + usize::from(extra.contains(&"--metrics-addr"));
    Component::start_with_env(id, &args, env, lines).await
}

/// Worker ids a router currently routes to, sorted.
pub async fn list_router_workers(router: &str) -> anyhow::Result<Vec<String>> {
    list_router_workers_with_key(router, None).await
}

/// Like [`list_router_workers`], sending `authorization: Bearer <key>` when `key` is set.
pub async fn list_router_workers_with_key(
    router: &str,
    key: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let channel = switchyard_client::connect_channel(router).await?;
    let mut client = switchyard_proto::v1::inference_client::InferenceClient::new(channel);
    let mut request = tonic::Request::new(switchyard_proto::v1::ListModelsRequest {});
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse()?);
    }
    let models = client.list_models(request).await?.into_inner();
    Ok(switchyard_client::routable_worker_ids(&models))
}

/// Asserts that `completion` ran to its token limit and said `expected`: every token, once, in
/// order; returns how it finished. `what` names the generation in the failure message.
pub fn assert_ran_to_length<'a>(
    completion: &'a switchyard_client::Completion,
    expected: &str,
    what: &str,
) -> &'a switchyard_proto::v1::Finished {
    let finished = completion
        .finished
        .as_ref()
        .unwrap_or_else(|| panic!("{what} failed: {:?}", completion.failed));
    assert_eq!(
        finished.reason,
        switchyard_proto::v1::FinishReason::Length as i32,
        "{what}"
    );
    assert_eq!(completion.text, expected, "{what}: every token, once");
    finished
}

/// A chat request for the synthetic model: one user message, `max_tokens`, the given class.
pub fn synthetic_request(
    id: &str,
    class: switchyard_proto::v1::RequestClass,
    content: &str,
    max_tokens: u32,
) -> switchyard_proto::v1::GenerateRequest {
    chat_request("synthetic", id, class, content, max_tokens)
}

/// A chat request for `model`: one user message, `max_tokens`, the given class.
pub fn chat_request(
    model: &str,
    id: &str,
    class: switchyard_proto::v1::RequestClass,
    content: &str,
    max_tokens: u32,
) -> switchyard_proto::v1::GenerateRequest {
    use switchyard_proto::v1::{ChatMessage, GenerateRequest, SamplingParams};
    GenerateRequest {
        request_id: id.into(),
        model: model.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: content.into(),
            ..Default::default()
        }],
        sampling: Some(SamplingParams {
            max_tokens,
            ..Default::default()
        }),
        class: class as i32,
        ..Default::default()
    }
}

/// Arguments of `switchyard up` on free loopback ports, followed by `extra`.
pub fn up_args(extra: &[&str]) -> Vec<String> {
    [
        "up",
        "--router-listen",
        "127.0.0.1:0",
        "--control-plane-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--dashboard-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

/// How long a client program (curl, grpcurl, the openai SDK) may run in a test.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs a client program to completion; returns (success, stdout, stderr).
pub async fn run_program<S: AsRef<std::ffi::OsStr>>(
    program: &str,
    args: &[S],
) -> anyhow::Result<(bool, String, String)> {
    let output = tokio::time::timeout(
        PROGRAM_TIMEOUT,
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("{program} did not finish within {PROGRAM_TIMEOUT:?}"))?
    .with_context(|| format!("running {program} (pip install -r scripts/test-requirements.txt)"))?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// The bound on streams a gRPC server at `grpc` advertises in its HTTP/2 SETTINGS, read at the
/// frame level (before any client library applies it), after a health check has been answered
/// (so the server's SETTINGS, sent first, have been applied).
pub async fn advertised_stream_limit(grpc: SocketAddr) -> anyhow::Result<usize> {
    let tcp = tokio::net::TcpStream::connect(grpc).await?;
    let (mut send, connection) = h2::client::handshake(tcp).await?;
    let mut connection = std::pin::pin!(connection);
    let request = http::Request::post(format!("http://{grpc}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let (response, mut body) = send.send_request(request, false)?;
    // An empty HealthCheckRequest: no compression, zero length.
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)?;
    let response = tokio::select! {
        response = response => response?,
        ended = &mut connection => anyhow::bail!("the connection ended first: {ended:?}"),
    };
    anyhow::ensure!(response.status() == http::StatusCode::OK, "{response:?}");
    Ok(connection.max_concurrent_send_streams())
}

/// The Python gRPC client, run as a program (`python3 PYTHON_CLIENT --target … "prompt"`).
pub const PYTHON_CLIENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../client/python/switchyard_client.py"
);

/// Runs a client program that must succeed; returns its stdout, or fails with its output.
pub async fn program_output<S: AsRef<std::ffi::OsStr>>(
    program: &str,
    args: &[S],
) -> anyhow::Result<String> {
    let (ok, out, err) = run_program(program, args).await?;
    anyhow::ensure!(ok, "{program} failed:\n{out}\n{err}");
    Ok(out)
}

/// `message` as a gRPC request carrying `authorization: Bearer <token>` (none without a token).
pub fn with_bearer<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii header"),
        );
    }
    request
}

/// How long a `switchyard chat` run may take in a test.
const CHAT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `switchyard chat <args>` with `env` (and none of the caller's `SWITCHYARD_*` chat
/// settings), types `input`, then closes stdin, which ends the chat once its replies are done;
/// returns (exit code, stdout, stderr).
pub async fn run_chat(
    args: &[&str],
    env: &[(&str, &str)],
    input: &str,
) -> anyhow::Result<(Option<i32>, String, String)> {
    use tokio::io::AsyncWriteExt as _;
    let mut command = Command::new(switchyard_bin());
    command.arg("chat").args(args);
    for inherited in [
        "SWITCHYARD_ROUTER",
        "SWITCHYARD_TLS_CA_FILE",
        "SWITCHYARD_API_KEY",
        "SWITCHYARD_API_KEY_FILE",
    ] {
        command.env_remove(inherited);
    }
    let mut child = command
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting switchyard chat")?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    // A chat that exits before reading its input closes the pipe: its output says why.
    let _ = stdin.write_all(input.as_bytes()).await;
    drop(stdin);
    let output = tokio::time::timeout(CHAT_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| format!("switchyard chat did not exit within {CHAT_TIMEOUT:?}"))??;
    Ok((
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// Writes a router API keys file (`--api-keys-file`) in `dir` mapping each key to its tenant.
pub fn write_api_keys(dir: &std::path::Path, keys: &[(&str, &str)]) -> anyhow::Result<PathBuf> {
    let keys: Vec<_> = keys
        .iter()
        .map(|(key, tenant)| serde_json::json!({"key": key, "tenant": tenant}))
        .collect();
    let path = dir.join("keys.json");
    std::fs::write(&path, serde_json::json!({ "keys": keys }).to_string())?;
    Ok(path)
}

/// `switchyard router` on `etcd` with `flags` on free loopback ports; it announces its gRPC and
/// HTTP addresses.
pub async fn start_router(etcd: &str, name: &str, flags: &[&str]) -> anyhow::Result<Component> {
    let mut args = strings(&[
        "router",
        "--etcd",
        etcd,
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    args.extend(strings(flags));
    Component::start(name, &args, 2).await
}

/// `switchyard worker-gpu` `id` on `etcd` with `flags` on a free loopback port, announcing
/// `lines` endpoints.
pub async fn start_gpu_worker(
    etcd: &str,
    id: &str,
    flags: &[&str],
    lines: usize,
) -> anyhow::Result<Component> {
    let mut args = strings(&[
        "worker-gpu",
        "--etcd",
        etcd,
        "--listen",
        "127.0.0.1:0",
        "--id",
        id,
    ]);
    args.extend(strings(flags));
    Component::start(id, &args, lines).await
}

/// Asserts that the worker listening at `addr` serves TLS (trusted through `ca`) and refuses
/// `Worker.Serve` to a client that presents no certificate: `UNAUTHENTICATED`, saying so.
pub async fn assert_worker_calls_need_a_client_certificate(
    addr: &str,
    ca: &std::path::Path,
) -> anyhow::Result<()> {
    let tls = switchyard_cluster::tls::ClientTls::new(ca.to_path_buf());
    let channel = switchyard_cluster::tls::endpoint(addr, Some(&tls))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .connect()
        .await?;
    let refused = switchyard_proto::v1::worker_client::WorkerClient::new(channel)
        .serve(futures::stream::pending::<switchyard_proto::v1::RouterFrame>())
        .await
        .err()
        .context("Worker.Serve without a client certificate was served")?;
    anyhow::ensure!(
        refused.code() == tonic::Code::Unauthenticated,
        "refused with {refused:?}, not UNAUTHENTICATED"
    );
    anyhow::ensure!(
        refused.message().contains("client certificate"),
        "refusal does not say why: {}",
        refused.message()
    );
    Ok(())
}

/// The admin token of the operator `alice` in [`admin_tokens_file`].
pub const OPERATOR_TOKEN: &str = "operator-token-0123456789abcdef";
/// The admin token of the viewer `victor` in [`admin_tokens_file`].
pub const VIEWER_TOKEN: &str = "viewer-token-0123456789abcdef";

/// An admin tokens file in `dir` with one operator (`alice`) and one viewer (`victor`); its
/// path, for `--admin-tokens-file`.
pub fn admin_tokens_file(dir: &tempfile::TempDir) -> anyhow::Result<String> {
    let path = dir.path().join("admin-tokens.json");
    std::fs::write(
        &path,
        serde_json::json!({"tokens": [
            {"name": "alice", "token": OPERATOR_TOKEN, "role": "operator"},
            {"name": "victor", "token": VIEWER_TOKEN, "role": "viewer"},
        ]})
        .to_string(),
    )?;
    Ok(path.display().to_string())
}

/// `POST {base}/files` of `lines` (one JSON request each) as a batch file: its id.
pub async fn upload_batch_file(
    http: &reqwest::Client,
    base: &str,
    lines: &[serde_json::Value],
) -> anyhow::Result<String> {
    let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(text.into_bytes()).file_name("batch.jsonl"),
        );
    let file: serde_json::Value = http
        .post(format!("{base}/files"))
        .multipart(form)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(file["id"].as_str().context("a file id")?.to_string())
}

/// `POST {base}/batches` of chat completions from file `file`, within 24 hours, with the
/// fields of `extra` added: the batch's id.
pub async fn create_batch(
    http: &reqwest::Client,
    base: &str,
    file: &str,
    extra: serde_json::Value,
) -> anyhow::Result<String> {
    let mut create = serde_json::json!({"input_file_id": file, "completion_window": "24h",
                                        "endpoint": "/v1/chat/completions"});
    for (field, value) in extra.as_object().into_iter().flatten() {
        create[field] = value.clone();
    }
    let made: serde_json::Value = http
        .post(format!("{base}/batches"))
        .json(&create)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(made["id"].as_str().context("a batch id")?.to_string())
}

/// `GET {base}/batches/{id}`.
pub async fn get_batch(
    http: &reqwest::Client,
    base: &str,
    id: &str,
) -> anyhow::Result<serde_json::Value> {
    Ok(http
        .get(format!("{base}/batches/{id}"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// Batch `id` once `until` holds of it (within `timeout`, saying `what` if not).
pub async fn wait_for_batch(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    timeout: Duration,
    what: &str,
    until: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    wait_until(timeout, what, || async {
        get_batch(http, base, id).await.is_ok_and(|b| until(&b))
    })
    .await?;
    get_batch(http, base, id).await
}

/// The lines of `batch`'s output file, read at `base`.
pub async fn batch_output(
    http: &reqwest::Client,
    base: &str,
    batch: &serde_json::Value,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let file = batch["output_file_id"].as_str().context("an output file")?;
    let text = http
        .get(format!("{base}/files/{file}/content"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port taken between `free_port` and etcd's bind makes etcd exit at once; the harness
    /// must see that (and start it elsewhere), not wait out its 20 s readiness timeout.
    #[tokio::test]
    async fn an_etcd_that_cannot_bind_its_port_is_reported_as_exited() {
        let taken = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = taken.local_addr().expect("bound").port();
        let error = match Etcd::start_on(port).await {
            Ok(_) => panic!("etcd started on a port another socket holds"),
            Err(error) => error.to_string(),
        };
        assert!(
            error.contains("etcd exited before answering"),
            "unexpected error: {error}"
        );
    }
}
