//! Ids of the items the router makes (a response's input and output items, a conversation's
//! items), so that an `item_reference` finds its item from any replica: an item kept with a
//! stored response or conversation carries that holder's id in its own —
//! `msg_r<holder>_<random>` for one of response `resp_<holder>`, `msg_c<holder>_<random>` for
//! one of conversation `conv_<holder>` — and the holder's id names the replica that keeps it.
//! A response's items that join a conversation name the conversation (which keeps them longest,
//! and keeps them even when the response is not stored); an item kept nowhere (`store: false`,
//! no conversation) gets a plain random id.

use serde_json::value::RawValue;
use tonic::Status;

use super::{CONVERSATION_PREFIX, ID_PREFIX, Lookup, OWNER_CHARS, ResponseStore, StoredResponse};

/// Hex digits after a holder id's prefix: the owner tag, then a UUID.
const HOLDER_CHARS: usize = OWNER_CHARS + 32;

/// A new id for an item of kind `prefix` (`msg`, `fc`, …) kept by `holder` (a response or
/// conversation id), if any.
pub fn mint(prefix: &str, holder: Option<&str>) -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    let code = holder.and_then(|holder| {
        let (kind, rest) = if let Some(rest) = holder.strip_prefix(ID_PREFIX) {
            ('r', rest)
        } else {
            ('c', holder.strip_prefix(CONVERSATION_PREFIX)?)
        };
        (rest.len() == HOLDER_CHARS).then(|| format!("{kind}{rest}"))
    });
    match code {
        Some(code) => format!("{prefix}_{code}_{}", &random[..8]),
        None => format!("{prefix}_{random}"),
    }
}

/// The id of the response or conversation that keeps item `id`, when the id names one.
pub fn holder_of(id: &str) -> Option<String> {
    let (_, rest) = id.split_once('_')?;
    let kind = rest.chars().next()?;
    let holder = rest.get(1..=HOLDER_CHARS)?;
    if rest.as_bytes().get(HOLDER_CHARS + 1) != Some(&b'_')
        || !holder.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return None;
    }
    match kind {
        'r' => Some(format!("{ID_PREFIX}{holder}")),
        'c' => Some(format!("{CONVERSATION_PREFIX}{holder}")),
        _ => None,
    }
}

impl ResponseStore {
    /// The items named by `ids` that this replica keeps for `tenant` (with their holder), as
    /// JSON text by id; ids naming nothing kept here are left out. An item of a background
    /// response still running is refused: it has no output to refer to yet.
    pub fn find_items(
        &self,
        ids: &[String],
        tenant: Option<&str>,
    ) -> Result<Vec<(String, String)>, Status> {
        let mut found = Vec::new();
        for id in ids {
            let Some(holder) = holder_of(id) else {
                continue;
            };
            let item = if holder.starts_with(CONVERSATION_PREFIX) {
                match self.get_conversation(&holder, tenant) {
                    Lookup::Found(conversation) => conversation
                        .items
                        .iter()
                        .find(|item| item.id == *id)
                        .map(|item| item.json.get().to_string()),
                    Lookup::Missing | Lookup::Elsewhere(_) => None,
                }
            } else {
                match self.get(&holder, tenant) {
                    Lookup::Found(response) if response.running => {
                        return Err(Status::failed_precondition(format!(
                            "item {id:?} is one of background response {holder:?}, still \
                             running: refer to it once the response has ended"
                        )));
                    }
                    Lookup::Found(response) => item_of(&response, id),
                    Lookup::Missing | Lookup::Elsewhere(_) => None,
                }
            };
            if let Some(item) = item {
                found.push((id.clone(), item));
            }
        }
        Ok(found)
    }
}

/// Item `id` of stored response `response` (one of its input items, or of its output), as
/// JSON text.
fn item_of(response: &StoredResponse, id: &str) -> Option<String> {
    if let Some(item) = response
        .input_items
        .iter()
        .find(|item| super::conversation::item_id(item) == Some(id))
    {
        return Some(item.get().to_string());
    }
    // Read as text, not built into a tree: only the output's items are looked at.
    #[derive(serde::Deserialize)]
    struct Output<'a> {
        #[serde(borrow)]
        output: Vec<&'a RawValue>,
    }
    let object: Output = serde_json::from_str(&response.object).ok()?;
    object
        .output
        .into_iter()
        .find(|item| super::conversation::item_id(item) == Some(id))
        .map(|item| item.get().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response_store::{ResponseStore, StoreLimits};

    #[test]
    fn an_items_id_names_the_response_or_conversation_that_keeps_it() {
        let store = ResponseStore::new(StoreLimits::default());
        let response = store.new_id();
        let conversation = store.new_conversation_id();
        let call = mint("fc", Some(&response));
        assert!(call.starts_with("fc_r"), "{call}");
        assert_eq!(holder_of(&call), Some(response.clone()));
        assert_eq!(
            holder_of(&mint("msg", Some(&conversation))),
            Some(conversation)
        );
        assert_ne!(mint("msg", Some(&response)), mint("msg", Some(&response)));
        // Kept nowhere, or not one of ours: no holder.
        for id in [
            mint("msg", None),
            "msg_abc".to_string(),
            "msg".to_string(),
            format!("msg_x{}_1", &response[5..]),
        ] {
            assert_eq!(holder_of(&id), None, "{id}");
        }
    }

    #[test]
    fn kept_items_are_found_by_id_for_their_tenant_only() {
        let store = ResponseStore::new(StoreLimits::default());
        let response = store.new_id();
        let (asked, said) = (mint("msg", Some(&response)), mint("msg", Some(&response)));
        let raw = |value: serde_json::Value| serde_json::value::to_raw_value(&value).unwrap();
        store.insert(store.response(
            response.clone(),
            Some("acme".into()),
            serde_json::json!({"output": [{"id": said, "role": "assistant"}]}).to_string(),
            vec![raw(serde_json::json!({"id": asked, "role": "user"}))],
            Vec::new(),
        ));
        let gone = mint("msg", Some(&store.new_id()));
        let ids = [asked.clone(), said.clone(), gone, "msg_mine".to_string()];
        let found = store.find_items(&ids, Some("acme")).expect("found");
        let found: Vec<&str> = found.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(found, [asked.as_str(), said.as_str()]);
        assert!(
            store
                .find_items(&ids, Some("globex"))
                .expect("none")
                .is_empty()
        );
        // An item of a run still going is refused.
        let running = store.new_id();
        let _run = store.begin_run(
            store.response(running.clone(), None, "{}".into(), Vec::new(), Vec::new()),
            Box::new(|| "{}".into()),
            None,
        );
        let refused = store
            .find_items(&[mint("msg", Some(&running))], None)
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    }
}
