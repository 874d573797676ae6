//! A standby copy of each replica's stored responses, kept by another replica, so a router
//! killed without its drain (OOM, node loss) loses no conversation: once its announcement
//! expires, its standby answers for its ids.
//!
//! Each router with a cluster token picks one other replica (the next by address, so every
//! replica is standby for about one other) and streams it `RouterPeers.Mirror`: its tags,
//! what it keeps now, then every response it keeps and drops as it happens. Messages are sent
//! once per stream, numbered, and the receiver holds each until the sender says no response can
//! name it again, so conversations stay shared on the standby as on the sender.
//!
//! The Batch API's files and batches ride along (see [`crate::batches::handover`]): taken
//! over, a batch still running goes on at the standby.
//!
//! The stream ends cleanly when the sender stops (its drain hands the responses over instead)
//! or falls behind and starts afresh: the receiver then drops its copy. When the stream breaks
//! instead, the receiver keeps the copy and watches the sender's announcement: gone within two
//! leases, the sender died and the copy is taken over (as a hand-over is); still there, the
//! sender lives and mirrors anew, so the copy is dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use switchyard_cluster::RouterRecord;
use switchyard_proto::v1::{self, mirror_item::Item};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status, Streaming};

use super::handover::{self, Adoption};
use super::journal;
use super::peers::PRESENCE_TTL;
use super::{
    MirrorEvent, MirrorStart, ResponseStore, StoreLimits, StoredConversation, StoredItem,
    StoredMessage, StoredResponse,
};
use crate::batches::handover::{self as batch_handover, Part, Receiving};
use crate::dispatch::Dispatcher;

/// Changes a mirror may fall behind by before it is let go and started afresh. Responses
/// waiting to be sent stay alive and count against the store's bytes, so this stays small.
pub(super) const BACKLOG: usize = 4096;
/// How often a router without a standby looks for another replica.
pub(super) const LOOK_AGAIN: Duration = Duration::from_secs(5);
/// How often a receiver whose mirror broke asks whether its sender is still announced.
const ORPHAN_CHECK: Duration = Duration::from_secs(1);

/// Turns a store's changes into a mirror's items.
pub struct MirrorWriter {
    epoch: u64,
    /// Each conversation sent: how many items, and the last of them. A version that still
    /// has that item at that place only added items after it (items are never reordered),
    /// so only those are sent.
    conversations: HashMap<String, (usize, Weak<StoredItem>)>,
    /// Batches sent whole (input and answers): from then on, only what changes.
    batches: std::collections::HashSet<String>,
}

impl MirrorWriter {
    pub fn new(epoch: u64) -> Self {
        Self {
            epoch,
            conversations: HashMap::new(),
            batches: Default::default(),
        }
    }

    /// The item telling of `conversation`'s new version: only what it added, when it only
    /// added items to the version sent before.
    fn conversation(&mut self, conversation: &StoredConversation) -> Item {
        let items = &conversation.items;
        let appended = self
            .conversations
            .get(&conversation.id)
            .and_then(|(count, last)| {
                let only_added = *count == 0
                    || (items.len() >= *count
                        && last
                            .upgrade()
                            .is_some_and(|last| Arc::ptr_eq(&last, &items[count - 1])));
                only_added.then_some(*count)
            });
        self.conversations.insert(
            conversation.id.clone(),
            (
                items.len(),
                items.last().map(Arc::downgrade).unwrap_or_default(),
            ),
        );
        match appended {
            Some(sent) => Item::ConversationAppend(v1::ConversationAppend {
                id: conversation.id.clone(),
                items_json: items[sent..]
                    .iter()
                    .map(|i| i.json.get().to_string())
                    .collect(),
                metadata_json: conversation.metadata.get().to_string(),
                age_ms: conversation.age().as_millis() as u64,
            }),
            None => Item::Conversation(handover::handed_conversation(conversation)),
        }
    }

    /// The items telling of `event`, in order.
    pub fn items(&mut self, event: MirrorEvent) -> Vec<v1::MirrorItem> {
        let item = |item| v1::MirrorItem { item: Some(item) };
        match event {
            MirrorEvent::Tag(tag) => vec![item(Item::Tag(tag))],
            MirrorEvent::Kept(response) => {
                let mut out = Vec::new();
                for message in &response.conversation {
                    if message.first_sent_in(self.epoch) {
                        out.push(item(Item::Message(v1::MirroredMessage {
                            number: message.number,
                            message: Some(message.message.clone()),
                        })));
                    }
                }
                let numbers = response.conversation.iter().map(|m| m.number).collect();
                out.push(item(Item::Response(handover::handed(&response, numbers))));
                out
            }
            MirrorEvent::Conversation(conversation) => {
                vec![item(self.conversation(&conversation))]
            }
            MirrorEvent::Forgotten(id) => {
                self.conversations.remove(&id);
                vec![item(Item::Forget(id))]
            }
            MirrorEvent::MessageGone(number) => vec![item(Item::MessageGone(number))],
            MirrorEvent::BatchFile(file) => {
                let mut parts = Vec::new();
                batch_handover::file_parts(&file, &mut parts);
                parts.into_iter().map(Part::mirrored).collect()
            }
            MirrorEvent::BatchAnswered(batch, index) if self.batches.contains(&batch.id) => {
                batch_handover::answer_part(&batch, index)
                    .map(Part::mirrored)
                    .into_iter()
                    .collect()
            }
            MirrorEvent::Batch(batch) | MirrorEvent::BatchAnswered(batch, _) => {
                let whole = self.batches.insert(batch.id.clone());
                let mut parts = Vec::new();
                batch_handover::batch_parts(&batch, whole, &mut parts);
                parts.into_iter().map(Part::mirrored).collect()
            }
        }
    }
}

/// A mirror's start as events: its tags, what the store kept, what is kept beside it; and
/// the changes that follow.
pub(super) fn opening(
    start: MirrorStart,
) -> (
    impl Iterator<Item = MirrorEvent>,
    mpsc::Receiver<MirrorEvent>,
) {
    let MirrorStart {
        tags,
        kept,
        conversations,
        beside,
        events,
        ..
    } = start;
    let kept = kept.into_iter().map(MirrorEvent::Kept);
    let conversations = conversations.into_iter().map(MirrorEvent::Conversation);
    let now = tags
        .into_iter()
        .map(MirrorEvent::Tag)
        .chain(conversations)
        .chain(kept)
        .chain(beside);
    (now, events)
}

/// Writes mirror `start` to `out`: its tags, what the store kept, then its changes until the
/// mirror ends.
async fn write(start: MirrorStart, out: mpsc::Sender<v1::MirrorItem>) {
    let mut writer = MirrorWriter::new(start.epoch);
    let (now, mut events) = opening(start);
    for event in now {
        for item in writer.items(event) {
            if out.send(item).await.is_err() {
                return;
            }
        }
    }
    while let Some(event) = events.recv().await {
        for item in writer.items(event) {
            if out.send(item).await.is_err() {
                return;
            }
        }
    }
}

/// A replica's copy of another's stored responses, as its mirror tells it.
pub struct Standby {
    tags: Vec<String>,
    store: ResponseStore,
    /// The sender's Batch API files and batches, and the gauge counting the batches.
    batches: Receiving,
    batch_gauge: Gauge,
    batches_counted: i64,
    /// The sender's messages by number, held until it says they are gone.
    messages: HashMap<u64, Arc<StoredMessage>>,
    /// Counts the responses held, with every other standby copy of this replica.
    gauge: Gauge,
    counted: i64,
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.gauge.dec_by(self.counted);
        self.batch_gauge.dec_by(self.batches_counted);
    }
}

impl Standby {
    pub fn new(limits: StoreLimits, gauge: Gauge) -> Self {
        Self {
            tags: Vec::new(),
            store: ResponseStore::new(limits),
            batches: Receiving::default(),
            batch_gauge: Gauge::default(),
            batches_counted: 0,
            messages: HashMap::new(),
            gauge,
            counted: 0,
        }
    }

    fn count(&mut self) {
        let now = self.store.usage().0 as i64;
        self.gauge.inc_by(now - self.counted);
        self.counted = now;
    }

    /// The sender's own tag (the first it sends).
    pub fn source(&self) -> Option<&str> {
        self.tags.first().map(String::as_str)
    }

    /// Responses kept, and their bytes.
    pub fn usage(&self) -> (usize, usize) {
        self.store.usage()
    }

    pub fn apply(&mut self, item: v1::MirrorItem) -> Result<(), Status> {
        match item.item {
            Some(Item::Tag(tag)) => {
                handover::check_tag(&tag)?;
                if !self.tags.contains(&tag) {
                    self.store.adopt_tag(&tag);
                    self.tags.push(tag);
                }
            }
            Some(Item::Message(v1::MirroredMessage { number, message })) => {
                let message = message.ok_or_else(|| {
                    Status::invalid_argument(format!("mirrored message {number} has no message"))
                })?;
                self.messages.insert(number, self.store.message(message));
            }
            Some(Item::Response(response)) => {
                if self.tags.is_empty() {
                    return Err(Status::invalid_argument(
                        "a mirror sends its tags before its responses",
                    ));
                }
                let response =
                    handover::received(&self.store, response, |n| self.messages.get(&n).cloned())?;
                self.store.insert(response);
                self.count();
            }
            Some(Item::Conversation(conversation)) => {
                if self.tags.is_empty() {
                    return Err(Status::invalid_argument(
                        "a mirror sends its tags before its conversations",
                    ));
                }
                let conversation = handover::received_conversation(&self.store, conversation)?;
                self.store.put_conversation(conversation);
            }
            Some(Item::ConversationAppend(added)) => {
                let id = added.id.clone();
                let (items, metadata) = handover::received_items(
                    &self.store,
                    &id,
                    added.items_json,
                    added.metadata_json,
                )?;
                // One the standby let go (its store was full) stays gone.
                self.store.extend_conversation(
                    &id,
                    items,
                    metadata,
                    Duration::from_millis(added.age_ms),
                );
            }
            Some(Item::Forget(id)) => {
                if !self.batches.forget(&id) {
                    self.store.remove(&id);
                    self.count();
                }
            }
            Some(Item::File(file)) => self.batches.file(file),
            Some(Item::Batch(batch)) => {
                self.batches.batch(batch);
                self.count_batches();
            }
            Some(Item::Bytes(piece)) => self.batches.bytes(piece)?,
            Some(Item::Answers(answers)) => self.batches.answers(answers)?,
            Some(Item::MessageGone(number)) => {
                self.messages.remove(&number);
            }
            None => return Err(Status::invalid_argument("an empty mirror item")),
        }
        Ok(())
    }

    /// Counts the batches it holds in `gauge`, with every other standby copy's.
    pub fn with_batch_gauge(mut self, gauge: Gauge) -> Self {
        self.batch_gauge = gauge;
        self
    }

    fn count_batches(&mut self) {
        let now = self.batches.batch_count() as i64;
        self.batch_gauge.inc_by(now - self.batches_counted);
        self.batches_counted = now;
    }

    /// Takes the copy over into `store`, which answers for the sender's tags from now on;
    /// the tags, how many responses it kept, and the sender's files and batches (for the
    /// batch store to take).
    pub fn take_over(mut self, store: &ResponseStore) -> (Vec<String>, u32, Receiving) {
        let kept: Vec<Arc<StoredResponse>> = self.store.export();
        let conversations = self.store.export_conversations();
        let mut adoption = Adoption::new(store);
        let frames = handover::frames(&self.tags, &kept, &conversations);
        for frame in handover::without_idle_tags(frames, self.batches.ids()) {
            // Made from a checked copy: it cannot be refused.
            if let Err(status) = adoption.push(frame) {
                tracing::warn!("taking a standby copy over: {}", status.message());
            }
        }
        let batches = std::mem::take(&mut self.batches);
        self.count_batches();
        (self.tags.clone(), adoption.kept(), batches)
    }
}

/// Serves one replica's mirror (`RouterPeers.Mirror`) until it ends.
pub async fn receive(
    dispatcher: Arc<Dispatcher>,
    mut items: Streaming<v1::MirrorItem>,
) -> Result<v1::MirrorResult, Status> {
    let mut standby = Standby::new(
        dispatcher.responses.limits(),
        dispatcher.metrics.standby_responses.clone(),
    )
    .with_batch_gauge(dispatcher.metrics.standby_batches.clone());
    let mut replaced = None;
    loop {
        let item = tokio::select! {
            item = items.message() => item,
            () = dispatcher.stopping.cancelled() => {
                return Err(Status::unavailable(
                    "this router replica is stopping: mirror to another",
                ));
            }
        };
        match item {
            Ok(Some(item)) => {
                standby.apply(item)?;
                if replaced.is_none()
                    && let Some(source) = standby.source()
                {
                    // A sender mirroring anew replaces the copy its broken mirror left.
                    dispatcher.peers.end_orphan(source);
                    replaced = Some(source.to_string());
                    tracing::info!(from = source, "keeping a standby copy of stored responses");
                }
            }
            // The sender stopped (and hands its responses over) or starts afresh.
            Ok(None) => return Ok(v1::MirrorResult {}),
            Err(status) => {
                if standby.source().is_some() {
                    tracing::info!(
                        from = standby.source(),
                        responses = standby.usage().0,
                        "a standby copy's mirror broke: {}",
                        status.message()
                    );
                    let watch = dispatcher
                        .peers
                        .begin_orphan(standby.source().unwrap_or_default());
                    tokio::spawn(keep_orphan(dispatcher.clone(), standby, watch));
                }
                return Err(status);
            }
        }
    }
}

/// Keeps the copy a broken mirror left until its sender's announcement expires (it died:
/// the copy is taken over) or outlives a lease (it lives: the copy is dropped).
async fn keep_orphan(dispatcher: Arc<Dispatcher>, standby: Standby, ended: CancellationToken) {
    let Some(registry) = dispatcher.peers.registry() else {
        return;
    };
    let source = standby.source().unwrap_or_default().to_string();
    let give_up = tokio::time::Instant::now() + 2 * PRESENCE_TTL;
    loop {
        tokio::select! {
            () = tokio::time::sleep(ORPHAN_CHECK) => {}
            () = ended.cancelled() => return,
            () = dispatcher.stopping.cancelled() => return,
        }
        let found = registry.find_router(&source).await;
        if ended.is_cancelled() {
            // A new mirror from the sender replaced this copy meanwhile.
            return;
        }
        match found {
            Ok(None) => break,
            Ok(Some(_)) if tokio::time::Instant::now() >= give_up => {
                tracing::info!(from = %source, "its sender still runs: standby copy dropped");
                dispatcher.peers.end_orphan(&source);
                return;
            }
            Ok(Some(_)) | Err(_) => {}
        }
    }
    dispatcher.peers.end_orphan(&source);
    let (tags, kept, batches) = standby.take_over(&dispatcher.responses);
    match batches.finish(&dispatcher) {
        Ok((0, 0)) => {}
        Ok((files, batches)) => tracing::warn!(
            from = %source,
            files,
            batches,
            "its Batch API files and batches are this replica's now (running ones go on here)"
        ),
        Err(status) => tracing::warn!("taking a standby copy's batches over: {}", status.message()),
    }
    tracing::warn!(
        from = %source,
        ?tags,
        kept,
        "a router replica died without its drain: this replica answers for its stored \
         responses now"
    );
    for tag in tags {
        dispatcher.peers.announce_adopted(tag);
    }
}

/// The replica a router mirrors to: of the others announced, the next by address after
/// `me` (so each replica is standby for about one other).
pub fn choose_standby(
    me: &str,
    mine: &[String],
    routers: Vec<RouterRecord>,
) -> Option<RouterRecord> {
    let others: BTreeMap<String, RouterRecord> = routers
        .into_iter()
        .filter(|r| r.grpc_address != me && !mine.contains(&r.id))
        .map(|r| (r.grpc_address.clone(), r))
        .collect();
    others
        .range::<str, _>((std::ops::Bound::Excluded(me), std::ops::Bound::Unbounded))
        .next()
        .or_else(|| others.iter().next())
        .map(|(_, r)| r.clone())
}

/// Keeps this replica's stored responses mirrored on a standby until `stop`, then ends the
/// mirror cleanly (the standby drops its copy: a stopping router hands its responses over).
///
/// While no replica can keep a standby copy, a router with a state directory journals the
/// mirror there instead (see [`super::saved`]).
pub async fn run(dispatcher: Arc<Dispatcher>, me: String, stop: CancellationToken) {
    let peers = match (
        dispatcher.config.cluster_token.clone(),
        dispatcher.peers.registry(),
    ) {
        (Some(token), Some(registry)) => Some((token, registry)),
        _ => None,
    };
    let journaled = dispatcher.state_dir.is_some();
    if peers.is_none() && !journaled {
        return;
    }
    let store = &dispatcher.responses;
    let state = |state| dispatcher.metrics.set_response_mirror(state);
    let mut backoff = switchyard_cluster::backoff::Backoff::new(
        Duration::from_millis(200),
        Duration::from_secs(5),
    );
    // Said once per standby and per run of failures, not at every try.
    let mut told: Option<String> = None;
    let mut failing = false;
    while !stop.is_cancelled() {
        let standby = match &peers {
            Some((_, registry)) => match registry.list_routers().await {
                Ok(routers) => choose_standby(&me, &store.tags(), routers),
                Err(error) => {
                    tracing::debug!("listing router replicas for a standby: {error}");
                    None
                }
            },
            None => None,
        };
        let (Some(standby), Some((token, _))) = (standby, &peers) else {
            if journaled {
                state("journaled");
                let registry = peers.as_ref().map(|(_, registry)| registry);
                if !journal::run(&dispatcher, &me, registry, &stop).await {
                    state("failing");
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                        () = stop.cancelled() => return,
                    }
                }
                continue;
            }
            state("alone");
            tokio::select! {
                () = tokio::time::sleep(LOOK_AGAIN) => continue,
                () = stop.cancelled() => return,
            }
        };
        let channel = match dispatcher.peers.channel_to(&standby) {
            Ok(channel) => channel,
            Err(error) => {
                state("failing");
                tracing::warn!(to = %standby.grpc_address, "cannot mirror stored responses: {error}");
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => continue,
                    () = stop.cancelled() => return,
                }
            }
        };
        // The standby keeps the copy from now on: a journal left would be taken back too.
        if let Some(dir) = &dispatcher.state_dir
            && let Err(error) = dir.discard_journal()
        {
            tracing::warn!("{error}");
        }
        let mut start = store.begin_mirror(BACKLOG);
        start.beside = dispatcher.batches.mirror_events();
        let epoch = start.epoch;
        let (items_tx, items_rx) = mpsc::channel(1024);
        let writer = tokio::spawn(write(start, items_tx));
        let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(items_rx));
        token.apply(&mut request);
        let mut client = v1::router_peers_client::RouterPeersClient::new(channel);
        if told.as_ref() != Some(&standby.grpc_address) {
            tracing::info!(to = %standby.grpc_address, "mirroring stored responses to a standby");
            told = Some(standby.grpc_address.clone());
        }
        let began = tokio::time::Instant::now();
        state("mirrored");
        let call = client.mirror(request);
        tokio::pin!(call);
        let ended = tokio::select! {
            ended = &mut call => ended,
            () = stop.cancelled() => {
                // The writer ends with the mirror: the stream ends cleanly.
                store.end_mirror(epoch);
                let _ = tokio::time::timeout(Duration::from_secs(5), call).await;
                state("off");
                return;
            }
        };
        store.end_mirror(epoch);
        writer.abort();
        if began.elapsed() > LOOK_AGAIN {
            // It ran: a break now starts a new run of tries.
            backoff.reset();
            failing = false;
        }
        match ended {
            // The store let the mirror go (it fell behind): start afresh at once.
            Ok(_) => {
                backoff.reset();
                failing = false;
            }
            Err(status) if !failing => {
                failing = true;
                state("failing");
                tracing::warn!(
                    to = %standby.grpc_address,
                    "the mirror of stored responses ended, trying again: {}: {}",
                    status.code(),
                    status.message()
                );
            }
            Err(status) => {
                state("failing");
                tracing::debug!(
                to = %standby.grpc_address,
                    "the mirror of stored responses failed again: {}",
                    status.message()
                );
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::response_store::Lookup;
    use crate::response_store::tests::user;

    pub(in crate::response_store) fn keep(
        store: &ResponseStore,
        before: &[Arc<StoredMessage>],
        text: &str,
    ) -> Arc<StoredResponse> {
        let mut conversation = before.to_vec();
        conversation.push(store.message(user(text)));
        let response = store.response(
            store.new_id(),
            Some("acme".into()),
            format!(r#"{{"said":"{text}"}}"#),
            vec![crate::response_store::tests::raw(
                serde_json::json!({"id": text}),
            )],
            conversation,
        );
        let id = response.id.clone();
        assert!(store.insert(response));
        match store.get(&id, Some("acme")) {
            Lookup::Found(kept) => kept,
            other => panic!("{other:?}"),
        }
    }

    /// Feeds `events` to `standby`.
    fn follow(writer: &mut MirrorWriter, events: Vec<MirrorEvent>, standby: &mut Standby) {
        for event in events {
            for item in writer.items(event) {
                standby.apply(item).expect("a valid mirror");
            }
        }
    }

    /// Feeds `standby` the changes waiting, until none are left (sending one may free
    /// messages, which are changes too).
    fn catch_up(
        writer: &mut MirrorWriter,
        events: &mut mpsc::Receiver<MirrorEvent>,
        standby: &mut Standby,
    ) {
        while let Ok(event) = events.try_recv() {
            follow(writer, vec![event], standby);
        }
    }

    fn waiting(events: &mut mpsc::Receiver<MirrorEvent>) -> Vec<MirrorEvent> {
        std::iter::from_fn(|| events.try_recv().ok()).collect()
    }

    /// A replica's Batch API files and batches go to its standby with its responses: a file
    /// as it is kept or deleted, a batch whole once, then as it moves on and each answer as it
    /// comes; taken over, they are the batch store's to take.
    #[test]
    fn files_and_batches_are_mirrored_as_they_change() {
        use crate::batches::{Answer, BatchLimits, BatchStore};
        let sender = Arc::new(ResponseStore::new(StoreLimits::default()));
        let batches =
            BatchStore::new(sender.owner(), BatchLimits::default()).mirrored_with(sender.clone());
        let kept = batches
            .upload(None, "in.jsonl".into(), bytes::Bytes::from_static(b"{}"))
            .unwrap();
        let mut start = sender.begin_mirror(1024);
        start.beside = batches.mirror_events();
        let mut writer = MirrorWriter::new(start.epoch);
        let mut events = start.events;
        let gauge = Gauge::default();
        let mut standby =
            Standby::new(StoreLimits::default(), Gauge::default()).with_batch_gauge(gauge.clone());
        let now = start
            .tags
            .into_iter()
            .map(MirrorEvent::Tag)
            .chain(start.beside);
        follow(&mut writer, now.collect(), &mut standby);

        let deleted = batches
            .upload(None, "gone.jsonl".into(), bytes::Bytes::from_static(b"{}"))
            .unwrap();
        assert!(batches.delete_file(&deleted.id, None));
        let batch = Arc::new(crate::batches::batch_in_progress(
            &batches,
            bytes::Bytes::from_static(b"input"),
        ));
        batches.add_batch(batch.clone());
        for index in [0, 2] {
            let answer = Answer {
                succeeded: true,
                line: format!("line {index}"),
            };
            batch.answers.lock().unwrap().insert(index, answer);
            batches.answered(&batch, index);
        }
        batch.progress.lock().unwrap().completed = 2;
        batches.changed(&batch);
        catch_up(&mut writer, &mut events, &mut standby);
        assert_eq!(gauge.get(), 1);

        let (tags, _, received) = standby.take_over(&ResponseStore::new(StoreLimits::default()));
        assert_eq!(tags, [sender.owner().to_string()]);
        assert_eq!(gauge.get(), 0, "the copy is gone");
        assert!(received.holds_file(&kept.id));
        assert!(!received.holds_file(&deleted.id));
        let answers = received.answers_of(&batch.id).expect("the batch");
        assert_eq!(answers.keys().copied().collect::<Vec<_>>(), [0, 2]);
        assert_eq!(answers[&2].line, "line 2");
    }

    /// A conversation that grows turn by turn is sent whole once, then only what each turn
    /// adds; one changed otherwise (an item deleted) is sent whole again. The standby's copy
    /// is the sender's either way.
    #[test]
    fn a_growing_conversation_is_mirrored_by_what_it_adds() {
        use crate::response_store::conversation::answer;
        use switchyard_proto::v1::conversation_call::Call;
        let sender = ResponseStore::new(StoreLimits::default());
        let start = sender.begin_mirror(1024);
        let mut writer = MirrorWriter::new(start.epoch);
        let mut standby = Standby::new(StoreLimits::default(), Gauge::default());
        let MirrorStart {
            tags, mut events, ..
        } = start;
        follow(
            &mut writer,
            tags.into_iter().map(MirrorEvent::Tag).collect(),
            &mut standby,
        );
        let id = sender.new_conversation_id();
        let made = sender.conversation(
            id.clone(),
            Some("acme".into()),
            7,
            crate::response_store::tests::raw(serde_json::json!({"k": "v"})),
            Vec::new(),
        );
        assert!(sender.put_conversation(made));
        let call = |call: Call| {
            let call = v1::ConversationCall {
                conversation_id: id.clone(),
                call: Some(call),
            };
            answer(&sender, Some("acme"), call).expect("answered");
        };
        let add = |n: usize| {
            let item = serde_json::json!({"id": format!("msg_{n}"), "type": "message",
                                          "role": "user", "content": "x".repeat(1000)});
            call(Call::AddItems(v1::AddedItems {
                items_json: vec![item.to_string()],
            }));
        };
        // (whole sends, appends, item bytes sent) for what is waiting.
        let mut sent = |standby: &mut Standby| {
            let (mut whole, mut appends, mut bytes) = (0, 0, 0);
            while let Ok(event) = events.try_recv() {
                for item in writer.items(event) {
                    match &item.item {
                        Some(Item::Conversation(c)) => {
                            whole += 1;
                            bytes += c.items_json.iter().map(String::len).sum::<usize>();
                        }
                        Some(Item::ConversationAppend(a)) => {
                            appends += 1;
                            bytes += a.items_json.iter().map(String::len).sum::<usize>();
                        }
                        _ => {}
                    }
                    standby.apply(item).expect("a valid mirror");
                }
            }
            (whole, appends, bytes)
        };
        let ids = |store: &ResponseStore| match store.get_conversation(&id, Some("acme")) {
            Lookup::Found(c) => c.items.iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        for n in 0..10 {
            add(n);
        }
        let (whole, appends, bytes) = sent(&mut standby);
        assert_eq!((whole, appends), (1, 10));
        assert!(bytes < 11 * 1100, "each item sent once: {bytes} bytes");
        assert_eq!(ids(&standby.store), ids(&sender));

        call(Call::DeleteItem("msg_3".into()));
        add(10);
        let (whole, appends, _) = sent(&mut standby);
        assert_eq!((whole, appends), (1, 1));
        assert_eq!(ids(&standby.store), ids(&sender));
        assert_eq!(ids(&sender).len(), 10);
    }

    #[test]
    fn a_standby_holds_what_its_sender_keeps_sharing_messages_as_it_does() {
        let sender = ResponseStore::new(StoreLimits::default());
        let first = keep(&sender, &[], "one");
        let start = sender.begin_mirror(1024);
        let mut writer = MirrorWriter::new(start.epoch);
        let gauge = Gauge::default();
        let mut standby = Standby::new(StoreLimits::default(), gauge.clone());
        let MirrorStart {
            tags,
            kept,
            mut events,
            ..
        } = start;
        let now: Vec<_> = tags
            .into_iter()
            .map(MirrorEvent::Tag)
            .chain(kept.into_iter().map(MirrorEvent::Kept))
            .collect();
        follow(&mut writer, now, &mut standby);
        // A conversation going on, one that goes, and a deleted response.
        let second = keep(&sender, &first.conversation, "two");
        let third = keep(&sender, &second.conversation, "three");
        let other = keep(&sender, &[], "other");
        assert!(sender.delete(&first.id, Some("acme")));
        assert!(sender.delete(&other.id, Some("acme")));
        drop((first, other));
        catch_up(&mut writer, &mut events, &mut standby);

        assert_eq!(standby.source(), Some(sender.owner()));
        assert_eq!(standby.usage().0, 2);
        assert_eq!(gauge.get(), 2);
        // Each message the sender still holds, once: "other" went with its response.
        assert_eq!(standby.messages.len(), 3);
        let copy = |id: &str| match standby.store.get(id, Some("acme")) {
            Lookup::Found(r) => r,
            other => panic!("{other:?}"),
        };
        let (second_copy, third_copy) = (copy(&second.id), copy(&third.id));
        assert!(Arc::ptr_eq(
            &second_copy.conversation[1],
            &third_copy.conversation[1]
        ));
        assert_eq!(third_copy.conversation[2].content, "three");
        assert_eq!(third_copy.object, third.object);

        // Taken over, it answers for the sender's ids, with the same sharing.
        let survivor = ResponseStore::new(StoreLimits::default());
        let (tags, kept, _) = standby.take_over(&survivor);
        assert_eq!((tags, kept), (vec![sender.owner().to_string()], 2));
        assert_eq!(gauge.get(), 0, "the copy is gone");
        let Lookup::Found(taken) = survivor.get(&third.id, Some("acme")) else {
            panic!("taken over");
        };
        assert_eq!(taken.input_items[0].get(), third.input_items[0].get());
        assert_eq!(
            taken.messages().map(|m| m.content).collect::<Vec<_>>(),
            ["one", "two", "three"]
        );
    }

    /// A message a standby was sent is named again by a later response as long as the sender
    /// holds it, even after every response that held it went: the standby keeps it until
    /// the sender says it is gone.
    #[test]
    fn a_message_outliving_its_responses_is_still_named_by_later_ones() {
        let sender = ResponseStore::new(StoreLimits::default());
        let start = sender.begin_mirror(1024);
        let mut writer = MirrorWriter::new(start.epoch);
        let mut events = start.events;
        let mut standby = Standby::new(StoreLimits::default(), Gauge::default());
        follow(
            &mut writer,
            start.tags.into_iter().map(MirrorEvent::Tag).collect(),
            &mut standby,
        );
        let first = keep(&sender, &[], "one");
        catch_up(&mut writer, &mut events, &mut standby);
        // A request going on from it holds its conversation while the response is deleted.
        let history = first.conversation.clone();
        sender.delete(&first.id, Some("acme"));
        drop(first);
        catch_up(&mut writer, &mut events, &mut standby);
        assert_eq!(standby.usage().0, 0);
        let next = keep(&sender, &history, "two");
        drop(history);
        catch_up(&mut writer, &mut events, &mut standby);
        assert!(matches!(
            standby.store.get(&next.id, Some("acme")),
            Lookup::Found(r) if r.conversation.len() == 2
        ));
        // Deleted, everything it held goes on both sides.
        sender.delete(&next.id, Some("acme"));
        drop(next);
        catch_up(&mut writer, &mut events, &mut standby);
        assert_eq!(standby.usage(), (0, 0));
        assert!(standby.messages.is_empty());
    }

    #[test]
    fn a_mirror_that_falls_behind_is_let_go_and_a_new_one_sends_everything_again() {
        let sender = ResponseStore::new(StoreLimits::default());
        let start = sender.begin_mirror(2);
        let mut events = start.events;
        let kept: Vec<_> = (0..3).map(|i| keep(&sender, &[], &i.to_string())).collect();
        // Two changes fit; the third let the mirror go, so its receiver ends.
        assert_eq!(waiting(&mut events).len(), 2);
        assert!(events.is_closed());
        let again = sender.begin_mirror(1024);
        assert!(again.epoch > start.epoch);
        assert_eq!(again.kept.len(), kept.len());
        let mut writer = MirrorWriter::new(again.epoch);
        // Messages already sent to the first mirror are sent to this one too.
        let items = writer.items(MirrorEvent::Kept(kept[0].clone()));
        assert!(matches!(items[0].item, Some(Item::Message(_))));
    }

    #[test]
    fn a_standby_refuses_what_no_mirror_sends() {
        let mut standby = Standby::new(StoreLimits::default(), Gauge::default());
        let response = v1::MirrorItem {
            item: Some(Item::Response(v1::HandedResponse {
                id: "resp_x".into(),
                ..Default::default()
            })),
        };
        // Responses before tags.
        assert!(standby.apply(response.clone()).is_err());
        standby
            .apply(v1::MirrorItem {
                item: Some(Item::Tag("0123456789ab".into())),
            })
            .expect("a tag");
        // A message never sent.
        let mut unknown = response;
        if let Some(Item::Response(r)) = &mut unknown.item {
            r.conversation = vec![7];
        }
        let refused = standby.apply(unknown).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(standby.apply(v1::MirrorItem { item: None }).is_err());
    }

    #[test]
    fn each_replica_mirrors_to_the_next_by_address() {
        let record = |id: &str, address: &str| RouterRecord {
            id: id.into(),
            grpc_address: address.into(),
        };
        let routers = || {
            vec![
                record("aaaaaaaaaaaa", "10.0.0.1:50051"),
                record("bbbbbbbbbbbb", "10.0.0.2:50051"),
                // A tag handed over to 10.0.0.2: the same replica.
                record("cccccccccccc", "10.0.0.2:50051"),
                record("dddddddddddd", "10.0.0.3:50051"),
            ]
        };
        let standby = |me: &str, mine: &[&str]| {
            let mine: Vec<String> = mine.iter().map(|t| t.to_string()).collect();
            choose_standby(me, &mine, routers()).map(|r| r.grpc_address)
        };
        assert_eq!(
            standby("10.0.0.1:50051", &["aaaaaaaaaaaa"]).as_deref(),
            Some("10.0.0.2:50051")
        );
        assert_eq!(
            standby("10.0.0.2:50051", &["bbbbbbbbbbbb", "cccccccccccc"]).as_deref(),
            Some("10.0.0.3:50051")
        );
        assert_eq!(
            standby("10.0.0.3:50051", &["dddddddddddd"]).as_deref(),
            Some("10.0.0.1:50051")
        );
        // Alone: none.
        assert_eq!(
            choose_standby(
                "10.0.0.1:50051",
                &[],
                vec![record("aaaaaaaaaaaa", "10.0.0.1:50051")]
            ),
            None
        );
    }
}
