//! Asking the router replica that stored a response about it: the replica is found by the
//! owner tag its ids carry (it announces itself in the cluster registry under that tag, see
//! [`announce`]), and asked over its `StoredResponses` gRPC service with the client's own
//! `Authorization`, so it answers only what the client's key may read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::http::HeaderMap;
use switchyard_cluster::tls::ClientTls;
use switchyard_cluster::{Registry, RouterRecord};
use switchyard_proto::v1::{self, stored_responses_client::StoredResponsesClient};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{Lookup, ResponseStore, StoredResponse};
use crate::dispatch::Dispatcher;
use crate::openai::ApiError;

/// How long a replica waits for another to answer about a response.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// Lease of a router's announcement in the registry: a replica that stopped without
/// withdrawing it (killed) is found gone this long after.
pub const PRESENCE_TTL: Duration = Duration::from_secs(10);

/// Why another replica could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No replica with that tag is running: the one that stored the response has stopped
    /// (a restart starts a new tag), so its responses are gone.
    #[error("the router replica that stored it ({owner}) is no longer running")]
    Gone { owner: String },
    #[error("the router replica that stored it ({owner}) cannot be reached: {why}")]
    Unreachable { owner: String, why: String },
    /// The replica refused the client's credentials, or the registry is not there yet.
    #[error("{0}")]
    Refused(ApiError),
}

impl PeerError {
    /// The HTTP answer about response `id`.
    pub fn into_api_error(self, id: &str) -> ApiError {
        self.into_api_error_about(&format!("response {id:?}"))
    }

    /// The HTTP answer about `subject` (what was asked for, e.g. `conversation "conv_…"`).
    pub fn into_api_error_about(self, subject: &str) -> ApiError {
        match self {
            PeerError::Gone { .. } => {
                ApiError::not_found(None, format!("{subject} is not stored any more: {self}"))
            }
            PeerError::Unreachable { .. } => {
                ApiError::from_code(tonic::Code::Unavailable, &format!("{subject}: {self}"))
            }
            PeerError::Refused(error) => error,
        }
    }
}

/// The other replicas, as this one reaches them.
#[derive(Default)]
pub struct Peers {
    /// Set once the router has its registry.
    registry: OnceLock<Arc<dyn Registry>>,
    tls: OnceLock<ClientTls>,
    /// One channel per replica asked, by owner tag (a channel reconnects by itself).
    channels: Mutex<HashMap<String, Channel>>,
    /// This replica's gRPC address as the others dial it, and when it stops announcing.
    me: OnceLock<(String, CancellationToken)>,
    /// The mirror of this replica's responses to its standby: how to end it, and its task.
    mirror: Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
    /// Copies broken mirrors left here, by their sender's tag: how to drop each.
    orphans: Mutex<HashMap<String, CancellationToken>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("registry", &self.registry.get().map(|r| r.describe()))
            .finish_non_exhaustive()
    }
}

impl Peers {
    pub fn set_registry(&self, registry: Arc<dyn Registry>) {
        let _ = self.registry.set(registry);
    }

    pub fn set_tls(&self, tls: ClientTls) {
        let _ = self.tls.set(tls);
    }

    /// Where the other replicas reach this one, and the token that ends its announcements.
    pub fn set_self(&self, address: String, stop: CancellationToken) {
        let _ = self.me.set((address, stop));
    }

    pub fn registry(&self) -> Option<Arc<dyn Registry>> {
        self.registry.get().cloned()
    }

    /// Mirrors `dispatcher`'s stored responses to a standby replica until
    /// [`Self::stop_mirror`] or `stop` (routers with a cluster token only).
    pub fn start_mirror(&self, dispatcher: Arc<Dispatcher>, stop: &CancellationToken) {
        let Some((address, _)) = self.me.get() else {
            return;
        };
        let stop = stop.child_token();
        let task = tokio::spawn(super::mirror::run(
            dispatcher,
            address.clone(),
            stop.clone(),
        ));
        *self.mirror.lock().expect("mirror task") = Some((stop, task));
    }

    /// Ends the mirror cleanly (its standby drops the copy) and waits for it.
    pub async fn stop_mirror(&self) {
        let mirror = self.mirror.lock().expect("mirror task").take();
        if let Some((stop, task)) = mirror {
            stop.cancel();
            let _ = task.await;
        }
    }

    /// A copy a broken mirror from `source` left here: the token that drops it (replacing
    /// any copy it left before).
    pub fn begin_orphan(&self, source: &str) -> CancellationToken {
        let ended = CancellationToken::new();
        let before = self
            .orphans
            .lock()
            .expect("orphaned copies")
            .insert(source.to_string(), ended.clone());
        if let Some(before) = before {
            before.cancel();
        }
        ended
    }

    /// Drops the copy a broken mirror from `source` left here, if any.
    pub fn end_orphan(&self, source: &str) {
        if let Some(ended) = self.orphans.lock().expect("orphaned copies").remove(source) {
            ended.cancel();
        }
    }

    /// Announces `tag` (handed over by a stopping replica) at this replica's address, until
    /// this replica stops.
    pub fn announce_adopted(&self, tag: String) {
        let (Some(registry), Some((address, stop))) = (self.registry.get(), self.me.get()) else {
            return;
        };
        super::handover::announce(
            registry.clone(),
            RouterRecord {
                id: tag,
                grpc_address: address.clone(),
            },
            PRESENCE_TTL,
            stop.clone(),
        );
    }

    /// A channel to `peer` (checking it is a router, with TLS).
    pub fn channel_to(
        &self,
        peer: &RouterRecord,
    ) -> Result<Channel, Box<dyn std::error::Error + Send + Sync>> {
        Ok(switchyard_cluster::identity::dial(
            &peer.grpc_address,
            self.tls.get(),
            switchyard_cluster::identity::router_uri(),
        )?
        .connect_timeout(ASK_TIMEOUT)
        .connect_lazy())
    }

    async fn client(&self, owner: &str) -> Result<StoredResponsesClient<Channel>, PeerError> {
        if let Some(channel) = self.channels.lock().expect("peer channels").get(owner) {
            return Ok(StoredResponsesClient::new(channel.clone()));
        }
        let unreachable = |why: String| PeerError::Unreachable {
            owner: owner.to_string(),
            why,
        };
        let registry = self.registry.get().ok_or_else(|| {
            unreachable("this replica has not reached the cluster registry yet".into())
        })?;
        let record = registry
            .find_router(owner)
            .await
            .map_err(|e| unreachable(format!("the cluster registry did not answer: {e}")))?
            .ok_or_else(|| PeerError::Gone {
                owner: owner.to_string(),
            })?;
        // With TLS the peer must hold a router certificate: its pod IP is in none.
        let endpoint = switchyard_cluster::identity::dial(
            &record.grpc_address,
            self.tls.get(),
            switchyard_cluster::identity::router_uri(),
        )
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(ASK_TIMEOUT)
        .timeout(ASK_TIMEOUT);
        let channel = endpoint.connect_lazy();
        self.channels
            .lock()
            .expect("peer channels")
            .insert(owner.to_string(), channel.clone());
        Ok(StoredResponsesClient::new(channel))
    }

    /// Forgets the channel to `owner` (its address may have changed).
    fn forget(&self, owner: &str) {
        self.channels.lock().expect("peer channels").remove(owner);
    }
}

/// A request carrying the client's credentials.
fn ask<T>(message: T, headers: &HeaderMap) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = headers.get(crate::auth::AUTHORIZATION)
        && let Ok(value) = tonic::metadata::MetadataValue::try_from(value.as_bytes())
    {
        request
            .metadata_mut()
            .insert(crate::auth::AUTHORIZATION, value);
    }
    request
}

/// What an answer's status means here: `None` for "not kept there".
async fn failure(owner: &str, peers: &Peers, status: tonic::Status) -> Option<PeerError> {
    match status.code() {
        tonic::Code::NotFound => None,
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => Some(PeerError::Refused(
            ApiError::from_code(status.code(), status.message()),
        )),
        _ => {
            peers.forget(owner);
            // A replica that stopped a moment ago has withdrawn its announcement: its
            // responses are gone, which is not worth a retry.
            let gone = match peers.registry.get() {
                Some(registry) => matches!(registry.find_router(owner).await, Ok(None)),
                None => false,
            };
            Some(if gone {
                PeerError::Gone {
                    owner: owner.to_string(),
                }
            } else {
                PeerError::Unreachable {
                    owner: owner.to_string(),
                    why: format!("{}: {}", status.code(), status.message()),
                }
            })
        }
    }
}

/// Response `id` from replica `owner`; `None` when it keeps no such response for this client.
pub async fn fetch(
    dispatcher: &Dispatcher,
    owner: &str,
    id: &str,
    tenant: Option<&str>,
    headers: &HeaderMap,
) -> Result<Option<Arc<StoredResponse>>, PeerError> {
    let peers = &dispatcher.peers;
    let mut client = peers.client(owner).await?;
    let asked = ask(v1::StoredResponseRequest { id: id.into() }, headers);
    match client.get(asked).await {
        Ok(answer) => Ok(Some(Arc::new(from_proto(
            &dispatcher.responses,
            answer.into_inner(),
            owner,
            tenant,
        )?))),
        Err(status) => failure(owner, peers, status).await.map_or(Ok(None), Err),
    }
}

/// Stored response or chat completion `id` for `tenant`, wherever in the cluster it is kept
/// (asking its keeper with the client's credentials); `None` when it is not kept.
pub async fn find(
    dispatcher: &Dispatcher,
    id: &str,
    tenant: Option<&str>,
    headers: &HeaderMap,
) -> Result<Option<Arc<StoredResponse>>, PeerError> {
    match dispatcher.responses.get(id, tenant) {
        Lookup::Found(kept) => Ok(Some(kept)),
        Lookup::Missing => Ok(None),
        Lookup::Elsewhere(owner) => fetch(dispatcher, &owner, id, tenant, headers).await,
    }
}

/// Deletes stored response or chat completion `id` for `tenant`, wherever in the cluster it
/// is kept; whether it was kept.
pub async fn delete_anywhere(
    dispatcher: &Dispatcher,
    id: &str,
    tenant: Option<&str>,
    headers: &HeaderMap,
) -> Result<bool, PeerError> {
    match crate::response_store::owner_of(id) {
        Some(owner) if !dispatcher.responses.tags().iter().any(|t| t == owner) => {
            delete(dispatcher, owner, id, headers).await
        }
        _ => Ok(dispatcher.responses.delete(id, tenant)),
    }
}

/// Deletes response `id` on replica `owner`; whether it was kept there for this client.
pub async fn delete(
    dispatcher: &Dispatcher,
    owner: &str,
    id: &str,
    headers: &HeaderMap,
) -> Result<bool, PeerError> {
    let peers = &dispatcher.peers;
    let mut client = peers.client(owner).await?;
    let asked = ask(v1::StoredResponseRequest { id: id.into() }, headers);
    match client.delete(asked).await {
        Ok(answer) => Ok(answer.into_inner().deleted),
        Err(status) => failure(owner, peers, status).await.map_or(Ok(false), Err),
    }
}

/// What replica `owner` answered to a conversation `call`: its JSON body, or its refusal
/// (not kept there, a bad page, too large) as the status it sent.
pub async fn call_conversation(
    dispatcher: &Dispatcher,
    owner: &str,
    call: v1::ConversationCall,
    headers: &HeaderMap,
) -> Result<Result<String, tonic::Status>, PeerError> {
    let peers = &dispatcher.peers;
    let mut client = peers.client(owner).await?;
    match client.call_conversation(ask(call, headers)).await {
        Ok(answer) => Ok(Ok(answer.into_inner().body_json)),
        Err(status) => refused_or_failed(owner, peers, status).await,
    }
}

/// Replaces the metadata of chat completion `id` on replica `owner`: its object as it is now,
/// or the replica's refusal (NOT_FOUND: not kept there for this client).
pub async fn update_chat_completion(
    dispatcher: &Dispatcher,
    owner: &str,
    id: &str,
    metadata_json: String,
    headers: &HeaderMap,
) -> Result<Result<String, tonic::Status>, PeerError> {
    let peers = &dispatcher.peers;
    let mut client = peers.client(owner).await?;
    let asked = ask(
        v1::UpdateChatCompletionRequest {
            id: id.into(),
            metadata_json,
        },
        headers,
    );
    match client.update_chat_completion(asked).await {
        Ok(answer) => Ok(Ok(answer.into_inner().object_json)),
        Err(status) => refused_or_failed(owner, peers, status).await,
    }
}

/// What every other running replica keeps of the chat completions `listing` asks for (each
/// replica once, whatever tags it answers for). A replica that cannot be asked fails the
/// listing: a page missing some would look whole.
pub async fn list_chat_completions(
    dispatcher: &Dispatcher,
    listing: &super::chat::Listing,
    headers: &HeaderMap,
) -> Result<Vec<(super::chat::Cursor, Arc<str>)>, ApiError> {
    let request = super::chat::listing_to_proto(listing);
    ask_every_other(dispatcher, "list what it keeps", |mut client| {
        let request = ask(request.clone(), headers);
        async move {
            let answer = client.list_chat_completions(request).await?;
            Ok(answer
                .into_inner()
                .completions
                .into_iter()
                .filter_map(super::chat::listed_from_proto)
                .collect())
        }
    })
    .await
}

/// What every other running replica answers to a Files or Batches API listing `call`: the
/// objects it lists, each with its place.
pub async fn list_batch_objects(
    dispatcher: &Dispatcher,
    call: v1::BatchCall,
    headers: &HeaderMap,
) -> Result<Vec<v1::ListedObject>, ApiError> {
    ask_every_other(dispatcher, "list its files and batches", |mut client| {
        let request = ask(call.clone(), headers);
        async move { Ok(client.call_batches(request).await?.into_inner().listed) }
    })
    .await
}

/// Asks every other running replica (each once, whatever tags it answers for) with `call`,
/// and gathers their answers. A replica that cannot be asked fails the whole (`doing` says
/// what for): an answer missing some replica's part would look whole.
async fn ask_every_other<T, F, Fut>(
    dispatcher: &Dispatcher,
    doing: &str,
    call: F,
) -> Result<Vec<T>, ApiError>
where
    F: Fn(StoredResponsesClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<T>, tonic::Status>>,
{
    let peers = &dispatcher.peers;
    let Some(registry) = peers.registry.get() else {
        // Not in a cluster (yet): this replica's are all there are to know of.
        return Ok(Vec::new());
    };
    let routers = registry.list_routers().await.map_err(|e| {
        ApiError::from_code(
            tonic::Code::Unavailable,
            &format!("listing needs the cluster registry, which did not answer: {e}"),
        )
    })?;
    let own = dispatcher.responses.tags();
    let mut asked = std::collections::HashSet::new();
    if let Some((address, _)) = peers.me.get() {
        asked.insert(address.clone());
    }
    let others: Vec<&RouterRecord> = routers
        .iter()
        .filter(|r| !own.contains(&r.id) && asked.insert(r.grpc_address.clone()))
        .collect();
    let call = &call;
    let asks = others.into_iter().map(|router| async move {
        let unreachable = |why: String| {
            ApiError::from_code(
                tonic::Code::Unavailable,
                &format!(
                    "router replica {} ({}) cannot be reached to {doing}: {why}",
                    router.id, router.grpc_address
                ),
            )
        };
        let client = peers
            .client(&router.id)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        match call(client).await {
            Ok(answer) => Ok(answer),
            Err(status) => match status.code() {
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                    Err(ApiError::from_code(status.code(), status.message()))
                }
                _ => {
                    peers.forget(&router.id);
                    Err(unreachable(format!(
                        "{}: {}",
                        status.code(),
                        status.message()
                    )))
                }
            },
        }
    });
    let answers = futures::future::try_join_all(asks).await?;
    Ok(answers.into_iter().flatten().collect())
}

/// What replica `owner` answered to a Files or Batches API `call`, or its refusal (not kept
/// there, a bad argument, a batch that cannot be cancelled) as the status it sent.
pub async fn call_batches(
    dispatcher: &Dispatcher,
    owner: &str,
    call: v1::BatchCall,
    headers: &HeaderMap,
) -> Result<Result<v1::BatchAnswer, tonic::Status>, PeerError> {
    let peers = &dispatcher.peers;
    let mut client = peers.client(owner).await?;
    match client.call_batches(ask(call, headers)).await {
        Ok(answer) => Ok(Ok(answer.into_inner())),
        Err(status) => refused_or_failed(owner, peers, status).await,
    }
}

/// A replica's answer that refuses what was asked (not kept there, a bad argument, a
/// precondition): that status; any other is a failure to reach it.
async fn refused_or_failed<T>(
    owner: &str,
    peers: &Peers,
    status: tonic::Status,
) -> Result<Result<T, tonic::Status>, PeerError> {
    match status.code() {
        tonic::Code::NotFound | tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
            Ok(Err(status))
        }
        code => {
            Err(failure(owner, peers, status)
                .await
                .unwrap_or_else(|| PeerError::Unreachable {
                    owner: owner.to_string(),
                    why: code.to_string(),
                }))
        }
    }
}

/// Cancels background response `id` on replica `owner`: the object it was stored with, or
/// that replica's refusal (not kept there, not a background response) as the status it sent.
pub async fn cancel(
    dispatcher: &Dispatcher,
    owner: &str,
    id: &str,
    headers: &HeaderMap,
) -> Result<Result<String, tonic::Status>, PeerError> {
    let peers = &dispatcher.peers;
    let mut client = peers.client(owner).await?;
    let asked = ask(v1::StoredResponseRequest { id: id.into() }, headers);
    match client.cancel(asked).await {
        Ok(answer) => Ok(Ok(answer.into_inner().object_json)),
        Err(status) => refused_or_failed(owner, peers, status).await,
    }
}

/// The items named by `ids` that replica `owner` keeps for this client, as JSON text by id,
/// or that replica's refusal (an item of a response still running) as the status it sent.
pub async fn get_items(
    dispatcher: &Dispatcher,
    owner: &str,
    ids: Vec<String>,
    headers: &HeaderMap,
) -> Result<Result<Vec<(String, String)>, tonic::Status>, PeerError> {
    let peers = &dispatcher.peers;
    let mut client = peers.client(owner).await?;
    match client
        .get_items(ask(v1::GetItemsRequest { ids }, headers))
        .await
    {
        Ok(answer) => Ok(Ok(answer
            .into_inner()
            .items
            .into_iter()
            .map(|item| (item.id, item.item_json))
            .collect())),
        Err(status) => refused_or_failed(owner, peers, status).await,
    }
}

/// The events of streamed background response `id` on replica `owner`, after
/// `starting_after`: the stream of them, or that replica's refusal (not kept there, no events
/// kept, past the end) as the status it sent.
pub async fn follow_events(
    dispatcher: &Dispatcher,
    owner: &str,
    id: &str,
    starting_after: Option<u64>,
    headers: &HeaderMap,
) -> Result<Result<tonic::Streaming<v1::ResponseStreamEvent>, tonic::Status>, PeerError> {
    let peers = &dispatcher.peers;
    let mut client = peers.client(owner).await?;
    let asked = ask(
        v1::FollowEventsRequest {
            id: id.into(),
            starting_after,
        },
        headers,
    );
    match client.follow_events(asked).await {
        Ok(answer) => Ok(Ok(answer.into_inner())),
        Err(status) if status.code() == tonic::Code::OutOfRange => Ok(Err(status)),
        Err(status) => refused_or_failed(owner, peers, status).await,
    }
}

/// A stored response as the gRPC service sends it.
pub fn to_proto(response: &StoredResponse) -> v1::StoredResponse {
    v1::StoredResponse {
        id: response.id.clone(),
        object_json: response.object.clone(),
        input_items_json: response.input_items_json(),
        conversation: response.messages().collect(),
        running: response.running,
    }
}

/// A response another replica sent, counted in this replica's store while it lives (a
/// request going on from it holds its conversation until its own answer is stored).
///
/// When the response went on from one this replica keeps (a conversation whose turns land on
/// both replicas, as a load balancer spreads them), the messages they have in common are
/// shared with it rather than copied: otherwise every turn that crossed over would hold a
/// copy of the whole conversation.
fn from_proto(
    store: &ResponseStore,
    response: v1::StoredResponse,
    owner: &str,
    tenant: Option<&str>,
) -> Result<StoredResponse, PeerError> {
    let garbled = |e: serde_json::Error| PeerError::Unreachable {
        owner: owner.to_string(),
        why: format!("its answer is not a stored response: {e}"),
    };
    #[derive(serde::Deserialize)]
    struct Object {
        previous_response_id: Option<String>,
    }
    let object: Object = serde_json::from_str(&response.object_json).map_err(garbled)?;
    let input_items = response
        .input_items_json
        .into_iter()
        .map(serde_json::value::RawValue::from_string)
        .collect::<Result<_, _>>()
        .map_err(garbled)?;
    let ancestor = match object.previous_response_id.map(|id| store.get(&id, tenant)) {
        Some(Lookup::Found(previous)) => previous.conversation.clone(),
        _ => Vec::new(),
    };
    let shared = ancestor
        .iter()
        .zip(&response.conversation)
        .take_while(|(mine, theirs)| ****mine == **theirs)
        .count();
    let conversation = ancestor
        .into_iter()
        .take(shared)
        .chain(
            response
                .conversation
                .into_iter()
                .skip(shared)
                .map(|m| store.message(m)),
        )
        .collect();
    // Not kept here: whose it is was checked by the replica that keeps it.
    let mut made = store.response(
        response.id,
        None,
        response.object_json,
        input_items,
        conversation,
    );
    made.running = response.running;
    Ok(made)
}

/// Announces this replica (its owner tag, and the address of its gRPC door) in the cluster
/// registry until `stop`, retrying while the registry is unreachable.
pub async fn announce(
    registry: Arc<dyn Registry>,
    record: RouterRecord,
    ttl: Duration,
    stop: CancellationToken,
) {
    let mut backoff = switchyard_cluster::backoff::Backoff::new(
        Duration::from_millis(200),
        Duration::from_secs(5),
    );
    let presence = loop {
        let announced = tokio::select! {
            announced = registry.announce_router(record.clone(), ttl) => announced,
            _ = stop.cancelled() => return,
        };
        match announced {
            Ok(presence) => break presence,
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    "cannot announce this router's stored responses in the registry: {error} \
                     (next try in {delay:.1?})"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    };
    tracing::info!(tag = %record.id, address = %record.grpc_address, "stored responses announced");
    stop.cancelled().await;
    if let Err(error) = presence.withdraw().await {
        tracing::debug!("withdrawing the router's announcement: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response_store::tests::user as message;

    /// `conversation` as another replica sends it, going on from `previous`.
    fn sent(previous: &str, conversation: &[&str]) -> v1::StoredResponse {
        v1::StoredResponse {
            id: "resp_other".into(),
            object_json: serde_json::json!({"previous_response_id": previous}).to_string(),
            input_items_json: vec![r#"{"id":"msg_1"}"#.into()],
            conversation: conversation.iter().map(|c| message(c)).collect(),
            running: false,
        }
    }

    #[test]
    fn a_fetched_conversation_shares_what_it_has_in_common_with_one_kept_here() {
        let store = ResponseStore::new(Default::default());
        let mine = store.response(
            store.new_id(),
            Some("acme".into()),
            "{}".into(),
            vec![],
            vec![store.message(message("one")), store.message(message("two"))],
        );
        let id = mine.id.clone();
        assert!(store.insert(mine));
        let Lookup::Found(mine) = store.get(&id, Some("acme")) else {
            panic!("kept");
        };
        let before = store.usage().1;

        let theirs = from_proto(
            &store,
            sent(&id, &["one", "two", "three"]),
            "other",
            Some("acme"),
        )
        .expect("a stored response");
        let texts: Vec<&str> = theirs
            .conversation
            .iter()
            .map(|m| m.content.as_str())
            .collect();
        assert_eq!(texts, ["one", "two", "three"]);
        assert!(Arc::ptr_eq(&theirs.conversation[0], &mine.conversation[0]));
        assert!(Arc::ptr_eq(&theirs.conversation[1], &mine.conversation[1]));
        let added = store.usage().1 - before;
        assert!(
            added < 1024,
            "only the new message and the response: {added} bytes"
        );

        // Another tenant's, or a conversation that differs: copied, nothing shared.
        for (tenant, conversation) in [
            (Some("globex"), ["one", "two", "three"]),
            (Some("acme"), ["one", "TWO", "three"]),
        ] {
            let copied = from_proto(&store, sent(&id, &conversation), "other", tenant)
                .expect("a stored response");
            assert!(!Arc::ptr_eq(&copied.conversation[1], &mine.conversation[1]));
            assert_eq!(copied.conversation[1].content, conversation[1]);
        }
    }

    #[test]
    fn an_answer_that_is_not_a_stored_response_says_so() {
        let store = ResponseStore::new(Default::default());
        let mut garbled = sent("resp_x", &["one"]);
        garbled.object_json = "not json".into();
        let error = from_proto(&store, garbled, "other", None).unwrap_err();
        assert!(
            error.to_string().contains("not a stored response"),
            "{error}"
        );
    }
}
