//! Which requests should prefer the same worker: the client's `affinity_key`, or else the
//! chat conversation a request belongs to.
//!
//! Every later turn of a chat resends the conversation unchanged up to and including its first
//! user message, so that prefix names the conversation without the client saying so. Workers
//! that publish their KV blocks are placed by the prefix index instead (see `crate::policy`);
//! this key matters for those that cannot — the wafer-scale gateway, whose upstream keeps its
//! own prompt cache, which helps only if a conversation's turns reach the same upstream
//! connection.

use switchyard_proto::v1::GenerateRequest;

use crate::policy::view::{stable_hash, stable_hash_parts};

/// The request's affinity hash: its `affinity_key` when set, else its conversation's (chat
/// requests), else none (a raw prompt gives no conversation boundary to key on).
pub fn affinity_of(request: &GenerateRequest) -> Option<u64> {
    if !request.affinity_key.is_empty() {
        return Some(stable_hash(&request.affinity_key));
    }
    let first_user = request.messages.iter().position(|m| m.role == "user")?;
    let opening = request.messages[..=first_user]
        .iter()
        .flat_map(|m| [m.role.as_str(), m.content.as_str()]);
    Some(stable_hash_parts(
        std::iter::once("conversation").chain(opening),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_proto::v1::ChatMessage;

    fn chat(turns: &[(&str, &str)]) -> GenerateRequest {
        GenerateRequest {
            messages: turns
                .iter()
                .map(|(role, content)| ChatMessage {
                    role: role.to_string(),
                    content: content.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    const SYSTEM: (&str, &str) = ("system", "You are a coding assistant.");

    #[test]
    fn every_turn_of_a_conversation_has_the_conversations_key() {
        let turn1 = chat(&[SYSTEM, ("user", "Write a parser.")]);
        let turn3 = chat(&[
            SYSTEM,
            ("user", "Write a parser."),
            ("assistant", "Here it is."),
            ("user", "Now add tests."),
            ("assistant", "Done."),
            ("user", "And docs."),
        ]);
        assert!(affinity_of(&turn1).is_some());
        assert_eq!(affinity_of(&turn1), affinity_of(&turn3));
    }

    #[test]
    fn conversations_sharing_a_system_prompt_get_different_keys() {
        let a = chat(&[SYSTEM, ("user", "Write a parser.")]);
        let b = chat(&[SYSTEM, ("user", "Write a lexer.")]);
        let no_system = chat(&[("user", "Write a parser.")]);
        assert_ne!(affinity_of(&a), affinity_of(&b));
        assert_ne!(affinity_of(&a), affinity_of(&no_system));
    }

    #[test]
    fn an_explicit_key_wins_and_a_raw_prompt_has_none() {
        let mut keyed = chat(&[SYSTEM, ("user", "Write a parser.")]);
        keyed.affinity_key = "tenant-7/session-2".into();
        let other_chat = GenerateRequest {
            affinity_key: "tenant-7/session-2".into(),
            ..chat(&[("user", "Something else.")])
        };
        assert_eq!(affinity_of(&keyed), affinity_of(&other_chat));
        assert_ne!(
            affinity_of(&keyed),
            affinity_of(&chat(&[SYSTEM, ("user", "Write a parser.")]))
        );
        let raw = GenerateRequest {
            prompt: "Once upon a time".into(),
            ..Default::default()
        };
        assert_eq!(affinity_of(&raw), None);
        // A conversation that has not reached a user message yet names none either.
        assert_eq!(affinity_of(&chat(&[SYSTEM])), None);
    }
}
