//! Stored responses: what `store: true` (OpenAI's default) keeps, so a later request can go on
//! from a response by its id (`previous_response_id`) and a client can read it back
//! (`GET /v1/responses/{id}`, its `input_items`) or delete it.
//!
//! Kept in this router's memory, bounded in bytes and in age: the oldest go first when a new
//! one does not fit, and none outlives `max_age`. A response id names the router replica
//! that stored it (its [`ResponseStore::owner`], fresh at every start): a replica asked about
//! another's response fetches it from that replica (see [`peers`]), and an id whose replica is
//! gone is answered "not found" with that reason.
//!
//! Each response is readable only by the tenant that made it (requests without an API key
//! are one tenant).
//!
//! The same store keeps conversations (`conv_…`, the Conversations API, see [`conversation`]):
//! their ids name their replica too, they count against the same bytes, and they go (oldest
//! change first) as responses do.
//!
//! Chat completions a request asked to keep (`store: true`, `chatcmpl-…`) are kept as
//! responses are (see [`chat`]).
//!
//! What a store keeps and drops can be followed as it happens ([`ResponseStore::begin_mirror`]):
//! that is how another replica keeps a standby copy (see [`mirror`]).

pub mod background;
pub mod chat;
pub mod conversation;
pub mod events;
pub mod handover;
pub mod item_ids;
pub mod journal;
pub mod mirror;
pub mod peers;
pub mod saved;
pub mod service;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use serde_json::value::RawValue;
use switchyard_proto::v1;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub use conversation::{StoredConversation, StoredItem};

/// Hex digits of the owner tag at the start of an id (after `resp_`).
const OWNER_CHARS: usize = 12;
const ID_PREFIX: &str = "resp_";
const CONVERSATION_PREFIX: &str = "conv_";

/// What a store and every piece it made share: the count of bytes alive, and the mirror
/// following the store, if any.
#[derive(Debug, Default)]
struct Ledger {
    /// Bytes of every message and response the store made that is still alive.
    alive: AtomicUsize,
    /// Numbers of the messages made, so a mirror names each once.
    messages_made: AtomicU64,
    /// Mirrors started; 0 is none.
    mirrors_started: AtomicU64,
    mirror: Mutex<Option<Tap>>,
}

/// Where a store's changes go while a mirror follows it.
#[derive(Debug)]
struct Tap {
    epoch: u64,
    events: mpsc::Sender<MirrorEvent>,
}

/// A change to a store, as its mirror is told of it.
#[derive(Debug)]
pub enum MirrorEvent {
    /// The store answers for this tag's ids too.
    Tag(String),
    Kept(Arc<StoredResponse>),
    /// A conversation as it now stands (new or changed).
    Conversation(Arc<StoredConversation>),
    /// A response or conversation the store no longer keeps.
    Forgotten(String),
    /// A message the mirror was sent that no response can hold any more (its number).
    MessageGone(u64),
    /// A Batch API file the replica keeps (its files and batches are kept beside the store,
    /// and mirrored with it; `Forgotten` names a file deleted).
    BatchFile(Arc<crate::batches::StoredFile>),
    /// A batch, new or moved on.
    Batch(Arc<crate::batches::Batch>),
    /// A batch's request answered (its place in the input).
    BatchAnswered(Arc<crate::batches::Batch>, usize),
}

impl Ledger {
    /// Tells the mirror (if one follows) of `event`.
    fn tell(&self, event: MirrorEvent) {
        self.tell_mirror(event, None);
    }

    fn message_gone(&self, number: u64, sent_in: u64) {
        self.tell_mirror(MirrorEvent::MessageGone(number), Some(sent_in));
    }

    /// Tells the mirror following the store (only if it is mirror `epoch`, when given) of
    /// `event`. A mirror that cannot keep up is let go: its stream ends, and it starts afresh.
    fn tell_mirror(&self, event: MirrorEvent, epoch: Option<u64>) {
        let mut mirror = self.mirror.lock().expect("mirror tap");
        let Some(tap) = mirror
            .as_ref()
            .filter(|tap| epoch.is_none_or(|e| e == tap.epoch))
        else {
            return;
        };
        if let Err(refused) = tap.events.try_send(event) {
            let gone = mirror.take();
            drop(mirror);
            // What the refused event holds may free messages, which tell the mirror too.
            drop((refused, gone));
        }
    }
}

/// Bytes the store counts for a piece it made, given back when the piece is freed (wherever
/// it was held last: the store, a request going on from it, an answer being written).
#[derive(Debug)]
struct Charge {
    bytes: usize,
    ledger: Arc<Ledger>,
}

impl Charge {
    fn new(bytes: usize, ledger: &Arc<Ledger>) -> Self {
        ledger.alive.fetch_add(bytes, Ordering::Relaxed);
        Self {
            bytes,
            ledger: ledger.clone(),
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.ledger.alive.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// One message of a stored conversation, shared by every response that goes on from it.
#[derive(Debug)]
pub struct StoredMessage {
    message: v1::ChatMessage,
    /// Its number, unique in its store.
    number: u64,
    /// The mirror that was last sent it (0: none), so each mirror is sent it once.
    mirrored_in: AtomicU64,
    charge: Charge,
}

impl StoredMessage {
    /// Whether the mirror `epoch` has not been sent this message yet (it counts as sent from
    /// now on).
    fn first_sent_in(&self, epoch: u64) -> bool {
        self.mirrored_in.swap(epoch, Ordering::Relaxed) != epoch
    }
}

impl Drop for StoredMessage {
    fn drop(&mut self) {
        let sent_in = *self.mirrored_in.get_mut();
        if sent_in != 0 {
            self.charge.ledger.message_gone(self.number, sent_in);
        }
    }
}

impl std::ops::Deref for StoredMessage {
    type Target = v1::ChatMessage;

    fn deref(&self) -> &v1::ChatMessage {
        &self.message
    }
}

/// One stored response.
#[derive(Debug)]
pub struct StoredResponse {
    pub id: String,
    /// The tenant that made it; `None` without API keys.
    pub tenant: Option<String>,
    /// The response object as it was answered (its JSON text).
    pub object: String,
    /// This request's input items (each a JSON object with an `id`), for `input_items`: kept
    /// as text, which is what they are read as, sent to other replicas as, and counted by.
    pub input_items: Vec<Box<RawValue>>,
    /// The conversation a request going on from this response continues: the earlier
    /// responses' conversation, this request's input, and the model's answer. Instructions
    /// are not in it: they hold for one request, as OpenAI's do.
    pub conversation: Vec<Arc<StoredMessage>>,
    /// When it was first stored (by whichever replica): its age counts from then.
    pub stored_at: Instant,
    /// A background response still running (see [`background`]), as it stands: not stored,
    /// not to be gone on from yet.
    pub running: bool,
    /// The events of a streamed background response, for a client resuming its stream (this
    /// replica's only: they are not handed over or mirrored).
    pub events: Option<Arc<events::EventLog>>,
    /// What a listing reads of a stored chat completion's object, read once when first listed.
    listed: std::sync::OnceLock<Option<chat::Listed>>,
    charge: Charge,
}

impl StoredResponse {
    /// The conversation as the messages of a request.
    pub fn messages(&self) -> impl Iterator<Item = v1::ChatMessage> + '_ {
        self.conversation.iter().map(|m| m.message.clone())
    }

    /// Its input items' JSON texts, as sent to another replica.
    pub fn input_items_json(&self) -> Vec<String> {
        self.input_items
            .iter()
            .map(|i| i.get().to_string())
            .collect()
    }

    /// How long ago it was first stored.
    pub fn age(&self) -> Duration {
        Instant::now().saturating_duration_since(self.stored_at)
    }

    /// The same response, first stored `age` ago.
    pub fn aged(mut self, age: Duration) -> Self {
        self.stored_at = Instant::now().checked_sub(age).unwrap_or(self.stored_at);
        self
    }

    /// What it would hold on its own, shared messages included.
    fn whole_bytes(&self) -> usize {
        self.charge.bytes
            + self
                .conversation
                .iter()
                .map(|m| m.charge.bytes)
                .sum::<usize>()
    }
}

fn message_bytes(message: &v1::ChatMessage) -> usize {
    96 + message.role.len()
        + message.content.len()
        + message.tool_call_id.len()
        + message
            .tool_calls
            .iter()
            .map(|c| 32 + c.id.len() + c.name.len() + c.arguments.len())
            .sum::<usize>()
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup<T = Arc<StoredResponse>> {
    Found(T),
    /// Not here, and this replica stored it (or the id is not one of ours): expired, deleted,
    /// never stored, or another tenant's.
    Missing,
    /// Stored by another replica, named by its owner tag.
    Elsewhere(String),
}

/// Bounds of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Bytes of responses kept; 0 keeps none (`store: true` is then refused).
    pub max_bytes: usize,
    /// How long a response is kept.
    pub max_age: Duration,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_bytes: 256 << 20,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<String, Arc<StoredResponse>>,
    conversations: HashMap<String, Arc<StoredConversation>>,
    /// Ids by when they were stored (a conversation: last changed), oldest first. An entry
    /// whose time is not its object's any more (deleted, or a conversation changed since) is
    /// stale: skipped when it reaches the front, and swept out when stale ones are many.
    order: VecDeque<(Instant, String)>,
    stale: usize,
    /// The stored chat completions among `by_id`, in their listing's order.
    chats: chat::Index,
}

/// This replica's stored responses.
///
/// Memory is counted exactly: every message and response the store makes adds its bytes to
/// one count and takes them back when it is freed, however it is shared. So a long
/// conversation whose early responses went still counts the messages its later ones hold, and
/// the oldest responses go until what is alive fits.
#[derive(Debug)]
pub struct ResponseStore {
    owner: String,
    /// Tags of replicas that handed their responses to this one on stopping: this replica
    /// answers for their ids now.
    adopted: Mutex<Vec<String>>,
    limits: StoreLimits,
    inner: Mutex<Inner>,
    ledger: Arc<Ledger>,
    /// What it holds, for Prometheus: responses and bytes.
    gauges: Option<(Gauge, Gauge)>,
    conversation_gauge: Option<Gauge>,
    /// Background responses running on this replica.
    runs: background::Runs,
}

impl ResponseStore {
    pub fn new(limits: StoreLimits) -> Self {
        let owner = uuid::Uuid::new_v4().simple().to_string()[..OWNER_CHARS].to_string();
        Self {
            owner,
            adopted: Mutex::default(),
            limits,
            inner: Mutex::default(),
            ledger: Arc::default(),
            gauges: None,
            conversation_gauge: None,
            runs: background::Runs::default(),
        }
    }

    /// Keeps `responses`, `conversations` and `bytes` at what the store holds.
    pub fn with_gauges(mut self, responses: Gauge, conversations: Gauge, bytes: Gauge) -> Self {
        self.gauges = Some((responses, bytes));
        self.conversation_gauge = Some(conversations);
        self
    }

    fn publish(&self, inner: &Inner) {
        if let Some((responses, bytes)) = &self.gauges {
            responses.set(inner.by_id.len() as i64);
            bytes.set(self.alive() as i64);
        }
        if let Some(conversations) = &self.conversation_gauge {
            conversations.set(inner.conversations.len() as i64);
        }
    }

    fn alive(&self) -> usize {
        self.ledger.alive.load(Ordering::Relaxed)
    }

    /// The tag this replica's ids carry (what it announces itself under).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    /// A new id for a response this replica stores.
    pub fn new_id(&self) -> String {
        format!("{ID_PREFIX}{}{}", self.owner, uuid::Uuid::new_v4().simple())
    }

    /// A message of a conversation that may be stored, counted while it lives.
    pub fn message(&self, message: v1::ChatMessage) -> Arc<StoredMessage> {
        let charge = Charge::new(message_bytes(&message), &self.ledger);
        Arc::new(StoredMessage {
            message,
            number: self.ledger.messages_made.fetch_add(1, Ordering::Relaxed),
            mirrored_in: AtomicU64::new(0),
            charge,
        })
    }

    /// A response that may be stored, counted while it lives.
    pub fn response(
        &self,
        id: String,
        tenant: Option<String>,
        object: String,
        input_items: Vec<Box<RawValue>>,
        conversation: Vec<Arc<StoredMessage>>,
    ) -> StoredResponse {
        let bytes = 256
            + id.len()
            + object.len()
            + input_items.iter().map(|i| i.get().len()).sum::<usize>()
            + conversation.len() * std::mem::size_of::<usize>();
        StoredResponse {
            id,
            tenant,
            object,
            input_items,
            conversation,
            stored_at: Instant::now(),
            running: false,
            events: None,
            listed: std::sync::OnceLock::new(),
            charge: Charge::new(bytes, &self.ledger),
        }
    }

    /// Keeps `response`; older responses go until what is alive fits. One larger than the
    /// whole store, or older than its maximum age, is not kept.
    pub fn insert(&self, response: StoredResponse) -> bool {
        if response.whole_bytes() > self.limits.max_bytes {
            return false;
        }
        let mut inner = self.inner.lock().expect("response store lock");
        let id = response.id.clone();
        inner.place(response.stored_at, &id);
        let response = Arc::new(response);
        if let Some(replaced) = inner.by_id.insert(id.clone(), response.clone()) {
            inner.stale += 1;
            inner.chats.remove(&replaced);
        }
        inner.chats.add(&response);
        self.ledger.tell(MirrorEvent::Kept(response));
        self.settle(&mut inner, &id);
        inner.by_id.contains_key(&id)
    }

    /// After `kept` was placed: drops what expired, then the oldest until what is alive fits
    /// (never `kept` when it is the newest).
    fn settle(&self, inner: &mut Inner, kept: &str) {
        inner.expire(Instant::now(), self.limits.max_age, &self.ledger);
        while self.alive() > self.limits.max_bytes {
            let Some((at, oldest)) = inner.order.front() else {
                break;
            };
            if oldest == kept && inner.is_current(*at, oldest) {
                // The newest is kept though what requests in flight hold runs over; one handed
                // over older than others kept is the oldest, and goes.
                if inner.live() > 1 {
                    inner.evict_oldest(&self.ledger);
                }
                break;
            }
            inner.evict_oldest(&self.ledger);
        }
        inner.sweep();
        self.publish(inner);
    }

    /// Every tag this replica answers for: its own, then those handed to it.
    pub fn tags(&self) -> Vec<String> {
        let mut tags = vec![self.owner.clone()];
        tags.extend(self.adopted.lock().expect("adopted tags").iter().cloned());
        tags
    }

    /// Answers for `tag`'s ids from now on (its replica handed its responses over).
    pub fn adopt_tag(&self, tag: &str) {
        let mut adopted = self.adopted.lock().expect("adopted tags");
        if tag != self.owner && !adopted.iter().any(|t| t == tag) {
            adopted.push(tag.to_string());
            self.ledger.tell(MirrorEvent::Tag(tag.to_string()));
        }
    }

    fn answers_for(&self, tag: &str) -> bool {
        tag == self.owner
            || self
                .adopted
                .lock()
                .expect("adopted tags")
                .iter()
                .any(|t| t == tag)
    }

    /// Every response kept, oldest first (to hand them over).
    pub fn export(&self) -> Vec<Arc<StoredResponse>> {
        let inner = self.inner.lock().expect("response store lock");
        inner
            .order
            .iter()
            .filter_map(|(_, id)| inner.by_id.get(id).cloned())
            .collect()
    }

    /// The response `id`, if `tenant` may read it: stored, or a background response still
    /// running (marked `running`).
    pub fn get(&self, id: &str, tenant: Option<&str>) -> Lookup {
        let kept = self.look_up(id, |inner| {
            inner
                .by_id
                .get(id)
                .filter(|r| r.tenant.as_deref() == tenant)
                .cloned()
        });
        match kept {
            Lookup::Missing => match self.running_response(id, tenant) {
                Some(running) => Lookup::Found(Arc::new(running)),
                None => Lookup::Missing,
            },
            kept => kept,
        }
    }

    /// What `find` finds of `id` in what is kept (once what is too old has gone); an id of
    /// another replica is [`Lookup::Elsewhere`].
    fn look_up<T>(&self, id: &str, find: impl FnOnce(&Inner) -> Option<T>) -> Lookup<T> {
        match owner_of(id) {
            Some(owner) if self.answers_for(owner) => {}
            Some(owner) => return Lookup::Elsewhere(owner.to_string()),
            None => return Lookup::Missing,
        }
        let mut inner = self.inner.lock().expect("response store lock");
        inner.expire(Instant::now(), self.limits.max_age, &self.ledger);
        self.publish(&inner);
        match find(&inner) {
            Some(found) => Lookup::Found(found),
            None => Lookup::Missing,
        }
    }

    /// Whether response `id` is stored here (whoever made it).
    fn holds(&self, id: &str) -> bool {
        let inner = self.inner.lock().expect("response store lock");
        inner.by_id.contains_key(id)
    }

    /// Deletes the response or stored chat completion `id` if `tenant` may; whether it was
    /// here.
    pub fn delete(&self, id: &str, tenant: Option<&str>) -> bool {
        (id.starts_with(ID_PREFIX) || id.starts_with(chat::CHAT_PREFIX))
            && self.delete_kept(id, tenant)
    }

    /// Deletes the response or conversation `id` if `tenant` may; whether it was here.
    fn delete_kept(&self, id: &str, tenant: Option<&str>) -> bool {
        let mut inner = self.inner.lock().expect("response store lock");
        let made_by = match inner.by_id.get(id) {
            Some(response) => Some(response.tenant.as_deref()),
            None => inner.conversations.get(id).map(|c| c.tenant.as_deref()),
        };
        let mine = made_by == Some(tenant);
        if mine {
            inner.drop_kept(id, &self.ledger);
            self.publish(&inner);
        }
        mine
    }

    /// Drops the response or conversation `id` whoever made it (a mirror told it went).
    pub fn remove(&self, id: &str) {
        let mut inner = self.inner.lock().expect("response store lock");
        inner.drop_kept(id, &self.ledger);
        self.publish(&inner);
    }

    /// Responses kept, and the bytes of everything the store made that is alive.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.inner.lock().expect("response store lock");
        (inner.by_id.len(), self.alive())
    }

    /// Starts following the store, for a mirror: what it keeps now (oldest first) and the
    /// tags it answers for, then every change from here on, in order, on the receiver (at
    /// most `backlog` waiting: a mirror that falls further behind is let go, its receiver
    /// ends). A mirror started later replaces this one; [`Self::end_mirror`] ends it.
    pub fn begin_mirror(&self, backlog: usize) -> MirrorStart {
        let inner = self.inner.lock().expect("response store lock");
        let mut mirror = self.ledger.mirror.lock().expect("mirror tap");
        let epoch = self.ledger.mirrors_started.fetch_add(1, Ordering::Relaxed) + 1;
        let (events_tx, events) = mpsc::channel(backlog);
        *mirror = Some(Tap {
            epoch,
            events: events_tx,
        });
        MirrorStart {
            epoch,
            tags: self.tags(),
            kept: inner
                .order
                .iter()
                .filter_map(|(_, id)| inner.by_id.get(id).cloned())
                .chain(self.interrupted_runs(|id| inner.by_id.contains_key(id)))
                .collect(),
            conversations: inner.conversations_by_age(),
            beside: Vec::new(),
            events,
        }
    }

    /// Tells the mirror following the store (if any) of `event`: what is kept beside the
    /// store (the Batch API's files and batches) goes with it.
    pub fn tell_mirror(&self, event: MirrorEvent) {
        self.ledger.tell(event);
    }

    /// Ends the mirror `epoch`, if it still follows the store: its receiver ends.
    pub fn end_mirror(&self, epoch: u64) {
        let mut mirror = self.ledger.mirror.lock().expect("mirror tap");
        if mirror.as_ref().is_some_and(|tap| tap.epoch == epoch) {
            let gone = mirror.take();
            drop(mirror);
            drop(gone);
        }
    }
}

/// A mirror's start ([`ResponseStore::begin_mirror`]).
#[derive(Debug)]
pub struct MirrorStart {
    /// Names this mirror: a message counts as sent to it once marked with it.
    pub epoch: u64,
    pub tags: Vec<String>,
    /// What the store kept when the mirror began, oldest first, then the background
    /// responses running as they would stand were they cut off.
    pub kept: Vec<Arc<StoredResponse>>,
    pub conversations: Vec<Arc<StoredConversation>>,
    /// What is kept beside the store when the mirror began (files and batches), sent after
    /// the rest.
    pub beside: Vec<MirrorEvent>,
    pub events: mpsc::Receiver<MirrorEvent>,
}

impl Inner {
    /// Responses and conversations kept.
    fn live(&self) -> usize {
        self.by_id.len() + self.conversations.len()
    }

    /// Whether the order's entry (`at`, `id`) is its object's (not stale).
    fn is_current(&self, at: Instant, id: &str) -> bool {
        if id.starts_with(CONVERSATION_PREFIX) {
            self.conversations
                .get(id)
                .is_some_and(|c| c.stored_at == at)
        } else {
            self.by_id.get(id).is_some_and(|r| r.stored_at == at)
        }
    }

    /// Enters `id`, stored at `at`, in the order: handed over objects keep their age, so may
    /// belong before the newest.
    fn place(&mut self, at: Instant, id: &str) {
        let place = self.order.partition_point(|(t, _)| *t <= at);
        self.order.insert(place, (at, id.to_string()));
    }

    /// Sweeps stale entries out of the order once they outnumber the live ones.
    fn sweep(&mut self) {
        if self.stale > 64 && self.stale > self.live() {
            let mut order = std::mem::take(&mut self.order);
            order.retain(|(at, id)| self.is_current(*at, id));
            self.order = order;
            self.stale = 0;
        }
    }

    /// Every conversation kept, oldest change first.
    fn conversations_by_age(&self) -> Vec<Arc<StoredConversation>> {
        let mut all: Vec<_> = self.conversations.values().cloned().collect();
        all.sort_by_key(|c| c.stored_at);
        all
    }

    fn expire(&mut self, now: Instant, max_age: Duration, ledger: &Ledger) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < max_age {
                break;
            }
            self.evict_oldest(ledger);
        }
    }

    /// Drops the oldest entry still in the order (its memory goes when nothing else holds
    /// it); false when there is none.
    fn evict_oldest(&mut self, ledger: &Ledger) -> bool {
        let Some((at, id)) = self.order.pop_front() else {
            return false;
        };
        if self.is_current(at, &id) {
            self.forget(&id, ledger);
        } else {
            self.stale = self.stale.saturating_sub(1);
        }
        true
    }

    /// Drops `id` before its order entry reaches the front (which is stale from now on).
    fn drop_kept(&mut self, id: &str, ledger: &Ledger) {
        if self.forget(id, ledger) {
            self.stale += 1;
        }
    }

    /// Drops the response or conversation `id`; whether it was kept.
    fn forget(&mut self, id: &str, ledger: &Ledger) -> bool {
        let gone = match self.by_id.remove(id) {
            Some(response) => {
                self.chats.remove(&response);
                true
            }
            None => self.conversations.remove(id).is_some(),
        };
        if gone {
            ledger.tell(MirrorEvent::Forgotten(id.to_string()));
        }
        gone
    }
}

/// Whether `id` is a Responses-API response's (not a conversation's or a chat completion's,
/// which the same store keeps).
pub fn is_response_id(id: &str) -> bool {
    id.starts_with(ID_PREFIX)
}

/// The owner tag of a response, conversation or stored chat completion id of this store's
/// shape; `None` for any other id.
pub fn owner_of(id: &str) -> Option<&str> {
    let rest = id
        .strip_prefix(ID_PREFIX)
        .or_else(|| id.strip_prefix(CONVERSATION_PREFIX))
        .or_else(|| id.strip_prefix(chat::CHAT_PREFIX))?;
    owner_in(rest)
}

/// The owner tag of an id of this shape once its prefix is off (`<tag><32 hex digits>`).
pub fn owner_in(rest: &str) -> Option<&str> {
    let valid = rest.len() == OWNER_CHARS + 32 && rest.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| &rest[..OWNER_CHARS])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `value` as stored JSON text (the store's tests and its submodules').
    pub(super) fn raw(value: serde_json::Value) -> Box<RawValue> {
        serde_json::value::to_raw_value(&value).expect("serializes")
    }

    /// A user message saying `content` (the store's tests and its submodules').
    pub(super) fn user(content: &str) -> v1::ChatMessage {
        v1::ChatMessage {
            role: "user".into(),
            content: content.into(),
            ..Default::default()
        }
    }

    /// A response whose conversation is `before` and one message of `text`.
    fn response(
        store: &ResponseStore,
        tenant: Option<&str>,
        before: &[Arc<StoredMessage>],
        text: &str,
    ) -> StoredResponse {
        let mut conversation = before.to_vec();
        conversation.push(store.message(user(text)));
        store.response(
            store.new_id(),
            tenant.map(Into::into),
            json!({"output_text": "ok"}).to_string(),
            vec![raw(json!({"type": "message"}))],
            conversation,
        )
    }

    fn limits(max_bytes: usize) -> StoreLimits {
        StoreLimits {
            max_bytes,
            max_age: Duration::from_secs(60),
        }
    }

    fn kept(store: &ResponseStore, id: &str) -> bool {
        matches!(store.get(id, None), Lookup::Found(_))
    }

    #[test]
    fn ids_name_their_replica_and_other_ids_are_no_ones() {
        let (a, b) = (
            ResponseStore::new(limits(1 << 20)),
            ResponseStore::new(limits(1 << 20)),
        );
        let id = a.new_id();
        assert_eq!(owner_of(&id), Some(a.owner()));
        assert!(matches!(b.get(&id, None), Lookup::Elsewhere(o) if o == a.owner()));
        assert!(matches!(a.get(&id, None), Lookup::Missing));
        for other in ["resp_1", "chatcmpl-abc", "", &format!("{id}0")] {
            assert_eq!(owner_of(other), None, "{other}");
            assert!(matches!(a.get(other, None), Lookup::Missing));
        }
    }

    #[test]
    fn a_response_is_read_and_deleted_by_its_tenant_only() {
        let store = ResponseStore::new(limits(1 << 20));
        let kept = response(&store, Some("acme"), &[], "hi");
        let id = kept.id.clone();
        assert!(store.insert(kept));
        assert!(matches!(store.get(&id, Some("acme")), Lookup::Found(r) if r.id == id));
        assert!(matches!(store.get(&id, Some("other")), Lookup::Missing));
        assert!(matches!(store.get(&id, None), Lookup::Missing));
        assert!(!store.delete(&id, Some("other")));
        assert!(store.delete(&id, Some("acme")));
        assert!(matches!(store.get(&id, Some("acme")), Lookup::Missing));
        assert_eq!(store.usage(), (0, 0));
    }

    #[test]
    fn the_oldest_go_when_the_bytes_run_out() {
        let probe = ResponseStore::new(limits(1 << 20));
        let one = response(&probe, None, &[], &"x".repeat(1000)).whole_bytes();
        let store = ResponseStore::new(limits(one * 3));
        let ids: Vec<String> = (0..5)
            .map(|_| {
                let r = response(&store, None, &[], &"x".repeat(1000));
                let id = r.id.clone();
                assert!(store.insert(r));
                id
            })
            .collect();
        let kept: Vec<bool> = ids.iter().map(|id| kept(&store, id)).collect();
        assert_eq!(kept, [false, false, true, true, true]);
        assert!(store.usage().1 <= one * 3);
        // Larger than the whole store: refused, nothing evicted for it, nothing left counted.
        assert!(!store.insert(response(&store, None, &[], &"x".repeat(one * 4))));
        assert_eq!(store.usage(), (3, one * 3));
    }

    /// Each response of a conversation holds every message before it. When an early response
    /// goes, the messages its successors hold stay alive and still count, so the store goes on
    /// evicting until what is alive fits, whatever holds what.
    #[test]
    fn memory_shared_along_conversations_is_counted_until_it_is_freed() {
        let turn = 10_000;
        let probe = ResponseStore::new(limits(1 << 20));
        let one = response(&probe, None, &[], &"x".repeat(turn)).whole_bytes();
        let store = ResponseStore::new(limits(one * 9 / 2));
        // Goes on from `last` (as a client naming it does) with one more turn.
        let go_on = |last: Option<&str>| {
            let history = match last.map(|id| store.get(id, None)) {
                Some(Lookup::Found(previous)) => previous.conversation.clone(),
                _ => Vec::new(),
            };
            let next = response(&store, None, &history, &"x".repeat(turn));
            let id = next.id.clone();
            assert!(store.insert(next));
            assert!(store.usage().1 <= one * 9 / 2, "{:?}", store.usage());
            id
        };
        let a0 = go_on(None);
        let b0 = go_on(None);
        let a1 = go_on(Some(&a0));
        let b1 = go_on(Some(&b0));
        // Four turns alive; a third turn of A does not fit. Evicting a0 frees nothing (a1
        // holds its message), nor b0, nor a1: only b1 frees B's two turns.
        let a2 = go_on(Some(&a1));
        let kept: Vec<bool> = [&a0, &b0, &a1, &b1, &a2]
            .iter()
            .map(|id| kept(&store, id))
            .collect();
        assert_eq!(kept, [false, false, false, false, true]);
        // Sharing is counted once: a response going on from a2 adds only its own turn.
        let before = store.usage().1;
        let a3 = go_on(Some(&a2));
        assert!(store.usage().1 - before < one + 1000, "{:?}", store.usage());
        // Deleting what is kept frees everything.
        store.delete(&a2, None);
        store.delete(&a3, None);
        assert_eq!(store.usage(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn responses_older_than_max_age_are_gone() {
        let store = ResponseStore::new(limits(1 << 20));
        let old = response(&store, None, &[], "old");
        let old_id = old.id.clone();
        store.insert(old);
        tokio::time::advance(Duration::from_secs(45)).await;
        let new = response(&store, None, &[], "new");
        let new_id = new.id.clone();
        store.insert(new);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(!kept(&store, &old_id));
        assert!(kept(&store, &new_id));
        assert_eq!(store.usage().0, 1);
    }

    #[test]
    fn the_gauges_follow_what_is_kept() {
        let (count, bytes) = (Gauge::default(), Gauge::default());
        let store = ResponseStore::new(limits(1 << 20)).with_gauges(
            count.clone(),
            Gauge::default(),
            bytes.clone(),
        );
        let kept = response(&store, None, &[], "hi");
        let id = kept.id.clone();
        store.insert(kept);
        assert_eq!(count.get(), 1);
        assert_eq!(bytes.get() as usize, store.usage().1);
        assert!(bytes.get() > 0);
        store.delete(&id, None);
        assert_eq!((count.get(), bytes.get()), (0, 0));
    }
}
