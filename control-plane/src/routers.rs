//! The routers as their reports last showed them: what each holds that a kill would lose (its
//! stored responses and conversations) and whether a standby replica holds a copy — for the
//! dashboard's Routers table, which says in words which replica is unprotected and why.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use switchyard_proto::v1;
use tokio::time::Instant;

/// Routers remembered at most; past it, the one silent longest is forgotten first.
pub const MAX_ROUTERS: usize = 256;
/// A router silent this long has stopped reporting (stopped, or cut off from the leader).
pub const SILENT_AFTER: Duration = Duration::from_secs(5);
/// A router silent this long is forgotten (a replaced pod).
pub const FORGET_AFTER: Duration = Duration::from_secs(300);

/// The mirror states a router reports (see [`v1::RouterState::response_mirror`]).
pub const MIRROR_STATES: [&str; 5] = ["off", "alone", "journaled", "mirrored", "failing"];

#[derive(Debug)]
struct Seen {
    at: Instant,
    state: v1::RouterState,
}

/// Each router's last reported state.
#[derive(Debug, Default)]
pub struct Routers {
    seen: Mutex<HashMap<String, Seen>>,
}

/// One router as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouterRow {
    pub router: String,
    /// Seconds since its last report.
    pub silent_s: u64,
    pub stored_responses: u32,
    pub stored_conversations: u32,
    pub store_bytes: u64,
    pub store_limit_bytes: u64,
    pub standby_responses: u32,
    pub response_mirror: String,
    pub sessions: u32,
    pub background_responses: u32,
    pub batches_running: u32,
    /// Its journal on disk while `journaled`, and how much of it is not yet synced.
    pub journal_bytes: u64,
    pub journal_unsynced_bytes: u64,
    /// Whether on-call should look at it.
    pub trouble: bool,
    /// What its state means, in words.
    pub verdict: String,
}

impl Routers {
    /// Keeps what `stats` says of its router (stats without a state say nothing).
    pub fn add(&self, stats: &v1::RouterStats) {
        let Some(state) = &stats.state else {
            return;
        };
        let mut seen = self.seen.lock().expect("routers lock");
        let now = Instant::now();
        seen.retain(|_, s| now.duration_since(s.at) < FORGET_AFTER);
        if !seen.contains_key(&stats.router_id) && seen.len() >= MAX_ROUTERS {
            let stalest = seen
                .iter()
                .min_by_key(|(_, s)| s.at)
                .map(|(id, _)| id.clone());
            if let Some(stalest) = stalest {
                seen.remove(&stalest);
            }
        }
        seen.insert(
            stats.router_id.clone(),
            Seen {
                at: now,
                state: state.clone(),
            },
        );
    }

    /// Every router remembered, by id.
    pub fn rows(&self) -> Vec<RouterRow> {
        let seen = self.seen.lock().expect("routers lock");
        let now = Instant::now();
        let reporting = seen
            .values()
            .filter(|s| now.duration_since(s.at) < SILENT_AFTER)
            .count();
        let mut rows: Vec<RouterRow> = seen
            .iter()
            .filter(|(_, s)| now.duration_since(s.at) < FORGET_AFTER)
            .map(|(id, s)| row(id, now.duration_since(s.at), &s.state, reporting))
            .collect();
        rows.sort_by(|a, b| a.router.cmp(&b.router));
        rows
    }
}

/// Router `id`'s row, `silent` since its report, with `reporting` routers reporting now.
fn row(id: &str, silent: Duration, state: &v1::RouterState, reporting: usize) -> RouterRow {
    let (trouble, verdict) = verdict(silent, state, reporting);
    RouterRow {
        router: id.to_string(),
        silent_s: silent.as_secs(),
        stored_responses: state.stored_responses,
        stored_conversations: state.stored_conversations,
        store_bytes: state.store_bytes,
        store_limit_bytes: state.store_limit_bytes,
        standby_responses: state.standby_responses,
        response_mirror: state.response_mirror.clone(),
        sessions: state.sessions,
        background_responses: state.background_responses,
        batches_running: state.batches_running,
        journal_bytes: state.journal_bytes,
        journal_unsynced_bytes: state.journal_unsynced_bytes,
        trouble,
        verdict,
    }
}

/// Whether `state` needs a look, and why, in the words on-call reads: what its store's
/// protection means, and the background responses a kill would end whatever it is.
fn verdict(silent: Duration, state: &v1::RouterState, reporting: usize) -> (bool, String) {
    let (trouble, mut verdict) = store_verdict(silent, state, reporting);
    if state.background_responses > 0 && silent < SILENT_AFTER {
        verdict.push_str(&format!(
            "; {} running here would end with a kill (a drain lets them finish)",
            counted(state.background_responses, "background response")
        ));
    }
    if state.batches_running > 0 && silent < SILENT_AFTER {
        verdict.push_str(&format!(
            "; {} running here: a drain hands them to another replica, a kill ends them",
            counted(state.batches_running, "batch")
        ));
    }
    (trouble, verdict)
}

fn store_verdict(silent: Duration, state: &v1::RouterState, reporting: usize) -> (bool, String) {
    if silent >= SILENT_AFTER {
        return (
            true,
            format!(
                "silent for {} s: not reporting (stopped, or cut off from the control plane); \
                 what follows is its last report",
                silent.as_secs()
            ),
        );
    }
    if state.store_limit_bytes == 0 {
        return (
            false,
            "stores nothing (--response-store-bytes 0): responses are not stored".into(),
        );
    }
    let held = match (state.stored_responses, state.stored_conversations) {
        (0, 0) => None,
        (responses, conversations) => Some(format!(
            "{} and {}",
            counted(responses, "stored response"),
            counted(conversations, "conversation")
        )),
    };
    match (state.response_mirror.as_str(), held) {
        ("mirrored", _) => (
            false,
            "protected: a standby replica keeps a copy of its store, and answers for it if this \
             one is killed"
                .into(),
        ),
        ("failing", Some(held)) => (
            true,
            format!(
                "unprotected: its mirror to a standby fails (see its log); a kill now would lose \
                 its {held}"
            ),
        ),
        ("failing", None) => (
            true,
            "its mirror to a standby fails (see its log); it holds nothing yet".into(),
        ),
        ("journaled", Some(held)) if reporting > 1 => (
            true,
            format!(
                "kept on disk only (--state-dir): it has found no standby though other routers \
                 report; a kill keeps its {held} for its restart, unreadable until then{}",
                journal(state)
            ),
        ),
        ("journaled", Some(held)) => (
            false,
            format!(
                "the only router; its {held} are journaled on disk (--state-dir): a kill or a \
                 restart keeps them for its next start, unreadable while it is down{}",
                journal(state)
            ),
        ),
        ("alone", Some(held)) if reporting > 1 => (
            true,
            format!(
                "unprotected: it has found no standby though other routers report; a kill now \
                 would lose its {held}"
            ),
        ),
        ("alone", Some(held)) => (
            false,
            format!(
                "the only router: no replica to keep a copy; a kill would lose its {held} (a \
                 drain keeps nothing either)"
            ),
        ),
        ("off", Some(held)) => (
            reporting > 1,
            format!(
                "no cluster token (--cluster-token-file): its store is neither mirrored nor \
                 handed over on a drain; a kill or a rollout loses its {held}"
            ),
        ),
        (_, None) => (false, "holds no stored responses or conversations".into()),
        (other, Some(held)) => (
            true,
            format!("reports mirror state {other:?}, unknown here; it holds {held}"),
        ),
    }
}

/// What a journaling router's journal holds, and what of it a host crash could lose.
fn journal(state: &v1::RouterState) -> String {
    match (state.journal_bytes, state.journal_unsynced_bytes) {
        (0, _) => String::new(),
        (written, 0) => format!(" (journal {}, all synced)", size(written)),
        (written, unsynced) => format!(
            " (journal {}, {} not yet synced: a host crash would lose that)",
            size(written),
            size(unsynced)
        ),
    }
}

/// `bytes` for people: "812 B", "3.1 KiB", "10.2 MiB".
fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut n = bytes as f64;
    let mut unit = 0;
    while n >= 1024.0 && unit < UNITS.len() - 1 {
        n /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ => format!("{n:.1} {}", UNITS[unit]),
    }
}

/// `n` `thing`s, in words: "1 conversation", "2 conversations".
fn counted(n: u32, thing: &str) -> String {
    match n {
        1 => format!("1 {thing}"),
        _ if thing.ends_with("ch") => format!("{n} {thing}es"),
        _ => format!("{n} {thing}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(responses: u32, mirror: &str) -> v1::RouterState {
        v1::RouterState {
            stored_responses: responses,
            stored_conversations: 1,
            store_bytes: 4096,
            store_limit_bytes: 1 << 20,
            response_mirror: mirror.into(),
            ..Default::default()
        }
    }

    fn stats(router: &str, state: v1::RouterState) -> v1::RouterStats {
        v1::RouterStats {
            router_id: router.into(),
            state: Some(state),
            ..Default::default()
        }
    }

    #[test]
    fn a_router_that_would_lose_what_it_holds_is_trouble_and_says_why() {
        let live = Duration::ZERO;
        let cases = [
            (state(3, "mirrored"), 2, false, "protected"),
            (
                state(3, "failing"),
                2,
                true,
                "a kill now would lose its 3 stored responses and 1 conversation",
            ),
            (state(3, "alone"), 2, true, "found no standby"),
            (state(3, "alone"), 1, false, "the only router"),
            (state(3, "journaled"), 1, false, "journaled on disk"),
            (
                v1::RouterState {
                    journal_bytes: 10_700_000,
                    ..state(3, "journaled")
                },
                1,
                false,
                "(journal 10.2 MiB, all synced)",
            ),
            (
                v1::RouterState {
                    journal_bytes: 10_700_000,
                    journal_unsynced_bytes: 3_200,
                    ..state(3, "journaled")
                },
                1,
                false,
                "3.1 KiB not yet synced",
            ),
            (state(3, "journaled"), 2, true, "found no standby"),
            (state(3, "off"), 2, true, "no cluster token"),
            (state(0, "off"), 2, true, "no cluster token"),
        ];
        for (state, reporting, trouble, says) in cases {
            let (is, verdict) = verdict(live, &state, reporting);
            assert_eq!(is, trouble, "{verdict}");
            assert!(verdict.contains(says), "{verdict}");
        }
        let nothing = v1::RouterState {
            response_mirror: "off".into(),
            store_limit_bytes: 1 << 20,
            ..Default::default()
        };
        assert_eq!(
            verdict(live, &nothing, 2),
            (false, "holds no stored responses or conversations".into())
        );
        let running = v1::RouterState {
            background_responses: 2,
            ..state(3, "mirrored")
        };
        let (trouble, said) = verdict(live, &running, 2);
        assert!(!trouble && said.ends_with("2 background responses running here would end with a kill (a drain lets them finish)"), "{said}");
        let batching = v1::RouterState {
            batches_running: 1,
            ..state(3, "mirrored")
        };
        let (trouble, said) = verdict(live, &batching, 2);
        assert!(
            !trouble
                && said.ends_with(
                    "1 batch running here: a drain hands them to another replica, a kill ends them"
                ),
            "{said}"
        );
        let silent = verdict(SILENT_AFTER, &state(3, "mirrored"), 2);
        assert!(
            silent.0 && silent.1.starts_with("silent for 5 s"),
            "{}",
            silent.1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn routers_are_listed_by_id_and_forgotten_once_long_silent() {
        let routers = Routers::default();
        routers.add(&stats("b", state(1, "mirrored")));
        routers.add(&stats("a", state(2, "mirrored")));
        // Stats without a state (an older router) say nothing of it.
        routers.add(&v1::RouterStats {
            router_id: "old".into(),
            ..Default::default()
        });
        let ids: Vec<String> = routers.rows().into_iter().map(|r| r.router).collect();
        assert_eq!(ids, ["a", "b"]);
        tokio::time::advance(SILENT_AFTER).await;
        routers.add(&stats("b", state(1, "mirrored")));
        let rows = routers.rows();
        assert!(rows[0].trouble && rows[0].silent_s == 5, "{rows:?}");
        assert!(!rows[1].trouble, "{rows:?}");
        tokio::time::advance(FORGET_AFTER).await;
        routers.add(&stats("b", state(1, "mirrored")));
        let ids: Vec<String> = routers.rows().into_iter().map(|r| r.router).collect();
        assert_eq!(ids, ["b"]);
    }
}
