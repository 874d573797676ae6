//! Stored responses over HTTP: `GET /v1/responses/{id}`, `DELETE /v1/responses/{id}` and
//! `GET /v1/responses/{id}/input_items`, and the conversation a request with
//! `previous_response_id` goes on from. A response another router replica stored is asked of
//! that replica (see [`crate::response_store::peers`]).

use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse as _, Response};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::super::error::ApiError;
use crate::auth::Tenant;
use crate::dispatch::Dispatcher;
use crate::openai::stream::event_stream;
use crate::response_store::{
    Lookup, StoredMessage, StoredResponse, conversation, events, is_response_id, peers,
};
use futures::StreamExt as _;

/// The stored-response routes.
pub const RESPONSE_ROUTE: &str = "/v1/responses/{id}";
pub const INPUT_ITEMS_ROUTE: &str = "/v1/responses/{id}/input_items";
pub const CANCEL_ROUTE: &str = "/v1/responses/{id}/cancel";

/// Why a response id finds nothing, for the client to act on.
const NOT_STORED: &str = "is not stored here: responses are kept for a limited time and size \
     (the router's --response-store-max-age and --response-store-bytes), only for the API key \
     that made them, and not at all with store: false; send the whole conversation in input";

/// A stored response, wherever in the cluster it is kept; `None` when it is not.
async fn find(
    dispatcher: &Dispatcher,
    id: &str,
    tenant: Option<&str>,
    headers: &HeaderMap,
) -> Result<Option<Arc<StoredResponse>>, ApiError> {
    if !is_response_id(id) {
        return Ok(None);
    }
    peers::find(dispatcher, id, tenant, headers)
        .await
        .map_err(|e| e.into_api_error(id))
}

/// The conversation of stored response `id` (a request's `previous_response_id`).
pub async fn conversation_of(
    dispatcher: &Dispatcher,
    id: &str,
    tenant: Option<&str>,
    headers: &HeaderMap,
) -> Result<Vec<Arc<StoredMessage>>, ApiError> {
    match find(dispatcher, id, tenant, headers).await {
        Ok(Some(response)) if response.running => Err(ApiError::invalid(
            "previous_response_id",
            format!(
                "response {id:?} is a background response still running: go on from it once \
                 it has ended (poll GET /v1/responses/{{id}} until its status is no longer \
                 in_progress)"
            ),
        )),
        Ok(Some(response)) => Ok(response.conversation.clone()),
        Ok(None) => Err(previous_not_found(id)),
        Err(error) => Err(ApiError {
            param: Some("previous_response_id".into()),
            ..error
        }),
    }
}

fn previous_not_found(id: &str) -> ApiError {
    let mut error = ApiError::not_found(
        Some("previous_response_id"),
        format!("previous_response_id: response {id:?} {NOT_STORED}"),
    );
    error.code = Some("previous_response_not_found");
    error
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(None, format!("response {id:?} {NOT_STORED}"))
}

fn tenant_of(tenant: &Option<Extension<Tenant>>) -> Option<&str> {
    tenant.as_ref().map(|t| t.0.0.as_str())
}

/// `GET /v1/responses/{id}`'s query: `stream=true` follows a streamed background response's
/// events (after `starting_after`) instead of answering the object.
#[derive(Debug, Deserialize)]
pub struct Retrieve {
    stream: Option<String>,
    starting_after: Option<String>,
}

impl Retrieve {
    /// `Some(starting_after)` when the events are asked for.
    fn events(&self) -> Result<Option<Option<u64>>, ApiError> {
        let stream = match self.stream.as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(ApiError::invalid(
                    "stream",
                    format!("is {other:?}, must be true or false"),
                ));
            }
        };
        let starting_after = match self.starting_after.as_deref() {
            None => None,
            Some(text) => Some(text.parse::<u64>().map_err(|_| {
                ApiError::invalid(
                    "starting_after",
                    format!("is {text:?}, must be an event's sequence_number (a whole number)"),
                )
            })?),
        };
        match (stream, starting_after) {
            (false, Some(_)) => Err(ApiError::invalid(
                "starting_after",
                "resumes a stream: send it with stream=true",
            )),
            (false, None) => Ok(None),
            (true, after) => Ok(Some(after)),
        }
    }
}

/// `GET /v1/responses/{id}`: the response object as it was answered (as it stands, for a
/// background response running), or with `stream=true` its events.
pub async fn get(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(retrieve): Query<Retrieve>,
) -> Response {
    let asked = match retrieve.events() {
        Ok(asked) => asked,
        Err(error) => return error.into_response(),
    };
    if let Some(starting_after) = asked {
        return follow(
            &dispatcher,
            &id,
            tenant_of(&tenant),
            starting_after,
            &headers,
        )
        .await
        .unwrap_or_else(|error| error.into_response());
    }
    match find(&dispatcher, &id, tenant_of(&tenant), &headers).await {
        Ok(Some(response)) => super::json_response(response.object.clone()),
        Ok(None) => not_found(&id).into_response(),
        Err(error) => error.into_response(),
    }
}

/// The events of streamed background response `id` after `starting_after`, as a stream,
/// wherever in the cluster it ran.
async fn follow(
    dispatcher: &Dispatcher,
    id: &str,
    tenant: Option<&str>,
    starting_after: Option<u64>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let refused = |status: tonic::Status| match status.code() {
        tonic::Code::NotFound => not_found(id),
        tonic::Code::OutOfRange => ApiError::invalid("starting_after", status.message()),
        tonic::Code::FailedPrecondition => ApiError::invalid("stream", status.message()),
        code => ApiError::from_code(code, status.message()),
    };
    if !is_response_id(id) {
        return Err(not_found(id));
    }
    match dispatcher.responses.events_of(id, tenant) {
        Lookup::Found(log) => {
            let log = events::followable(id, log).map_err(refused)?;
            let events = log
                .follow(starting_after)
                .map_err(|past| ApiError::invalid("starting_after", past.to_string()))?;
            Ok(event_stream(events))
        }
        Lookup::Missing => Err(not_found(id)),
        Lookup::Elsewhere(owner) => {
            match peers::follow_events(dispatcher, &owner, id, starting_after, headers).await {
                // A relay that breaks (its replica stopped) ends the stream: the client
                // resumes after the last event it got, or reads the response whole.
                Ok(Ok(events)) => Ok(event_stream(
                    events
                        .take_while(|event| std::future::ready(event.is_ok()))
                        .filter_map(|event| std::future::ready(event.ok().map(|e| e.sse))),
                )),
                Ok(Err(status)) => Err(refused(status)),
                Err(error) => Err(error.into_api_error(id)),
            }
        }
    }
}

/// `DELETE /v1/responses/{id}`.
pub async fn delete(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let tenant = tenant_of(&tenant);
    if let Lookup::Found(running) = dispatcher.responses.get(&id, tenant)
        && running.running
    {
        return ApiError::invalid(
            "id",
            format!(
                "response {id:?} is a background response still running: cancel it \
                 (POST /v1/responses/{{id}}/cancel), then delete it"
            ),
        )
        .into_response();
    }
    let deleted = match is_response_id(&id) {
        true => peers::delete_anywhere(&dispatcher, &id, tenant, &headers)
            .await
            .map_err(|e| e.into_api_error(&id)),
        false => Ok(false),
    };
    match deleted {
        Ok(true) => Json(json!({"id": id, "object": "response", "deleted": true})).into_response(),
        Ok(false) => not_found(&id).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `POST /v1/responses/{id}/cancel`: stops a background response; answers the response as
/// it was stored (one that has ended already: as it is).
pub async fn cancel(
    State(dispatcher): State<Arc<Dispatcher>>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let tenant = tenant_of(&tenant);
    if !is_response_id(&id) {
        return not_found(&id).into_response();
    }
    let answer = match crate::response_store::owner_of(&id) {
        Some(owner) if !dispatcher.responses.tags().iter().any(|t| t == owner) => {
            match peers::cancel(&dispatcher, owner, &id, &headers).await {
                Ok(answer) => answer,
                Err(error) => return error.into_api_error(&id).into_response(),
            }
        }
        _ => dispatcher.responses.cancel(&id, tenant).await,
    };
    match answer {
        Ok(object) => super::json_response(object),
        Err(status) if status.code() == tonic::Code::NotFound => not_found(&id).into_response(),
        Err(status) => ApiError::from_code(status.code(), status.message()).into_response(),
    }
}

/// A list's paging, as OpenAI's: 20 at a time by default.
#[derive(Debug, Default, Deserialize)]
pub struct Paging {
    pub after: Option<String>,
    pub limit: Option<String>,
    pub order: Option<String>,
}

/// `GET /v1/responses/{id}/input_items`: the items the request that made it sent.
pub async fn input_items(
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
    match find(&dispatcher, &id, tenant_of(&tenant), &headers).await {
        Ok(Some(response)) => match page.of(&response.input_items) {
            Ok(body) => Json(body).into_response(),
            Err(error) => error.into_response(),
        },
        Ok(None) => not_found(&id).into_response(),
        Err(error) => error.into_response(),
    }
}

#[derive(Debug, PartialEq)]
pub struct Page {
    pub after: Option<String>,
    pub limit: usize,
    pub newest_first: bool,
}

/// The page `paging` asks for; without an `order`, newest first when `newest_first_by_default`
/// (OpenAI's lists differ).
pub fn page_of(paging: &Paging, newest_first_by_default: bool) -> Result<Page, ApiError> {
    let limit = match paging.limit.as_deref() {
        None => 20,
        Some(text) => match text.parse::<usize>() {
            Ok(n @ 1..=100) => n,
            _ => {
                return Err(ApiError::invalid(
                    "limit",
                    format!("is {text:?}, must be a whole number from 1 to 100"),
                ));
            }
        },
    };
    let newest_first = match paging.order.as_deref() {
        None => newest_first_by_default,
        Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(ApiError::invalid(
                "order",
                format!("is {other:?}, must be \"asc\" or \"desc\""),
            ));
        }
    };
    Ok(Page {
        after: paging.after.clone(),
        limit,
        newest_first,
    })
}

impl Page {
    /// The list object of this page of `items` (stored oldest first, as JSON text).
    fn of(&self, items: &[Box<RawValue>]) -> Result<Value, ApiError> {
        let items: Vec<&RawValue> = items.iter().map(AsRef::as_ref).collect();
        conversation::page(&items, self.after.as_deref(), self.limit, self.newest_first)
            .map_err(|(field, why)| ApiError::invalid(field, why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paging(after: Option<&str>, limit: Option<&str>, order: Option<&str>) -> Paging {
        Paging {
            after: after.map(Into::into),
            limit: limit.map(Into::into),
            order: order.map(Into::into),
        }
    }

    fn items(n: usize) -> Vec<Box<RawValue>> {
        (0..n)
            .map(|i| serde_json::value::to_raw_value(&json!({"id": format!("msg_{i}")})).unwrap())
            .collect()
    }

    fn ids(list: &Value) -> Vec<&str> {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn input_items_page_newest_first_by_default() {
        let page = page_of(&paging(None, Some("2"), None), true).unwrap();
        let list = page.of(&items(3)).unwrap();
        assert_eq!(ids(&list), ["msg_2", "msg_1"]);
        assert_eq!(list["has_more"], true);
        assert_eq!(list["first_id"], "msg_2");
        assert_eq!(list["last_id"], "msg_1");
        let next = page_of(&paging(Some("msg_1"), Some("2"), None), true).unwrap();
        let list = next.of(&items(3)).unwrap();
        assert_eq!(ids(&list), ["msg_0"]);
        assert_eq!(list["has_more"], false);
        let oldest = page_of(&paging(None, None, Some("asc")), true).unwrap();
        assert_eq!(
            ids(&oldest.of(&items(3)).unwrap()),
            ["msg_0", "msg_1", "msg_2"]
        );
    }

    #[test]
    fn bad_paging_names_its_parameter() {
        for (paging, param) in [
            (paging(None, Some("0"), None), "limit"),
            (paging(None, Some("lots"), None), "limit"),
            (paging(None, None, Some("newest")), "order"),
        ] {
            assert_eq!(
                page_of(&paging, true).unwrap_err().param.as_deref(),
                Some(param)
            );
        }
        let unknown = page_of(&paging(Some("msg_9"), None, None), true).unwrap();
        assert_eq!(
            unknown.of(&items(2)).unwrap_err().param.as_deref(),
            Some("after")
        );
    }
}
