//! End-to-end test of the Python gRPC client (`client/python/switchyard_client.py`, on
//! `grpcio`) against real processes: etcd, a router and workers of both pools. Its message
//! classes are generated from `proto/` on first use, here into an empty cache.

use anyhow::Context as _;
use switchyard_tests::{Cluster, ClusterSpec, PYTHON_CLIENT, program_output};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_streams_steers_and_cancels_on_one_session() -> anyhow::Result<()> {
    // A short idle timeout, which the client's pings must keep an unused session past.
    let idle_s = "2";
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 1,
        router_flags: vec!["--idle-timeout".into(), format!("{idle_s}s")],
        ..Default::default()
    })
    .await?;
    let cache = tempfile::tempdir()?;
    let python = |script: &str, args: &[&str]| {
        let mut argv = vec![
            format!("XDG_CACHE_HOME={}", cache.path().display()),
            "python3".to_string(),
            script.to_string(),
        ];
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    };
    let target = cluster.router_addr();

    let out = program_output(
        "env",
        &python(
            concat!(env!("CARGO_MANIFEST_DIR"), "/python/grpc_session_check.py"),
            &[&target, "synthetic", idle_s],
        ),
    )
    .await
    .context("the Python client checks (pip install -r scripts/test-requirements.txt)")?;
    assert!(out.contains("grpc-python: 11 passed, 0 failed"), "{out}");

    // The README's command: the answer on stdout, the routing and usage on stderr.
    let out = program_output(
        "env",
        &python(
            PYTHON_CLIENT,
            &[
                "--target",
                &target,
                "--max-tokens",
                "5",
                "what the wafer said",
            ],
        ),
    )
    .await?;
    assert_eq!(out, "what the wafer said what\n");
    Ok(())
}
