//! Background responses (`background: true`) while they run: the request is answered at once,
//! the generation goes on without the client, and the client polls the response by its id
//! (`GET /v1/responses/{id}`, which shows it `in_progress` with what it has written so far)
//! or cancels it (`POST /v1/responses/{id}/cancel`). When it ends (completed, incomplete,
//! failed or cancelled) it is stored as any response is, and stops being a run.
//!
//! A run made with `stream: true` also keeps its events (see [`super::events`]): the client
//! that made it follows them, and one whose stream broke picks it up again after the last
//! event it saw.
//!
//! A run lives on the replica that placed it; the others reach it as they reach a stored
//! response (the id names the replica). A replica killed mid-run loses the run, but not
//! silently: its mirror sends the standby, as the run starts, the response as it would stand
//! were the run cut off (`failed`, saying why), which the response as it ends replaces. A
//! standby that takes over answers that.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::events::EventLog;
use super::{Lookup, MirrorEvent, ResponseStore, StoredResponse};

/// Longest a cancel waits for the run to store how it ended.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// The response object of a run as it stands now (JSON).
pub type Describe = Box<dyn Fn() -> String + Send + Sync>;

/// A background response while it runs.
pub struct Running {
    /// The response as it would stand were the run cut off: what the mirror's standby holds
    /// until the run ends.
    interrupted: Arc<StoredResponse>,
    describe: Describe,
    cancel: CancellationToken,
    /// The stored object once it has ended.
    ended: watch::Receiver<Option<String>>,
    /// Its events, when it streams them.
    pub(super) events: Option<Arc<EventLog>>,
}

/// Runs in progress on this replica, by response id.
#[derive(Default)]
pub struct Runs {
    by_id: std::sync::Mutex<HashMap<String, Arc<Running>>>,
    /// Counts them, for Prometheus.
    gauge: std::sync::OnceLock<prometheus_client::metrics::gauge::Gauge>,
}

impl Runs {
    fn count(&self, runs: &HashMap<String, Arc<Running>>) {
        if let Some(gauge) = self.gauge.get() {
            gauge.set(runs.len() as i64);
        }
    }
}

impl std::fmt::Debug for Runs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.by_id.lock().map(|runs| runs.len()).unwrap_or_default();
        f.debug_struct("Runs").field("running", &count).finish()
    }
}

/// What a run's task holds: the token that cancels it, and the way to say it ended.
pub struct RunHandle {
    pub cancel: CancellationToken,
    id: String,
    ended: watch::Sender<Option<String>>,
}

impl RunHandle {
    /// The run ended and `object` (JSON) was stored: it is a stored response from now on.
    pub fn ended(self, store: &ResponseStore, object: String) {
        let mut runs = store.runs.by_id.lock().expect("runs lock");
        runs.remove(&self.id);
        store.runs.count(&runs);
        drop(runs);
        if !store.holds(&self.id) {
            // Not stored after all (larger than the store): the standby drops what it holds.
            store.ledger.tell(MirrorEvent::Forgotten(self.id.clone()));
        }
        self.ended.send_replace(Some(object));
    }
}

impl ResponseStore {
    /// Registers a background response, whose object as it runs `describe` tells, whose
    /// stream (if it streams) `events` keeps, and that `interrupted` stands for were the run
    /// cut off (the mirror's standby is sent it now).
    pub fn begin_run(
        &self,
        interrupted: StoredResponse,
        describe: Describe,
        events: Option<Arc<EventLog>>,
    ) -> RunHandle {
        let cancel = CancellationToken::new();
        let (ended_tx, ended) = watch::channel(None);
        let id = interrupted.id.clone();
        let interrupted = Arc::new(interrupted);
        let running = Running {
            interrupted: interrupted.clone(),
            describe,
            cancel: cancel.clone(),
            ended,
            events,
        };
        let mut runs = self.runs.by_id.lock().expect("runs lock");
        runs.insert(id.clone(), Arc::new(running));
        self.runs.count(&runs);
        drop(runs);
        self.ledger.tell(MirrorEvent::Kept(interrupted));
        RunHandle {
            cancel,
            id,
            ended: ended_tx,
        }
    }

    /// Keeps `gauge` at the number of background responses running here.
    pub fn with_run_gauge(self, gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        let _ = self.runs.gauge.set(gauge);
        self
    }

    /// Background responses running on this replica.
    pub fn running(&self) -> usize {
        self.runs.by_id.lock().expect("runs lock").len()
    }

    pub(super) fn run(&self, id: &str, tenant: Option<&str>) -> Option<Arc<Running>> {
        self.runs
            .by_id
            .lock()
            .expect("runs lock")
            .get(id)
            .filter(|run| run.interrupted.tenant.as_deref() == tenant)
            .cloned()
    }

    /// What the runs going on would be were they cut off, but those `stored` already (for a
    /// mirror starting: it is sent these after what is stored).
    pub(super) fn interrupted_runs(
        &self,
        stored: impl Fn(&str) -> bool,
    ) -> Vec<Arc<StoredResponse>> {
        self.runs
            .by_id
            .lock()
            .expect("runs lock")
            .values()
            .filter(|run| !stored(&run.interrupted.id))
            .map(|run| run.interrupted.clone())
            .collect()
    }

    /// Background response `id` while it runs, as a response not stored (`running`).
    pub(super) fn running_response(
        &self,
        id: &str,
        tenant: Option<&str>,
    ) -> Option<StoredResponse> {
        let run = self.run(id, tenant)?;
        let mut response = self.response(
            id.to_string(),
            run.interrupted.tenant.clone(),
            (run.describe)(),
            run.interrupted.input_items.clone(),
            Vec::new(),
        );
        response.running = true;
        response.events = run.events.clone();
        Some(response)
    }

    /// Cancels background response `id` (this replica's) for `tenant`: the object it was
    /// stored with. One cancelled already is answered as it was stored (cancelling is
    /// idempotent); one that ended otherwise, or a response that was not a background one,
    /// is refused, as there is nothing to cancel.
    pub async fn cancel(&self, id: &str, tenant: Option<&str>) -> Result<String, Status> {
        if let Some(run) = self.run(id, tenant) {
            run.cancel.cancel();
            let mut ended = run.ended.clone();
            let stored = tokio::time::timeout(CANCEL_WAIT, ended.wait_for(Option::is_some)).await;
            return match stored {
                Ok(Ok(object)) => Ok(object.clone().unwrap_or_default()),
                _ => Err(Status::unavailable(format!(
                    "response {id:?} was told to stop but has not said how it ended within \
                     {CANCEL_WAIT:?}; read it with GET /v1/responses/{{id}}"
                ))),
            };
        }
        match self.get(id, tenant) {
            Lookup::Found(response) => match background_status(&response.object) {
                Some(status) if status == "cancelled" => Ok(response.object.clone()),
                Some(status) => Err(Status::failed_precondition(format!(
                    "response {id:?} has ended ({status}) and cannot be cancelled; only a \
                     background response still running can be"
                ))),
                None => Err(Status::failed_precondition(format!(
                    "response {id:?} is not a background response: it ended when it was \
                     answered, and only background responses can be cancelled"
                ))),
            },
            Lookup::Missing | Lookup::Elsewhere(_) => Err(Status::not_found(format!(
                "response {id:?} is not stored here (expired, deleted, another API key's, or \
                 never stored)"
            ))),
        }
    }
}

/// How a response object (JSON) that ran in the background ended; `None` for one that did
/// not run in the background.
fn background_status(object: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Ended {
        #[serde(default)]
        background: bool,
        #[serde(default)]
        status: String,
    }
    serde_json::from_str::<Ended>(object)
        .ok()
        .filter(|e| e.background)
        .map(|e| e.status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response_store::StoreLimits;

    fn store() -> Arc<ResponseStore> {
        Arc::new(ResponseStore::new(StoreLimits::default()))
    }

    #[tokio::test]
    async fn a_run_is_read_while_it_runs_and_cancelled_into_what_it_stored() {
        let store = store();
        let id = store.new_id();
        let interrupted = store.response(
            id.clone(),
            Some("acme".into()),
            r#"{"status":"failed","background":true}"#.into(),
            Vec::new(),
            Vec::new(),
        );
        let handle = store.begin_run(
            interrupted,
            Box::new(|| r#"{"status":"in_progress","background":true}"#.into()),
            None,
        );
        match store.get(&id, Some("acme")) {
            Lookup::Found(running) => {
                assert!(running.running);
                assert!(running.object.contains("in_progress"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(store.get(&id, Some("other")), Lookup::Missing));
        // The run's task: it stops when told and stores how it ended.
        let task = {
            let store = store.clone();
            let id = id.clone();
            tokio::spawn(async move {
                handle.cancel.cancelled().await;
                let object = r#"{"status":"cancelled","background":true}"#.to_string();
                let response = store.response(
                    id,
                    Some("acme".into()),
                    object.clone(),
                    Vec::new(),
                    Vec::new(),
                );
                store.insert(response);
                handle.ended(&store, object);
            })
        };
        let cancelled = store.cancel(&id, Some("acme")).await.expect("cancelled");
        assert!(cancelled.contains("cancelled"), "{cancelled}");
        task.await.expect("the run ended");
        assert_eq!(store.running(), 0);
        // Cancelling again answers what was stored.
        assert_eq!(
            store.cancel(&id, Some("acme")).await.expect("stored"),
            cancelled
        );
    }

    /// The object of a `Kept` a mirror was told of.
    fn kept_object(event: MirrorEvent) -> String {
        match event {
            MirrorEvent::Kept(response) => response.object.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_mirror_holds_a_run_as_cut_off_until_it_ends() {
        let store = store();
        let begin = |id: &str| {
            store.begin_run(
                store.response(id.into(), None, "cut off".into(), Vec::new(), Vec::new()),
                Box::new(|| "running".into()),
                None,
            )
        };
        let before = store.new_id();
        let first = begin(&before);
        // A mirror starting now is sent the run as cut off, after what is stored...
        let mut mirror = store.begin_mirror(16);
        let sent: Vec<_> = mirror.kept.iter().map(|r| r.object.as_str()).collect();
        assert_eq!(sent, ["cut off"]);
        // ...and one running already is told of a run as it starts...
        let after = store.new_id();
        let second = begin(&after);
        assert_eq!(
            kept_object(mirror.events.try_recv().expect("told")),
            "cut off"
        );
        // ...then of the response as it ended, which replaces it.
        store.insert(store.response(before.clone(), None, "ended".into(), Vec::new(), Vec::new()));
        first.ended(&store, "ended".into());
        assert_eq!(
            kept_object(mirror.events.try_recv().expect("told")),
            "ended"
        );
        // A run whose response was not stored after all is forgotten by the mirror.
        second.ended(&store, "too large".into());
        match mirror.events.try_recv().expect("told") {
            MirrorEvent::Forgotten(id) => assert_eq!(id, after),
            other => panic!("{other:?}"),
        }
        assert!(mirror.events.try_recv().is_err());
    }

    #[tokio::test]
    async fn only_background_responses_are_cancelled() {
        let store = store();
        let id = store.new_id();
        let response = store.response(
            id.clone(),
            None,
            r#"{"status":"completed","background":false}"#.into(),
            Vec::new(),
            Vec::new(),
        );
        store.insert(response);
        let refused = store.cancel(&id, None).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        let missing = store.cancel(&store.new_id(), None).await.unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound);
        // A background response that completed has nothing left to cancel either.
        let completed = store.new_id();
        store.insert(store.response(
            completed.clone(),
            None,
            r#"{"status":"completed","background":true}"#.into(),
            Vec::new(),
            Vec::new(),
        ));
        let refused = store.cancel(&completed, None).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(
            refused.message().contains("has ended (completed)"),
            "{refused:?}"
        );
    }
}
