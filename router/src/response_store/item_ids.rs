//! Ids of the items the router makes (a response's input and output items, a conversation's
//! items), so that an `item_reference` finds its item from any replica: an item kept with a
//! stored response or conversation carries that holder's id in its own —
//! `msg_r<holder>_<random>` for one of response `resp_<holder>`, `msg_c<holder>_<random>` for
//! one of conversation `conv_<holder>` — and the holder's id names the replica that keeps it.
//! An item kept nowhere (`store: false`) gets a plain random id.

use super::{CONVERSATION_PREFIX, ID_PREFIX, OWNER_CHARS};

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
}
