//! A stopping router hands its stored responses to another replica, which answers for their
//! ids from then on: a rollout replaces every router, and without this it would end every
//! conversation a client continues with `previous_response_id`.
//!
//! At the end of its drain (its requests in flight have ended, so nothing more is stored) the
//! router picks another announced replica and streams it `RouterPeers.Handover`: the tags its
//! ids carry (its own and any handed to it before), each message once, then each response
//! naming its messages by number, oldest first — so the receiver shares messages between
//! responses as the sender did. The receiver keeps what fits its store, answers for the tags,
//! and announces itself under them once the stopping replica has withdrawn.
//!
//! The Batch API's files and batches go along (see [`crate::batches::handover`]).
//!
//! Only routers may hand responses over: the call needs the cluster token
//! (`--cluster-token-file`). Without one, a stopping router's responses go with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use switchyard_cluster::RouterRecord;
use switchyard_proto::v1::{self, handover_item::Item};
use tonic::{Request, Response, Status, Streaming};

use serde_json::value::RawValue;

use super::{ResponseStore, StoredConversation, StoredItem, StoredMessage, StoredResponse, peers};
use crate::dispatch::Dispatcher;

/// Longest a stopping router spends handing its responses over.
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// The hand-over of `responses` (oldest first) and `conversations` answering for `tags`:
/// the conversations, whole; then each message once, in the order first used, and each
/// response naming its messages by number.
pub fn frames(
    tags: &[String],
    responses: &[Arc<StoredResponse>],
    conversations: &[Arc<StoredConversation>],
) -> Vec<v1::HandoverItem> {
    let frame = |item| v1::HandoverItem { item: Some(item) };
    let mut out: Vec<v1::HandoverItem> = tags.iter().map(|t| frame(Item::Tag(t.clone()))).collect();
    out.extend(
        conversations
            .iter()
            .map(|c| frame(Item::Conversation(handed_conversation(c)))),
    );
    let mut numbers: HashMap<*const StoredMessage, u64> = HashMap::new();
    for response in responses {
        let mut conversation = Vec::with_capacity(response.conversation.len());
        for message in &response.conversation {
            let next = numbers.len() as u64;
            let number = *numbers.entry(Arc::as_ptr(message)).or_insert_with(|| {
                out.push(frame(Item::Message(message.message.clone())));
                next
            });
            conversation.push(number);
        }
        let mut handed = handed(response, conversation);
        // Its events go along, for a client resuming its stream at the receiver.
        handed.events = response
            .events
            .as_ref()
            .filter(|log| log.is_closed())
            .map(|log| log.events())
            .unwrap_or_default();
        out.push(frame(Item::Response(handed)));
    }
    out
}

/// `frames` without the tags that name nothing in them, nor any of the ids `beside` (handed
/// apart from them): a tag is adopted for what it names, and a replica restarted or rolled
/// out again and again would otherwise answer for — and keep announcing — every tag it ever
/// took. An id of a dropped tag is not found either way.
pub fn without_idle_tags<'a>(
    mut frames: Vec<v1::HandoverItem>,
    beside: impl IntoIterator<Item = &'a str>,
) -> Vec<v1::HandoverItem> {
    let owner = |id: &str| {
        super::owner_of(id)
            .or_else(|| crate::batches::owner_of(id))
            .map(str::to_string)
    };
    let mut named: std::collections::HashSet<String> =
        beside.into_iter().filter_map(owner).collect();
    for frame in &frames {
        let id = match &frame.item {
            Some(Item::Response(r)) => &r.id,
            Some(Item::Conversation(c)) => &c.id,
            Some(Item::File(f)) => &f.id,
            Some(Item::Batch(b)) => &b.id,
            _ => continue,
        };
        named.extend(owner(id));
    }
    frames.retain(|frame| !matches!(&frame.item, Some(Item::Tag(tag)) if !named.contains(tag)));
    frames
}

/// `conversation` as sent to another replica.
pub(super) fn handed_conversation(conversation: &StoredConversation) -> v1::HandedConversation {
    v1::HandedConversation {
        id: conversation.id.clone(),
        tenant: conversation.tenant.clone(),
        created_at: conversation.created_at,
        metadata_json: conversation.metadata.get().to_string(),
        items_json: conversation.items_json(),
        age_ms: conversation.age().as_millis() as u64,
    }
}

/// A conversation another replica sent, made in `store` (its items as new ones).
pub(super) fn received_conversation(
    store: &ResponseStore,
    conversation: v1::HandedConversation,
) -> Result<StoredConversation, Status> {
    let (items, metadata) = received_items(
        store,
        &conversation.id,
        conversation.items_json,
        conversation.metadata_json,
    )?;
    Ok(store
        .conversation(
            conversation.id,
            conversation.tenant,
            conversation.created_at,
            metadata,
            items,
        )
        .aged(Duration::from_millis(conversation.age_ms)))
}

/// Items and metadata of conversation `id` another replica sent, made in `store`.
pub(super) fn received_items(
    store: &ResponseStore,
    id: &str,
    items_json: Vec<String>,
    metadata_json: String,
) -> Result<(Vec<Arc<StoredItem>>, Box<RawValue>), Status> {
    let invalid = |what: &str, why: &dyn std::fmt::Display| {
        Status::invalid_argument(format!("conversation {id:?}: {what}: {why}"))
    };
    let metadata = RawValue::from_string(metadata_json).map_err(|e| invalid("metadata", &e))?;
    let mut items = Vec::with_capacity(items_json.len());
    for text in items_json {
        let json = RawValue::from_string(text).map_err(|e| invalid("an item", &e))?;
        let item_id = super::conversation::item_id(&json)
            .ok_or_else(|| invalid("an item", &"it has no id"))?
            .to_string();
        items.push(store.item(item_id, json));
    }
    Ok((items, metadata))
}

/// `response` as sent to another replica, its messages named by `conversation`'s numbers.
pub(super) fn handed(response: &StoredResponse, conversation: Vec<u64>) -> v1::HandedResponse {
    v1::HandedResponse {
        id: response.id.clone(),
        tenant: response.tenant.clone(),
        object_json: response.object.clone(),
        input_items_json: response.input_items_json(),
        conversation,
        age_ms: response.age().as_millis() as u64,
        events: Vec::new(),
    }
}

/// A response another replica sent, made in `store`, its messages found by `message`.
pub(super) fn received(
    store: &ResponseStore,
    response: v1::HandedResponse,
    message: impl Fn(u64) -> Option<Arc<StoredMessage>>,
) -> Result<StoredResponse, Status> {
    let conversation = response
        .conversation
        .iter()
        .map(|&n| message(n))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "response {:?} names a message not sent before it",
                response.id
            ))
        })?;
    let input_items = response
        .input_items_json
        .into_iter()
        .map(serde_json::value::RawValue::from_string)
        .collect::<Result<_, _>>()
        .map_err(|e| Status::invalid_argument(format!("an input item: {e}")))?;
    let mut received = store
        .response(
            response.id,
            response.tenant,
            response.object_json,
            input_items,
            conversation,
        )
        .aged(Duration::from_millis(response.age_ms));
    if !response.events.is_empty() {
        let log = store.event_log();
        for event in response.events {
            log.push(event);
        }
        log.close();
        received.events = Some(log);
    }
    Ok(received)
}

/// Refuses `tag` unless it can be a router's tag.
pub(super) fn check_tag(tag: &str) -> Result<(), Status> {
    let id = format!("{}{tag}{}", super::ID_PREFIX, "0".repeat(32));
    match super::owner_of(&id) {
        Some(_) => Ok(()),
        None => Err(Status::invalid_argument(format!(
            "tag {tag:?} is not a router's tag"
        ))),
    }
}

/// A hand-over being received into a store.
pub struct Adoption<'a> {
    store: &'a ResponseStore,
    tags: Vec<String>,
    messages: Vec<Arc<StoredMessage>>,
    kept: u32,
}

impl<'a> Adoption<'a> {
    pub fn new(store: &'a ResponseStore) -> Self {
        Self {
            store,
            tags: Vec::new(),
            messages: Vec::new(),
            kept: 0,
        }
    }

    /// Responses kept so far.
    pub fn kept(&self) -> u32 {
        self.kept
    }

    pub fn push(&mut self, frame: v1::HandoverItem) -> Result<(), Status> {
        match frame.item {
            Some(Item::Tag(tag)) => {
                check_tag(&tag)?;
                // From now on, ids of this tag are looked up here.
                self.store.adopt_tag(&tag);
                self.tags.push(tag);
            }
            Some(Item::Message(message)) => self.messages.push(self.store.message(message)),
            Some(Item::Response(response)) => {
                let response = received(self.store, response, |n| {
                    self.messages.get(usize::try_from(n).ok()?).cloned()
                })?;
                self.kept += u32::from(self.store.insert(response));
            }
            Some(Item::Conversation(conversation)) => {
                let conversation = received_conversation(self.store, conversation)?;
                self.kept += u32::from(self.store.put_conversation(conversation));
            }
            None => return Err(Status::invalid_argument("an empty hand-over item")),
            Some(Item::File(_) | Item::Batch(_) | Item::Bytes(_) | Item::Answers(_)) => {
                return Err(Status::invalid_argument(
                    "files and batches are received by the batch store, not this one",
                ));
            }
        }
        Ok(())
    }
}

/// A whole hand-over being taken: responses and conversations into the store as they come,
/// files and batches into the batch store at its end. A peer's hand-over and one saved on
/// disk (see [`super::saved`]) are taken alike.
pub struct Taking<'a> {
    adoption: Adoption<'a>,
    batches: crate::batches::handover::Receiving,
}

/// What a hand-over left here.
#[derive(Debug)]
pub struct Taken {
    /// The tags this replica answers for because of it.
    pub tags: Vec<String>,
    /// Responses and conversations kept.
    pub kept: u32,
    pub files: usize,
    pub batches: usize,
}

impl<'a> Taking<'a> {
    pub fn new(store: &'a ResponseStore) -> Self {
        Self {
            adoption: Adoption::new(store),
            batches: Default::default(),
        }
    }

    pub fn push(&mut self, frame: v1::HandoverItem) -> Result<(), Status> {
        let item = frame
            .item
            .ok_or_else(|| Status::invalid_argument("an empty hand-over item"))?;
        if let Some(item) = self.batches.push(item)? {
            self.adoption.push(v1::HandoverItem { item: Some(item) })?;
        }
        Ok(())
    }

    /// Keeps the files and batches (running ones go on here) and announces this replica
    /// under the tags taken, so other replicas asking for their ids find it.
    pub fn finish(self, dispatcher: &Arc<Dispatcher>) -> Result<Taken, Status> {
        let (files, batches) = self.batches.finish(dispatcher)?;
        let taken = Taken {
            tags: self.adoption.tags,
            kept: self.adoption.kept,
            files,
            batches,
        };
        for tag in &taken.tags {
            dispatcher.peers.announce_adopted(tag.clone());
        }
        Ok(taken)
    }
}

/// The `RouterPeers` service: takes other replicas' stored responses when they stop.
pub struct RouterPeersService {
    dispatcher: Arc<Dispatcher>,
}

impl RouterPeersService {
    pub fn new(dispatcher: Arc<Dispatcher>) -> Self {
        Self { dispatcher }
    }
}

#[tonic::async_trait]
impl v1::router_peers_server::RouterPeers for RouterPeersService {
    async fn handover(
        &self,
        request: Request<Streaming<v1::HandoverItem>>,
    ) -> Result<Response<v1::HandoverResult>, Status> {
        self.check_peer(&request)?;
        let mut frames = request.into_inner();
        let mut taking = Taking::new(&self.dispatcher.responses);
        while let Some(frame) = frames.message().await? {
            taking.push(frame)?;
        }
        let taken = taking.finish(&self.dispatcher)?;
        tracing::info!(
            tags = ?taken.tags,
            kept = taken.kept,
            files = taken.files,
            batches = taken.batches,
            "stored responses, files and batches handed over by a stopping router"
        );
        Ok(Response::new(v1::HandoverResult { kept: taken.kept }))
    }

    async fn mirror(
        &self,
        request: Request<Streaming<v1::MirrorItem>>,
    ) -> Result<Response<v1::MirrorResult>, Status> {
        self.check_peer(&request)?;
        let result = super::mirror::receive(self.dispatcher.clone(), request.into_inner()).await?;
        Ok(Response::new(result))
    }
}

impl RouterPeersService {
    /// Refuses a caller without the cluster token: only routers.
    fn check_peer<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.dispatcher.config.cluster_token else {
            return Err(Status::permission_denied(
                "stored responses go between routers only with a cluster token \
                 (--cluster-token-file) on every router",
            ));
        };
        token.check(request)
    }
}

/// Why a stopping router kept its responses.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("no cluster token (--cluster-token-file): the other replicas would refuse them")]
    NoToken,
    #[error("no other router replica is running")]
    NoPeer,
    #[error("{0}")]
    Failed(String),
}

/// Everything a stopping replica hands over: its stored responses and conversations, its
/// files and batches.
pub fn everything(dispatcher: &Dispatcher) -> Vec<v1::HandoverItem> {
    let store = &dispatcher.responses;
    let mut frames = frames(
        &store.tags(),
        &store.export(),
        &store.export_conversations(),
    );
    frames.extend(crate::batches::handover::frames(&dispatcher.batches));
    without_idle_tags(frames, [])
}

/// Hands `frames` (see [`everything`]) to another replica; the one it chose and how many it
/// kept.
pub async fn hand_over(
    dispatcher: &Dispatcher,
    frames: &[v1::HandoverItem],
) -> Result<(RouterRecord, u32), HandoverError> {
    let store = &dispatcher.responses;
    let token = dispatcher
        .config
        .cluster_token
        .clone()
        .ok_or(HandoverError::NoToken)?;
    let tags = store.tags();
    let failed = |e: &dyn std::fmt::Display| HandoverError::Failed(e.to_string());
    let routers = dispatcher
        .peers
        .registry()
        .ok_or(HandoverError::NoPeer)?
        .list_routers()
        .await
        .map_err(|e| failed(&e))?;
    let mut others: Vec<RouterRecord> = routers
        .into_iter()
        .filter(|r| !tags.contains(&r.id))
        .collect();
    if others.is_empty() {
        return Err(HandoverError::NoPeer);
    }
    // In a rollout another replica may be stopping too (it takes no new connections): the
    // next one is tried.
    fastrand::shuffle(&mut others);
    let mut last = HandoverError::NoPeer;
    for peer in others {
        let channel = match dispatcher.peers.channel_to(&peer) {
            Ok(channel) => channel,
            Err(error) => {
                last = failed(&error);
                continue;
            }
        };
        let mut request = Request::new(futures::stream::iter(frames.to_vec()));
        token.apply(&mut request);
        match v1::router_peers_client::RouterPeersClient::new(channel)
            .handover(request)
            .await
        {
            Ok(answer) => return Ok((peer, answer.into_inner().kept)),
            Err(status) => {
                last = failed(&format!(
                    "{}: {}: {}",
                    peer.grpc_address,
                    status.code(),
                    status.message()
                ));
            }
        }
    }
    Err(last)
}

/// Hands the responses over at the end of a drain, saying what happened.
pub async fn hand_over_on_stop(dispatcher: &Dispatcher) {
    // The standby drops its copy first: the replica handed to answers for the ids instead.
    dispatcher.peers.stop_mirror().await;
    // The batches' runs let their running requests end (the drain waited for those) and stop:
    // what they answered goes over with them.
    let runs = &dispatcher.batches.runs;
    runs.close();
    if tokio::time::timeout(HANDOVER_TIMEOUT, runs.wait())
        .await
        .is_err()
    {
        tracing::warn!("batch runs still going: their requests running now are sent again");
    }
    let count = dispatcher.responses.usage().0 + dispatcher.responses.conversation_count();
    // Whatever happens below supersedes the journal kept while the replica ran: another
    // replica takes the responses, or the hand-over saved beside it does, or nothing is left.
    let discard_journal = || {
        if let Some(dir) = &dispatcher.state_dir
            && let Err(error) = dir.discard_journal()
        {
            tracing::error!("{error}");
        }
    };
    if count == 0 && dispatcher.batches.is_empty() {
        discard_journal();
        return;
    }
    let frames = everything(dispatcher);
    let why = match tokio::time::timeout(HANDOVER_TIMEOUT, hand_over(dispatcher, &frames)).await {
        Ok(Ok((peer, kept))) => {
            tracing::info!(
                to = %peer.grpc_address,
                kept,
                of = count,
                "stored responses handed over to another router replica"
            );
            discard_journal();
            return;
        }
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("none took them within {HANDOVER_TIMEOUT:?}"),
    };
    let Some(dir) = &dispatcher.state_dir else {
        tracing::warn!(
            responses = count,
            "stored responses not handed over, they go with this replica: {why}"
        );
        return;
    };
    match dir.save(&frames) {
        Ok(bytes) => {
            discard_journal();
            tracing::info!(
            responses = count,
            bytes,
            dir = %dir.path().display(),
                "stored responses, files and batches kept for this router's next start \
                 (not handed over: {why})"
            );
        }
        Err(error) => tracing::error!(
            responses = count,
            "stored responses neither handed over ({why}) nor kept: {error}"
        ),
    }
}

/// Announces `record` (an adopted tag at this replica's address) until `stop`.
pub(super) fn announce(
    registry: Arc<dyn switchyard_cluster::Registry>,
    record: RouterRecord,
    ttl: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    tokio::spawn(peers::announce(registry, record, ttl, stop));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response_store::Lookup;
    use crate::response_store::tests::user;

    /// Tags that name nothing handed over are left out: each restart or rollout would
    /// otherwise add one that is answered for, and announced, for ever.
    #[test]
    fn only_the_tags_that_name_something_handed_over_go_along() {
        let hex = "0123456789abcdef0123456789abcdef";
        let tag = |t: &str| v1::HandoverItem {
            item: Some(Item::Tag(t.into())),
        };
        let frames = vec![
            tag("aaaaaaaaaaaa"),
            tag("bbbbbbbbbbbb"),
            tag("cccccccccccc"),
            tag("dddddddddddd"),
            v1::HandoverItem {
                item: Some(Item::Response(v1::HandedResponse {
                    id: format!("resp_aaaaaaaaaaaa{hex}"),
                    ..Default::default()
                })),
            },
            v1::HandoverItem {
                item: Some(Item::Batch(v1::HandedBatch {
                    id: format!("batch_dddddddddddd{hex}"),
                    ..Default::default()
                })),
            },
        ];
        let file = format!("file-cccccccccccc{hex}");
        let kept: Vec<String> = without_idle_tags(frames, [file.as_str()])
            .into_iter()
            .filter_map(|f| match f.item {
                Some(Item::Tag(t)) => Some(t),
                _ => None,
            })
            .collect();
        assert_eq!(kept, ["aaaaaaaaaaaa", "cccccccccccc", "dddddddddddd"]);
    }

    #[test]
    fn a_handed_over_store_answers_for_the_ids_and_shares_messages_as_the_sender_did() {
        let sender = ResponseStore::new(Default::default());
        let first_turn = sender.message(user("one"));
        let first = sender.response(
            sender.new_id(),
            Some("acme".into()),
            r#"{"id":"a"}"#.into(),
            vec![crate::response_store::tests::raw(
                serde_json::json!({"id": "msg_1"}),
            )],
            vec![first_turn.clone()],
        );
        let second = sender.response(
            sender.new_id(),
            Some("acme".into()),
            r#"{"id":"b"}"#.into(),
            vec![],
            vec![first_turn, sender.message(user("two"))],
        );
        let ids = [first.id.clone(), second.id.clone()];
        sender.insert(first);
        sender.insert(second);
        let frames = frames(&sender.tags(), &sender.export(), &[]);
        // The tag, each message once, each response.
        assert_eq!(frames.len(), 1 + 2 + 2);

        let receiver = ResponseStore::new(Default::default());
        assert!(matches!(
            receiver.get(&ids[0], Some("acme")),
            Lookup::Elsewhere(_)
        ));
        let mut adoption = Adoption::new(&receiver);
        for frame in frames {
            adoption.push(frame).expect("a valid hand-over");
        }
        assert_eq!(adoption.kept, 2);
        let Lookup::Found(a) = receiver.get(&ids[0], Some("acme")) else {
            panic!("kept");
        };
        let Lookup::Found(b) = receiver.get(&ids[1], Some("acme")) else {
            panic!("kept");
        };
        assert!(Arc::ptr_eq(&a.conversation[0], &b.conversation[0]));
        assert_eq!(b.conversation[1].content, "two");
        assert_eq!(a.input_items[0].get(), r#"{"id":"msg_1"}"#);
        // Still each tenant's own.
        assert!(matches!(
            receiver.get(&ids[0], Some("other")),
            Lookup::Missing
        ));
        // The receiver hands them on with the tag it adopted.
        assert_eq!(receiver.tags()[1], sender.owner());
    }

    /// A handed-over response is as old at the receiver as it was at the sender, so it does
    /// not outlive the maximum age by being handed over.
    #[tokio::test(start_paused = true)]
    async fn a_handed_over_response_keeps_its_age() {
        let limits = crate::response_store::StoreLimits {
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
        };
        let sender = ResponseStore::new(limits);
        let old = sender.response(sender.new_id(), None, "{}".into(), vec![], vec![]);
        let id = old.id.clone();
        sender.insert(old);
        tokio::time::advance(Duration::from_secs(40)).await;
        let receiver = ResponseStore::new(limits);
        let newer = receiver.response(receiver.new_id(), None, "{}".into(), vec![], vec![]);
        let newer_id = newer.id.clone();
        receiver.insert(newer);
        let mut adoption = Adoption::new(&receiver);
        for frame in frames(&sender.tags(), &sender.export(), &[]) {
            adoption.push(frame).expect("a valid hand-over");
        }
        let Lookup::Found(taken) = receiver.get(&id, None) else {
            panic!("kept");
        };
        assert!(taken.age() >= Duration::from_secs(40), "{:?}", taken.age());
        tokio::time::advance(Duration::from_secs(21)).await;
        assert!(matches!(receiver.get(&id, None), Lookup::Missing));
        assert!(matches!(receiver.get(&newer_id, None), Lookup::Found(_)));
    }

    #[test]
    fn a_response_naming_a_message_not_sent_is_refused() {
        let receiver = ResponseStore::new(Default::default());
        let mut adoption = Adoption::new(&receiver);
        let refused = adoption.push(v1::HandoverItem {
            item: Some(Item::Response(v1::HandedResponse {
                id: "resp_x".into(),
                conversation: vec![3],
                ..Default::default()
            })),
        });
        assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);
        let bad_tag = adoption.push(v1::HandoverItem {
            item: Some(Item::Tag("not/a tag".into())),
        });
        assert_eq!(bad_tag.unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
