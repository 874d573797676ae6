//! `switchyard admin`: the control plane's admin API from a shell, for operators and on-call
//! engineers — list the workers, drain or undrain one, read, replace or merge-patch the routing
//! policy, follow the cluster's events — without grpcurl or the proto files.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use switchyard_policy::document::{MAX_DOCUMENT_BYTES, PolicyError};
use switchyard_proto::v1::{self, admin_client::AdminClient};
use tonic::transport::Channel;
use unicode_width::UnicodeWidthStr as _;

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// Control-plane gRPC address (writes go to the leader; a follower's refusal names it).
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_CONTROL_PLANE",
        default_value = "127.0.0.1:50052"
    )]
    pub control_plane: String,
    /// File holding an operator token (e.g. the `control-plane admin token` file `switchyard
    /// up` prints): writes need one when the control plane has admin tokens.
    #[arg(long, global = true, env = "SWITCHYARD_OPERATOR_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust: the control plane serves TLS.
    #[arg(long, global = true, env = "SWITCHYARD_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// How long to wait for the control plane's answer (connecting included), e.g. 30s.
    #[arg(long, global = true, default_value = "15s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// The registered workers: id, pool, state, slots, address and models; a worker the
    /// control plane cannot reach is `unreachable`, and a last column says why.
    Workers,
    /// Drain a worker: it finishes what it runs and takes nothing new.
    Drain { worker_id: String },
    /// Lift a worker's drain.
    Undrain { worker_id: String },
    /// The routing policy every router applies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Follow the cluster's events (workers joining, leaving, draining; policy changes; the
    /// audit trail of admin writes), one line each — time (UTC), kind, what happened — until
    /// interrupted; the last ones the control plane kept first. --timeout bounds only the
    /// wait for the watch to open.
    Events {
        /// How many of the events the control plane kept to print first, oldest first (it
        /// keeps its last 200, since it started); 0 prints only new ones.
        #[arg(long, default_value_t = 20)]
        recent: u32,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Print the stored policy document (or the built-in default).
    Get,
    /// Replace the policy with the document in FILE (`-`: stdin); sections it leaves out take
    /// their defaults.
    Set { file: PathBuf },
    /// Change only what a JSON merge patch (RFC 7386) names, e.g.
    /// '{"quotas": {"tenants": {"acme": {"tokens_per_minute": 1200}}}}'; `null` removes a
    /// member. PATCH is the JSON itself, or @FILE.
    Merge { patch: String },
}

/// The exit statuses, as `switchyard admin --help` lists them.
pub const EXIT_STATUSES: &str = "Exit status: 0 done; 1 another failure (a file that cannot \
be read); 2 a usage error (a --control-plane that is not an address too); 3 not allowed (no \
operator token, or a viewer's); 4 no such worker; 5 refused as invalid (a bad document or \
patch); 6 this control plane is a follower (the message names the leader); 7 the control plane \
is unreachable or cannot answer now (no answer within --timeout included).";

/// Exit statuses of `switchyard admin` (besides 0, and clap's 2 for a usage error), so that
/// scripts can tell failures apart without parsing the message.
pub mod exit {
    /// Anything else (a file that cannot be read, an unexpected answer).
    pub const OTHER: i32 = 1;
    /// A usage error: what clap reports for bad arguments, and a `--control-plane` that is not
    /// an address.
    pub const USAGE: i32 = 2;
    /// No token, an unknown one, or one whose role may not do this.
    pub const NOT_ALLOWED: i32 = 3;
    /// No such worker.
    pub const NOT_FOUND: i32 = 4;
    /// The request was refused as invalid (a bad policy document or patch, an empty id).
    pub const INVALID: i32 = 5;
    /// This replica is a follower: the message names the leader.
    pub const NOT_LEADER: i32 = 6;
    /// The control plane could not be reached, or cannot answer now (etcd unreachable).
    pub const UNAVAILABLE: i32 = 7;
}

/// Why `switchyard admin` failed, with its exit status.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct AdminFailure {
    pub exit_code: i32,
    pub message: String,
}

impl AdminFailure {
    fn new(exit_code: i32, message: impl Into<String>) -> Self {
        Self {
            exit_code,
            message: message.into(),
        }
    }

    /// The control plane's answer `status` as an operator reads it, with a hint where the
    /// status says more about the address than about the request.
    fn refused(status: tonic::Status, address: &str, tls: bool) -> Self {
        use tonic::Code;
        if switchyard_client::is_connection_failure(&status) {
            // Not an answer: the connection broke under the call. Against a TLS-only control
            // plane a plaintext call always does (how it breaks is a race), so say so.
            let hint = if tls {
                ""
            } else {
                " (the control plane may speak TLS: pass --tls-ca-file)"
            };
            return Self::new(
                exit::UNAVAILABLE,
                format!(
                    "cannot reach the control plane at {address}: {}{hint}",
                    switchyard_client::connection_failure(&status)
                ),
            );
        }
        let text = status.message();
        let (exit_code, message) = match status.code() {
            Code::Unauthenticated | Code::PermissionDenied => (
                exit::NOT_ALLOWED,
                format!(
                    "{text} (writes need an operator token: --token-file or \
                     SWITCHYARD_OPERATOR_TOKEN_FILE)"
                ),
            ),
            Code::NotFound => (exit::NOT_FOUND, text.to_string()),
            Code::InvalidArgument => (exit::INVALID, text.to_string()),
            Code::FailedPrecondition => (exit::NOT_LEADER, text.to_string()),
            Code::Unavailable | Code::DeadlineExceeded => (exit::UNAVAILABLE, text.to_string()),
            Code::Unimplemented => (
                exit::OTHER,
                format!(
                    "{address} does not serve the Admin API: give the control plane's gRPC \
                     address (default 127.0.0.1:50052)"
                ),
            ),
            Code::Internal if text.contains("compression flag") => (
                exit::OTHER,
                format!(
                    "{address} answered in plain HTTP, not gRPC (the dashboard's port?): give \
                     the control plane's gRPC address"
                ),
            ),
            code => (exit::OTHER, format!("{code:?}: {text}")),
        };
        Self::new(exit_code, format!("the control plane refused: {message}"))
    }
}

/// One call to the Admin API, with what it sends read from the arguments and files.
enum Call {
    Workers,
    Drain(String),
    Undrain(String),
    GetPolicy,
    SetPolicy(v1::SetPolicyRequest),
    Events(u32),
}

impl Call {
    /// The call `command` makes; a policy document is read (a file, stdin) here, before the
    /// control plane is dialled and its deadline runs.
    fn of(command: AdminCommand) -> anyhow::Result<Self> {
        let (document, merge) = match command {
            AdminCommand::Workers => return Ok(Self::Workers),
            AdminCommand::Drain { worker_id } => return Ok(Self::Drain(worker_id)),
            AdminCommand::Undrain { worker_id } => return Ok(Self::Undrain(worker_id)),
            AdminCommand::Policy(PolicyCommand::Get) => return Ok(Self::GetPolicy),
            AdminCommand::Events { recent } => return Ok(Self::Events(recent)),
            AdminCommand::Policy(PolicyCommand::Set { file }) => (read_document(&file)?, false),
            AdminCommand::Policy(PolicyCommand::Merge { patch }) => match patch.strip_prefix('@') {
                Some(file) => (read_document(Path::new(file))?, true),
                None => (patch, true),
            },
        };
        // Refused here rather than sent: over the control plane's gRPC message limit (4 MiB)
        // the call would fail as an unexplained OUT_OF_RANGE.
        if document.len() > MAX_DOCUMENT_BYTES {
            return Err(AdminFailure::new(
                exit::INVALID,
                format!(
                    "not sent: {}",
                    PolicyError::TooLarge {
                        bytes: document.len(),
                        limit: MAX_DOCUMENT_BYTES,
                    }
                ),
            )
            .into());
        }
        Ok(Self::SetPolicy(v1::SetPolicyRequest { document, merge }))
    }

    /// Reads are open on every control plane: only writes carry (and need) the token.
    fn writes(&self) -> bool {
        matches!(self, Self::Drain(_) | Self::Undrain(_) | Self::SetPolicy(_))
    }

    /// What an operator must know when no answer came: a write may have been applied.
    fn unanswered(&self) -> &'static str {
        match self {
            Self::Workers | Self::GetPolicy | Self::Events(_) => "",
            Self::Drain(_) | Self::Undrain(_) => {
                "; the write may or may not have been applied: check with `switchyard admin \
                 workers`"
            }
            Self::SetPolicy(_) => {
                "; the write may or may not have been applied: check with `switchyard admin \
                 policy get`"
            }
        }
    }
}

pub async fn admin(args: AdminArgs) -> anyhow::Result<()> {
    let call = Call::of(args.command)?;
    let token = match &args.token_file {
        Some(file) if call.writes() => Some(read_token(file)?),
        _ => None,
    };
    let address = &args.control_plane;
    // A control plane that accepts connections but never answers (hung, frozen, a black-holed
    // address) must not hold an on-call engineer's shell, or a script, for ever.
    let unanswered = call.unanswered();
    let tls = args.tls_ca_file.is_some();
    let answered = tokio::time::timeout(args.timeout, async {
        let channel = connect(address, args.tls_ca_file.as_deref()).await?;
        run(
            AdminClient::new(channel),
            call,
            token.as_deref(),
            address,
            tls,
        )
        .await
    })
    .await;
    let watch = answered.unwrap_or_else(|_| {
        Err(AdminFailure::new(
            exit::UNAVAILABLE,
            format!(
                "no answer from the control plane at {address} within {} (hung or overloaded? \
                 --timeout waits longer){unanswered}",
                humantime::format_duration(args.timeout)
            ),
        )
        .into())
    })?;
    match watch {
        // Followed for as long as it lasts: --timeout was for opening it.
        Some(events) => follow(events, address, tls).await,
        None => Ok(()),
    }
}

/// Prints the watch's events as they come; the watch ends only with the control plane
/// (stopping) or the connection, both failures a script must see.
async fn follow(
    mut events: tonic::Streaming<v1::ClusterEvent>,
    address: &str,
    tls: bool,
) -> anyhow::Result<()> {
    while let Some(event) = events
        .message()
        .await
        .map_err(|status| AdminFailure::refused(status, address, tls))?
    {
        println!("{}", event_line(&event));
    }
    Err(AdminFailure::new(
        exit::UNAVAILABLE,
        format!(
            "the control plane at {address} ended the watch (it is stopping): run the command \
             again to follow the replica that serves next"
        ),
    )
    .into())
}

/// One event as `switchyard admin events` prints it: when (RFC 3339, UTC, to the
/// millisecond), its kind (`worker_joined`, `admin_write`, …) and the control plane's message,
/// two spaces apart.
fn event_line(event: &v1::ClusterEvent) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(event.at_unix_ms).unwrap_or(0));
    let kind = event.kind().as_str_name();
    let kind = kind.strip_prefix("KIND_").unwrap_or(kind).to_lowercase();
    format!(
        "{}  {kind}  {}",
        humantime::format_rfc3339_millis(at),
        event.message
    )
}

/// Makes `call`; a watch (`Events`) is returned once open, for the caller to follow.
async fn run(
    mut client: AdminClient<Channel>,
    call: Call,
    token: Option<&str>,
    address: &str,
    tls: bool,
) -> anyhow::Result<Option<tonic::Streaming<v1::ClusterEvent>>> {
    let refused = |status: tonic::Status| AdminFailure::refused(status, address, tls);
    match call {
        Call::Workers => {
            let workers = client
                .list_workers(authorized(token, v1::ListWorkersRequest::default())?)
                .await
                .map_err(refused)?
                .into_inner()
                .workers;
            let now_unix_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            print!("{}", workers_table(&workers, now_unix_ms));
        }
        Call::Drain(worker_id) => {
            let answer = client
                .drain(authorized(
                    token,
                    v1::DrainRequest {
                        worker_id: worker_id.clone(),
                    },
                )?)
                .await
                .map_err(refused)?
                .into_inner();
            let already = if answer.already_draining {
                " (it was already)"
            } else {
                ""
            };
            println!("{worker_id} draining{already}");
        }
        Call::Undrain(worker_id) => {
            let answer = client
                .undrain(authorized(
                    token,
                    v1::UndrainRequest {
                        worker_id: worker_id.clone(),
                    },
                )?)
                .await
                .map_err(refused)?
                .into_inner();
            // Lifting the drain is all this did: whether the worker is registered and
            // advertises `ready` again is `admin workers`' to say.
            if answer.was_draining {
                println!("{worker_id} drain lifted");
            } else {
                println!("{worker_id} was not draining");
            }
        }
        Call::GetPolicy => {
            let policy = client
                .get_policy(authorized(token, v1::GetPolicyRequest {})?)
                .await
                .map_err(refused)?
                .into_inner();
            println!("{}", policy.document);
            if !policy.invalid.is_empty() {
                // What is stored, printed as it is; the warning goes where scripts keep stdout
                // clean of it.
                eprintln!("warning: {}", invalid_stored_policy(&policy.invalid));
            }
        }
        Call::SetPolicy(request) => {
            let stored = client
                .set_policy(authorized(token, request)?)
                .await
                .map_err(refused)?
                .into_inner();
            println!("{}", stored.document);
        }
        Call::Events(replay_recent) => {
            let events = client
                .watch_events(authorized(token, v1::WatchEventsRequest { replay_recent })?)
                .await
                .map_err(refused)?
                .into_inner();
            return Ok(Some(events));
        }
    }
    Ok(None)
}

async fn connect(address: &str, tls_ca_file: Option<&Path>) -> anyhow::Result<Channel> {
    let connected = match tls_ca_file {
        Some(ca) => switchyard_client::connect_tls(address, ca).await,
        None => switchyard_client::connect_channel(address).await,
    };
    connected.map_err(|error| {
        let failure = match &error {
            // Nothing was dialled: the flags are at fault, and trying again will not help.
            switchyard_client::ClientError::Address(_) => AdminFailure::new(
                exit::USAGE,
                format!(
                    "--control-plane {address:?} is not an address: give host:port (default \
                     127.0.0.1:50052)"
                ),
            ),
            switchyard_client::ClientError::Tls(why) => {
                AdminFailure::new(exit::OTHER, format!("--tls-ca-file: {why}"))
            }
            switchyard_client::ClientError::Connect(transport) => AdminFailure::new(
                exit::UNAVAILABLE,
                format!(
                    "cannot reach the control plane at {address}: {}",
                    switchyard_cluster::telemetry::chain_text(transport)
                ),
            ),
            other => AdminFailure::new(
                exit::UNAVAILABLE,
                format!("cannot reach the control plane at {address}: {other}"),
            ),
        };
        failure.into()
    })
}

/// The token in `file`: its first line, trimmed.
fn read_token(file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file).with_context(|| {
        format!(
            "reading the operator token file {} (--token-file or \
             SWITCHYARD_OPERATOR_TOKEN_FILE)",
            file.display()
        )
    })?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    anyhow::ensure!(
        !token.is_empty(),
        "--token-file {}: empty; it holds one operator token",
        file.display()
    );
    Ok(token)
}

/// A policy document from `file`, or stdin for `-`.
fn read_document(file: &Path) -> anyhow::Result<String> {
    if file == Path::new("-") {
        let mut document = String::new();
        std::io::stdin()
            .read_to_string(&mut document)
            .context("reading the policy document from stdin")?;
        return Ok(document);
    }
    std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

/// What `policy get` says of a stored document that is `invalid` (why).
fn invalid_stored_policy(invalid: &str) -> String {
    format!(
        "the stored routing policy is invalid and routers do not apply it: {invalid}. Running \
         routers keep their last valid policy; a router that starts now has none and is not \
         ready until a valid document is stored (switchyard admin policy set)"
    )
}

/// `message` as a call carrying `authorization: Bearer <token>` when there is one.
fn authorized<T>(token: Option<&str>, message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .context("the operator token is not a valid header value")?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

/// What the STATE column says of `worker`: the state its record advertises, except that a
/// worker advertising `ready` that the control plane has no load stream to is `unreachable`
/// (no ready capacity, as `GetClusterStats` counts it and the dashboard shows it).
fn shown_state(worker: &v1::WorkerInfo) -> &str {
    match &worker.unreachable {
        Some(_) if worker.state == "ready" => "unreachable",
        _ => &worker.state,
    }
}

/// Why the control plane has no load stream to the worker, for the WHY column.
fn why_unreachable(down: &v1::WorkerUnreachable, now_unix_ms: i64) -> String {
    let failing_for = Duration::from_secs(
        u64::try_from(now_unix_ms.saturating_sub(down.since_unix_ms) / 1000).unwrap_or(0),
    );
    let attempts = match down.attempts {
        1 => "1 attempt".to_string(),
        n => format!("{n} attempts"),
    };
    format!(
        "no load stream for {} ({attempts}): {}",
        humantime::format_duration(failing_for),
        down.reason
    )
}

/// One line a worker, columns aligned, under a header; a last column, WHY, when a worker is
/// unreachable (`now_unix_ms` says for how long). A worker advertising no model shows `-`.
fn workers_table(workers: &[v1::WorkerInfo], now_unix_ms: i64) -> String {
    let mut header = vec!["ID", "POOL", "STATE", "SLOTS", "ADDRESS", "MODELS"];
    let why = workers.iter().any(|w| w.unreachable.is_some());
    if why {
        header.push("WHY");
    }
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| h.to_string()).collect())
        .chain(workers.iter().map(|w| {
            let mut row = vec![
                w.id.clone(),
                w.pool.clone(),
                shown_state(w).to_string(),
                w.max_concurrent.to_string(),
                w.address.clone(),
                // A column is never empty: a blank cell shifts the next one (WHY) into its
                // place for `awk` and `cut`.
                if w.models.is_empty() {
                    "-".to_string()
                } else {
                    w.models.join(",")
                },
            ];
            if why {
                let down = w.unreachable.as_ref();
                row.push(down.map_or_else(String::new, |d| why_unreachable(d, now_unix_ms)));
            }
            row
        }))
        .collect();
    // Columns a terminal gives a cell, not its chars: `format!("{:width$}")` pads by chars, so
    // a CJK or emoji id (two columns a char) pushed its line's next columns right, and one
    // with combining marks (none) pulled them left.
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].width()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell}{}", " ".repeat(width - cell.width())))
                .collect();
            format!("{}\n", cells.join("  ").trim_end())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `switchyard admin <args>` as parsed from a command line.
    fn parse(args: &[&str]) -> AdminArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            admin: AdminArgs,
        }
        <Cli as clap::Parser>::parse_from(std::iter::once("admin").chain(args.iter().copied()))
            .admin
    }

    fn failure(result: anyhow::Result<()>) -> (i32, String) {
        let error = result.expect_err("a failure");
        let failure = error
            .downcast_ref::<AdminFailure>()
            .unwrap_or_else(|| panic!("not an AdminFailure: {error:#}"));
        (failure.exit_code, failure.message.clone())
    }

    /// A control plane that accepts connections and never answers (SIGSTOPped, hung): the
    /// command gives up at --timeout with exit 7, saying a write may have been applied.
    #[tokio::test]
    async fn a_control_plane_that_never_answers_is_given_up_at_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        // Accepted and held open, never read: what a frozen process's kernel does.
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        for (args, write) in [(&["workers"][..], false), (&["drain", "gpu-0"][..], true)] {
            let mut args = parse(args);
            args.control_plane = address.clone();
            args.timeout = Duration::from_millis(300);
            let started = std::time::Instant::now();
            let answer = tokio::time::timeout(Duration::from_secs(10), admin(args))
                .await
                .expect("gave up at its timeout, not hung");
            let (code, message) = failure(answer);
            assert!(started.elapsed() < Duration::from_secs(5));
            assert_eq!(code, exit::UNAVAILABLE, "{message}");
            assert!(
                message.contains(&format!(
                    "no answer from the control plane at {address} within 300ms"
                )),
                "{message}"
            );
            assert_eq!(
                message.contains("may or may not have been applied"),
                write,
                "{message}"
            );
        }
        held.abort();
    }

    /// Flags that are wrong say which flag, with the status of their cause: nothing was
    /// dialled, so not 7 ("unreachable", which scripts retry).
    #[tokio::test]
    async fn a_bad_address_or_ca_file_is_no_unreachable_control_plane() {
        let mut args = parse(&["workers", "--control-plane", "not an address"]);
        args.timeout = Duration::from_secs(5);
        let (code, message) = failure(admin(args).await);
        assert_eq!(code, exit::USAGE, "{message}");
        assert!(
            message.starts_with("--control-plane \"not an address\""),
            "{message}"
        );
        assert!(!message.contains("router"), "{message}");

        let missing = std::env::temp_dir().join(format!("no-such-ca-{}.pem", std::process::id()));
        let ca = missing.display().to_string();
        let args = parse(&[
            "workers",
            "--tls-ca-file",
            &ca,
            "--control-plane",
            "127.0.0.1:1",
        ]);
        let (code, message) = failure(admin(args).await);
        assert_eq!(code, exit::OTHER, "{message}");
        assert!(
            message.starts_with("--tls-ca-file: cannot read"),
            "{message}"
        );
        assert!(message.contains(&ca), "{message}");
    }

    #[test]
    fn an_event_line_says_when_in_utc_what_kind_and_what_happened() {
        let event = v1::ClusterEvent {
            kind: v1::cluster_event::Kind::WorkerIdentityRejected as i32,
            worker_id: "gpu-0".into(),
            // 2026-12-05 14:03:07.042 UTC
            at_unix_ms: 1_796_479_387_042,
            message: "worker record gpu-0 (gpu) at 10.0.0.1:1 refused".into(),
            ..Default::default()
        };
        assert_eq!(
            event_line(&event),
            "2026-12-05T14:03:07.042Z  worker_identity_rejected  worker record gpu-0 (gpu) at \
             10.0.0.1:1 refused"
        );
        let args = parse(&["events"]);
        assert!(matches!(args.command, AdminCommand::Events { recent: 20 }));
        let args = parse(&["events", "--recent", "0"]);
        assert!(matches!(args.command, AdminCommand::Events { recent: 0 }));
    }

    #[test]
    fn workers_line_up_under_their_header() {
        let worker = |id: &str, state: &str| v1::WorkerInfo {
            id: id.into(),
            pool: "gpu".into(),
            address: "10.0.0.1:50061".into(),
            models: vec!["a".into(), "b".into()],
            max_concurrent: 16,
            state: state.into(),
            ..Default::default()
        };
        let table = workers_table(&[worker("gpu-0", "ready"), worker("gpu-10", "draining")], 0);
        assert_eq!(
            table,
            "ID      POOL  STATE     SLOTS  ADDRESS         MODELS\n\
             gpu-0   gpu   ready     16     10.0.0.1:50061  a,b\n\
             gpu-10  gpu   draining  16     10.0.0.1:50061  a,b\n"
        );
    }

    /// Ids are padded by the columns a terminal gives them, not by bytes or chars: a CJK
    /// character takes two, a combining mark none, so the next column starts where the header's
    /// does on every line.
    #[test]
    fn non_ascii_ids_line_up_by_display_width() {
        let worker = |id: &str| v1::WorkerInfo {
            id: id.into(),
            pool: "gpu".into(),
            address: "10.0.0.1:50061".into(),
            models: vec!["a".into()],
            max_concurrent: 8,
            state: "ready".into(),
            ..Default::default()
        };
        // "wörker-東京" is 11 chars, 15 bytes, 13 columns; "e\u{301}" (é as e + combining
        // acute) is 2 chars, 1 column; "🚀" is 1 char, 4 bytes, 2 columns.
        let table = workers_table(
            &[
                worker("wörker-東京"),
                worker("gpu-e\u{301}"),
                worker("🚀-1"),
            ],
            0,
        );
        assert_eq!(
            table,
            "ID           POOL  STATE  SLOTS  ADDRESS         MODELS\n\
             wörker-東京  gpu   ready  8      10.0.0.1:50061  a\n\
             gpu-e\u{301}        gpu   ready  8      10.0.0.1:50061  a\n\
             🚀-1         gpu   ready  8      10.0.0.1:50061  a\n",
            "\n{table}"
        );
        // Each line's POOL starts at the same terminal column as the header's.
        let column = |line: &str| {
            unicode_width::UnicodeWidthStr::width(&line[..line.find("gpu  ").unwrap()])
        };
        let lines: Vec<&str> = table.lines().collect();
        let header = lines[0].find("POOL").unwrap();
        for line in &lines[1..] {
            assert_eq!(column(line), header, "{line:?} in\n{table}");
        }
    }

    /// A worker advertising no model (still loading one, say) has `-` in MODELS, so that the
    /// WHY after it stays the sixth field for `awk` (the cell was blank, and WHY's first word
    /// took its place).
    #[test]
    fn a_worker_without_models_shows_a_dash_not_a_blank_field() {
        let worker = v1::WorkerInfo {
            id: "gpu-2".into(),
            pool: "gpu".into(),
            address: "10.0.0.1:50061".into(),
            max_concurrent: 8,
            state: "ready".into(),
            unreachable: Some(v1::WorkerUnreachable {
                reason: "connection refused".into(),
                since_unix_ms: 0,
                attempts: 1,
            }),
            ..Default::default()
        };
        let table = workers_table(&[worker], 2_000);
        let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            row[..6],
            ["gpu-2", "gpu", "unreachable", "8", "10.0.0.1:50061", "-"],
            "{table}"
        );
        assert_eq!(row[6], "no", "{table}");
    }

    #[test]
    fn a_ready_worker_the_control_plane_cannot_reach_is_unreachable_and_says_why() {
        let worker = |id: &str, state: &str, down: bool| v1::WorkerInfo {
            id: id.into(),
            pool: "gpu".into(),
            address: "10.0.0.1:50061".into(),
            models: vec!["a".into()],
            max_concurrent: 8,
            state: state.into(),
            unreachable: down.then(|| v1::WorkerUnreachable {
                reason: "Unauthenticated: cluster token not recognised".into(),
                since_unix_ms: 1_000,
                attempts: if state == "ready" { 13 } else { 1 },
            }),
            ..Default::default()
        };
        let table = workers_table(
            &[
                worker("gpu-0", "ready", false),
                worker("gpu-1", "ready", true),
                worker("gpu-2", "draining", true),
            ],
            13_500,
        );
        assert_eq!(
            table,
            "ID     POOL  STATE        SLOTS  ADDRESS         MODELS  WHY\n\
             gpu-0  gpu   ready        8      10.0.0.1:50061  a\n\
             gpu-1  gpu   unreachable  8      10.0.0.1:50061  a       no load stream for 12s (13 attempts): Unauthenticated: cluster token not recognised\n\
             gpu-2  gpu   draining     8      10.0.0.1:50061  a       no load stream for 12s (1 attempt): Unauthenticated: cluster token not recognised\n"
        );
    }
}
