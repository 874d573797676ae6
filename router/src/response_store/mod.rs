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

pub mod peers;
pub mod service;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use serde_json::Value;
use switchyard_proto::v1;
use tokio::time::Instant;

/// Hex digits of the owner tag at the start of an id (after `resp_`).
const OWNER_CHARS: usize = 12;
const ID_PREFIX: &str = "resp_";

/// One stored response.
#[derive(Debug)]
pub struct StoredResponse {
    pub id: String,
    /// The tenant that made it; `None` without API keys.
    pub tenant: Option<String>,
    /// The response object, as it was answered.
    pub object: Value,
    /// This request's input items (each with an `id`), for `input_items`.
    pub input_items: Vec<Value>,
    /// The conversation a request going on from this response continues: the earlier
    /// responses' conversation, this request's input, and the model's answer. Instructions
    /// are not in it: they hold for one request, as OpenAI's do. Messages are shared with
    /// the responses that go on from it.
    pub conversation: Vec<Arc<v1::ChatMessage>>,
}

impl StoredResponse {
    /// Bytes it holds of its own (messages shared with its predecessor count there).
    fn bytes(&self, shared: usize) -> usize {
        let json = |v: &Value| v.to_string().len();
        let own: usize = self.conversation[shared.min(self.conversation.len())..]
            .iter()
            .map(|m| message_bytes(m))
            .sum();
        256 + self.id.len()
            + json(&self.object)
            + self.input_items.iter().map(json).sum::<usize>()
            + own
            + self.conversation.len() * std::mem::size_of::<usize>()
    }

    /// The conversation as the messages of a request.
    pub fn messages(&self) -> impl Iterator<Item = v1::ChatMessage> + '_ {
        self.conversation.iter().map(|m| (**m).clone())
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
pub enum Lookup {
    Found(Arc<StoredResponse>),
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

#[derive(Debug)]
struct Entry {
    response: Arc<StoredResponse>,
    bytes: usize,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<String, Entry>,
    /// Ids by age, oldest first (deleted ones stay until they reach the front).
    order: VecDeque<(Instant, String)>,
    bytes: usize,
}

/// This replica's stored responses.
#[derive(Debug)]
pub struct ResponseStore {
    owner: String,
    limits: StoreLimits,
    inner: Mutex<Inner>,
    /// What it holds, for Prometheus: responses and bytes.
    gauges: Option<(Gauge, Gauge)>,
}

impl ResponseStore {
    pub fn new(limits: StoreLimits) -> Self {
        let owner = uuid::Uuid::new_v4().simple().to_string()[..OWNER_CHARS].to_string();
        Self {
            owner,
            limits,
            inner: Mutex::default(),
            gauges: None,
        }
    }

    /// Keeps `responses` and `bytes` at what the store holds.
    pub fn with_gauges(mut self, responses: Gauge, bytes: Gauge) -> Self {
        self.gauges = Some((responses, bytes));
        self
    }

    fn publish(&self, inner: &Inner) {
        if let Some((responses, bytes)) = &self.gauges {
            responses.set(inner.by_id.len() as i64);
            bytes.set(inner.bytes as i64);
        }
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

    /// Keeps `response`; `shared` of its conversation's messages are its predecessor's.
    /// Older responses go to make room; one larger than the whole store is not kept.
    pub fn insert(&self, response: StoredResponse, shared: usize) -> bool {
        let bytes = response.bytes(shared);
        if bytes > self.limits.max_bytes {
            return false;
        }
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("response store lock");
        inner.expire(now, self.limits.max_age);
        while inner.bytes + bytes > self.limits.max_bytes {
            if !inner.evict_oldest() {
                break;
            }
        }
        let id = response.id.clone();
        inner.bytes += bytes;
        inner.order.push_back((now, id.clone()));
        inner.by_id.insert(
            id,
            Entry {
                response: Arc::new(response),
                bytes,
            },
        );
        self.publish(&inner);
        true
    }

    /// The response `id`, if `tenant` may read it.
    pub fn get(&self, id: &str, tenant: Option<&str>) -> Lookup {
        match owner_of(id) {
            Some(owner) if owner == self.owner => {}
            Some(owner) => return Lookup::Elsewhere(owner.to_string()),
            None => return Lookup::Missing,
        }
        let mut inner = self.inner.lock().expect("response store lock");
        inner.expire(Instant::now(), self.limits.max_age);
        self.publish(&inner);
        match inner.by_id.get(id) {
            Some(entry) if entry.response.tenant.as_deref() == tenant => {
                Lookup::Found(entry.response.clone())
            }
            _ => Lookup::Missing,
        }
    }

    /// Deletes the response `id` if `tenant` may; whether it was here.
    pub fn delete(&self, id: &str, tenant: Option<&str>) -> bool {
        let mut inner = self.inner.lock().expect("response store lock");
        let mine = inner
            .by_id
            .get(id)
            .is_some_and(|e| e.response.tenant.as_deref() == tenant);
        if mine && let Some(entry) = inner.by_id.remove(id) {
            inner.bytes -= entry.bytes;
            self.publish(&inner);
        }
        mine
    }

    /// Responses kept and their bytes.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.inner.lock().expect("response store lock");
        (inner.by_id.len(), inner.bytes)
    }
}

impl Inner {
    fn expire(&mut self, now: Instant, max_age: Duration) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < max_age {
                break;
            }
            self.evict_oldest();
        }
    }

    /// Drops the oldest entry still in the order; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        let Some((_, id)) = self.order.pop_front() else {
            return false;
        };
        if let Some(entry) = self.by_id.remove(&id) {
            self.bytes -= entry.bytes;
        }
        true
    }
}

/// The owner tag of a response id of this store's shape; `None` for any other id.
pub fn owner_of(id: &str) -> Option<&str> {
    let rest = id.strip_prefix(ID_PREFIX)?;
    let valid = rest.len() == OWNER_CHARS + 32 && rest.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| &rest[..OWNER_CHARS])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(content: &str) -> Arc<v1::ChatMessage> {
        Arc::new(v1::ChatMessage {
            role: "user".into(),
            content: content.into(),
            ..Default::default()
        })
    }

    fn response(store: &ResponseStore, tenant: Option<&str>, text: &str) -> StoredResponse {
        StoredResponse {
            id: store.new_id(),
            tenant: tenant.map(Into::into),
            object: json!({"output_text": text}),
            input_items: vec![json!({"type": "message", "content": text})],
            conversation: vec![message(text)],
        }
    }

    fn limits(max_bytes: usize) -> StoreLimits {
        StoreLimits {
            max_bytes,
            max_age: Duration::from_secs(60),
        }
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
        let kept = response(&store, Some("acme"), "hi");
        let id = kept.id.clone();
        assert!(store.insert(kept, 0));
        assert!(matches!(store.get(&id, Some("acme")), Lookup::Found(r) if r.id == id));
        assert!(matches!(store.get(&id, Some("other")), Lookup::Missing));
        assert!(matches!(store.get(&id, None), Lookup::Missing));
        assert!(!store.delete(&id, Some("other")));
        assert!(store.delete(&id, Some("acme")));
        assert!(matches!(store.get(&id, Some("acme")), Lookup::Missing));
        assert_eq!(store.usage(), (0, 0));
    }

    #[test]
    fn the_gauges_follow_what_is_kept() {
        let (count, bytes) = (Gauge::default(), Gauge::default());
        let store = ResponseStore::new(limits(1 << 20)).with_gauges(count.clone(), bytes.clone());
        let kept = response(&store, None, "hi");
        let id = kept.id.clone();
        store.insert(kept, 0);
        assert_eq!(count.get(), 1);
        assert_eq!(bytes.get() as usize, store.usage().1);
        assert!(bytes.get() > 0);
        store.delete(&id, None);
        assert_eq!((count.get(), bytes.get()), (0, 0));
    }

    #[test]
    fn the_oldest_go_when_the_bytes_run_out() {
        let probe = ResponseStore::new(limits(1 << 20));
        let one = response(&probe, None, &"x".repeat(1000)).bytes(0);
        let store = ResponseStore::new(limits(one * 3));
        let ids: Vec<String> = (0..5)
            .map(|_| {
                let r = response(&store, None, &"x".repeat(1000));
                let id = r.id.clone();
                assert!(store.insert(r, 0));
                id
            })
            .collect();
        let kept: Vec<bool> = ids
            .iter()
            .map(|id| matches!(store.get(id, None), Lookup::Found(_)))
            .collect();
        assert_eq!(kept, [false, false, true, true, true]);
        assert!(store.usage().1 <= one * 3);
        // Larger than the whole store: refused, nothing evicted for it.
        assert!(!store.insert(response(&store, None, &"x".repeat(one * 4)), 0));
        assert_eq!(store.usage().0, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn responses_older_than_max_age_are_gone() {
        let store = ResponseStore::new(limits(1 << 20));
        let old = response(&store, None, "old");
        let old_id = old.id.clone();
        store.insert(old, 0);
        tokio::time::advance(Duration::from_secs(45)).await;
        let new = response(&store, None, "new");
        let new_id = new.id.clone();
        store.insert(new, 0);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(matches!(store.get(&old_id, None), Lookup::Missing));
        assert!(matches!(store.get(&new_id, None), Lookup::Found(_)));
        assert_eq!(store.usage().0, 1);
    }

    #[test]
    fn shared_messages_count_once() {
        let store = ResponseStore::new(limits(1 << 20));
        let first = response(&store, None, &"x".repeat(10_000));
        let mut second = response(&store, None, "next");
        second.conversation = [first.conversation.clone(), second.conversation].concat();
        let (alone, shared) = (second.bytes(0), second.bytes(1));
        assert!(alone - shared >= 10_000, "{alone} vs {shared}");
    }
}
