//! OpenAI's Files and Batches APIs over HTTP: `POST /v1/files` (multipart: `purpose=batch`
//! and the JSONL `file`), `GET /v1/files` (by `purpose`, paged with `after`, `limit`,
//! `order`), `GET`/`DELETE /v1/files/{id}`, `GET /v1/files/{id}/content`; `POST
//! /v1/batches`, `GET /v1/batches` (paged with `after`, `limit`), `GET /v1/batches/{id}`,
//! `POST /v1/batches/{id}/cancel`. See [`crate::batches`] for how a batch runs.
//!
//! Files and batches are kept by the replica that received them (their ids name it): the
//! others ask that one, a batch is created where its input file is, and a listing asks every
//! replica.

use std::sync::Arc;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use serde::Deserialize;
use serde_json::Value;
use switchyard_proto::v1::{self, batch_call::Call};

use super::error::ApiError;
use crate::auth::Tenant;
use crate::batches::calls::{self, CreateBatch};
use crate::batches::{self, BATCH_PURPOSE, KeepError, made_ms};
use crate::dispatch::Dispatcher;
use crate::response_store::peers;

pub const FILES_ROUTE: &str = "/v1/files";
pub const FILE_ROUTE: &str = "/v1/files/{id}";
pub const FILE_CONTENT_ROUTE: &str = "/v1/files/{id}/content";
pub const BATCHES_ROUTE: &str = "/v1/batches";
pub const BATCH_ROUTE: &str = "/v1/batches/{id}";
pub const CANCEL_ROUTE: &str = "/v1/batches/{id}/cancel";

/// Room a multipart upload's framing takes on top of its file.
pub const UPLOAD_FRAMING_BYTES: usize = 64 << 10;

fn tenant_of(tenant: &Option<Extension<Tenant>>) -> Option<&str> {
    tenant.as_ref().map(|t| t.0.0.as_str())
}

/// The HTTP answer to a refusal by the replica that keeps what was asked.
fn refused(status: tonic::Status, param: Option<&str>) -> ApiError {
    let mut error = ApiError::from_code(status.code(), status.message());
    error.param = param.map(str::to_string);
    error
}

/// Answers `call`: here when this replica keeps what it names, else on the one that does.
async fn call(
    dispatcher: &Arc<Dispatcher>,
    tenant: Option<&str>,
    headers: &HeaderMap,
    call: Call,
) -> Result<v1::BatchAnswer, ApiError> {
    let subject = calls::subject(&call).unwrap_or_default();
    let param = matches!(call, Call::CreateBatchJson(_)).then_some("input_file_id");
    match batches::owner_of(&subject) {
        Some(owner) if !dispatcher.responses.tags().iter().any(|t| t == owner) => {
            let call = v1::BatchCall { call: Some(call) };
            peers::call_batches(dispatcher, owner, call, headers)
                .await
                .map_err(|e| e.into_api_error_about(&format!("{subject:?}")))?
                .map_err(|status| refused(status, param))
        }
        _ => calls::answer(dispatcher, tenant, call).map_err(|status| refused(status, param)),
    }
}

/// A JSON answer.
fn json_answer(answer: v1::BatchAnswer) -> Response {
    let mut response = answer.body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Answers `call` (see [`call`]) as JSON.
async fn answer(
    dispatcher: &Arc<Dispatcher>,
    tenant: &Option<Extension<Tenant>>,
    headers: &HeaderMap,
    call: Call,
) -> Response {
    match self::call(dispatcher, tenant_of(tenant), headers, call).await {
        Ok(answer) => json_answer(answer),
        Err(error) => error.into_response(),
    }
}

/// `POST /v1/files`: keeps a JSONL file of batch requests.
pub async fn upload(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    let form = match multipart {
        Ok(multipart) => read_form(multipart).await,
        Err(rejection) => Err(ApiError::bad_body(format!(
            "{}; upload the file as multipart/form-data with the fields purpose and file",
            rejection.body_text()
        ))),
    };
    let (filename, bytes) = match form {
        Ok(form) => form,
        Err(error) => return error.into_response(),
    };
    let tenant = tenant_of(&tenant).map(str::to_string);
    match dispatcher.batches.upload(tenant, filename, bytes) {
        Ok(file) => axum::Json(file.object()).into_response(),
        Err(error) => {
            let mut refusal = ApiError::invalid("file", &error);
            refusal.status = match error {
                KeepError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                KeepError::Full { .. } => StatusCode::INSUFFICIENT_STORAGE,
            };
            refusal.message = error.to_string();
            refusal.into_response()
        }
    }
}

/// The upload's file name and bytes, its purpose checked.
async fn read_form(mut multipart: Multipart) -> Result<(String, Bytes), ApiError> {
    let unreadable = |error: axum::extract::multipart::MultipartError| {
        let mut refusal = ApiError::bad_body(format!(
            "the upload could not be read: {}",
            error.body_text()
        ));
        refusal.status = error.status();
        refusal
    };
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = multipart.next_field().await.map_err(unreadable)? {
        match field.name().unwrap_or_default() {
            "purpose" => purpose = Some(field.text().await.map_err(unreadable)?),
            "file" => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                file = Some((name, field.bytes().await.map_err(unreadable)?));
            }
            other => {
                return Err(ApiError::invalid(
                    other,
                    "is not a field this router takes; an upload holds purpose and file",
                ));
            }
        }
    }
    match purpose.as_deref() {
        Some(BATCH_PURPOSE) => {}
        None => return Err(ApiError::invalid("purpose", "is required: send \"batch\"")),
        Some(other) => {
            return Err(ApiError::invalid(
                "purpose",
                format!("is {other:?}; this router keeps files for batches only: send \"batch\""),
            ));
        }
    }
    let (name, bytes) =
        file.ok_or_else(|| ApiError::invalid("file", "is required: the JSONL file of requests"))?;
    if bytes.is_empty() {
        return Err(ApiError::invalid(
            "file",
            "is empty: send the JSONL file of requests",
        ));
    }
    Ok((name, bytes))
}

/// A listing's query: OpenAI's paging.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<String>,
    order: Option<String>,
    purpose: Option<String>,
}

/// The page a listing's query asks for.
fn listing(
    query: Result<Query<ListQuery>, QueryRejection>,
    listed: Listed,
) -> Result<v1::BatchListing, ApiError> {
    let (default_limit, max_limit) = listed.limits();
    let files = listed == Listed::Files;
    let Query(query) =
        query.map_err(|rejection| ApiError::invalid("query", rejection.body_text()))?;
    let limit = match query.limit.as_deref() {
        None => default_limit,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|limit| (1..=max_limit).contains(limit))
            .ok_or_else(|| {
                ApiError::invalid(
                    "limit",
                    format!("is {text:?}, must be from 1 to {max_limit}"),
                )
            })?,
    };
    let oldest_first = match query.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") if files => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "order",
                format!("is {other:?}, must be \"asc\" or \"desc\""),
            ));
        }
    };
    if query.purpose.is_some() && !files {
        return Err(ApiError::invalid(
            "purpose",
            "batches are not listed by purpose",
        ));
    }
    let after = match query.after {
        None => None,
        Some(id) => Some(v1::ListedCursor {
            made_ms: made_ms(&id)
                .filter(|_| batches::owner_of(&id).is_some())
                .ok_or_else(|| {
                    ApiError::invalid("after", format!("{id:?} is not an id this listing gave"))
                })?,
            id,
        }),
    };
    Ok(v1::BatchListing {
        after,
        limit,
        purpose: query.purpose.unwrap_or_default(),
        oldest_first,
    })
}

/// Lists what every replica keeps for the client.
async fn list_everywhere(
    dispatcher: &Arc<Dispatcher>,
    tenant: Option<&str>,
    headers: &HeaderMap,
    listing: v1::BatchListing,
    listed: Listed,
) -> Result<Value, ApiError> {
    let page = batches::Page {
        after: listing.after.as_ref().map(|c| (c.made_ms, c.id.clone())),
        limit: listing.limit as usize,
        oldest_first: listing.oldest_first,
    };
    let here = calls::answer(dispatcher, tenant, listed.call(listing.clone()))
        .map_err(|status| refused(status, None))?;
    let call = v1::BatchCall {
        call: Some(listed.call(listing)),
    };
    let elsewhere = peers::list_batch_objects(dispatcher, call, headers).await?;
    let mut placed: Vec<(batches::Cursor, String)> = here
        .listed
        .into_iter()
        .chain(elsewhere)
        .filter_map(|listed| {
            let cursor = listed.cursor?;
            Some(((cursor.made_ms, cursor.id), listed.object_json))
        })
        .filter(|(cursor, _)| page.follows(cursor))
        .collect();
    page.sort(&mut placed);
    placed.dedup_by(|a, b| a.0 == b.0);
    placed.truncate(page.limit + 1);
    let objects = placed
        .into_iter()
        .filter_map(|(_, json)| serde_json::from_str(&json).ok())
        .collect();
    Ok(batches::list_object(objects, page.limit))
}

/// What a listing lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listed {
    Files,
    Batches,
}

impl Listed {
    /// Its default and largest `limit`, as OpenAI's API has them.
    fn limits(self) -> (u32, u32) {
        match self {
            Listed::Files => (10_000, 10_000),
            Listed::Batches => (20, 100),
        }
    }

    fn call(self, listing: v1::BatchListing) -> Call {
        match self {
            Listed::Files => Call::ListFiles(listing),
            Listed::Batches => Call::ListBatches(listing),
        }
    }
}

/// `GET /v1/files` and `GET /v1/batches`.
async fn list(
    dispatcher: &Arc<Dispatcher>,
    tenant: &Option<Extension<Tenant>>,
    headers: &HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
    listed: Listed,
) -> Response {
    let answer = match listing(query, listed) {
        Ok(listing) => {
            list_everywhere(dispatcher, tenant_of(tenant), headers, listing, listed).await
        }
        Err(error) => Err(error),
    };
    match answer {
        Ok(list) => axum::Json(list).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `GET /v1/files`.
pub async fn list_files(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    list(&dispatcher, &tenant, &headers, query, Listed::Files).await
}

/// `GET /v1/batches`.
pub async fn list_batches(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    list(&dispatcher, &tenant, &headers, query, Listed::Batches).await
}

/// `GET /v1/files/{id}`.
pub async fn get_file(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(&dispatcher, &tenant, &headers, Call::GetFile(id)).await
}

/// `DELETE /v1/files/{id}`.
pub async fn delete_file(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(&dispatcher, &tenant, &headers, Call::DeleteFile(id)).await
}

/// `GET /v1/files/{id}/content`: the file's bytes.
pub async fn file_content(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    match call(
        &dispatcher,
        tenant_of(&tenant),
        &headers,
        Call::FileContent(id),
    )
    .await
    {
        Ok(answer) => {
            let mut response = answer.body.into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            response
        }
        Err(error) => error.into_response(),
    }
}

/// `POST /v1/batches`: creates a batch of an uploaded file, on the replica that keeps it.
pub async fn create(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let checked = body.map_err(super::handlers::body_unread).and_then(|body| {
        let (create, _) =
            CreateBatch::parse(&body).map_err(|bad| ApiError::invalid(bad.param, bad.message))?;
        super::check_metadata(create.metadata)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    });
    let body = match checked {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    answer(&dispatcher, &tenant, &headers, Call::CreateBatchJson(body)).await
}

/// `GET /v1/batches/{id}`.
pub async fn get_batch(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(&dispatcher, &tenant, &headers, Call::GetBatch(id)).await
}

/// `POST /v1/batches/{id}/cancel`: stops the batch; it writes what was answered.
pub async fn cancel(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(&dispatcher, &tenant, &headers, Call::CancelBatch(id)).await
}
