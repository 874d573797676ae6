//! `item_reference` items (`{"type": "item_reference", "id": "…"}`) in a response's `input` or
//! in items added to a conversation: each is replaced by the item it names before the request
//! is read, as if the client had sent the item itself.
//!
//! The items found are those the cluster keeps: the input and output items of stored responses
//! and the items of stored conversations. Their ids name their holder (see
//! [`crate::response_store::item_ids`]), whose id names the replica that keeps it: the items a
//! request names are asked of each such replica at once (`StoredResponses.GetItems`, with the
//! client's own key), only the items travelling. An id that names nothing kept — a client's
//! own, an item of a response made with `store: false`, or one gone with its holder — is a 404
//! naming the reference.

use std::collections::HashMap;

use axum::http::HeaderMap;
use serde_json::Value;

use super::super::error::ApiError;
use crate::dispatch::Dispatcher;
use crate::response_store::{item_ids, owner_of, peers};

/// Replaces every `item_reference` in `items` (named `field` in the request: `input`,
/// `items`) with the item it names.
pub async fn resolve(
    items: &mut [Value],
    field: &str,
    dispatcher: &Dispatcher,
    tenant: Option<&str>,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    // The references, by the replica keeping what they name.
    let mut wanted: HashMap<String, Vec<String>> = HashMap::new();
    let mut references = Vec::new();
    for (i, item) in items.iter().enumerate() {
        if item.get("type").and_then(Value::as_str) != Some("item_reference") {
            continue;
        }
        let Some(id) = item.get("id").and_then(Value::as_str) else {
            return Err(ApiError::invalid(
                format!("{field}[{i}].id"),
                "is required: the id of the item to put here",
            ));
        };
        let owner = item_ids::holder_of(id)
            .and_then(|holder| owner_of(&holder).map(str::to_string))
            .ok_or_else(|| not_found(&format!("{field}[{i}].id"), id))?;
        wanted.entry(owner).or_default().push(id.to_string());
        references.push((i, id.to_string()));
    }
    if references.is_empty() {
        return Ok(());
    }
    let store = &dispatcher.responses;
    let mut found: HashMap<String, String> = HashMap::new();
    for (owner, ids) in wanted {
        let answer = if store.tags().contains(&owner) {
            store.find_items(&ids, tenant)
        } else {
            peers::get_items(dispatcher, &owner, ids, headers)
                .await
                .map_err(|e| ApiError {
                    param: Some(field.to_string()),
                    ..e.into_api_error_about("a referenced item")
                })?
        };
        let items = answer
            .map_err(|status| ApiError::invalid(field.to_string(), status.message().to_string()))?;
        found.extend(items);
    }
    for (i, id) in references {
        let item = found
            .get(&id)
            .and_then(|text| serde_json::from_str(text).ok())
            .ok_or_else(|| not_found(&format!("{field}[{i}].id"), &id))?;
        items[i] = item;
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
