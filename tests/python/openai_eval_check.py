#!/usr/bin/env python3
"""Asks a Switchyard router what evaluation harnesses ask an OpenAI-compatible completions
endpoint, with the official `openai` SDK, and reads the answers the way lm-evaluation-harness
reads them (its `local-completions` model: loglikelihood requests are `echo`, `logprobs: 1`,
`max_tokens: 1`, temperature 0, a batch of prompts a call; the continuation's log probability
is the sum over its tokens, found by `text_offset`; it is greedy when each of its tokens is the
most likely there).

Usage: openai_eval_check.py BASE_URL MODEL
(a model that knows "The capital of France is" continues with " Paris"). Prints one line per
check and "openai-eval: N passed, M failed"; exits non-zero when a check failed. The
end-to-end test `tests/tests/real_model.rs` runs it against the real model.
"""

import sys

from openai import OpenAI

from checklist import check, finish

BASE_URL, MODEL = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=120)
CONTEXT = "The capital of France is"
CONTINUATIONS = [" Paris", " London"]


def loglikelihood_requests(pairs):
    """One call for a batch of (context, continuation) pairs, as the harness sends them."""
    return client.completions.create(
        model=MODEL,
        prompt=[context + continuation for context, continuation in pairs],
        max_tokens=1,
        temperature=0,
        logprobs=1,
        echo=True,
        seed=1234,
    )


def parse(choice, context):
    """The harness's reading of one choice: (sum of the continuation's log probabilities,
    whether every continuation token is the most likely one there)."""
    logprobs = choice.logprobs
    # The generated token is last; the continuation's tokens start where the context ends.
    start = next(i for i, offset in enumerate(logprobs.text_offset) if offset >= len(context))
    end = len(logprobs.tokens) - 1
    assert start < end, (start, end, logprobs.tokens)
    total = sum(logprobs.token_logprobs[start:end])
    greedy = all(
        max(top, key=top.get) == token
        for token, top in zip(logprobs.tokens[start:end], logprobs.top_logprobs[start:end])
    )
    return total, greedy


@check
def loglikelihoods_rank_the_models_answer_first():
    answer = loglikelihood_requests([(CONTEXT, c) for c in CONTINUATIONS])
    assert [c.index for c in answer.choices] == [0, 1], answer.choices
    (paris, paris_greedy), (london, london_greedy) = (
        parse(c, CONTEXT) for c in answer.choices
    )
    assert paris_greedy and not london_greedy, (paris_greedy, london_greedy)
    assert london < paris < 0, (paris, london)
    for choice, continuation in zip(answer.choices, CONTINUATIONS):
        assert choice.text.startswith(CONTEXT + continuation), choice.text
        assert choice.logprobs.token_logprobs[0] is None, choice.logprobs.token_logprobs[:2]
        assert choice.logprobs.top_logprobs[0] is None, choice.logprobs.top_logprobs[:2]


@check
def a_batch_scores_as_its_prompts_do_alone():
    batch = loglikelihood_requests([(CONTEXT, c) for c in CONTINUATIONS])
    for choice, continuation in zip(batch.choices, CONTINUATIONS):
        alone = loglikelihood_requests([(CONTEXT, continuation)]).choices[0]
        together, by_itself = parse(choice, CONTEXT)[0], parse(alone, CONTEXT)[0]
        assert abs(together - by_itself) < 1e-3, (continuation, together, by_itself)


@check
def the_scored_continuation_is_what_generation_reports():
    scored = parse(loglikelihood_requests([(CONTEXT, " Paris")]).choices[0], CONTEXT)[0]
    generated = client.completions.create(
        model=MODEL, prompt=CONTEXT, max_tokens=1, temperature=0, logprobs=1
    ).choices[0]
    assert generated.logprobs.tokens == [" Paris"], generated.logprobs.tokens
    assert abs(generated.logprobs.token_logprobs[0] - scored) < 1e-3, (generated, scored)


@check
def generation_until_a_stop_as_the_harness_asks():
    answer = client.completions.create(
        model=MODEL, prompt=CONTEXT, max_tokens=16, temperature=0, stop=["\n", "."]
    ).choices[0]
    assert answer.text.startswith(" Paris"), answer.text
    assert "\n" not in answer.text and "." not in answer.text, answer.text
    assert answer.finish_reason == "stop", answer.finish_reason


@check
def an_echoed_stream_opens_with_the_prompt():
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=CONTEXT, max_tokens=2, temperature=0, echo=True, stream=True
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert texts[0] == CONTEXT, texts
    assert "".join(texts).startswith(CONTEXT + " Paris"), texts


@check
def an_echo_of_no_tokens_scores_the_prompt_alone():
    """OpenAI's score-only form, which older harnesses send: `echo` with `max_tokens: 0`."""
    prompt = CONTEXT + " Paris"
    alone = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, temperature=0, logprobs=1, echo=True
    )
    choice = alone.choices[0]
    assert choice.text == prompt, choice.text
    assert choice.finish_reason == "length", choice.finish_reason
    assert alone.usage.completion_tokens == 0, alone.usage
    assert len(choice.logprobs.tokens) == alone.usage.prompt_tokens, (choice.logprobs, alone.usage)
    # The same scores as the harness's one-token form, without its generated token.
    scored = loglikelihood_requests([(CONTEXT, " Paris")]).choices[0].logprobs
    assert choice.logprobs.tokens == scored.tokens[:-1], (choice.logprobs.tokens, scored.tokens)
    for own, theirs in zip(choice.logprobs.token_logprobs[1:], scored.token_logprobs[1:-1]):
        assert abs(own - theirs) < 1e-3, (own, theirs)
    streamed = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=0, echo=True, stream=True
        )
    )
    texts = [c.choices[0].text for c in streamed if c.choices]
    assert "".join(texts) == prompt, texts
    ends = [c.choices[0].finish_reason for c in streamed if c.choices and c.choices[0].finish_reason]
    assert ends == ["length"], ends


finish("openai-eval")
