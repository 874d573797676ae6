//! Stored conversations (OpenAI's Conversations API): a list of items a client and its
//! responses add to (`POST /v1/conversations`, `conversation` on a response), kept in the same
//! store as responses: the id names the replica that keeps it, its memory counts against the
//! same bytes, and a conversation left unchanged longest goes first when they run out (or when
//! it has not changed for the store's maximum age).
//!
//! A conversation changes, so each change makes a new version sharing the items it keeps
//! (they are counted once); the versions replace each other in the store, in the order the
//! changes were made on this replica, and a mirror is sent each version as it stands.
//!
//! Every call on a conversation ([`v1::ConversationCall`]) is answered by [`answer`] on the
//! replica that keeps it, whichever replica the client asked: that one forwards the call (see
//! [`super::peers`]).

use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::{Value, json};
use switchyard_proto::v1::{self, conversation_call::Call};
use tokio::time::Instant;
use tonic::Status;

use super::{CONVERSATION_PREFIX, Charge, Lookup, MirrorEvent, ResponseStore};

/// The most items one call may add, as OpenAI's API allows.
pub const MAX_ADDED_ITEMS: usize = 20;

/// One item of a stored conversation: a JSON object with an `id`.
#[derive(Debug)]
pub struct StoredItem {
    pub id: String,
    pub json: Box<RawValue>,
    charge: Charge,
}

/// One version of a stored conversation.
#[derive(Debug)]
pub struct StoredConversation {
    pub id: String,
    /// The tenant that made it; `None` without API keys.
    pub tenant: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// A JSON object.
    pub metadata: Box<RawValue>,
    /// Oldest first.
    pub items: Vec<Arc<StoredItem>>,
    /// When this version was made (by whichever replica): the conversation's age counts from
    /// its last change.
    pub stored_at: Instant,
    charge: Charge,
}

impl StoredConversation {
    /// The conversation object the API answers with.
    pub fn object(&self) -> Value {
        json!({
            "id": self.id,
            "object": "conversation",
            "created_at": self.created_at,
            "metadata": self.metadata,
        })
    }

    /// Its items as one JSON array, oldest first.
    pub fn items_array(&self) -> String {
        let mut array = String::with_capacity(
            2 + self
                .items
                .iter()
                .map(|i| i.json.get().len() + 1)
                .sum::<usize>(),
        );
        array.push('[');
        for (n, item) in self.items.iter().enumerate() {
            if n > 0 {
                array.push(',');
            }
            array.push_str(item.json.get());
        }
        array.push(']');
        array
    }

    /// Its items' JSON texts, oldest first.
    pub fn items_json(&self) -> Vec<String> {
        self.items
            .iter()
            .map(|i| i.json.get().to_string())
            .collect()
    }

    pub fn age(&self) -> std::time::Duration {
        Instant::now().saturating_duration_since(self.stored_at)
    }

    /// The same version, made `age` ago (its age goes on from another replica's).
    pub fn aged(mut self, age: std::time::Duration) -> Self {
        self.stored_at = Instant::now().checked_sub(age).unwrap_or(self.stored_at);
        self
    }

    /// What it would hold on its own, its items included.
    pub(super) fn whole_bytes(&self) -> usize {
        self.charge.bytes + self.items.iter().map(|i| i.charge.bytes).sum::<usize>()
    }
}

/// Why a conversation call is refused.
fn missing(id: &str) -> Status {
    Status::not_found(format!(
        "conversation {id:?} is not stored here: conversations are kept in the router's memory \
         for a limited size and time since their last change (its --response-store-bytes and \
         --response-store-max-age), only for the API key that made them"
    ))
}

fn too_large(id: &str) -> Status {
    Status::failed_precondition(format!(
        "conversation {id:?} would be larger than the whole response store \
         (--response-store-bytes): start a new conversation, or delete some of its items"
    ))
}

impl ResponseStore {
    /// A new id for a conversation this replica keeps.
    pub fn new_conversation_id(&self) -> String {
        format!(
            "{CONVERSATION_PREFIX}{}{}",
            self.owner,
            uuid::Uuid::new_v4().simple()
        )
    }

    /// An item of a conversation that may be stored, counted while it lives.
    pub fn item(&self, id: String, json: Box<RawValue>) -> Arc<StoredItem> {
        let charge = Charge::new(64 + id.len() + json.get().len(), &self.ledger);
        Arc::new(StoredItem { id, json, charge })
    }

    /// A version of a conversation, counted while it lives; made now.
    pub fn conversation(
        &self,
        id: String,
        tenant: Option<String>,
        created_at: u64,
        metadata: Box<RawValue>,
        items: Vec<Arc<StoredItem>>,
    ) -> StoredConversation {
        let bytes =
            256 + id.len() + metadata.get().len() + items.len() * std::mem::size_of::<usize>();
        StoredConversation {
            id,
            tenant,
            created_at,
            metadata,
            items,
            stored_at: Instant::now(),
            charge: Charge::new(bytes, &self.ledger),
        }
    }

    /// Keeps `conversation` (new, or a version replacing the one kept); the oldest go until
    /// what is alive fits. One larger than the whole store is not kept.
    pub fn put_conversation(&self, conversation: StoredConversation) -> bool {
        if conversation.whole_bytes() > self.limits.max_bytes {
            return false;
        }
        let mut inner = self.inner.lock().expect("response store lock");
        self.keep_conversation(&mut inner, conversation)
    }

    fn keep_conversation(
        &self,
        inner: &mut super::Inner,
        conversation: StoredConversation,
    ) -> bool {
        let id = conversation.id.clone();
        inner.place(conversation.stored_at, &id);
        let conversation = Arc::new(conversation);
        if inner
            .conversations
            .insert(id.clone(), conversation.clone())
            .is_some()
        {
            inner.stale += 1;
        }
        self.ledger.tell(MirrorEvent::Conversation(conversation));
        self.settle(inner, &id);
        inner.conversations.contains_key(&id)
    }

    /// The conversation `id`, if `tenant` may read it.
    pub fn get_conversation(
        &self,
        id: &str,
        tenant: Option<&str>,
    ) -> Lookup<Arc<StoredConversation>> {
        self.look_up(id, |inner| {
            inner
                .conversations
                .get(id)
                .filter(|c| c.tenant.as_deref() == tenant)
                .cloned()
        })
    }

    /// Changes conversation `id` (if `tenant` may) to the version `change` makes of it,
    /// atomically: changes made at once each see the one before. The version kept.
    fn change_conversation(
        &self,
        id: &str,
        tenant: Option<&str>,
        change: impl FnOnce(&StoredConversation) -> Result<StoredConversation, Status>,
    ) -> Result<Arc<StoredConversation>, Status> {
        let mut inner = self.inner.lock().expect("response store lock");
        let current = inner
            .conversations
            .get(id)
            .filter(|c| c.tenant.as_deref() == tenant)
            .cloned()
            .ok_or_else(|| missing(id))?;
        let next = change(&current)?;
        if next.whole_bytes() > self.limits.max_bytes {
            return Err(too_large(id));
        }
        if !self.keep_conversation(&mut inner, next) {
            return Err(too_large(id));
        }
        Ok(inner.conversations[id].clone())
    }

    /// The next version of `current`: its metadata and items as given, made now.
    fn next_version(
        &self,
        current: &StoredConversation,
        metadata: Box<RawValue>,
        items: Vec<Arc<StoredItem>>,
    ) -> StoredConversation {
        self.conversation(
            current.id.clone(),
            current.tenant.clone(),
            current.created_at,
            metadata,
            items,
        )
    }

    /// Adds `items` to conversation `id` whoever made it, with `metadata`, changed `age` ago
    /// (a mirror told of it); whether it was here to add to.
    pub fn extend_conversation(
        &self,
        id: &str,
        items: Vec<Arc<StoredItem>>,
        metadata: Box<RawValue>,
        age: std::time::Duration,
    ) -> bool {
        let mut inner = self.inner.lock().expect("response store lock");
        let Some(current) = inner.conversations.get(id).cloned() else {
            return false;
        };
        let mut all = current.items.clone();
        all.extend(items);
        let next = self.next_version(&current, metadata, all).aged(age);
        if next.whole_bytes() > self.limits.max_bytes {
            inner.drop_kept(id, &self.ledger);
            self.publish(&inner);
            return false;
        }
        self.keep_conversation(&mut inner, next)
    }

    /// Deletes conversation `id` if `tenant` may; whether it was here.
    pub fn delete_conversation(&self, id: &str, tenant: Option<&str>) -> bool {
        id.starts_with(CONVERSATION_PREFIX) && self.delete_kept(id, tenant)
    }

    /// Every conversation kept, oldest change first (to hand them over).
    pub fn export_conversations(&self) -> Vec<Arc<StoredConversation>> {
        self.inner
            .lock()
            .expect("response store lock")
            .conversations_by_age()
    }

    /// Conversations kept.
    pub fn conversation_count(&self) -> usize {
        self.inner
            .lock()
            .expect("response store lock")
            .conversations
            .len()
    }
}

/// Items given ids, checked by the caller: as stored.
fn stored_items(store: &ResponseStore, items: Vec<String>) -> Result<Vec<Arc<StoredItem>>, Status> {
    items
        .into_iter()
        .map(|text| {
            let json = RawValue::from_string(text)
                .map_err(|e| Status::invalid_argument(format!("an item: {e}")))?;
            let id = item_id(&json)
                .ok_or_else(|| Status::invalid_argument("an item has no id"))?
                .to_string();
            Ok(store.item(id, json))
        })
        .collect()
}

/// The `id` of an item's JSON.
pub fn item_id(item: &RawValue) -> Option<&str> {
    #[derive(serde::Deserialize)]
    struct Id<'a> {
        #[serde(borrow)]
        id: Option<&'a str>,
    }
    serde_json::from_str::<Id>(item.get()).ok()?.id
}

/// A page of `items` (stored oldest first): the list object the API answers with. `after`
/// naming no item is refused by name.
pub fn page(
    items: &[&RawValue],
    after: Option<&str>,
    limit: usize,
    newest_first: bool,
) -> Result<Value, (&'static str, String)> {
    let mut ordered = items.to_vec();
    if newest_first {
        ordered.reverse();
    }
    let start = match after {
        None => 0,
        Some(after) => {
            ordered
                .iter()
                .position(|item| item_id(item) == Some(after))
                .ok_or_else(|| ("after", format!("{after:?} is no item of this list")))?
                + 1
        }
    };
    let page: Vec<&RawValue> = ordered.iter().skip(start).take(limit).copied().collect();
    let id = |item: Option<&&RawValue>| item.and_then(|i| item_id(i)).map(str::to_string);
    Ok(json!({
        "object": "list",
        "data": page,
        "first_id": id(page.first()),
        "last_id": id(page.last()),
        "has_more": start + page.len() < ordered.len(),
    }))
}

/// The list object of items just added.
fn added_list(items: &[Arc<StoredItem>]) -> Value {
    let json: Vec<&RawValue> = items.iter().map(|i| i.json.as_ref()).collect();
    json!({
        "object": "list",
        "data": json,
        "first_id": items.first().map(|i| &i.id),
        "last_id": items.last().map(|i| &i.id),
        "has_more": false,
    })
}

/// Answers `call` from what `store` keeps for `tenant` (JSON text): on the replica that keeps
/// the conversation. A call about a conversation this replica does not keep is NOT_FOUND.
pub fn answer(
    store: &ResponseStore,
    tenant: Option<&str>,
    call: v1::ConversationCall,
) -> Result<String, Status> {
    let id = call.conversation_id;
    let current = match store.get_conversation(&id, tenant) {
        Lookup::Found(conversation) => conversation,
        Lookup::Missing | Lookup::Elsewhere(_) => return Err(missing(&id)),
    };
    let body = match call
        .call
        .ok_or_else(|| Status::invalid_argument("a conversation call names no call"))?
    {
        Call::Get(_) => current.object(),
        Call::UpdateMetadataJson(metadata) => {
            let object = serde_json::from_str::<serde_json::Map<String, Value>>(&metadata);
            if let Err(e) = object {
                return Err(Status::invalid_argument(format!(
                    "metadata: must be a JSON object: {e}"
                )));
            }
            let metadata = RawValue::from_string(metadata)
                .map_err(|e| Status::invalid_argument(format!("metadata: {e}")))?;
            store
                .change_conversation(&id, tenant, |c| {
                    Ok(store.next_version(c, metadata, c.items.clone()))
                })?
                .object()
        }
        Call::Delete(_) => {
            if !store.delete_conversation(&id, tenant) {
                return Err(missing(&id));
            }
            json!({"id": id, "object": "conversation.deleted", "deleted": true})
        }
        Call::ListItems(v1::ItemsPage {
            after,
            limit,
            newest_first,
        }) => {
            let items: Vec<&RawValue> = current.items.iter().map(|i| i.json.as_ref()).collect();
            page(
                &items,
                after.as_deref(),
                limit.clamp(1, 100) as usize,
                newest_first,
            )
            .map_err(|(field, why)| Status::invalid_argument(format!("{field}: {why}")))?
        }
        Call::AddItems(v1::AddedItems { items_json }) => {
            let added = stored_items(store, items_json)?;
            store.change_conversation(&id, tenant, |c| {
                let mut items = c.items.clone();
                items.extend(added.iter().cloned());
                Ok(store.next_version(c, c.metadata.clone(), items))
            })?;
            added_list(&added)
        }
        Call::GetItem(item) => match current.items.iter().find(|i| i.id == item) {
            Some(found) => serde_json::from_str(found.json.get()).expect("stored as JSON"),
            None => return Err(missing_item(&id, &item)),
        },
        Call::DeleteItem(item) => store
            .change_conversation(&id, tenant, |c| {
                if !c.items.iter().any(|i| i.id == item) {
                    return Err(missing_item(&id, &item));
                }
                let items = c.items.iter().filter(|i| i.id != item).cloned().collect();
                Ok(store.next_version(c, c.metadata.clone(), items))
            })?
            .object(),
        // Joined as they are kept: no item is read.
        Call::History(_) => return Ok(current.items_array()),
    };
    Ok(body.to_string())
}

fn missing_item(conversation: &str, item: &str) -> Status {
    Status::not_found(format!(
        "conversation {conversation:?} has no item {item:?}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response_store::StoreLimits;
    use std::time::Duration;

    fn store(max_bytes: usize) -> ResponseStore {
        ResponseStore::new(StoreLimits {
            max_bytes,
            max_age: Duration::from_secs(60),
        })
    }

    fn raw(value: Value) -> Box<RawValue> {
        serde_json::value::to_raw_value(&value).expect("serializes")
    }

    fn message(id: &str, text: &str) -> String {
        json!({"type": "message", "id": id, "role": "user", "content": text}).to_string()
    }

    /// A new conversation of `tenant` holding `items`; its id.
    fn create(store: &ResponseStore, tenant: Option<&str>, items: &[&str]) -> String {
        let id = store.new_conversation_id();
        let items = items
            .iter()
            .map(|i| store.item(i.to_string(), raw(json!({"id": i}))))
            .collect();
        let conversation =
            store.conversation(id.clone(), tenant.map(Into::into), 7, raw(json!({})), items);
        assert!(store.put_conversation(conversation));
        id
    }

    fn call(
        store: &ResponseStore,
        tenant: Option<&str>,
        id: &str,
        call: Call,
    ) -> Result<Value, Status> {
        let body = answer(
            store,
            tenant,
            v1::ConversationCall {
                conversation_id: id.into(),
                call: Some(call),
            },
        )?;
        Ok(serde_json::from_str(&body).expect("JSON"))
    }

    fn item_ids(store: &ResponseStore, id: &str) -> Vec<String> {
        match store.get_conversation(id, None) {
            Lookup::Found(c) => c.items.iter().map(|i| i.id.clone()).collect(),
            _ => panic!("conversation {id} gone"),
        }
    }

    #[test]
    fn items_are_added_paged_read_and_deleted() {
        let store = store(1 << 20);
        let id = create(&store, None, &["msg_a"]);
        let added = call(
            &store,
            None,
            &id,
            Call::AddItems(v1::AddedItems {
                items_json: vec![message("msg_b", "b"), message("msg_c", "c")],
            }),
        )
        .unwrap();
        assert_eq!(added["first_id"], "msg_b");
        assert_eq!(added["last_id"], "msg_c");
        assert_eq!(item_ids(&store, &id), ["msg_a", "msg_b", "msg_c"]);

        let page = |after: Option<&str>, newest_first| {
            call(
                &store,
                None,
                &id,
                Call::ListItems(v1::ItemsPage {
                    after: after.map(Into::into),
                    limit: 2,
                    newest_first,
                }),
            )
            .unwrap()
        };
        let newest = page(None, true);
        assert_eq!(newest["first_id"], "msg_c");
        assert_eq!(newest["has_more"], true);
        assert_eq!(page(Some("msg_b"), true)["data"][0]["id"], "msg_a");
        assert_eq!(page(None, false)["last_id"], "msg_b");
        let unknown = call(
            &store,
            None,
            &id,
            Call::ListItems(v1::ItemsPage {
                after: Some("msg_z".into()),
                limit: 2,
                newest_first: true,
            }),
        )
        .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::InvalidArgument);

        let read = call(&store, None, &id, Call::GetItem("msg_b".into())).unwrap();
        assert_eq!(read["content"], "b");
        let after_delete = call(&store, None, &id, Call::DeleteItem("msg_b".into())).unwrap();
        assert_eq!(after_delete["object"], "conversation");
        assert_eq!(item_ids(&store, &id), ["msg_a", "msg_c"]);
        for gone in [
            Call::GetItem("msg_b".into()),
            Call::DeleteItem("msg_b".into()),
        ] {
            let refused = call(&store, None, &id, gone).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::NotFound);
        }
        let history = call(&store, None, &id, Call::History(v1::ConversationWhole {})).unwrap();
        assert_eq!(history.as_array().unwrap().len(), 2);
    }

    #[test]
    fn a_conversation_is_another_tenants_to_no_one_and_deleting_frees_it() {
        let store = store(1 << 20);
        let id = create(&store, Some("acme"), &["msg_a"]);
        let get = || Call::Get(v1::ConversationWhole {});
        assert_eq!(
            call(&store, Some("acme"), &id, get()).unwrap()["id"],
            id.as_str()
        );
        for other in [None, Some("other")] {
            assert_eq!(
                call(&store, other, &id, get()).unwrap_err().code(),
                tonic::Code::NotFound
            );
        }
        let updated = call(
            &store,
            Some("acme"),
            &id,
            Call::UpdateMetadataJson(json!({"topic": "x"}).to_string()),
        )
        .unwrap();
        assert_eq!(updated["metadata"]["topic"], "x");
        assert_eq!(updated["created_at"], 7);
        let deleted = call(
            &store,
            Some("acme"),
            &id,
            Call::Delete(v1::ConversationWhole {}),
        );
        assert_eq!(deleted.unwrap()["deleted"], true);
        assert_eq!(store.conversation_count(), 0);
        assert_eq!(store.usage(), (0, 0));
    }

    /// Versions share their items: a change counts only what it adds, and the versions it
    /// replaces leave nothing counted (nor, swept, in the order).
    #[test]
    fn changes_share_items_and_replaced_versions_free_theirs() {
        let store = store(8 << 20);
        let id = create(&store, None, &[]);
        let text = "x".repeat(10_000);
        let mut last = store.usage().1;
        for turn in 0..200 {
            call(
                &store,
                None,
                &id,
                Call::AddItems(v1::AddedItems {
                    items_json: vec![message(&format!("msg_{turn}"), &text)],
                }),
            )
            .unwrap();
            let now = store.usage().1;
            assert!(
                now - last < text.len() + 1000,
                "turn {turn}: {last} -> {now}"
            );
            last = now;
        }
        let inner = store.inner.lock().unwrap();
        assert!(
            inner.order.len() < 100,
            "{} order entries",
            inner.order.len()
        );
    }

    #[test]
    fn the_conversation_changed_longest_ago_goes_first() {
        let probe = store(1 << 20);
        let one = {
            let id = create(&probe, None, &[]);
            let Lookup::Found(c) = probe.get_conversation(&id, None) else {
                panic!()
            };
            c.whole_bytes()
        };
        let store = store(one * 2 + one / 2);
        let first = create(&store, None, &[]);
        let second = create(&store, None, &[]);
        // Changing the first makes the second the one changed longest ago.
        call(&store, None, &first, Call::UpdateMetadataJson("{}".into())).unwrap();
        let third = create(&store, None, &[]);
        let kept = |id: &str| matches!(store.get_conversation(id, None), Lookup::Found(_));
        assert!(kept(&first) && !kept(&second) && kept(&third));
    }

    #[test]
    fn a_conversation_larger_than_the_store_is_refused_by_name() {
        let store = store(4096);
        let id = create(&store, None, &[]);
        let refused = call(
            &store,
            None,
            &id,
            Call::AddItems(v1::AddedItems {
                items_json: vec![message("msg_big", &"x".repeat(8192))],
            }),
        )
        .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(kept_empty(&store, &id));
    }

    fn kept_empty(store: &ResponseStore, id: &str) -> bool {
        matches!(store.get_conversation(id, None), Lookup::Found(c) if c.items.is_empty())
    }
}
