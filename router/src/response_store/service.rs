//! The `StoredResponses` gRPC service: this replica's stored responses and conversations, for
//! the other replicas (and gRPC clients), under the same API keys as `Inference`.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt as _};

use switchyard_proto::v1;
use tonic::{Request, Response, Status};

use super::{Lookup, ResponseStore, chat, conversation, events, peers};
use crate::auth::Tenant;

pub struct StoredResponsesService {
    store: Arc<ResponseStore>,
    /// Where the Files and Batches API calls go; without it they are UNIMPLEMENTED.
    dispatcher: Option<Arc<crate::dispatch::Dispatcher>>,
}

impl StoredResponsesService {
    pub fn new(store: Arc<ResponseStore>) -> Self {
        Self {
            store,
            dispatcher: None,
        }
    }

    /// The service of `dispatcher`'s replica: its stored responses, files and batches.
    pub fn of(dispatcher: Arc<crate::dispatch::Dispatcher>) -> Self {
        Self {
            store: dispatcher.responses.clone(),
            dispatcher: Some(dispatcher),
        }
    }
}

fn tenant_of<T>(request: &Request<T>) -> Option<String> {
    request.extensions().get::<Tenant>().map(|t| t.0.clone())
}

fn not_kept(id: &str) -> Status {
    Status::not_found(format!(
        "response {id:?} is not kept by this router replica (expired, deleted, another API \
         key's, or never stored)"
    ))
}

#[tonic::async_trait]
impl v1::stored_responses_server::StoredResponses for StoredResponsesService {
    type FollowEventsStream =
        Pin<Box<dyn Stream<Item = Result<v1::ResponseStreamEvent, Status>> + Send + 'static>>;

    async fn get_items(
        &self,
        request: Request<v1::GetItemsRequest>,
    ) -> Result<Response<v1::GetItemsResponse>, Status> {
        let tenant = tenant_of(&request);
        let ids = request.into_inner().ids;
        // Only what this replica keeps: a replica never asks on another's behalf.
        let items = self
            .store
            .find_items(&ids, tenant.as_deref())?
            .into_iter()
            .map(|(id, item_json)| v1::KeptItem { id, item_json })
            .collect();
        Ok(Response::new(v1::GetItemsResponse { items }))
    }

    async fn follow_events(
        &self,
        request: Request<v1::FollowEventsRequest>,
    ) -> Result<Response<Self::FollowEventsStream>, Status> {
        let tenant = tenant_of(&request);
        let v1::FollowEventsRequest { id, starting_after } = request.into_inner();
        // Only what this replica keeps: a replica never asks on another's behalf.
        let log = match self.store.events_of(&id, tenant.as_deref()) {
            Lookup::Found(log) => events::followable(&id, log)?,
            Lookup::Missing | Lookup::Elsewhere(_) => return Err(not_kept(&id)),
        };
        let events = log
            .follow(starting_after)
            .map_err(|past| Status::out_of_range(past.to_string()))?;
        Ok(Response::new(Box::pin(
            events.map(|sse| Ok(v1::ResponseStreamEvent { sse })),
        )))
    }

    async fn get(
        &self,
        request: Request<v1::StoredResponseRequest>,
    ) -> Result<Response<v1::StoredResponse>, Status> {
        let tenant = tenant_of(&request);
        let id = request.into_inner().id;
        // Only what this replica keeps: a replica never asks on another's behalf.
        match self.store.get(&id, tenant.as_deref()) {
            Lookup::Found(response) => Ok(Response::new(peers::to_proto(&response))),
            Lookup::Missing | Lookup::Elsewhere(_) => Err(not_kept(&id)),
        }
    }

    async fn delete(
        &self,
        request: Request<v1::StoredResponseRequest>,
    ) -> Result<Response<v1::DeleteStoredResponseResponse>, Status> {
        let tenant = tenant_of(&request);
        let id = request.into_inner().id;
        Ok(Response::new(v1::DeleteStoredResponseResponse {
            deleted: self.store.delete(&id, tenant.as_deref()),
        }))
    }

    async fn cancel(
        &self,
        request: Request<v1::StoredResponseRequest>,
    ) -> Result<Response<v1::StoredResponse>, Status> {
        let tenant = tenant_of(&request);
        let id = request.into_inner().id;
        let object_json = self.store.cancel(&id, tenant.as_deref()).await?;
        Ok(Response::new(v1::StoredResponse {
            id,
            object_json,
            ..Default::default()
        }))
    }

    async fn update_chat_completion(
        &self,
        request: Request<v1::UpdateChatCompletionRequest>,
    ) -> Result<Response<v1::StoredResponse>, Status> {
        let tenant = tenant_of(&request);
        let v1::UpdateChatCompletionRequest { id, metadata_json } = request.into_inner();
        // Checked where it is kept, whoever sends it.
        let metadata = serde_json::from_str(&metadata_json)
            .ok()
            .and_then(|m| match m {
                serde_json::Value::Object(m) => Some(m),
                _ => None,
            })
            .ok_or_else(|| Status::invalid_argument("metadata_json: must be a JSON object"))
            .and_then(|m| {
                crate::openai::check_metadata(Some(m))
                    .map_err(|e| Status::invalid_argument(e.message))
            })?;
        let object_json = self
            .store
            .update_chat_metadata(&id, tenant.as_deref(), metadata)
            .ok_or_else(|| not_kept(&id))?;
        Ok(Response::new(v1::StoredResponse {
            id,
            object_json,
            ..Default::default()
        }))
    }

    async fn call_batches(
        &self,
        request: Request<v1::BatchCall>,
    ) -> Result<Response<v1::BatchAnswer>, Status> {
        let Some(dispatcher) = &self.dispatcher else {
            return Err(Status::unimplemented(
                "this service keeps no files or batches",
            ));
        };
        let tenant = tenant_of(&request);
        let call = request
            .into_inner()
            .call
            .ok_or_else(|| Status::invalid_argument("call: say which call to make"))?;
        // Only what this replica keeps: a replica never asks on another's behalf.
        crate::batches::calls::answer(dispatcher, tenant.as_deref(), call).map(Response::new)
    }

    async fn list_chat_completions(
        &self,
        request: Request<v1::ListChatCompletionsRequest>,
    ) -> Result<Response<v1::ListChatCompletionsResponse>, Status> {
        let tenant = tenant_of(&request);
        let listing = chat::listing_from_proto(request.into_inner());
        let completions = self
            .store
            .list_chat_completions(tenant.as_deref(), &listing)
            .into_iter()
            .map(|(cursor, object)| chat::listed_to_proto(cursor, &object))
            .collect();
        Ok(Response::new(v1::ListChatCompletionsResponse {
            completions,
        }))
    }

    async fn call_conversation(
        &self,
        request: Request<v1::ConversationCall>,
    ) -> Result<Response<v1::ConversationAnswer>, Status> {
        let tenant = tenant_of(&request);
        let call = request.into_inner();
        // Items are checked where they are kept, whoever sends them: a gRPC client as the HTTP
        // door is, and another replica relaying what its door checked.
        if let Some(v1::conversation_call::Call::AddItems(added)) = &call.call {
            crate::openai::check_added_items(&added.items_json)
                .map_err(|e| Status::invalid_argument(e.message))?;
        }
        // Only what this replica keeps: a replica never asks on another's behalf.
        let body_json = conversation::answer(&self.store, tenant.as_deref(), call)?;
        Ok(Response::new(v1::ConversationAnswer { body_json }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response_store::StoreLimits;
    use v1::stored_responses_server::StoredResponses as _;

    #[tokio::test]
    async fn items_a_grpc_caller_adds_are_checked_as_the_http_doors_are() {
        let store = Arc::new(ResponseStore::new(StoreLimits::default()));
        let conversation = store.conversation(
            store.new_conversation_id(),
            None,
            0,
            serde_json::value::RawValue::from_string("{}".into()).expect("JSON"),
            Vec::new(),
        );
        let id = conversation.id.clone();
        assert!(store.put_conversation(conversation));
        let service = StoredResponsesService::new(store);
        let add = |items: &[&str]| {
            Request::new(v1::ConversationCall {
                conversation_id: id.clone(),
                call: Some(v1::conversation_call::Call::AddItems(v1::AddedItems {
                    items_json: items.iter().map(|i| i.to_string()).collect(),
                })),
            })
        };
        for (bad, why) in [
            (r#"{"id":"msg_1","role":"wizard","content":"hi"}"#, "role"),
            (r#"{"id":"msg_1","type":"item_reference"}"#, "type"),
            (r#"{"role":"user","content":"hi"}"#, "items_json[0].id"),
            ("not json", "is not JSON"),
        ] {
            let refused = service.call_conversation(add(&[bad])).await.unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(refused.message().contains(why), "{bad}: {refused:?}");
        }
        let added = service
            .call_conversation(add(&[r#"{"id":"msg_1","role":"user","content":"hi"}"#]))
            .await
            .expect("a good item is added");
        assert!(added.into_inner().body_json.contains("msg_1"));
    }
}
