//! Truncation (`Truncation::Auto`, OpenAI Responses' `truncation: "auto"`): a conversation
//! that no longer fits the model's context loses its oldest messages rather than being
//! refused, so a long agent session (`previous_response_id` after `previous_response_id`)
//! goes on.
//!
//! System messages always stay, and so does the last message. The kept conversation starts
//! at a user message where there is one to start at (chat templates expect turns to start
//! there), and never at a tool result, whose call would be gone. The fewest messages are
//! dropped that leave the answer its room: the `max_tokens` the client asked for, or, when it
//! gave none, a quarter of the context (at most the default bound). The cut is found by
//! bisection, tokenizing with the workers' own tokenizer, on the blocking pool.

use switchyard_proto::v1;

use super::Dispatcher;
use super::validate::OutputBound;

/// Where a kept conversation may start, oldest first: indices of messages that can begin
/// it (user messages, or, without any, any but tool results), never past the last message.
/// Index 0 of the list is the uncut conversation.
fn cut_points(messages: &[v1::ChatMessage]) -> Vec<usize> {
    let body: Vec<usize> = (0..messages.len())
        .filter(|&i| messages[i].role != "system")
        .collect();
    let Some(&first) = body.first() else {
        return Vec::new();
    };
    let starts = |allowed: &dyn Fn(&str) -> bool| -> Vec<usize> {
        body.iter()
            .copied()
            .filter(|&i| i > first && allowed(&messages[i].role))
            .collect()
    };
    let mut cuts = starts(&|role| role == "user");
    if cuts.is_empty() {
        cuts = starts(&|role| role != "tool");
    }
    cuts.insert(0, first);
    cuts
}

/// What a message weighs in the prompt's text.
fn message_bytes(message: &v1::ChatMessage) -> usize {
    message.content.len()
        + message
            .tool_calls
            .iter()
            .map(|c| c.name.len() + c.arguments.len())
            .sum::<usize>()
}

/// `messages` without the conversation before `cut`: system messages stay.
fn cut_at(messages: &[v1::ChatMessage], cut: usize) -> Vec<v1::ChatMessage> {
    messages
        .iter()
        .enumerate()
        .filter(|(i, m)| *i >= cut || m.role == "system")
        .map(|(_, m)| m.clone())
        .collect()
}

/// The fewest oldest messages of `request` to drop so its prompt (as `encode` counts it)
/// leaves `reserve` tokens of `context_length`: the messages kept, their prompt ids and how
/// many were dropped. `None` when it fits already, or when nothing dropped makes it fit (it
/// is refused then, as without truncation).
fn truncate(
    request: &v1::GenerateRequest,
    context_length: usize,
    reserve: usize,
    encode: impl Fn(&v1::GenerateRequest) -> Option<Vec<u32>>,
) -> Option<(Vec<v1::ChatMessage>, Vec<u32>, usize)> {
    let cuts = cut_points(&request.messages);
    let room = context_length.checked_sub(reserve)?;
    let cut_request = |cut: usize| {
        let mut cut_request = request.clone();
        cut_request.messages = cut_at(&request.messages, cut);
        cut_request
    };
    let fits = |cut: usize| {
        let cut_request = cut_request(cut);
        let ids = encode(&cut_request)?;
        (ids.len() <= room).then_some((cut_request.messages, ids))
    };
    let whole = encode(request)?.len();
    if cuts.is_empty() || whole <= room {
        return None;
    }
    // The cut is the first that fits: dropping more only shortens the prompt. A guess from
    // the whole prompt's tokens per byte is tried first, then the one before it (usually
    // settling it in two tokenizations); bisection finds it otherwise.
    let weights: Vec<usize> = request.messages.iter().map(message_bytes).collect();
    let kept_bytes = |cut: usize| {
        (0..weights.len())
            .filter(|&i| i >= cut || request.messages[i].role == "system")
            .map(|i| weights[i])
            .sum::<usize>()
    };
    let tokens_per_byte = whole as f64 / kept_bytes(0).max(1) as f64;
    let guess = (1..cuts.len())
        .find(|&i| (kept_bytes(cuts[i]) as f64 * tokens_per_byte) as usize <= room)
        .unwrap_or(cuts.len() - 1);
    let (mut too_long, mut fitting) = (0, None);
    let mut high = cuts.len();
    let mut next = Some(guess);
    while too_long + 1 < high {
        let middle = next
            .take()
            .filter(|m| (too_long + 1..high).contains(m))
            .unwrap_or((too_long + high) / 2);
        let first = fitting.is_none() && too_long == 0;
        match fits(cuts[middle]) {
            Some(found) => {
                fitting = Some((middle, found));
                high = middle;
                next = first.then(|| middle - 1);
            }
            None => {
                too_long = middle;
                next = first.then_some(middle + 1);
            }
        }
    }
    let (at, (messages, ids)) = fitting?;
    let dropped = request.messages.len() - messages.len();
    debug_assert!(at > 0 && dropped > 0);
    Some((messages, ids, dropped))
}

impl Dispatcher {
    /// Drops the oldest messages of a request asking for truncation until its prompt fits the
    /// model's context (see the module); the prompt ids when it tokenized them. Needs the
    /// model's tokenizer and context length: without them the request goes on as it is.
    pub(super) async fn truncate_to_context(
        &self,
        request: &mut v1::GenerateRequest,
        bound: OutputBound,
    ) -> Option<Vec<u32>> {
        if request.truncation != v1::Truncation::Auto as i32
            || request.messages.is_empty()
            || switchyard_proto::validate_generate_request(request, &self.config.limits).is_err()
        {
            return None;
        }
        let tokenizers = self.links.tokenizers();
        let tokenizer = tokenizers.get(&request.model)?;
        let context_length = tokenizers.context_length(&request.model)? as usize;
        let max_tokens = request.sampling.as_ref().map_or(0, |s| s.max_tokens) as usize;
        let reserve = match bound {
            OutputBound::Asked => max_tokens,
            OutputBound::Default => max_tokens.min(context_length / 4),
        }
        .max(1);
        let whole = request.clone();
        let cut = tokio::task::spawn_blocking(move || {
            let encode = |r: &v1::GenerateRequest| crate::tokenizers::encode(&tokenizer, r);
            truncate(&whole, context_length, reserve, encode)
        })
        .await;
        match cut {
            Ok(Some((messages, ids, dropped))) => {
                tracing::debug!(
                    request_id = %request.request_id,
                    dropped,
                    prompt_tokens = ids.len(),
                    "truncated: the oldest messages dropped to fit the context"
                );
                request.messages = messages;
                Some(ids)
            }
            Ok(None) => None,
            Err(failed) if failed.is_panic() => std::panic::resume_unwind(failed.into_panic()),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: &str, words: usize) -> v1::ChatMessage {
        v1::ChatMessage {
            role: role.into(),
            content: vec!["w"; words].join(" "),
            ..Default::default()
        }
    }

    /// One token per word of every message, plus one per message (a stand-in for a chat
    /// template's framing, so counts are easy to follow).
    fn words(request: &v1::GenerateRequest) -> Option<Vec<u32>> {
        let n: usize = request
            .messages
            .iter()
            .map(|m| 1 + m.content.split_whitespace().count())
            .sum();
        Some(vec![0; n])
    }

    fn request(messages: Vec<v1::ChatMessage>) -> v1::GenerateRequest {
        v1::GenerateRequest {
            messages,
            truncation: v1::Truncation::Auto as i32,
            ..Default::default()
        }
    }

    fn roles(messages: &[v1::ChatMessage]) -> Vec<&str> {
        messages.iter().map(|m| m.role.as_str()).collect()
    }

    #[test]
    fn the_fewest_oldest_turns_go_and_system_messages_stay() {
        // system 10, then four turns of 10 + 10 tokens, then the new question (10).
        let mut messages = vec![message("system", 9)];
        for _ in 0..4 {
            messages.push(message("user", 9));
            messages.push(message("assistant", 9));
        }
        messages.push(message("user", 9));
        let whole = request(messages);
        assert_eq!(words(&whole).unwrap().len(), 100);
        assert!(truncate(&whole, 120, 20, words).is_none(), "it fits");
        // 30 tokens too many: two turns (40 tokens) go, not one (20).
        let (kept, ids, dropped) = truncate(&whole, 100, 30, words).expect("cut");
        assert_eq!(dropped, 4);
        assert_eq!(ids.len(), 60);
        assert_eq!(
            roles(&kept),
            ["system", "user", "assistant", "user", "assistant", "user"]
        );
        // Room for nothing but the system message and the question.
        let (kept, _, dropped) = truncate(&whole, 40, 19, words).expect("cut");
        assert_eq!((roles(&kept), dropped), (vec!["system", "user"], 8));
        // Not even that: refused as without truncation.
        assert!(truncate(&whole, 30, 19, words).is_none());
    }

    /// The cut is guessed from the whole prompt's tokens per byte and checked: a long
    /// conversation of even turns is tokenized three times (whole, the guess, one turn
    /// fewer dropped), not once per bisection step.
    #[test]
    fn a_good_guess_settles_the_cut_in_three_tokenizations() {
        let mut messages = vec![message("system", 9)];
        for _ in 0..200 {
            messages.push(message("user", 9));
            messages.push(message("assistant", 9));
        }
        messages.push(message("user", 9));
        let calls = std::cell::Cell::new(0);
        let counted = |r: &v1::GenerateRequest| {
            calls.set(calls.get() + 1);
            words(r)
        };
        let (_, ids, dropped) = truncate(&request(messages), 1000, 100, counted).expect("cut");
        // 10 system + 10 question + 44 turns of 20 = 900: 156 turns go.
        assert_eq!((ids.len(), dropped), (900, 312));
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn a_tool_result_is_never_kept_without_its_call() {
        let messages = vec![
            message("user", 9),
            message("assistant", 9),
            message("tool", 9),
            message("assistant", 9),
            message("tool", 9),
            message("assistant", 9),
        ];
        // No later user message to start at: the cut lands on an assistant message.
        assert_eq!(cut_points(&messages), [0, 1, 3, 5]);
        let (kept, _, _) = truncate(&request(messages), 40, 10, words).expect("cut");
        assert_eq!(roles(&kept), ["assistant", "tool", "assistant"]);
    }

    #[test]
    fn user_messages_are_where_a_cut_conversation_starts() {
        let messages = vec![
            message("system", 1),
            message("user", 1),
            message("assistant", 1),
            message("tool", 1),
            message("user", 1),
            message("assistant", 1),
        ];
        assert_eq!(cut_points(&messages), [1, 4]);
        assert_eq!(cut_points(&[message("system", 1)]), Vec::<usize>::new());
    }
}
