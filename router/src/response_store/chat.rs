//! Stored chat completions: what a Chat Completions request with `store: true` keeps, read
//! back by its id (`chatcmpl-…`, naming the replica that keeps it as a response id does), its
//! request's messages, listed by model and metadata, its metadata changed, or deleted.
//!
//! They are kept as stored responses are (the same bytes and age bounds, hand-over and
//! standby copy): the completion object as answered (with its `metadata`) and the request's
//! messages, each given an id, as its items.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use switchyard_proto::v1;

use super::{ResponseStore, StoredResponse};

/// How a stored chat completion's id begins (OpenAI's form).
pub const CHAT_PREFIX: &str = "chatcmpl-";

/// Where a listing goes on from: the completion last listed, by creation and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created: u64,
    pub id: String,
}

/// Which stored chat completions a listing asks for.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Only this model's (`None`: any).
    pub model: Option<String>,
    /// Only those whose metadata holds every one of these pairs.
    pub metadata: Vec<(String, String)>,
    /// Only those after this one in the listing's order.
    pub after: Option<Cursor>,
    pub limit: usize,
    pub newest_first: bool,
}

/// What a listing reads of a completion object.
#[derive(Debug, Deserialize)]
pub(super) struct Listed {
    created: u64,
    #[serde(default)]
    model: String,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
}

impl Listing {
    /// Whether `listed` is one asked for (where the listing starts is the walk's to keep).
    fn takes(&self, listed: &Listed) -> bool {
        let model = self.model.as_ref().is_none_or(|m| *m == listed.model);
        let metadata = self.metadata.iter().all(|(key, value)| {
            listed
                .metadata
                .as_ref()
                .and_then(|m| m.get(key))
                .and_then(Value::as_str)
                == Some(value.as_str())
        });
        model && metadata
    }

    /// `found` (with their cursors) in the listing's order, at most `limit + 1` of them (the
    /// one past the page tells there are more).
    pub fn order(&self, mut found: Vec<(Cursor, Arc<str>)>) -> Vec<(Cursor, Arc<str>)> {
        found.sort_by(|(a, _), (b, _)| {
            let order = (a.created, &a.id).cmp(&(b.created, &b.id));
            if self.newest_first {
                order.reverse()
            } else {
                order
            }
        });
        found.truncate(self.limit + 1);
        found
    }
}

/// What a listing reads of stored chat completion `r`, read from its object once.
fn listed_of(r: &StoredResponse) -> Option<&Listed> {
    r.listed
        .get_or_init(|| serde_json::from_str(&r.object).ok())
        .as_ref()
}

/// The stored chat completions of a store, by `created`, then id: a listing walks them in
/// order and stops once it has a page.
#[derive(Debug, Default)]
pub(super) struct Index(BTreeMap<(u64, String), Arc<StoredResponse>>);

impl Index {
    /// Enters `r` if it is a stored chat completion.
    pub(super) fn add(&mut self, r: &Arc<StoredResponse>) {
        if let Some(key) = Self::key(r) {
            self.0.insert(key, r.clone());
        }
    }

    /// Takes `r` out, if it was entered.
    pub(super) fn remove(&mut self, r: &StoredResponse) {
        if let Some(key) = Self::key(r) {
            self.0.remove(&key);
        }
    }

    fn key(r: &StoredResponse) -> Option<(u64, String)> {
        if !r.id.starts_with(CHAT_PREFIX) {
            return None;
        }
        listed_of(r).map(|listed| (listed.created, r.id.clone()))
    }
}

/// The cursor of a completion object (its `created` and `id`), if it has them.
pub fn cursor_of(id: &str, object: &str) -> Option<Cursor> {
    let listed: Listed = serde_json::from_str(object).ok()?;
    Some(Cursor {
        created: listed.created,
        id: id.to_string(),
    })
}

impl ResponseStore {
    /// A new id for a chat completion this replica stores. Time-ordered (UUIDv7, ordered
    /// within the process): completions made in the same second list in the order they were
    /// made.
    pub fn new_chat_completion_id(&self) -> String {
        format!(
            "{CHAT_PREFIX}{}{}",
            self.owner,
            uuid::Uuid::now_v7().simple()
        )
    }

    /// The chat completions `tenant` stored here that `listing` asks for, in its order, at
    /// most `limit + 1`: walked in order from its cursor, until that many are found.
    pub fn list_chat_completions(
        &self,
        tenant: Option<&str>,
        listing: &Listing,
    ) -> Vec<(Cursor, Arc<str>)> {
        let mut inner = self.inner.lock().expect("response store lock");
        inner.expire(
            tokio::time::Instant::now(),
            self.limits.max_age,
            &self.ledger,
        );
        self.publish(&inner);
        let key = |c: &Cursor| (c.created, c.id.clone());
        let after = listing.after.as_ref().map(key);
        let walk: Box<dyn Iterator<Item = &Arc<StoredResponse>>> =
            match (listing.newest_first, after) {
                (false, None) => Box::new(inner.chats.0.values()),
                (false, Some(after)) => Box::new(
                    inner
                        .chats
                        .0
                        .range((Bound::Excluded(after), Bound::Unbounded))
                        .map(|(_, r)| r),
                ),
                (true, None) => Box::new(inner.chats.0.values().rev()),
                (true, Some(after)) => Box::new(inner.chats.0.range(..after).rev().map(|(_, r)| r)),
            };
        walk.filter(|r| r.tenant.as_deref() == tenant)
            .filter_map(|r| {
                let listed = listed_of(r)?;
                listing.takes(listed).then(|| {
                    let cursor = Cursor {
                        created: listed.created,
                        id: r.id.clone(),
                    };
                    (cursor, Arc::from(r.object.as_str()))
                })
            })
            .take(listing.limit + 1)
            .collect()
    }

    /// Replaces the metadata of chat completion `id` if `tenant` stored it here: its object
    /// as it is now; `None` when it is not kept for `tenant`.
    pub fn update_chat_metadata(
        &self,
        id: &str,
        tenant: Option<&str>,
        metadata: Value,
    ) -> Option<String> {
        if !id.starts_with(CHAT_PREFIX) {
            return None;
        }
        let super::Lookup::Found(kept) = self.get(id, tenant) else {
            return None;
        };
        let mut object: Map<String, Value> = serde_json::from_str(&kept.object).ok()?;
        object.insert("metadata".into(), metadata);
        let object = Value::Object(object).to_string();
        let items: Vec<Box<RawValue>> = kept.input_items.clone();
        let changed = self
            .response(
                id.to_string(),
                kept.tenant.clone(),
                object.clone(),
                items,
                Vec::new(),
            )
            .aged(kept.age());
        self.insert(changed).then_some(object)
    }
}

/// Most completions one page lists (OpenAI's bound).
pub const MAX_LIMIT: usize = 100;

/// The listing a `ListChatCompletions` call asks for.
pub fn listing_from_proto(asked: v1::ListChatCompletionsRequest) -> Listing {
    let mut metadata: Vec<(String, String)> = asked.metadata.into_iter().collect();
    metadata.sort();
    Listing {
        model: Some(asked.model).filter(|m| !m.is_empty()),
        metadata,
        after: asked.after.map(|c| Cursor {
            created: c.created,
            id: c.id,
        }),
        limit: (asked.limit as usize).clamp(1, MAX_LIMIT),
        newest_first: asked.newest_first,
    }
}

/// `listing` as a `ListChatCompletions` call.
pub fn listing_to_proto(listing: &Listing) -> v1::ListChatCompletionsRequest {
    v1::ListChatCompletionsRequest {
        model: listing.model.clone().unwrap_or_default(),
        metadata: listing.metadata.iter().cloned().collect(),
        after: listing.after.as_ref().map(cursor_to_proto),
        limit: listing.limit as u32,
        newest_first: listing.newest_first,
    }
}

fn cursor_to_proto(cursor: &Cursor) -> v1::ChatCompletionCursor {
    v1::ChatCompletionCursor {
        created: cursor.created,
        id: cursor.id.clone(),
    }
}

pub fn listed_to_proto(cursor: Cursor, object: &str) -> v1::ListedChatCompletion {
    v1::ListedChatCompletion {
        cursor: Some(cursor_to_proto(&cursor)),
        object_json: object.to_string(),
    }
}

/// A listed completion another replica sent; `None` without its cursor.
pub fn listed_from_proto(listed: v1::ListedChatCompletion) -> Option<(Cursor, Arc<str>)> {
    let cursor = listed.cursor?;
    Some((
        Cursor {
            created: cursor.created,
            id: cursor.id,
        },
        Arc::from(listed.object_json),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response_store::StoreLimits;
    use serde_json::json;
    use std::time::Duration;

    fn store() -> ResponseStore {
        ResponseStore::new(StoreLimits {
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(3600),
        })
    }

    fn keep(
        store: &ResponseStore,
        tenant: Option<&str>,
        created: u64,
        model: &str,
        tag: &str,
    ) -> String {
        let id = store.new_chat_completion_id();
        let object = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "metadata": {"tag": tag},
        });
        let kept = store.response(
            id.clone(),
            tenant.map(str::to_string),
            object.to_string(),
            Vec::new(),
            Vec::new(),
        );
        assert!(store.insert(kept));
        id
    }

    fn ids(listed: &[(Cursor, Arc<str>)]) -> Vec<&str> {
        listed.iter().map(|(c, _)| c.id.as_str()).collect()
    }

    #[test]
    fn a_listing_filters_orders_and_goes_on_after_its_cursor() {
        let store = store();
        let a = keep(&store, None, 10, "m", "x");
        let b = keep(&store, None, 20, "m", "y");
        let c = keep(&store, None, 30, "other", "x");
        let d = keep(&store, None, 40, "m", "x");
        keep(&store, Some("t"), 50, "m", "x");
        let all = Listing {
            limit: 10,
            ..Default::default()
        };
        assert_eq!(
            ids(&store.list_chat_completions(None, &all)),
            [&a, &b, &c, &d]
        );
        let newest = Listing {
            newest_first: true,
            limit: 1,
            ..all.clone()
        };
        assert_eq!(ids(&store.list_chat_completions(None, &newest)), [&d, &c]);
        let filtered = Listing {
            model: Some("m".into()),
            metadata: vec![("tag".into(), "x".into())],
            ..all.clone()
        };
        assert_eq!(ids(&store.list_chat_completions(None, &filtered)), [&a, &d]);
        let after = Listing {
            after: cursor_of(&b, &json!({"created": 20}).to_string()),
            ..all
        };
        assert_eq!(ids(&store.list_chat_completions(None, &after)), [&c, &d]);
    }

    #[test]
    fn metadata_is_replaced_for_its_tenant_only() {
        let store = store();
        let id = keep(&store, Some("t"), 10, "m", "x");
        assert_eq!(
            store.update_chat_metadata(&id, None, json!({"k": "v"})),
            None
        );
        let object = store
            .update_chat_metadata(&id, Some("t"), json!({"k": "v"}))
            .expect("updated");
        let object: Value = serde_json::from_str(&object).unwrap();
        assert_eq!(object["metadata"], json!({"k": "v"}));
        assert_eq!(object["created"], 10);
        let super::super::Lookup::Found(kept) = store.get(&id, Some("t")) else {
            panic!("kept")
        };
        assert_eq!(kept.object, object.to_string());
    }
}
