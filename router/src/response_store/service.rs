//! The `StoredResponses` gRPC service: this replica's stored responses and conversations, for
//! the other replicas (and gRPC clients), under the same API keys as `Inference`.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt as _};

use switchyard_proto::v1;
use tonic::{Request, Response, Status};

use super::{Lookup, ResponseStore, conversation, events, peers};
use crate::auth::Tenant;

pub struct StoredResponsesService {
    store: Arc<ResponseStore>,
}

impl StoredResponsesService {
    pub fn new(store: Arc<ResponseStore>) -> Self {
        Self { store }
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

    async fn call_conversation(
        &self,
        request: Request<v1::ConversationCall>,
    ) -> Result<Response<v1::ConversationAnswer>, Status> {
        let tenant = tenant_of(&request);
        // Only what this replica keeps: a replica never asks on another's behalf.
        let body_json = conversation::answer(&self.store, tenant.as_deref(), request.into_inner())?;
        Ok(Response::new(v1::ConversationAnswer { body_json }))
    }
}
