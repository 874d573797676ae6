//! A real etcd for this crate's tests: one member on free loopback ports, its data (and its
//! log, `etcd.log`) in a temporary directory, killed when dropped. The end-to-end harness
//! (`switchyard-tests`' `Etcd`) does the same for the whole system; this crate cannot depend on
//! it (it depends on this crate, and on every component).

use std::net::TcpListener;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How long etcd may take to answer after it started.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Etcd {
    process: Child,
    _data: tempfile::TempDir,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
}

/// A free TCP port on 127.0.0.1 (bound and released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free port")
}

impl Etcd {
    /// Starts etcd and waits until it answers a read. A port found free may be taken before
    /// etcd binds it (tests run at once): etcd then exits, and is started again on others.
    pub async fn start() -> Self {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            match Self::start_once().await {
                Ok(etcd) => return etcd,
                Err(why) => eprintln!("etcd attempt {attempt} of {ATTEMPTS}: {why}"),
            }
        }
        panic!("etcd did not start in {ATTEMPTS} attempts");
    }

    async fn start_once() -> Result<Self, String> {
        let data = tempfile::tempdir().map_err(|e| e.to_string())?;
        let url = format!("http://127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
        let log_path = data.path().join("etcd.log");
        let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
        let mut process = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(data.path().join("member"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting etcd (install Debian's etcd-server): {e}"))?;
        let answers = async {
            let deadline = Instant::now() + READY_TIMEOUT;
            let mut ticks = tokio::time::interval(Duration::from_millis(20));
            loop {
                ticks.tick().await;
                if let Ok(mut client) = etcd_client::Client::connect([url.as_str()], None).await
                    && client.get("ready", None).await.is_ok()
                {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(format!("etcd did not answer within {READY_TIMEOUT:?}"));
                }
            }
        };
        let outcome = tokio::select! {
            answered = answers => answered,
            exited = process.wait() => Err(format!("etcd exited before answering ({exited:?})")),
        };
        match outcome {
            Ok(()) => Ok(Self {
                process,
                _data: data,
                url,
            }),
            Err(why) => {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(5)..].join("\n");
                Err(format!("{why}; its log ends:\n{tail}"))
            }
        }
    }

    /// Freezes etcd (SIGSTOP): its sockets stay open, nothing is answered, until
    /// [`Etcd::resume`].
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Thaws etcd after [`Etcd::pause`].
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.process.id().expect("etcd is running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .expect("signalling etcd");
    }

    /// A raw etcd client, for what the registry does not do (revoking a lease behind its back).
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.url.as_str()], None)
            .await
            .expect("connecting to etcd")
    }

    pub async fn registry(&self) -> switchyard_cluster::EtcdRegistry {
        switchyard_cluster::EtcdRegistry::connect(std::slice::from_ref(&self.url))
            .await
            .expect("connecting the registry to etcd")
    }
}
