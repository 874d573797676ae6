//! A request's `n` choices: one generation each through the dispatcher, their frames merged
//! into one stream tagged with the choice's index, and their usage added up as OpenAI counts
//! it (the prompt once, every choice's completion).

use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use switchyard_proto::v1;
use tonic::Status;

use super::wire;
use crate::dispatch::FrameReceiver;

/// Most choices one request may ask for (`n`): each is a generation of its own.
pub const MAX_CHOICES: u32 = 16;

/// Every choice's frames, as they come, each with its choice's index.
pub type ChoiceFrames = Pin<Box<dyn Stream<Item = (u32, Result<v1::ServerFrame, Status>)> + Send>>;

/// The choices' frames merged; choice `i` is `receivers[i]`'s generation. Dropping the
/// stream drops every receiver, which cancels every generation still running.
pub fn merge(receivers: Vec<FrameReceiver>) -> ChoiceFrames {
    Box::pin(futures::stream::select_all(
        receivers.into_iter().zip(0u32..).map(|(receiver, index)| {
            receiver
                .into_stream()
                .map(move |item| (index, item))
                .boxed()
        }),
    ))
}

/// The usage of a request whose choices ended with `usages` (in index order): the prompt (and
/// what of it the cache held) as the first choice read it, the completions of all.
pub fn usage(usages: &[Option<v1::Usage>]) -> wire::Usage {
    let mut total = wire::Usage::from(usages.first().copied().flatten());
    for usage in usages.iter().skip(1) {
        total.completion_tokens += usage.as_ref().map_or(0, |u| u.completion_tokens);
    }
    total.total_tokens = total.prompt_tokens + total.completion_tokens;
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_counts_once_and_every_completion_counts() {
        let usage_of = |prompt, completion, cached| {
            Some(v1::Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                cached_prompt_tokens: cached,
            })
        };
        let total = usage(&[usage_of(10, 4, 0), usage_of(10, 6, 8), usage_of(10, 1, 8)]);
        assert_eq!(
            (
                total.prompt_tokens,
                total.completion_tokens,
                total.total_tokens,
                total.prompt_tokens_details.cached_tokens
            ),
            (10, 11, 21, 0)
        );
        let one = usage(&[usage_of(3, 2, 1)]);
        assert_eq!(
            (one.total_tokens, one.prompt_tokens_details.cached_tokens),
            (5, 1)
        );
    }
}
