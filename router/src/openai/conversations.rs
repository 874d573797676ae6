//! OpenAI's Conversations API: `POST /v1/conversations` makes a stored conversation, its
//! items are listed, added, read and deleted under `/v1/conversations/{id}/items`, and a
//! response with `conversation` goes on from its items and adds its input and output to them
//! (see [`super::responses`]). What the OpenAI Agents SDK's `OpenAIConversationsSession` and
//! `client.conversations` use.
//!
//! A conversation is kept by the router replica that made it (see
//! [`crate::response_store::conversation`]); any replica answers for it, asking that one.

use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse as _, Response};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use switchyard_proto::v1::{self, conversation_call::Call};
use tonic::Code;

use super::error::ApiError;
use super::handlers;
use super::responses::references;
use super::responses::request;
use super::responses::stored::{Paging, page_of};
use super::wire;
use crate::auth::Tenant;
use crate::dispatch::Dispatcher;
use crate::response_store::conversation::{self, MAX_ADDED_ITEMS};
use crate::response_store::{Lookup, peers};

pub const CONVERSATIONS_ROUTE: &str = "/v1/conversations";
pub const CONVERSATION_ROUTE: &str = "/v1/conversations/{id}";
pub const ITEMS_ROUTE: &str = "/v1/conversations/{id}/items";
pub const ITEM_ROUTE: &str = "/v1/conversations/{id}/items/{item_id}";

/// `POST /v1/conversations` and `POST /v1/conversations/{id}`'s body.
#[derive(Debug, Default, Deserialize)]
struct ConversationBody {
    items: Option<Vec<Value>>,
    metadata: Option<Map<String, Value>>,
}

#[derive(Debug, Default, Deserialize)]
struct ItemsBody {
    items: Option<Vec<Value>>,
}

fn tenant_of(tenant: &Option<Extension<Tenant>>) -> Option<String> {
    tenant.as_ref().map(|t| t.0.0.clone())
}

/// A JSON body of `T`; an empty body is `T`'s default when `empty_ok`.
fn body_of<T: serde::de::DeserializeOwned + Default>(
    body: Result<Bytes, BytesRejection>,
    empty_ok: bool,
) -> Result<T, ApiError> {
    match body {
        Ok(body) if body.is_empty() && empty_ok => Ok(T::default()),
        body => wire::typed(&wire::json_object(&handlers::read_body(body)?)?),
    }
}

/// Checked items to add to conversation `holder` (`field`: how the request names them), as
/// stored JSON with ids (new ones naming `holder`).
fn items_to_add(items: Vec<Value>, field: &str, holder: &str) -> Result<Vec<String>, ApiError> {
    if items.len() > MAX_ADDED_ITEMS {
        return Err(ApiError::invalid(
            field,
            format!(
                "has {} items, at most {MAX_ADDED_ITEMS} may be added at once",
                items.len()
            ),
        ));
    }
    request::check_items(&items, field)?;
    Ok(
        request::with_ids(items.into_iter().map(as_listed).collect(), Some(holder))
            .into_iter()
            .map(|item| item.get().to_string())
            .collect(),
    )
}

/// Checks items a `StoredResponses.CallConversation` caller adds (JSON texts, each with the
/// `id` it is kept under) as the HTTP door checks those it is sent: at most
/// [`MAX_ADDED_ITEMS`], each an input item a response can run.
pub fn check_added_items(items_json: &[String]) -> Result<(), ApiError> {
    if items_json.len() > MAX_ADDED_ITEMS {
        return Err(ApiError::invalid(
            "items_json",
            format!(
                "has {} items, at most {MAX_ADDED_ITEMS} may be added at once",
                items_json.len()
            ),
        ));
    }
    let items = items_json
        .iter()
        .enumerate()
        .map(|(i, text)| match serde_json::from_str::<Value>(text) {
            Ok(item) if item.get("id").is_some_and(Value::is_string) => Ok(item),
            Ok(_) => Err(ApiError::invalid(
                format!("items_json[{i}].id"),
                "is required: a string the item is kept under",
            )),
            Err(e) => Err(ApiError::invalid(
                format!("items_json[{i}]"),
                format!("is not JSON: {e}"),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    request::check_items(&items, "items_json")
}

/// An input item (JSON text) as a conversation lists it (see [`as_listed`]).
pub(super) fn as_listed_text(item: &RawValue) -> String {
    match serde_json::from_str::<Value>(item.get()) {
        Ok(value) => as_listed(value).to_string(),
        Err(_) => item.get().to_string(),
    }
}

/// A message item as a conversation lists it (as OpenAI's API does): its text as a content
/// part (`output_text` for the assistant's, else `input_text`) and a `status`.
fn as_listed(mut item: Value) -> Value {
    let Value::Object(fields) = &mut item else {
        return item;
    };
    if fields.get("type").is_some_and(|t| t != "message") {
        return item;
    }
    if let Some(Value::String(text)) = fields.get("content") {
        let kind = if fields.get("role").is_some_and(|r| r == "assistant") {
            "output_text"
        } else {
            "input_text"
        };
        let part = serde_json::json!([{"type": kind, "text": text}]);
        fields.insert("content".into(), part);
    }
    fields
        .entry("status")
        .or_insert_with(|| Value::from("completed"));
    item
}

/// Metadata as stored: a checked JSON object (`{}` when none).
fn metadata_json(metadata: Option<Map<String, Value>>) -> Result<Box<RawValue>, ApiError> {
    let metadata = match request::metadata(metadata)? {
        Value::Null => Value::Object(Map::new()),
        checked => checked,
    };
    Ok(serde_json::value::to_raw_value(&metadata).expect("a JSON value serializes"))
}

/// The HTTP answer to a refusal of a conversation call.
fn refused(status: tonic::Status) -> ApiError {
    ApiError::from_code(status.code(), status.message())
}

/// Makes `call` on the replica that keeps its conversation: its JSON answer.
pub async fn call(
    dispatcher: &Dispatcher,
    tenant: Option<&str>,
    headers: &HeaderMap,
    call: v1::ConversationCall,
) -> Result<String, ApiError> {
    let id = call.conversation_id.clone();
    match dispatcher.responses.get_conversation(&id, tenant) {
        Lookup::Elsewhere(owner) => peers::call_conversation(dispatcher, &owner, call, headers)
            .await
            .map_err(|e| e.into_api_error_about(&format!("conversation {id:?}")))?
            .map_err(refused),
        Lookup::Found(_) | Lookup::Missing => {
            conversation::answer(&dispatcher.responses, tenant, call).map_err(refused)
        }
    }
}

/// Answers `call` over HTTP.
async fn answer(
    dispatcher: &Dispatcher,
    tenant: &Option<Extension<Tenant>>,
    headers: &HeaderMap,
    call: v1::ConversationCall,
) -> Response {
    match self::call(dispatcher, tenant_of(tenant).as_deref(), headers, call).await {
        Ok(body) => super::responses::json_response(body),
        Err(error) => error.into_response(),
    }
}

fn on(id: String, call: Call) -> v1::ConversationCall {
    v1::ConversationCall {
        conversation_id: id,
        call: Some(call),
    }
}

/// `POST /v1/conversations`: a new conversation, kept by this replica.
pub async fn create(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match make(&dispatcher, tenant_of(&tenant), &headers, body).await {
        Ok(object) => Json(object).into_response(),
        Err(error) => error.into_response(),
    }
}

async fn make(
    dispatcher: &Dispatcher,
    tenant: Option<String>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ApiError> {
    let mut body: ConversationBody = body_of(body, true)?;
    if let Some(items) = body.items.as_mut() {
        references::resolve(items, "items", dispatcher, tenant.as_deref(), headers).await?;
    }
    let store = &dispatcher.responses;
    if store.limits().max_bytes == 0 {
        return Err(ApiError::from_code(
            Code::FailedPrecondition,
            "this router keeps no conversations: its --response-store-bytes is 0",
        ));
    }
    let metadata = metadata_json(body.metadata)?;
    let id = store.new_conversation_id();
    let items = items_to_add(body.items.unwrap_or_default(), "items", &id)?;
    let items = items
        .into_iter()
        .map(|text| {
            let json = RawValue::from_string(text).expect("made as JSON");
            let id = conversation::item_id(&json).unwrap_or_default().to_string();
            store.item(id, json)
        })
        .collect();
    let made = store.conversation(id, tenant, handlers::unix_now(), metadata, items);
    let object = made.object();
    if !store.put_conversation(made) {
        return Err(ApiError::invalid(
            "items",
            "are larger than the whole response store (--response-store-bytes)",
        ));
    }
    Ok(object)
}

/// `GET /v1/conversations/{id}`.
pub async fn get(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let call = on(id, Call::Get(v1::ConversationWhole {}));
    answer(&dispatcher, &tenant, &headers, call).await
}

/// `POST /v1/conversations/{id}`: replaces its metadata.
pub async fn update(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let metadata = body_of::<ConversationBody>(body, false).and_then(|body| {
        if body.items.is_some() {
            return Err(ApiError::invalid(
                "items",
                "are added at POST /v1/conversations/{id}/items",
            ));
        }
        let Some(metadata) = body.metadata else {
            return Err(ApiError::invalid("metadata", "is required"));
        };
        metadata_json(Some(metadata))
    });
    match metadata {
        Ok(metadata) => {
            let call = on(id, Call::UpdateMetadataJson(metadata.get().to_string()));
            answer(&dispatcher, &tenant, &headers, call).await
        }
        Err(error) => error.into_response(),
    }
}

/// `DELETE /v1/conversations/{id}`.
pub async fn delete(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let call = on(id, Call::Delete(v1::ConversationWhole {}));
    answer(&dispatcher, &tenant, &headers, call).await
}

/// `GET /v1/conversations/{id}/items`: newest first by default, 20 at a time.
pub async fn list_items(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(paging): Query<Paging>,
) -> Response {
    let page = match page_of(&paging, true) {
        Ok(page) => page,
        Err(error) => return error.into_response(),
    };
    let call = on(
        id,
        Call::ListItems(v1::ItemsPage {
            after: page.after,
            limit: page.limit as u32,
            newest_first: page.newest_first,
        }),
    );
    match self::call(&dispatcher, tenant_of(&tenant).as_deref(), &headers, call).await {
        Ok(body) => super::responses::json_response(body),
        // The one argument only the keeping replica can check: which items there are.
        Err(error) if error.status == axum::http::StatusCode::BAD_REQUEST => ApiError {
            param: Some("after".into()),
            ..error
        }
        .into_response(),
        Err(error) => error.into_response(),
    }
}

/// `POST /v1/conversations/{id}/items`: adds up to 20 items.
pub async fn add_items(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let items = match body_of::<ItemsBody>(body, false) {
        Ok(ItemsBody {
            items: Some(mut items),
        }) if !items.is_empty() => {
            let tenant = tenant_of(&tenant);
            references::resolve(
                &mut items,
                "items",
                &dispatcher,
                tenant.as_deref(),
                &headers,
            )
            .await
            .and_then(|()| items_to_add(items, "items", &id))
        }
        Ok(_) => Err(ApiError::invalid("items", "must list at least one item")),
        Err(error) => Err(error),
    };
    match items {
        Ok(items_json) => {
            let call = on(id, Call::AddItems(v1::AddedItems { items_json }));
            answer(&dispatcher, &tenant, &headers, call).await
        }
        Err(error) => error.into_response(),
    }
}

/// `GET /v1/conversations/{id}/items/{item_id}`.
pub async fn get_item(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path((id, item)): Path<(String, String)>,
) -> Response {
    answer(&dispatcher, &tenant, &headers, on(id, Call::GetItem(item))).await
}

/// `DELETE /v1/conversations/{id}/items/{item_id}`: answers the conversation.
pub async fn delete_item(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path((id, item)): Path<(String, String)>,
) -> Response {
    answer(
        &dispatcher,
        &tenant,
        &headers,
        on(id, Call::DeleteItem(item)),
    )
    .await
}

/// The messages of conversation `id` a response goes on from.
pub async fn history(
    dispatcher: &Dispatcher,
    id: &str,
    tenant: Option<&str>,
    headers: &HeaderMap,
) -> Result<Vec<v1::ChatMessage>, ApiError> {
    let call = on(id.to_string(), Call::History(v1::ConversationWhole {}));
    let body = self::call(dispatcher, tenant, headers, call)
        .await
        .map_err(|error| ApiError {
            param: Some("conversation".into()),
            ..error
        })?;
    let items: Vec<Value> = serde_json::from_str(&body).map_err(|e| {
        ApiError::from_code(
            Code::Internal,
            &format!("conversation {id:?}: its items are not JSON: {e}"),
        )
    })?;
    request::conversation_messages(&items)
}

/// Adds what a response took and gave (its input items and output items, JSON) to
/// conversation `id`.
pub async fn add_turn(
    dispatcher: &Dispatcher,
    id: &str,
    tenant: Option<&str>,
    headers: &HeaderMap,
    items_json: Vec<String>,
) -> Result<(), ApiError> {
    let call = on(
        id.to_string(),
        Call::AddItems(v1::AddedItems { items_json }),
    );
    self::call(dispatcher, tenant, headers, call)
        .await
        .map(drop)
}
