//! Files and Batches API calls answered by the replica that keeps what they name: the HTTP
//! door's handlers call [`answer`] for what this replica keeps, and the `StoredResponses`
//! gRPC service calls it for the other replicas.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchyard_proto::v1::{self, batch_call::Call};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::{
    BATCH_PREFIX, BATCH_PURPOSE, Batch, Cursor, ENDPOINTS, Page, Progress, Status as BatchStatus,
};
use crate::dispatch::Dispatcher;

/// Longest completion window a batch may ask for.
const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// What `POST /v1/batches` sends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
}

/// Why a creation cannot be taken, naming the field to fix.
#[derive(Debug, PartialEq, Eq)]
pub struct BadCreation {
    pub param: String,
    pub message: String,
}

fn bad(param: &str, message: String) -> BadCreation {
    BadCreation {
        param: param.to_string(),
        message,
    }
}

impl CreateBatch {
    /// Reads and checks a creation's JSON body.
    pub fn parse(body: &[u8]) -> Result<(Self, Duration), BadCreation> {
        let mut json = serde_json::Deserializer::from_slice(body);
        let create: Self = serde_path_to_error::deserialize(&mut json).map_err(|e| {
            let path = e.path().to_string();
            let error = e.into_inner().to_string();
            let param = match path.as_str() {
                "." => backquoted(&error).unwrap_or("body").to_string(),
                field => field.to_string(),
            };
            bad(&param, format!("the body is not a batch creation: {error}"))
        })?;
        if !ENDPOINTS.contains(&create.endpoint.as_str()) {
            return Err(bad(
                "endpoint",
                format!(
                    "is {:?}; this router runs batches of {}",
                    create.endpoint,
                    ENDPOINTS.join(", ")
                ),
            ));
        }
        let window = window(&create.completion_window).ok_or_else(|| {
            bad(
                "completion_window",
                format!(
                    "is {:?}, must be \"24h\" (or a shorter window such as \"90m\" or \"30s\")",
                    create.completion_window
                ),
            )
        })?;
        if super::owner_of(&create.input_file_id).is_none() {
            return Err(bad(
                "input_file_id",
                format!(
                    "{:?} is not a file id of this cluster (upload the file with POST /v1/files, \
                     purpose \"batch\", and pass the id it answers)",
                    create.input_file_id
                ),
            ));
        }
        Ok((create, window))
    }
}

/// The first name a serde error quotes (`missing field `x``, `unknown field `x``).
fn backquoted(error: &str) -> Option<&str> {
    let (_, rest) = error.split_once('`')?;
    Some(rest.split_once('`')?.0)
}

/// A completion window, `<n>h`, `<n>m` or `<n>s`, from a second to a day.
pub(crate) fn window(text: &str) -> Option<Duration> {
    let split = text.len().checked_sub(1)?;
    let (count, unit) = text.split_at(split);
    let count: u64 = count.parse().ok()?;
    let seconds = match unit {
        "h" => count.checked_mul(3600)?,
        "m" => count.checked_mul(60)?,
        "s" => count,
        _ => return None,
    };
    let window = Duration::from_secs(seconds);
    (seconds > 0 && window <= MAX_WINDOW).then_some(window)
}

/// The id a call names: its replica answers it (a creation: its input file's).
pub fn subject(call: &Call) -> Option<String> {
    match call {
        Call::GetFile(id)
        | Call::FileContent(id)
        | Call::DeleteFile(id)
        | Call::GetBatch(id)
        | Call::CancelBatch(id) => Some(id.clone()),
        Call::CreateBatchJson(body) => CreateBatch::parse(body.as_bytes())
            .ok()
            .map(|(create, _)| create.input_file_id),
        Call::ListFiles(_) | Call::ListBatches(_) => None,
    }
}

fn answer_json(value: Value) -> v1::BatchAnswer {
    v1::BatchAnswer {
        body: Bytes::from(value.to_string()),
        listed: Vec::new(),
    }
}

fn file_missing(id: &str) -> Status {
    Status::not_found(format!(
        "file {id:?} is not kept: it was deleted, belongs to another API key, or the router \
         replica that kept it has stopped"
    ))
}

fn batch_missing(id: &str) -> Status {
    Status::not_found(format!(
        "batch {id:?} is not kept: it belongs to another API key, or the router replica that \
         ran it has stopped"
    ))
}

/// Answers `call` from what this replica keeps, for `tenant`.
pub fn answer(
    dispatcher: &Arc<Dispatcher>,
    tenant: Option<&str>,
    call: Call,
) -> Result<v1::BatchAnswer, Status> {
    let store = &dispatcher.batches;
    match call {
        Call::GetFile(id) => {
            let file = store.file(&id, tenant).ok_or_else(|| file_missing(&id))?;
            Ok(answer_json(file.object()))
        }
        Call::FileContent(id) => {
            let file = store.file(&id, tenant).ok_or_else(|| file_missing(&id))?;
            Ok(v1::BatchAnswer {
                body: file.bytes.clone(),
                listed: Vec::new(),
            })
        }
        Call::DeleteFile(id) => {
            if !store.delete_file(&id, tenant) {
                return Err(file_missing(&id));
            }
            Ok(answer_json(
                json!({"id": id, "object": "file", "deleted": true}),
            ))
        }
        Call::GetBatch(id) => {
            let batch = store.batch(&id, tenant).ok_or_else(|| batch_missing(&id))?;
            Ok(answer_json(batch.object()))
        }
        Call::CancelBatch(id) => {
            let batch = store.batch(&id, tenant).ok_or_else(|| batch_missing(&id))?;
            cancel(&batch)?;
            store.changed(&batch);
            Ok(answer_json(batch.object()))
        }
        Call::CreateBatchJson(body) => create(dispatcher, tenant, &body),
        Call::ListFiles(listing) => {
            let page = page_of(&listing);
            let purpose = Some(listing.purpose.as_str()).filter(|p| !p.is_empty());
            Ok(listed(store.list_files(tenant, purpose, &page)))
        }
        Call::ListBatches(listing) => Ok(listed(store.list_batches(tenant, &page_of(&listing)))),
    }
}

fn cancel(batch: &Batch) -> Result<(), Status> {
    {
        let mut progress = batch.progress.lock().expect("batch progress");
        match progress.status {
            BatchStatus::Validating | BatchStatus::InProgress | BatchStatus::Finalizing => {
                progress.status = BatchStatus::Cancelling;
                progress
                    .reached
                    .insert(BatchStatus::Cancelling.as_str().into(), super::unix_now());
            }
            BatchStatus::Cancelling | BatchStatus::Cancelled => {}
            ended => {
                return Err(Status::failed_precondition(format!(
                    "batch {:?} is {}: only a batch still running can be cancelled",
                    batch.id,
                    ended.as_str()
                )));
            }
        }
    }
    batch.cancel.cancel();
    Ok(())
}

fn create(
    dispatcher: &Arc<Dispatcher>,
    tenant: Option<&str>,
    body: &str,
) -> Result<v1::BatchAnswer, Status> {
    let (create, window) = CreateBatch::parse(body.as_bytes())
        .map_err(|bad| Status::invalid_argument(format!("{}: {}", bad.param, bad.message)))?;
    let store = &dispatcher.batches;
    let file = store
        .file(&create.input_file_id, tenant)
        .ok_or_else(|| file_missing(&create.input_file_id))?;
    if file.purpose != BATCH_PURPOSE {
        return Err(Status::invalid_argument(format!(
            "input_file_id: file {:?} has purpose {:?}; a batch runs a file uploaded with \
             purpose \"batch\"",
            file.id, file.purpose
        )));
    }
    let metadata = crate::openai::check_metadata(create.metadata)
        .map_err(|e| Status::invalid_argument(e.message))?;
    let metadata = match metadata {
        Value::Null => Value::Object(Map::new()),
        checked => checked,
    };
    let batch = Arc::new(Batch {
        id: store.new_id(BATCH_PREFIX),
        tenant: tenant.map(str::to_string),
        endpoint: create.endpoint,
        input_file_id: create.input_file_id,
        window_text: create.completion_window,
        window,
        metadata,
        created_at: super::unix_now(),
        progress: std::sync::Mutex::new(Progress::new()),
        cancel: CancellationToken::new(),
        input: file.bytes.clone(),
        answers: Default::default(),
    });
    store.add_batch(batch.clone());
    let object = batch.object();
    super::run::start(dispatcher.clone(), batch);
    Ok(answer_json(object))
}

fn page_of(listing: &v1::BatchListing) -> Page {
    Page {
        after: listing
            .after
            .as_ref()
            .map(|cursor| (cursor.made_ms, cursor.id.clone())),
        limit: listing.limit as usize + 1,
        oldest_first: listing.oldest_first,
    }
}

fn listed(page: Vec<(Cursor, Value)>) -> v1::BatchAnswer {
    v1::BatchAnswer {
        body: Bytes::new(),
        listed: page
            .into_iter()
            .map(|((made_ms, id), object)| v1::ListedObject {
                cursor: Some(v1::ListedCursor { made_ms, id }),
                object_json: object.to_string(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creation(fields: Value) -> Result<(CreateBatch, Duration), BadCreation> {
        CreateBatch::parse(fields.to_string().as_bytes())
    }

    const FILE: &str = "file-0123456789ab0190f0e1d2c3b4a5968778695a4b3c2d";

    #[test]
    fn a_creation_names_what_is_wrong_with_it() {
        let good = json!({"input_file_id": FILE, "endpoint": "/v1/chat/completions",
                          "completion_window": "24h"});
        let (create, window) = creation(good.clone()).unwrap();
        assert_eq!(create.input_file_id, FILE);
        assert_eq!(window, Duration::from_secs(86_400));
        let param = |change: Value| {
            let mut body = good.clone();
            for (k, v) in change.as_object().unwrap() {
                body[k] = v.clone();
            }
            creation(body).unwrap_err().param
        };
        assert_eq!(param(json!({"endpoint": "/v1/moderations"})), "endpoint");
        assert_eq!(
            param(json!({"completion_window": "2d"})),
            "completion_window"
        );
        assert_eq!(
            param(json!({"completion_window": "0s"})),
            "completion_window"
        );
        assert_eq!(param(json!({"input_file_id": "file-abc"})), "input_file_id");
        assert_eq!(param(json!({"input_file_id": 7})), "input_file_id");
        assert_eq!(
            creation(json!({"endpoint": "/v1/completions", "completion_window": "24h"}))
                .unwrap_err()
                .param,
            "input_file_id"
        );
        assert_eq!(
            param(json!({"output_expires_after": {}})),
            "output_expires_after"
        );
    }

    #[test]
    fn windows_run_from_a_second_to_a_day() {
        assert_eq!(window("30s"), Some(Duration::from_secs(30)));
        assert_eq!(window("90m"), Some(Duration::from_secs(5400)));
        assert_eq!(window("24h"), Some(Duration::from_secs(86_400)));
        for bad in ["25h", "0h", "h", "", "1d", "-1s", "1.5h"] {
            assert_eq!(window(bad), None, "{bad}");
        }
    }
}
