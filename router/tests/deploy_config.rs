//! The configuration files the Kubernetes manifests ship (deploy/k8s) are accepted by the
//! router's own parsers: a policy document the routers would refuse, or a key file that stops
//! the router at start-up, must fail CI rather than a rollout.

use std::path::PathBuf;

use switchyard_policy::document::PolicyDocument;
use switchyard_router::auth::ApiKeys;

fn deploy_file(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/k8s")
        .join(relative)
}

#[test]
fn shipped_policy_is_valid_and_spells_out_every_field() {
    let path = deploy_file("base/policy.json");
    let text = std::fs::read(&path).expect("reading deploy/k8s/base/policy.json");
    let policy = PolicyDocument::from_json(&text).expect("the shipped policy validates");
    // Every field explicit: a missing field would silently take a default (a partial lane
    // object is filled with the cost-sensitive lane's defaults), so the file must equal its
    // own normalised form.
    let written: serde_json::Value = serde_json::from_slice(&text).expect("JSON");
    let normalised: serde_json::Value =
        serde_json::from_str(&policy.to_json()).expect("normalised JSON");
    assert_eq!(
        written,
        normalised,
        "deploy/k8s/base/policy.json should spell out every field; normalised:\n{}",
        policy.to_json()
    );
    assert!(
        !policy.rules.is_empty(),
        "the shipped policy demonstrates a rule"
    );
}

#[test]
fn dev_api_keys_load() {
    let keys = ApiKeys::load(&deploy_file("overlays/dev/api-keys.json")).expect("dev keys load");
    assert_eq!(keys.tenant("sk-switchyard-dev"), Some("dev"));
}
