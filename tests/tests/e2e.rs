//! The end-to-end tests, one module per file, in one test binary: real etcd and real
//! Switchyard processes on loopback (see each module's docs). `cargo nextest run -p
//! switchyard-tests -E 'test(/^tls::/)'` runs one file's tests.

mod auth;
mod batches;
mod burst;
mod cluster;
mod control_plane;
mod deploy_manifests;
mod etcd_outage;
mod failover_and_tools;
mod first_use;
mod hygiene;
mod moves;
mod observability;
mod openai;
mod policy;
mod prefix_reuse;
mod python_client;
mod quotas;
mod real_model;
mod reliability;
mod security;
mod tls;

/// With `autotests = false`, a file added next to these is compiled only once it is declared
/// here: a forgotten `mod` would be a test file that silently never runs.
#[test]
fn every_end_to_end_file_is_a_module_of_this_binary() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let declared = include_str!("e2e.rs");
    let forgotten: Vec<String> = std::fs::read_dir(&dir)
        .expect("reading tests/tests")
        .filter_map(|entry| {
            let name = entry.expect("a directory entry").file_name();
            let module = name.to_str()?.strip_suffix(".rs")?.to_string();
            (module != "e2e" && !declared.contains(&format!("\nmod {module};\n"))).then_some(module)
        })
        .collect();
    assert!(
        forgotten.is_empty(),
        "declare them in tests/tests/e2e.rs: {forgotten:?}"
    );
}
