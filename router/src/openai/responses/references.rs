//! `item_reference` items (`{"type": "item_reference", "id": "…"}`) in a response's `input` or
//! in items added to a conversation: each is replaced by the item it names before the request
//! is read, as if the client had sent the item itself.
//!
//! The items found are those the cluster keeps: the input and output items of stored responses
//! and the items of stored conversations. Their ids name their holder (see
//! [`crate::response_store::item_ids`]), so any replica finds one by asking the replica that
//! keeps its holder, with the client's own key. An id that names nothing kept — a client's
//! own, an item of a response made with `store: false`, or one gone with its holder — is a
//! 404 naming the reference.

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::HeaderMap;
use serde_json::Value;
use switchyard_proto::v1::conversation_call::Call;

use super::super::conversations;
use super::super::error::ApiError;
use super::stored;
use crate::dispatch::Dispatcher;
use crate::response_store::{StoredResponse, conversation, item_ids};

/// Replaces every `item_reference` in `items` (named `field` in the request: `input`,
/// `items`) with the item it names.
pub async fn resolve(
    items: &mut [Value],
    field: &str,
    dispatcher: &Dispatcher,
    tenant: Option<&str>,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    // Each stored response read once, however many of its items are named.
    let mut responses: HashMap<String, Arc<StoredResponse>> = HashMap::new();
    for (i, item) in items.iter_mut().enumerate() {
        if item.get("type").and_then(Value::as_str) != Some("item_reference") {
            continue;
        }
        let field = format!("{field}[{i}].id");
        let Some(id) = item.get("id").and_then(Value::as_str).map(str::to_string) else {
            return Err(ApiError::invalid(
                field,
                "is required: the id of the item to put here",
            ));
        };
        let found = match item_ids::holder_of(&id) {
            Some(holder) if holder.starts_with("conv_") => {
                in_conversation(dispatcher, &holder, &id, tenant, headers).await
            }
            Some(holder) => {
                let response = match responses.get(&holder) {
                    Some(response) => Some(response.clone()),
                    None => stored::find(dispatcher, &holder, tenant, headers).await?,
                };
                let found = response.as_ref().and_then(|r| in_response(r, &id));
                if let Some(response) = response {
                    if response.running {
                        return Err(ApiError::invalid(
                            field,
                            format!(
                                "item {id:?} is one of background response {holder:?}, still \
                                 running: refer to it once the response has ended"
                            ),
                        ));
                    }
                    responses.insert(holder, response);
                }
                Ok(found)
            }
            None => Ok(None),
        };
        *item = found
            .map_err(|e| ApiError {
                param: Some(field.clone()),
                ..e
            })?
            .ok_or_else(|| not_found(&field, &id))?;
    }
    Ok(())
}

fn not_found(field: &str, id: &str) -> ApiError {
    ApiError::not_found(
        Some(field),
        format!(
            "{field}: item {id:?} is not kept: a reference names an item of a stored response \
             or conversation (as their ids name them), and those are kept for a limited time, \
             for the API key that made them; send the item itself instead"
        ),
    )
}

/// Item `id` of stored response `response`: one of its input items, or of its output.
fn in_response(response: &StoredResponse, id: &str) -> Option<Value> {
    if let Some(item) = response
        .input_items
        .iter()
        .find(|item| conversation::item_id(item) == Some(id))
    {
        return serde_json::from_str(item.get()).ok();
    }
    let mut object: Value = serde_json::from_str(&response.object).ok()?;
    let Value::Array(output) = object.get_mut("output")?.take() else {
        return None;
    };
    output
        .into_iter()
        .find(|item| item.get("id").and_then(Value::as_str) == Some(id))
}

/// Item `id` of stored conversation `conversation`, wherever it is kept.
async fn in_conversation(
    dispatcher: &Dispatcher,
    conversation: &str,
    id: &str,
    tenant: Option<&str>,
    headers: &HeaderMap,
) -> Result<Option<Value>, ApiError> {
    let call = switchyard_proto::v1::ConversationCall {
        conversation_id: conversation.to_string(),
        call: Some(Call::GetItem(id.to_string())),
    };
    match conversations::call(dispatcher, tenant, headers, call).await {
        Ok(item) => Ok(serde_json::from_str(&item).ok()),
        Err(error) if error.status == axum::http::StatusCode::NOT_FOUND => Ok(None),
        Err(error) => Err(error),
    }
}
