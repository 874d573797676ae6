//! OpenAI's Batch API: a client uploads a JSONL file of requests (`POST /v1/files`, purpose
//! `batch`), creates a batch of it (`POST /v1/batches`), and later downloads the answers as
//! another file. The batch's requests run in the cost-sensitive lane, a bounded number at a
//! time on each replica, so interactive traffic keeps its workers; a request refused for want
//! of room (429, 503) waits and is tried again until the batch's completion window closes.
//!
//! Files and batches live on the router replica that received them, in memory, and their ids
//! name it as stored responses' do: the other replicas ask that one (see
//! [`calls`]). A batch runs where its input file is kept.

pub mod calls;
pub mod handover;
pub mod input;
pub mod run;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::response_store::MirrorEvent;

/// How a file id begins (OpenAI's form), then the owner tag and a UUIDv7.
pub const FILE_PREFIX: &str = "file-";
/// How a batch id begins.
pub const BATCH_PREFIX: &str = "batch_";
/// The only purpose of the files this router keeps: it runs batches, nothing else.
pub const BATCH_PURPOSE: &str = "batch";
/// The purpose of the files a batch writes.
pub const OUTPUT_PURPOSE: &str = "batch_output";
/// The endpoints a batch may call.
pub const ENDPOINTS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
];

/// Bounds of a replica's batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Largest file a client may upload.
    pub max_file_bytes: usize,
    /// Bytes of files this replica keeps; uploads past it are refused (files are never
    /// dropped to make room: a batch's answers are not lost).
    pub store_bytes: usize,
    /// Batch requests running at once on this replica, all batches together.
    pub concurrency: usize,
    /// Requests one batch may hold.
    pub max_requests: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_file_bytes: 100 << 20,
            store_bytes: 1 << 30,
            concurrency: 8,
            max_requests: 50_000,
        }
    }
}

/// A file's or batch's place in a listing: when it was made (Unix ms, from its id), its id.
pub type Cursor = (u64, String);

/// When an id of ours was made (its UUIDv7's time, Unix ms); `None` for any other id.
pub fn made_ms(id: &str) -> Option<u64> {
    let hex = id.get(id.len().checked_sub(32)?..)?;
    let (seconds, nanos) = uuid::Uuid::try_parse(hex).ok()?.get_timestamp()?.to_unix();
    Some(seconds * 1000 + u64::from(nanos) / 1_000_000)
}

/// The replica tag a file or batch id carries; `None` for an id not of that shape.
pub fn owner_of(id: &str) -> Option<&str> {
    let rest = id
        .strip_prefix(FILE_PREFIX)
        .or_else(|| id.strip_prefix(BATCH_PREFIX))?;
    crate::response_store::owner_in(rest)
}

/// An uploaded file, or one a batch wrote.
#[derive(Debug)]
pub struct StoredFile {
    pub id: String,
    pub tenant: Option<String>,
    pub filename: String,
    pub purpose: String,
    pub created_at: u64,
    pub bytes: Bytes,
}

impl StoredFile {
    /// The file object of OpenAI's Files API.
    pub fn object(&self) -> Value {
        json!({
            "id": self.id,
            "object": "file",
            "bytes": self.bytes.len(),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": null,
            "status_details": null,
        })
    }
}

/// Where a batch is in its life, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Validating => "validating",
            Status::Failed => "failed",
            Status::InProgress => "in_progress",
            Status::Finalizing => "finalizing",
            Status::Completed => "completed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }

    /// Whether the batch has ended (nothing of it runs any more).
    pub fn ended(self) -> bool {
        matches!(
            self,
            Status::Failed | Status::Completed | Status::Expired | Status::Cancelled
        )
    }
}

/// Tokens a batch's answers used, as their `usage` told.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
}

/// What changes as a batch runs (as JSON, what a hand-over sends of it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub status: Status,
    /// When it reached each status (Unix seconds), by status name.
    pub reached: BTreeMap<String, u64>,
    pub total: usize,
    pub completed: usize,
    pub failed: usize,
    /// Why its input was refused (each an OpenAI batch error object).
    pub errors: Vec<Value>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub usage: Usage,
}

impl Progress {
    /// A batch's progress as it is made.
    pub fn new() -> Self {
        Self {
            status: Status::Validating,
            reached: BTreeMap::new(),
            total: 0,
            completed: 0,
            failed: 0,
            errors: Vec::new(),
            output_file_id: None,
            error_file_id: None,
            usage: Usage::default(),
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// A request's line of the output file (it succeeded) or the error file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub succeeded: bool,
    pub line: String,
}

/// A batch: its request, and how far it has got.
#[derive(Debug)]
pub struct Batch {
    pub id: String,
    pub tenant: Option<String>,
    pub endpoint: String,
    pub input_file_id: String,
    /// The completion window as asked (`24h`), and as a duration.
    pub window_text: String,
    pub window: Duration,
    pub metadata: Value,
    pub created_at: u64,
    pub progress: Mutex<Progress>,
    /// Fires when a client cancels it.
    pub cancel: CancellationToken,
    /// Its input file's bytes (kept if the file is deleted).
    pub input: Bytes,
    /// The answers so far, by the request's place in the input.
    pub answers: Mutex<BTreeMap<usize, Answer>>,
}

impl Batch {
    /// The batch object of OpenAI's Batch API, as it stands now.
    pub fn object(&self) -> Value {
        let progress = self.progress.lock().expect("batch progress").clone();
        let at = |status: &str| json!(progress.reached.get(status));
        let errors = if progress.errors.is_empty() {
            Value::Null
        } else {
            json!({"object": "list", "data": progress.errors})
        };
        let usage = progress.usage;
        json!({
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.window_text,
            "status": progress.status.as_str(),
            "output_file_id": progress.output_file_id,
            "error_file_id": progress.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": at("in_progress"),
            "expires_at": self.created_at + self.window.as_secs(),
            "finalizing_at": at("finalizing"),
            "completed_at": at("completed"),
            "failed_at": at("failed"),
            "expired_at": at("expired"),
            "cancelling_at": at("cancelling"),
            "cancelled_at": at("cancelled"),
            "request_counts": {
                "total": progress.total,
                "completed": progress.completed,
                "failed": progress.failed,
            },
            "usage": {
                "input_tokens": usage.input_tokens,
                "input_tokens_details": {"cached_tokens": usage.cached_tokens},
                "output_tokens": usage.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.input_tokens + usage.output_tokens,
            },
            "metadata": self.metadata,
        })
    }

    /// Moves it to `status`, noting when. A batch being cancelled only goes on to
    /// cancelled: the run reaching its next step meanwhile does not undo the cancel.
    pub fn reach(&self, status: Status) {
        let mut progress = self.progress.lock().expect("batch progress");
        if progress.status == Status::Cancelling && status != Status::Cancelled {
            return;
        }
        progress.status = status;
        progress.reached.insert(status.as_str().into(), unix_now());
    }

    pub fn status(&self) -> Status {
        self.progress.lock().expect("batch progress").status
    }

    fn visible_to(&self, tenant: Option<&str>) -> bool {
        tenant.is_none_or(|t| self.tenant.as_deref() == Some(t))
    }
}

/// Why a file could not be kept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeepError {
    #[error(
        "the file is {bytes} bytes, over this router's limit of {limit} (its --batch-max-file-bytes)"
    )]
    TooLarge { bytes: usize, limit: usize },
    #[error(
        "this router replica keeps {kept} bytes of files and this one ({bytes} bytes) would take \
         it past its limit of {limit} (its --batch-store-bytes): delete files you no longer need \
         (DELETE /v1/files/{{id}}) and try again"
    )]
    Full {
        bytes: usize,
        kept: usize,
        limit: usize,
    },
}

#[derive(Debug, Default)]
struct Inner {
    files: HashMap<String, Arc<StoredFile>>,
    batches: HashMap<String, Arc<Batch>>,
    /// Bytes of the files kept.
    bytes: usize,
}

/// This replica's files and batches.
#[derive(Debug)]
pub struct BatchStore {
    owner: String,
    limits: BatchLimits,
    inner: Mutex<Inner>,
    /// Batch requests this replica may run at once, all batches together.
    pub(crate) slots: Arc<Semaphore>,
    /// The runs of its batches: a stopping router waits for them to settle before it hands
    /// the batches over.
    pub(crate) runs: tokio_util::task::TaskTracker,
    gauges: Option<BatchGauges>,
    /// The stored responses' store, whose mirror to a standby replica carries the files and
    /// batches too.
    mirror: Option<Arc<crate::response_store::ResponseStore>>,
}

/// What the store tells Prometheus.
#[derive(Debug, Clone, Default)]
pub struct BatchGauges {
    pub running: Gauge,
    pub file_bytes: Gauge,
}

impl BatchStore {
    /// The store of the replica whose ids carry `owner`.
    pub fn new(owner: &str, limits: BatchLimits) -> Self {
        Self {
            owner: owner.to_string(),
            limits,
            inner: Mutex::default(),
            slots: Arc::new(Semaphore::new(limits.concurrency.max(1))),
            runs: tokio_util::task::TaskTracker::new(),
            gauges: None,
            mirror: None,
        }
    }

    pub fn with_gauges(mut self, gauges: BatchGauges) -> Self {
        self.gauges = Some(gauges);
        self
    }

    /// Mirrors the files and batches with `store`'s stored responses.
    pub fn mirrored_with(mut self, store: Arc<crate::response_store::ResponseStore>) -> Self {
        self.mirror = Some(store);
        self
    }

    fn tell(&self, event: MirrorEvent) {
        if let Some(store) = &self.mirror {
            store.tell_mirror(event);
        }
    }

    /// What a mirror starting now is sent of the files and batches.
    pub fn mirror_events(&self) -> Vec<MirrorEvent> {
        let (files, batches) = self.export();
        files
            .into_iter()
            .map(MirrorEvent::BatchFile)
            .chain(batches.into_iter().map(MirrorEvent::Batch))
            .collect()
    }

    pub fn limits(&self) -> BatchLimits {
        self.limits
    }

    /// A new id with `prefix`, naming this replica.
    pub fn new_id(&self, prefix: &str) -> String {
        format!("{prefix}{}{}", self.owner, uuid::Uuid::now_v7().simple())
    }

    fn publish(&self, inner: &Inner) {
        if let Some(gauges) = &self.gauges {
            gauges.file_bytes.set(inner.bytes as i64);
            let running = inner.batches.values().filter(|b| !b.status().ended());
            gauges.running.set(running.count() as i64);
        }
    }

    /// Keeps an uploaded file, if it fits.
    pub fn upload(
        &self,
        tenant: Option<String>,
        filename: String,
        bytes: Bytes,
    ) -> Result<Arc<StoredFile>, KeepError> {
        let limit = self.limits.max_file_bytes;
        if bytes.len() > limit {
            return Err(KeepError::TooLarge {
                bytes: bytes.len(),
                limit,
            });
        }
        let mut inner = self.inner.lock().expect("batch store");
        if inner.bytes + bytes.len() > self.limits.store_bytes {
            return Err(KeepError::Full {
                bytes: bytes.len(),
                kept: inner.bytes,
                limit: self.limits.store_bytes,
            });
        }
        Ok(self.keep(&mut inner, tenant, filename, BATCH_PURPOSE, bytes))
    }

    /// Keeps a file a batch wrote, whatever room is left: a batch's answers are never
    /// dropped (uploads are refused until files are deleted).
    pub fn write_output(
        &self,
        tenant: Option<String>,
        filename: String,
        bytes: Bytes,
    ) -> Arc<StoredFile> {
        let mut inner = self.inner.lock().expect("batch store");
        self.keep(&mut inner, tenant, filename, OUTPUT_PURPOSE, bytes)
    }

    fn keep(
        &self,
        inner: &mut Inner,
        tenant: Option<String>,
        filename: String,
        purpose: &str,
        bytes: Bytes,
    ) -> Arc<StoredFile> {
        let file = StoredFile {
            id: self.new_id(FILE_PREFIX),
            tenant,
            filename,
            purpose: purpose.to_string(),
            created_at: unix_now(),
            bytes,
        };
        self.put_file(inner, file)
    }

    fn put_file(&self, inner: &mut Inner, file: StoredFile) -> Arc<StoredFile> {
        let file = Arc::new(file);
        inner.bytes += file.bytes.len();
        if let Some(replaced) = inner.files.insert(file.id.clone(), file.clone()) {
            inner.bytes -= replaced.bytes.len();
        }
        self.publish(inner);
        self.tell(MirrorEvent::BatchFile(file.clone()));
        file
    }

    /// Keeps a file another replica handed over, under its id (whatever room is left: it
    /// may be a batch's answers).
    pub fn adopt_file(&self, file: StoredFile) {
        let mut inner = self.inner.lock().expect("batch store");
        self.put_file(&mut inner, file);
    }

    /// Every file and batch kept here, for a hand-over.
    pub fn export(&self) -> (Vec<Arc<StoredFile>>, Vec<Arc<Batch>>) {
        let inner = self.inner.lock().expect("batch store");
        (
            inner.files.values().cloned().collect(),
            inner.batches.values().cloned().collect(),
        )
    }

    /// Whether it keeps nothing.
    pub fn is_empty(&self) -> bool {
        let inner = self.inner.lock().expect("batch store");
        inner.files.is_empty() && inner.batches.is_empty()
    }

    /// File `id` if it is kept here for `tenant`.
    pub fn file(&self, id: &str, tenant: Option<&str>) -> Option<Arc<StoredFile>> {
        let inner = self.inner.lock().expect("batch store");
        let file = inner.files.get(id)?;
        tenant
            .is_none_or(|t| file.tenant.as_deref() == Some(t))
            .then(|| file.clone())
    }

    /// Deletes file `id` (a batch running on it keeps its copy); whether it was kept.
    pub fn delete_file(&self, id: &str, tenant: Option<&str>) -> bool {
        if self.file(id, tenant).is_none() {
            return false;
        }
        let mut inner = self.inner.lock().expect("batch store");
        let Some(file) = inner.files.remove(id) else {
            return false;
        };
        inner.bytes -= file.bytes.len();
        self.publish(&inner);
        drop(inner);
        self.tell(MirrorEvent::Forgotten(id.to_string()));
        true
    }

    /// Keeps a new batch.
    pub fn add_batch(&self, batch: Arc<Batch>) {
        let mut inner = self.inner.lock().expect("batch store");
        inner.batches.insert(batch.id.clone(), batch.clone());
        self.publish(&inner);
        drop(inner);
        self.tell(MirrorEvent::Batch(batch));
    }

    /// `batch` moved on (its status, its counts): the gauges and the mirror follow.
    pub fn changed(&self, batch: &Arc<Batch>) {
        self.publish(&self.inner.lock().expect("batch store"));
        self.tell(MirrorEvent::Batch(batch.clone()));
    }

    /// `batch`'s request `index` was answered: the mirror follows.
    pub fn answered(&self, batch: &Arc<Batch>, index: usize) {
        self.tell(MirrorEvent::BatchAnswered(batch.clone(), index));
    }

    /// Batch `id` if it is kept here for `tenant`.
    pub fn batch(&self, id: &str, tenant: Option<&str>) -> Option<Arc<Batch>> {
        let inner = self.inner.lock().expect("batch store");
        let batch = inner.batches.get(id)?;
        batch.visible_to(tenant).then(|| batch.clone())
    }

    /// `tenant`'s files (only those of `purpose` when given) after `after` in the order
    /// asked, at most `limit`: each with its place and object.
    pub fn list_files(
        &self,
        tenant: Option<&str>,
        purpose: Option<&str>,
        page: &Page,
    ) -> Vec<(Cursor, Value)> {
        let inner = self.inner.lock().expect("batch store");
        let files = inner.files.values().filter(|file| {
            tenant.is_none_or(|t| file.tenant.as_deref() == Some(t))
                && purpose.is_none_or(|p| file.purpose == p)
        });
        page.take(files.map(|file| (&file.id, file)), |file| file.object())
    }

    /// `tenant`'s batches after `after` in the order asked, at most `limit`.
    pub fn list_batches(&self, tenant: Option<&str>, page: &Page) -> Vec<(Cursor, Value)> {
        let batches: Vec<Arc<Batch>> = {
            let inner = self.inner.lock().expect("batch store");
            inner
                .batches
                .values()
                .filter(|batch| batch.visible_to(tenant))
                .cloned()
                .collect()
        };
        page.take(batches.iter().map(|b| (&b.id, b)), |batch| batch.object())
    }

    /// Batches not yet ended.
    pub fn running(&self) -> usize {
        let inner = self.inner.lock().expect("batch store");
        inner
            .batches
            .values()
            .filter(|b| !b.status().ended())
            .count()
    }
}

/// A page of a listing: where it starts, how many, in which order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub after: Option<Cursor>,
    pub limit: usize,
    pub oldest_first: bool,
}

impl Page {
    /// Whether `cursor` comes after the page's start in its order.
    pub fn follows(&self, cursor: &Cursor) -> bool {
        match &self.after {
            None => true,
            Some(after) if self.oldest_first => cursor > after,
            Some(after) => cursor < after,
        }
    }

    /// Sorts `places` in the page's order.
    pub fn sort<T>(&self, places: &mut [(Cursor, T)]) {
        if self.oldest_first {
            places.sort_by(|a, b| a.0.cmp(&b.0));
        } else {
            places.sort_by(|a, b| b.0.cmp(&a.0));
        }
    }

    /// The page of `items` (each with its id), as `object` describes them.
    fn take<'i, T: 'i>(
        &self,
        items: impl Iterator<Item = (&'i String, T)>,
        object: impl Fn(T) -> Value,
    ) -> Vec<(Cursor, Value)> {
        let mut placed: Vec<(Cursor, T)> = items
            .filter_map(|(id, item)| Some(((made_ms(id)?, id.clone()), item)))
            .filter(|(cursor, _)| self.follows(cursor))
            .collect();
        self.sort(&mut placed);
        placed.truncate(self.limit);
        placed
            .into_iter()
            .map(|(cursor, item)| (cursor, object(item)))
            .collect()
    }
}

/// A listing's answer: OpenAI's list object of the page's first `limit` objects.
pub fn list_object(mut objects: Vec<Value>, limit: usize) -> Value {
    let has_more = objects.len() > limit;
    objects.truncate(limit);
    let id_of = |object: Option<&Value>| object.and_then(|o| o.get("id")).cloned();
    json!({
        "object": "list",
        "first_id": id_of(objects.first()),
        "last_id": id_of(objects.last()),
        "has_more": has_more,
        "data": objects,
    })
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// A batch of `input` in progress, for tests.
#[cfg(test)]
pub(crate) fn batch_in_progress(store: &BatchStore, input: Bytes) -> Batch {
    let mut progress = Progress::new();
    progress.status = Status::InProgress;
    Batch {
        id: store.new_id(BATCH_PREFIX),
        tenant: Some("acme".into()),
        endpoint: "/v1/chat/completions".into(),
        input_file_id: store.new_id(FILE_PREFIX),
        window_text: "24h".into(),
        window: Duration::from_secs(86_400),
        metadata: json!({"job": "x"}),
        created_at: 7,
        progress: Mutex::new(progress),
        cancel: CancellationToken::new(),
        input,
        answers: Mutex::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> BatchStore {
        BatchStore::new("0123456789ab", BatchLimits::default())
    }

    #[test]
    fn ids_name_the_replica_and_carry_when_they_were_made() {
        let store = store();
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let id = store.new_id(FILE_PREFIX);
        assert_eq!(owner_of(&id), Some("0123456789ab"));
        let made = made_ms(&id).expect("a time");
        assert!(
            made >= before && made < before + 60_000,
            "{made} vs {before}"
        );
        assert_eq!(owner_of(&store.new_id(BATCH_PREFIX)), Some("0123456789ab"));
        assert_eq!(owner_of("file-abc"), None);
        assert_eq!(owner_of("resp_0123456789ab0123"), None);
    }

    #[test]
    fn uploads_are_refused_past_the_limits_and_outputs_are_not() {
        let store = BatchStore::new(
            "0123456789ab",
            BatchLimits {
                max_file_bytes: 10,
                store_bytes: 15,
                ..BatchLimits::default()
            },
        );
        let eleven = Bytes::from_static(b"01234567890");
        assert_eq!(
            store.upload(None, "a".into(), eleven.clone()).unwrap_err(),
            KeepError::TooLarge {
                bytes: 11,
                limit: 10
            }
        );
        let first = store
            .upload(None, "a".into(), Bytes::from_static(b"0123456789"))
            .unwrap();
        let full = store
            .upload(None, "b".into(), Bytes::from_static(b"012345"))
            .unwrap_err();
        assert!(matches!(full, KeepError::Full { kept: 10, .. }), "{full}");
        let output = store.write_output(None, "out".into(), eleven);
        assert_eq!(output.purpose, OUTPUT_PURPOSE);
        assert!(store.delete_file(&first.id, None));
        assert!(!store.delete_file(&first.id, None));
        assert!(store.file(&output.id, None).is_some());
    }

    #[test]
    fn a_tenant_sees_only_its_own_files() {
        let store = store();
        let file = store
            .upload(Some("acme".into()), "a".into(), Bytes::from_static(b"x"))
            .unwrap();
        assert!(store.file(&file.id, Some("acme")).is_some());
        assert!(store.file(&file.id, Some("globex")).is_none());
        assert!(!store.delete_file(&file.id, Some("globex")));
        let page = Page {
            after: None,
            limit: 10,
            oldest_first: false,
        };
        assert_eq!(store.list_files(Some("globex"), None, &page).len(), 0);
        assert_eq!(store.list_files(Some("acme"), None, &page).len(), 1);
    }

    #[test]
    fn listings_page_in_either_order_from_a_cursor() {
        let store = store();
        let ids: Vec<String> = (0..5)
            .map(|i| {
                store
                    .upload(None, format!("f{i}"), Bytes::from_static(b"x"))
                    .unwrap()
                    .id
                    .clone()
            })
            .collect();
        let page = |after: Option<&String>, oldest_first| Page {
            after: after.map(|id| (made_ms(id).unwrap(), id.clone())),
            limit: 2,
            oldest_first,
        };
        let listed = |page: Page| -> Vec<String> {
            store
                .list_files(None, None, &page)
                .into_iter()
                .map(|(cursor, _)| cursor.1)
                .collect()
        };
        assert_eq!(listed(page(None, true)), ids[..2]);
        assert_eq!(listed(page(Some(&ids[1]), true)), ids[2..4]);
        assert_eq!(listed(page(None, false)), [ids[4].clone(), ids[3].clone()]);
        assert_eq!(
            listed(page(Some(&ids[3]), false)),
            [ids[2].clone(), ids[1].clone()]
        );
        assert_eq!(
            store.list_files(None, Some(OUTPUT_PURPOSE), &page(None, true)),
            []
        );
    }
}
