//! Stored chat completions over HTTP, as OpenAI's API has them: a Chat Completions request with
//! `store: true` is kept (with its `metadata` and its messages), then
//! `GET /v1/chat/completions` lists them (by `model` and `metadata[key]=value`, paged with
//! `after`, `limit` and `order`), `GET /v1/chat/completions/{id}` reads one,
//! `POST /v1/chat/completions/{id}` replaces its metadata, `DELETE` deletes it, and
//! `GET /v1/chat/completions/{id}/messages` pages through its request's messages.
//!
//! A completion is kept by the replica that answered it (its id names that replica, see
//! [`crate::response_store`]); the others ask that one, and a listing asks every replica.

use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse as _, Response};
use futures::StreamExt as _;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use switchyard_proto::v1::{self, server_frame::Frame};

use super::choices::ChoiceFrames;
use super::error::ApiError;
use super::handlers::{Meta, Whole};
use super::responses::request::metadata as checked_metadata;
use super::wire::{self, ChatCompletionRequest, StreamMode};
use crate::auth::Tenant;
use crate::dispatch::Dispatcher;
use crate::response_store::chat::{self, CHAT_PREFIX, Cursor, Listing};
use crate::response_store::{ResponseStore, StoredResponse, peers};

pub const COMPLETION_ROUTE: &str = "/v1/chat/completions/{id}";
pub const MESSAGES_ROUTE: &str = "/v1/chat/completions/{id}/messages";

/// Why a completion id finds nothing, for the client to act on.
const NOT_STORED: &str = "is not stored: a chat completion is kept only when its request \
     says store: true, for a limited time and size (the router's --response-store-max-age and \
     --response-store-bytes), and only for the API key that made it";

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(None, format!("chat completion {id:?} {NOT_STORED}"))
}

fn tenant_of(tenant: &Option<Extension<Tenant>>) -> Option<&str> {
    tenant.as_ref().map(|t| t.0.0.as_str())
}

/// What a request with `store: true` keeps once its answer is whole.
pub(crate) struct Keep {
    /// The completion's id (`chatcmpl-…`, naming this replica).
    pub id: String,
    store: Arc<ResponseStore>,
    tenant: Option<String>,
    /// Checked, `{}` when none was given.
    metadata: Value,
    /// The request's messages as sent.
    messages: Vec<Value>,
}

impl Keep {
    /// What `request` asks to keep; `None` when it does not say `store: true`.
    ///
    /// `store_as`: the id the request runs under when the router minted it (as
    /// [`ResponseStore::new_chat_completion_id`] does), the stored completion's id too.
    pub(crate) fn asked(
        request: &ChatCompletionRequest,
        dispatcher: &Dispatcher,
        tenant: Option<String>,
        store_as: Option<String>,
    ) -> Result<Option<Self>, ApiError> {
        let store = match &request.store {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(other) => {
                return Err(ApiError::invalid(
                    "store",
                    format!("is {other}, must be true or false"),
                ));
            }
        };
        let metadata = match &request.metadata {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(Value::Object(pairs)) => checked_metadata(Some(pairs.clone()))?,
            Some(other) => {
                return Err(ApiError::invalid(
                    "metadata",
                    format!("is {other}, must be an object of strings"),
                ));
            }
        };
        if !store {
            return Ok(None);
        }
        let responses = &dispatcher.responses;
        if responses.limits().max_bytes == 0 {
            return Err(ApiError::invalid(
                "store",
                "this router keeps no completions (its --response-store-bytes is 0): send \
                 store: false, or ask its operator to give it room",
            ));
        }
        Ok(Some(Self {
            id: store_as.unwrap_or_else(|| responses.new_chat_completion_id()),
            store: responses.clone(),
            tenant,
            metadata,
            messages: request.messages.clone().unwrap_or_default(),
        }))
    }

    /// Keeps `body`, the whole answer, with its metadata (which it gains too).
    pub(crate) fn store(self, body: &mut Value) {
        if let Value::Object(fields) = body {
            fields.insert("metadata".into(), self.metadata);
        }
        let items = self
            .messages
            .into_iter()
            .enumerate()
            .filter_map(|(index, message)| {
                let Value::Object(mut fields) = message else {
                    return None;
                };
                // OpenAI's stored form of a message sent as parts: their text as `content`,
                // the parts as `content_parts`.
                if let Some(Value::Array(parts)) = fields.get("content") {
                    let text: Vec<&str> = parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .collect();
                    let text = Value::from(text.join("\n"));
                    let parts = fields.insert("content".into(), text);
                    fields.insert("content_parts".into(), parts.unwrap_or_default());
                }
                fields.insert("id".into(), Value::from(format!("{}-{index}", self.id)));
                serde_json::value::to_raw_value(&fields).ok()
            })
            .collect();
        let kept = self
            .store
            .response(self.id, self.tenant, body.to_string(), items, Vec::new());
        if !self.store.insert(kept) {
            tracing::debug!("a stored chat completion did not fit the response store");
        }
    }

    /// `frames` (after `first`) as they go to a streaming client, keeping the answer once it
    /// is whole; a stream that fails or is dropped keeps nothing.
    pub(crate) fn stream_through(
        self,
        meta: Meta,
        mode: StreamMode,
        first: (u32, &Frame),
        frames: ChoiceFrames,
    ) -> ChoiceFrames {
        let mut whole = Whole::new(mode);
        whole.push(first.0, first.1.clone());
        let mut keeping = Some((self, whole, meta));
        keep_if_whole(&mut keeping);
        Box::pin(frames.inspect(move |(index, item)| {
            let Some((_, whole, _)) = keeping.as_mut() else {
                return;
            };
            match item {
                Ok(v1::ServerFrame {
                    frame: Some(Frame::Failed(_)),
                })
                | Err(_) => keeping = None,
                Ok(v1::ServerFrame { frame: Some(frame) }) => whole.push(*index, frame.clone()),
                Ok(v1::ServerFrame { frame: None }) => {}
            }
            keep_if_whole(&mut keeping);
        }))
    }
}

fn keep_if_whole(keeping: &mut Option<(Keep, Whole, Meta)>) {
    if keeping.as_ref().is_some_and(|(_, whole, _)| whole.ended())
        && let Some((keep, whole, meta)) = keeping.take()
    {
        let (_, mut body) = whole.answer(meta);
        keep.store(&mut body);
    }
}

/// Stored chat completion `id`, wherever in the cluster it is kept; `None` when it is not.
async fn find(
    dispatcher: &Dispatcher,
    id: &str,
    tenant: Option<&str>,
    headers: &HeaderMap,
) -> Result<Option<Arc<StoredResponse>>, ApiError> {
    if !id.starts_with(CHAT_PREFIX) {
        return Ok(None);
    }
    peers::find(dispatcher, id, tenant, headers)
        .await
        .map_err(|e| e.into_api_error_about(&format!("chat completion {id:?}")))
}

/// `GET /v1/chat/completions/{id}`: the completion as it was answered, with its metadata.
pub async fn get(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    match find(&dispatcher, &id, tenant_of(&tenant), &headers).await {
        Ok(Some(kept)) => super::responses::json_response(kept.object.clone()),
        Ok(None) => not_found(&id).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `POST /v1/chat/completions/{id}`'s body: the metadata that replaces the completion's.
#[derive(Debug, serde::Deserialize)]
struct Update {
    metadata: Option<Value>,
}

/// `POST /v1/chat/completions/{id}`: replaces its metadata (the only thing that changes).
pub async fn update(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let metadata = body
        .map_err(super::handlers::body_unread)
        .and_then(|body| wire::json_object(&body))
        .and_then(|body| wire::typed::<Update>(&body))
        .and_then(|update| match update.metadata {
            Some(Value::Object(pairs)) => checked_metadata(Some(pairs)),
            // The SDK sends `null` for `metadata=None`: no pairs left.
            Some(Value::Null) => Ok(Value::Object(Map::new())),
            None => Err(ApiError::invalid(
                "metadata",
                "is required: the pairs that replace the completion's (null or {} for none)",
            )),
            Some(other) => Err(ApiError::invalid(
                "metadata",
                format!("is {other}, must be an object of strings"),
            )),
        });
    let metadata = match metadata {
        Ok(metadata) => metadata,
        Err(error) => return error.into_response(),
    };
    let tenant = tenant_of(&tenant);
    let updated = match crate::response_store::owner_of(&id) {
        _ if !id.starts_with(CHAT_PREFIX) => Ok(None),
        Some(owner) if !dispatcher.responses.tags().iter().any(|t| t == owner) => {
            match peers::update_chat_completion(
                &dispatcher,
                owner,
                &id,
                metadata.to_string(),
                &headers,
            )
            .await
            {
                Ok(Ok(object)) => Ok(Some(object)),
                Ok(Err(status)) if status.code() == tonic::Code::NotFound => Ok(None),
                Ok(Err(status)) => Err(ApiError::from_code(status.code(), status.message())),
                Err(error) => Err(error.into_api_error_about(&format!("chat completion {id:?}"))),
            }
        }
        _ => Ok(dispatcher
            .responses
            .update_chat_metadata(&id, tenant, metadata)),
    };
    match updated {
        Ok(Some(object)) => super::responses::json_response(object),
        Ok(None) => not_found(&id).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `DELETE /v1/chat/completions/{id}`.
pub async fn delete(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let deleted = match id.starts_with(CHAT_PREFIX) {
        true => peers::delete_anywhere(&dispatcher, &id, tenant_of(&tenant), &headers)
            .await
            .map_err(|e| e.into_api_error_about(&format!("chat completion {id:?}"))),
        false => Ok(false),
    };
    match deleted {
        Ok(true) => Json(json!({"id": id, "object": "chat.completion.deleted", "deleted": true}))
            .into_response(),
        Ok(false) => not_found(&id).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `GET /v1/chat/completions/{id}/messages`: its request's messages, oldest first by default,
/// 20 at a time.
pub async fn messages(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(paging): Query<super::responses::stored::Paging>,
) -> Response {
    let page = match super::responses::stored::page_of(&paging, false) {
        Ok(page) => page,
        Err(error) => return error.into_response(),
    };
    match find(&dispatcher, &id, tenant_of(&tenant), &headers).await {
        Ok(Some(kept)) => {
            let items: Vec<&RawValue> = kept.input_items.iter().map(AsRef::as_ref).collect();
            match crate::response_store::conversation::page(
                &items,
                page.after.as_deref(),
                page.limit,
                page.newest_first,
            ) {
                Ok(body) => Json(body).into_response(),
                Err((field, why)) => ApiError::invalid(field, why).into_response(),
            }
        }
        Ok(None) => not_found(&id).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `GET /v1/chat/completions`' query: `model`, `metadata[key]=value` (any number), `after`,
/// `limit` and `order` (oldest first unless `desc`).
fn listing_of(query: Vec<(String, String)>) -> Result<(Listing, Option<String>), ApiError> {
    let mut paging = super::responses::stored::Paging::default();
    let mut listing = Listing::default();
    for (key, value) in query {
        match key.as_str() {
            "model" => listing.model = Some(value),
            "after" => paging.after = Some(value),
            "limit" => paging.limit = Some(value),
            "order" => paging.order = Some(value),
            _ => match key
                .strip_prefix("metadata[")
                .and_then(|k| k.strip_suffix(']'))
            {
                Some(name) if !name.is_empty() => listing.metadata.push((name.to_string(), value)),
                _ => {
                    return Err(ApiError::invalid(
                        key.clone(),
                        "is not a parameter of this listing: model, metadata[key], after, \
                         limit and order are",
                    ));
                }
            },
        }
    }
    let page = super::responses::stored::page_of(&paging, false)?;
    listing.metadata.sort();
    listing.limit = page.limit;
    listing.newest_first = page.newest_first;
    Ok((listing, page.after))
}

/// `GET /v1/chat/completions`: the stored completions of the caller's key, across the
/// cluster.
pub async fn list(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    list_for(&dispatcher, tenant_of(&tenant), &headers, query)
        .await
        .unwrap_or_else(|error| error.into_response())
}

async fn list_for(
    dispatcher: &Dispatcher,
    tenant: Option<&str>,
    headers: &HeaderMap,
    query: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    let (mut listing, after) = listing_of(query)?;
    if let Some(after) = after {
        let kept = find(dispatcher, &after, tenant, headers).await?;
        let cursor = kept.and_then(|kept| chat::cursor_of(&kept.id, &kept.object));
        let Some(cursor) = cursor else {
            return Err(ApiError::invalid(
                "after",
                format!("chat completion {after:?} {NOT_STORED}"),
            ));
        };
        listing.after = Some(cursor);
    }
    let mut found = dispatcher.responses.list_chat_completions(tenant, &listing);
    found.extend(peers::list_chat_completions(dispatcher, &listing, headers).await?);
    let mut found: Vec<(Cursor, Arc<str>)> = listing.order(found);
    let has_more = found.len() > listing.limit;
    found.truncate(listing.limit);
    let data: Vec<&RawValue> = found
        .iter()
        .filter_map(|(_, object)| serde_json::from_str(object).ok())
        .collect();
    let id = |at: Option<&(Cursor, Arc<str>)>| at.map(|(c, _)| c.id.clone());
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "first_id": id(found.first()),
        "last_id": id(found.last()),
        "has_more": has_more,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_listing_reads_its_filters_and_pages_oldest_first() {
        let (listing, after) = listing_of(query(&[
            ("model", "m"),
            ("metadata[team]", "a"),
            ("metadata[env]", "prod"),
            ("after", "chatcmpl-x"),
            ("limit", "5"),
        ]))
        .unwrap();
        assert_eq!(listing.model.as_deref(), Some("m"));
        assert_eq!(
            listing.metadata,
            [("env".into(), "prod".into()), ("team".into(), "a".into())]
        );
        assert_eq!((listing.limit, listing.newest_first), (5, false));
        assert_eq!(after.as_deref(), Some("chatcmpl-x"));
        let (newest, _) = listing_of(query(&[("order", "desc")])).unwrap();
        assert!(newest.newest_first);
    }

    #[test]
    fn a_bad_listing_parameter_is_named() {
        for (pairs, param) in [
            (query(&[("limit", "0")]), "limit"),
            (query(&[("order", "up")]), "order"),
            (query(&[("models", "m")]), "models"),
            (query(&[("metadata[]", "x")]), "metadata[]"),
        ] {
            let refused = listing_of(pairs).unwrap_err();
            assert_eq!(refused.param.as_deref(), Some(param), "{refused:?}");
        }
    }
}
