//! Listing stored chat completions (`GET /v1/chat/completions?metadata[k]=v&limit=20`) on one
//! replica whose store holds 10 000 and 100 000 of them (a 256 MiB store holds about 100 000
//! of a kilobyte each), half another tenant's: what the replica's own part of a listing costs
//! when a page is found early in the walk (a filter many match) and when the walk goes through
//! every completion (a filter one matches), and what keeping one costs (its listing fields are
//! read from its JSON as it is kept).

use std::time::{Duration, Instant};

use serde_json::json;
use switchyard_router::response_store::chat::Listing;
use switchyard_router::response_store::{ResponseStore, StoreLimits};

/// A completion object about the size of a short chat answer.
fn object(id: &str, n: usize) -> String {
    json!({
        "id": id, "object": "chat.completion", "created": 1_700_000_000 + n as u64 / 10,
        "model": "SmolLM2-135M-Instruct.Q4_1", "system_fingerprint": null,
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null,
                     "message": {"role": "assistant", "refusal": null,
                                 "content": "a short answer of a few words ".repeat(20)}}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 120, "total_tokens": 160},
        "metadata": {"app": format!("app-{}", (n / 2) % 50), "user": format!("u{n}")},
    })
    .to_string()
}

fn filled(completions: usize) -> ResponseStore {
    let store = ResponseStore::new(StoreLimits {
        max_bytes: 1 << 30,
        max_age: Duration::from_secs(3600),
    });
    for n in 0..completions {
        let id = store.new_chat_completion_id();
        let tenant = (n % 2 == 0).then(|| "acme".to_string());
        let kept = store.response(id.clone(), tenant, object(&id, n), Vec::new(), Vec::new());
        assert!(store.insert(kept), "the store holds them all");
    }
    store
}

/// Mean time of a listing of `tenant`'s completions that `listing` asks for, and how many it
/// found (at most a page and one).
fn time_listing(store: &ResponseStore, listing: &Listing) -> (Duration, usize) {
    let rounds = 20;
    let start = Instant::now();
    let mut found = 0;
    for _ in 0..rounds {
        found = store.list_chat_completions(Some("acme"), listing).len();
    }
    (start.elapsed() / rounds, found)
}

fn main() {
    println!(
        "{:>11} {:>10} {:>14} {:>14}",
        "completions", "keep each", "list (broad)", "list (one)"
    );
    for completions in [10_000, 100_000] {
        let start = Instant::now();
        let store = filled(completions);
        let keep = start.elapsed() / completions as u32;
        // One app in fifty: a page is found early in the walk.
        let broad = Listing {
            metadata: vec![("app".into(), "app-7".into())],
            limit: 20,
            ..Default::default()
        };
        // One user's single completion, the newest first: the walk goes through them all.
        let one = Listing {
            metadata: vec![("user".into(), "u0".into())],
            limit: 20,
            newest_first: true,
            ..Default::default()
        };
        let (broad, found_broad) = time_listing(&store, &broad);
        let (one, found_one) = time_listing(&store, &one);
        assert_eq!((found_broad, found_one), (21, 1));
        println!(
            "{completions:>11} {:>8.2}µs {:>12.3}ms {:>12.3}ms",
            keep.as_secs_f64() * 1e6,
            broad.as_secs_f64() * 1e3,
            one.as_secs_f64() * 1e3,
        );
    }
}
