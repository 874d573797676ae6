//! `switchyard-bench http-overhead` end to end, as run from the command line: the load-test
//! backend alone and behind Switchyard (etcd, a `worker-wse` gateway and a router, as separate
//! processes: `cargo build --bins` first, and `etcd` on the PATH). SMG is left out: it is not
//! installed everywhere the tests run.

use std::process::Command;

#[test]
fn direct_and_switchyard_paths_stream_every_reply_and_print_the_table() {
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard-bench"))
        .args([
            "http-overhead",
            "--paths",
            "direct,switchyard",
            "--concurrency",
            "1,4",
            "--requests",
            "12",
            "--rounds",
            "2",
            "--max-tokens",
            "5",
        ])
        .output()
        .expect("running switchyard-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // One row per level and path, after the header; a short or failed reply fails the run.
    let rows: Vec<&str> = stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "{stdout}");
    for (row, (level, path)) in rows.iter().zip([
        (1, "direct"),
        (1, "switchyard"),
        (4, "direct"),
        (4, "switchyard"),
    ]) {
        let fields: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(fields[..2], [level.to_string().as_str(), path], "{stdout}");
    }
    // Every run is reported as it ends: 2 rounds x 2 levels x 2 paths.
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("round ")).count(),
        8,
        "{stderr}"
    );
}

/// `--backend-url` measures a server already running (here the load-test backend, started on
/// its own) and `--no-keep-alive` opens a connection per request: the kernel counts one
/// connection opened per request at least.
#[test]
fn a_running_backend_is_measured_with_a_connection_per_request() {
    use std::io::{BufRead as _, BufReader};
    use std::process::Stdio;

    let mut backend = Command::new(env!("CARGO_BIN_EXE_switchyard-bench"))
        .args(["openai-backend", "--model", "loadtest", "--ttft", "1ms"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the backend");
    let mut line = String::new();
    BufReader::new(backend.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("the backend's address");
    let address = line
        .trim()
        .strip_prefix("backend http ")
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .to_string();
    let json = std::env::temp_dir().join(format!("http-overhead-{}.json", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard-bench"))
        .args([
            "http-overhead",
            "--backend-url",
            &address,
            "--no-keep-alive",
        ])
        .args([
            "--paths",
            "direct",
            "--concurrency",
            "2",
            "--requests",
            "10",
        ])
        .args(["--rounds", "1", "--max-tokens", "3", "--json"])
        .arg(&json)
        .output()
        .expect("running switchyard-bench");
    let _ = backend.kill();
    let _ = backend.wait();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stderr.contains(&format!("backend: {address}")), "{stderr}");
    let runs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON file")).unwrap();
    let _ = std::fs::remove_file(&json);
    let opened = runs[0]["tcp"]["active_opens"]
        .as_u64()
        .expect("active_opens");
    assert!(
        opened >= 10,
        "{opened} connections opened for 10 requests: {runs}"
    );
}
