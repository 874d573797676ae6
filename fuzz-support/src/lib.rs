//! What the workspace's proptest fuzz harnesses share: loading a crate's checked-in seed
//! corpus, and arbitrary JSON.

use proptest::prelude::*;
use serde_json::Value;

/// The files of seed corpus `corpus` (under `<manifest_dir>/tests/fuzz_seeds/`), as (path,
/// bytes), by path. Callers pass their own `env!("CARGO_MANIFEST_DIR")`: the corpus lives with
/// the crate it exercises, not here.
pub fn seeds(manifest_dir: &str, corpus: &str) -> Vec<(String, Vec<u8>)> {
    let dir = format!("{manifest_dir}/tests/fuzz_seeds/{corpus}");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {dir}: {e}"))
        .map(|entry| {
            let path = entry.expect("seed entry").path();
            (
                path.display().to_string(),
                std::fs::read(&path).expect("readable seed"),
            )
        })
        .collect();
    seeds.sort();
    seeds
}

/// Any JSON value, small and nested: leaves of every type (strings from `strings`), up to
/// `nodes` nodes in all.
pub fn any_json(
    strings: impl Strategy<Value = String> + 'static,
    nodes: u32,
) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        strings.prop_map(Value::String),
    ];
    leaf.prop_recursive(3, nodes, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
