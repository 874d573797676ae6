//! A request's choices (`n` for each of its prompts): one generation each through the
//! dispatcher, their frames merged into one stream tagged with the choice's index, and their
//! usage added up as OpenAI counts it (each prompt once, every choice's completion).

use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use switchyard_proto::v1;
use tonic::Status;

use super::wire;
use crate::dispatch::FrameReceiver;

/// Most choices one request may ask for (`n`): each is a generation of its own.
pub const MAX_CHOICES: u32 = 16;

/// Most generations one request may start: a completions batch's prompts × `n`. Each takes a
/// worker's slot, and the answer waits for the last.
pub const MAX_GENERATIONS: u32 = 64;

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

/// `frames` as a score-only request (`echo` with `max_tokens: 0`) answers: each choice's
/// scored prompt, and none of what was generated to score it. Its tokens' text, log
/// probabilities and calls go (a frame left with nothing goes whole); it ends as `length`,
/// having completed no token.
pub fn score_only(frames: ChoiceFrames) -> ChoiceFrames {
    use v1::server_frame::Frame;
    Box::pin(frames.filter_map(|(index, item)| async move {
        let Ok(v1::ServerFrame { frame: Some(frame) }) = item else {
            return Some((index, item));
        };
        let frame = match frame {
            Frame::Tokens(tokens) if tokens.prompt_logprobs.is_empty() => return None,
            Frame::Tokens(tokens) => Frame::Tokens(v1::Tokens {
                request_id: tokens.request_id,
                seq: tokens.seq,
                prompt_logprobs: tokens.prompt_logprobs,
                ..Default::default()
            }),
            Frame::Finished(mut finished) => {
                finished.reason = v1::FinishReason::Length as i32;
                finished.stop_sequence.clear();
                if let Some(usage) = finished.usage.as_mut() {
                    usage.completion_tokens = 0;
                }
                Frame::Finished(finished)
            }
            other => other,
        };
        Some((index, Ok(v1::ServerFrame { frame: Some(frame) })))
    }))
}

/// The usage of a request whose choices ended with `usages` (in index order), `per_prompt`
/// choices for each of its prompts: every prompt (and what of it the cache held) once, as its
/// first choice read it, and the completions of all.
pub fn usage(usages: &[Option<v1::Usage>], per_prompt: u32) -> wire::Usage {
    let per_prompt = per_prompt.max(1) as usize;
    let mut total = v1::Usage::default();
    for (index, usage) in usages.iter().enumerate() {
        let usage = usage.unwrap_or_default();
        if index % per_prompt == 0 {
            total.prompt_tokens += usage.prompt_tokens;
            total.cached_prompt_tokens += usage.cached_prompt_tokens;
        }
        total.completion_tokens += usage.completion_tokens;
    }
    wire::Usage::from(Some(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage_of(prompt: u32, completion: u32, cached: u32) -> Option<v1::Usage> {
        Some(v1::Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_prompt_tokens: cached,
        })
    }

    /// A score-only answer keeps each choice's scored prompt and its end, and none of the
    /// token generated to get there.
    #[tokio::test]
    async fn a_score_only_answer_is_the_scored_prompt_alone() {
        use v1::server_frame::Frame;
        let scored = |logprob| v1::TokenLogprobs {
            chosen: Some(v1::TokenLogprob {
                token_id: 7,
                token: b"x".to_vec(),
                logprob,
            }),
            top: Vec::new(),
        };
        let frame = |frame| Ok(v1::ServerFrame { frame: Some(frame) });
        let frames: Vec<(u32, Result<v1::ServerFrame, Status>)> = vec![
            (
                0,
                frame(Frame::Tokens(v1::Tokens {
                    request_id: "r".into(),
                    text: " Paris".into(),
                    token_ids: vec![9],
                    logprobs: vec![scored(-0.5)],
                    prompt_logprobs: vec![scored(0.0), scored(-2.0)],
                    ..Default::default()
                })),
            ),
            (
                0,
                frame(Frame::Tokens(v1::Tokens {
                    seq: 1,
                    text: "!".into(),
                    token_ids: vec![3],
                    ..Default::default()
                })),
            ),
            (
                0,
                frame(Frame::Finished(v1::Finished {
                    reason: v1::FinishReason::Stop as i32,
                    stop_sequence: "!".into(),
                    usage: usage_of(2, 2, 0),
                    ..Default::default()
                })),
            ),
        ];
        let answered: Vec<_> = score_only(Box::pin(futures::stream::iter(frames)))
            .map(|(index, item)| (index, item.expect("frame").frame.expect("some")))
            .collect()
            .await;
        let [(0, Frame::Tokens(tokens)), (0, Frame::Finished(finished))] = &answered[..] else {
            panic!("the prompt's scores and the end: {answered:?}");
        };
        assert_eq!(tokens.prompt_logprobs, vec![scored(0.0), scored(-2.0)]);
        assert_eq!(tokens.request_id, "r");
        assert!(
            tokens.text.is_empty() && tokens.token_ids.is_empty() && tokens.logprobs.is_empty()
        );
        assert_eq!(finished.reason, v1::FinishReason::Length as i32);
        assert!(finished.stop_sequence.is_empty());
        assert_eq!(finished.usage, usage_of(2, 0, 0));
    }

    #[test]
    fn the_prompt_counts_once_and_every_completion_counts() {
        let total = usage(
            &[usage_of(10, 4, 0), usage_of(10, 6, 8), usage_of(10, 1, 8)],
            3,
        );
        assert_eq!(
            (
                total.prompt_tokens,
                total.completion_tokens,
                total.total_tokens,
                total.prompt_tokens_details.cached_tokens
            ),
            (10, 11, 21, 0)
        );
        let one = usage(&[usage_of(3, 2, 1)], 1);
        assert_eq!(
            (one.total_tokens, one.prompt_tokens_details.cached_tokens),
            (5, 1)
        );
    }

    #[test]
    fn every_prompt_of_a_batch_counts_once() {
        // Two prompts, two choices each.
        let total = usage(
            &[
                usage_of(10, 1, 0),
                usage_of(10, 2, 10),
                usage_of(7, 3, 4),
                usage_of(7, 4, 7),
            ],
            2,
        );
        assert_eq!(
            (
                total.prompt_tokens,
                total.completion_tokens,
                total.total_tokens,
                total.prompt_tokens_details.cached_tokens
            ),
            (17, 10, 27, 4)
        );
    }
}
