//! What a new user meets first: `switchyard up` and `switchyard chat` when something is not
//! as expected — a port taken, etcd not there, no cluster running, Ctrl-C while the cluster is
//! still starting. Each time the message says what happened and what to do, and the exit
//! status says it failed.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use switchyard_tests::{
    Component, PYTHON_CLIENT, free_port, log_dir, run_chat, run_program, switchyard_bin, up_args,
    wait_until,
};
use tokio::process::Command;

/// Runs `switchyard <args>` to its end; returns (exit code, stdout, stderr).
async fn run(args: &[String]) -> anyhow::Result<(Option<i32>, String, String)> {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(switchyard_bin())
            .args(args)
            .env("NO_COLOR", "1")
            // What a new user has: no backtraces under the messages.
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("switchyard did not exit within 60s")??;
    Ok((
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// `switchyard up` on a port something else holds names the flag that chooses it, and exits
/// with status 1 instead of serving without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_on_a_taken_port_names_the_flag_to_change() -> anyhow::Result<()> {
    for flag in [
        "--router-listen",
        "--http-listen",
        "--control-plane-listen",
        "--dashboard-listen",
    ] {
        let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
        let address = taken.local_addr()?.to_string();
        // This flag on the taken port, the others on free ones.
        let mut args = up_args(&["--engine", "synthetic"]);
        let at = args
            .iter()
            .position(|a| a == flag)
            .context("up_args sets it")?;
        args[at + 1] = address.clone();
        let (code, out, err) = run(&args).await?;
        assert_eq!(code, Some(1), "{flag}: {out}\n{err}");
        assert!(
            err.contains(&address) && err.contains("already in use") && err.contains(flag),
            "{flag}: the message does not name the address and the flag:\n{err}"
        );
        assert!(!out.contains("router grpc"), "{flag}: announced: {out}");
    }
    Ok(())
}

/// `switchyard up --etcd` on an address where no etcd answers says so, with what to do, at
/// once and with status 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_no_etcd_at_the_given_address_says_what_to_do() -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{}", free_port());
    let args = up_args(&["--engine", "synthetic", "--etcd", &url]);
    let (code, out, err) = run(&args).await?;
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains(&format!("no etcd answers at {url}")) && err.contains("without --etcd"),
        "the message does not say what to do:\n{err}"
    );
    Ok(())
}

/// A worker asked to serve more sequences at once than any worker may (once a panic on an
/// overflow, or slots the routers would pile every request into) refuses to start, naming
/// the flag and its range, with clap's usage status 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_an_impossible_slot_count_refuses_to_start() -> anyhow::Result<()> {
    for (component, slots) in [("worker-gpu", "4294967295"), ("worker-wse", "0")] {
        let args: Vec<String> = [
            component,
            "--engine",
            "synthetic",
            "--max-concurrent",
            slots,
        ]
        .map(String::from)
        .into();
        let (code, out, err) = run(&args).await?;
        assert_eq!(code, Some(2), "{component}: {out}\n{err}");
        assert!(
            err.contains("--max-concurrent") && err.contains("1..=65536"),
            "{component}: the message names no flag or range:\n{err}"
        );
        assert!(!err.contains("panicked"), "{component}: {err}");
    }
    Ok(())
}

/// `switchyard chat` with no router at its address says where it looked and how to start
/// one, with status 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_with_no_cluster_running_says_how_to_start_one() -> anyhow::Result<()> {
    let router = format!("127.0.0.1:{}", free_port());
    let (code, out, err) = run_chat(&["--router", &router], &[], "hello\n").await?;
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains(&format!("no router answers at {router}"))
            && err.contains("switchyard up")
            && err.contains("--router"),
        "the message does not say what to do:\n{err}"
    );
    Ok(())
}

/// Ctrl-C while `switchyard up` is still loading its engines stops it: every component
/// stopped, no endpoint announced, no error report, status 130 (interrupted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_while_up_is_starting_stops_it_cleanly() -> anyhow::Result<()> {
    let model_path = &switchyard_tests::real_model_path()?;
    let log = log_dir().join(format!("up-interrupted-{}.log", free_port()));
    let up = Command::new(switchyard_bin())
        .args(up_args(&["--model-path", model_path]))
        .env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()?;
    // Three engines load one after another: after the first, `up` is still starting.
    wait_until(Duration::from_secs(60), "the first engine to load", || {
        let loaded = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("model loaded");
        async move { loaded }
    })
    .await?;
    let pid = up.id().context("up exited early")?;
    kill(Pid::from_raw(pid as i32), Signal::SIGINT)?;
    let output = tokio::time::timeout(Duration::from_secs(60), up.wait_with_output())
        .await
        .context("up did not stop within 60s of Ctrl-C")??;
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout),
        std::fs::read_to_string(&log)?,
    );
    assert_eq!(output.status.code(), Some(130), "{out}\n{err}");
    assert!(
        err.contains("interrupted before the cluster was ready"),
        "no word of why it stopped:\n{err}"
    );
    assert!(!err.contains("Error:"), "reported as an error:\n{err}");
    assert!(!out.contains("router grpc"), "announced: {out}");
    Ok(())
}

/// The Python client run as a program (README "Try it") with no router at `--target`, with or
/// without `--model`: says where it looked and how to start one, with status 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_with_no_cluster_running_says_how_to_start_one() -> anyhow::Result<()> {
    let target = format!("127.0.0.1:{}", free_port());
    for extra in [&[][..], &["--model", "SmolLM2-135M-Instruct.Q4_1"]] {
        let mut args = vec![PYTHON_CLIENT, "--target", &target];
        args.extend(extra);
        args.push("hello");
        let (ok, out, err) = run_program("python3", &args).await?;
        assert!(!ok, "{extra:?}: {out}\n{err}");
        assert!(
            err.contains(&format!("no router answers at {target}"))
                && err.contains("scripts/up.sh")
                && err.contains("--target"),
            "{extra:?}: the message does not say what to do:\n{err}"
        );
    }
    Ok(())
}

/// Ctrl-C while the Python client streams an answer ends it with status 130 and a word, not
/// a Python traceback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_stops_on_ctrl_c_without_a_traceback() -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt as _;
    let up = Component::start("up-python-ctrl-c", &up_args(&["--engine", "synthetic"]), 7).await?;
    let target = up.addr_of("router", "grpc").to_string();
    let mut python = Command::new("python3")
        .args([PYTHON_CLIENT, "--target", &target, "--max-tokens", "2000"])
        .arg("tell me a long story")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    // Its first token printed, it is streaming; keep reading so it never blocks on the pipe.
    let mut stdout = python.stdout.take().context("piped stdout")?;
    let mut first = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(60), stdout.read_exact(&mut first))
        .await
        .context("no token within 60s")??;
    tokio::spawn(async move { tokio::io::copy(&mut stdout, &mut tokio::io::sink()).await });
    let pid = python.id().context("python exited early")?;
    kill(Pid::from_raw(pid as i32), Signal::SIGINT)?;
    let output = tokio::time::timeout(Duration::from_secs(30), python.wait_with_output())
        .await
        .context("python did not stop within 30s of Ctrl-C")??;
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{err}");
    assert!(!err.contains("Traceback"), "a traceback:\n{err}");
    assert!(
        err.contains("interrupted"),
        "no word of why it stopped:\n{err}"
    );
    Ok(())
}

/// A line the router refuses (here: too long) is not kept in the conversation: the next line
/// is answered, where every later turn used to be refused with the same error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_line_does_not_stay_in_the_chat_conversation() -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let up = Component::start("up-chat-refused", &up_args(&["--engine", "synthetic"]), 7).await?;
    let router = up.addr_of("router", "grpc").to_string();
    let mut chat = Command::new(switchyard_bin())
        .args(["chat", "--router", &router, "--max-tokens", "3"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = chat.stdin.take().context("piped stdin")?;
    let mut stderr = tokio::io::BufReader::new(chat.stderr.take().context("piped stderr")?);
    // Over the router's --max-message-bytes (256 KiB by default).
    stdin
        .write_all(format!("{}\n", "word ".repeat(100_000)).as_bytes())
        .await?;
    let mut said = String::new();
    while !said.contains("[error") {
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(30), stderr.read_line(&mut line))
            .await
            .context("no error for the long line within 30s")??;
        anyhow::ensure!(read > 0, "chat ended first: {said}");
        said.push_str(&line);
    }
    // Sent once the first turn has ended: a new turn, not a redirect of that one.
    stdin.write_all(b"hello\n").await?;
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(30), chat.wait_with_output())
        .await
        .context("chat did not exit within 30s")??;
    let (out, mut rest) = (String::from_utf8_lossy(&output.stdout), String::new());
    tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut rest).await?;
    let reply = switchyard_worker::synthetic::synthetic_text("hello", 0, 3);
    assert!(
        out.contains(&reply),
        "no reply {reply:?}: {out}\n{said}{rest}"
    );
    assert!(!rest.contains("[error"), "refused again: {said}{rest}");
    Ok(())
}

/// `switchyard chat --router` at another port of the cluster — the router's OpenAI-compatible
/// HTTP port, the control plane's gRPC — says it is not the router's gRPC address and where
/// that is, with status 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_at_a_port_that_is_not_the_routers_grpc_says_which_is() -> anyhow::Result<()> {
    let up = Component::start("up-chat-port", &up_args(&["--engine", "synthetic"]), 7).await?;
    for address in [
        up.addr_of("router", "http"),
        up.addr_of("control-plane", "grpc"),
    ] {
        let address = address.to_string();
        let (code, out, err) = run_chat(&["--router", &address], &[], "hello\n").await?;
        assert_eq!(code, Some(1), "{address}: {out}\n{err}");
        assert!(
            err.contains(&format!(
                "{address} is not a Switchyard router's gRPC address"
            )) && err.contains("router grpc"),
            "{address}: the message does not say which address to use:\n{err}"
        );
    }
    Ok(())
}

/// A second Ctrl-C while `switchyard up` lets its requests in flight finish (up to 30 s) stops
/// it at once, saying so, with status 130; it used to be ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ctrl_c_stops_up_at_once_while_it_drains() -> anyhow::Result<()> {
    use switchyard_proto::v1::{RequestClass, server_frame::Frame};
    let mut up =
        Component::start("up-ctrl-c-twice", &up_args(&["--engine", "synthetic"]), 7).await?;
    let session =
        switchyard_client::SessionClient::connect(&up.addr_of("router", "grpc").to_string())
            .await?;
    // About 50 s at the synthetic 60 tokens/s: in flight well past the drain timeout.
    let request = switchyard_tests::synthetic_request(
        "long",
        RequestClass::CostSensitive,
        "a long story",
        3000,
    );
    let mut stream = session.start(request)?;
    while !matches!(stream.next().await, Some(Frame::Tokens(_))) {}
    let pid = Pid::from_raw(up.pid().context("up exited")? as i32);
    kill(pid, Signal::SIGINT)?;
    // `up` says so once it listens for the second Ctrl-C.
    up.wait_for_log("Ctrl-C again stops at once", Duration::from_secs(10))
        .await?;
    kill(pid, Signal::SIGINT)?;
    let status = up.exited(Duration::from_secs(10)).await?;
    let log = std::fs::read_to_string(&up.log)?;
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("stopped at once"), "no word of it:\n{log}");
    Ok(())
}

/// The Python client run where `grpcio` is not installed (`-S`: no site-packages) says what to
/// install, with status 1 and no traceback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_without_grpcio_says_what_to_install() -> anyhow::Result<()> {
    let (ok, out, err) = run_program(
        "python3",
        &["-S", PYTHON_CLIENT, "--target", "127.0.0.1:1", "hi"],
    )
    .await?;
    assert!(!ok, "{out}\n{err}");
    assert!(
        err.contains("pip install grpcio grpcio-tools") && !err.contains("Traceback"),
        "{err}"
    );
    Ok(())
}
