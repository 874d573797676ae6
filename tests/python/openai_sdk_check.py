#!/usr/bin/env python3
"""Drives a Switchyard router's OpenAI-compatible HTTP API with the official `openai` SDK.

Usage: openai_sdk_check.py BASE_URL MODEL [CA_FILE]
(BASE_URL like http://127.0.0.1:8080/v1; with https://, CA_FILE is the CA to trust, e.g. the
one `switchyard up --tls` prints). Prints one line per check and, at the end,
"openai-sdk: N passed, M failed"; exits non-zero when a check failed.
The end-to-end test `tests/tests/openai.rs` runs it against real router and worker processes.
"""

import ssl
import sys

import openai
from openai import DefaultHttpxClient, OpenAI

from checklist import check, finish

BASE_URL, MODEL = sys.argv[1], sys.argv[2]
CA_FILE = sys.argv[3] if len(sys.argv) > 3 else None
# Trust exactly the given CA, as a user would pass it to the SDK's HTTP client.
http_client = (
    DefaultHttpxClient(verify=ssl.create_default_context(cafile=CA_FILE)) if CA_FILE else None
)
# No retries: a 429/503 must surface, not be retried away.
client = OpenAI(
    base_url=BASE_URL, api_key="unused", max_retries=0, timeout=30, http_client=http_client
)
MESSAGES = [{"role": "user", "content": "the quick brown fox jumps"}]


def check_cached_tokens(usage):
    """Prompt tokens served from the worker's prefix cache, as the SDK types them."""
    details = usage.prompt_tokens_details
    assert details is not None, usage
    assert isinstance(details.cached_tokens, int), usage
    assert 0 <= details.cached_tokens <= usage.prompt_tokens, usage


@check
def chat_non_streaming():
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=7, seed=42)
    assert r.object == "chat.completion", r
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content, r
    assert r.choices[0].finish_reason == "length", r.choices[0].finish_reason
    assert r.usage.completion_tokens == 7, r.usage
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    check_cached_tokens(r.usage)


@check
def chat_streaming_equals_non_streaming():
    whole = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=9, seed=7
    ).choices[0].message.content
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=9,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage, chunks = [], None, None, 0
    for chunk in stream:
        chunks += 1
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.choices:
            delta = chunk.choices[0].delta
            if delta.content:
                parts.append(delta.content)
            if chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    streamed = "".join(parts)
    assert streamed == whole, (streamed, whole)
    assert finish == "length", finish
    assert usage is not None and usage.completion_tokens == 9, usage
    check_cached_tokens(usage)
    assert chunks >= 3, chunks


@check
def chat_raw_response_headers():
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=2,
        extra_headers={"x-switchyard-class": "latency-critical"},
    )
    assert raw.headers["x-switchyard-lane"] == "latency-critical", dict(raw.headers)
    assert raw.headers["x-switchyard-worker"], dict(raw.headers)
    assert raw.parse().choices[0].message.content


@check
def service_tier_chooses_the_lane():
    # OpenAI's own field picks the lane, whole and streamed; the answer names the lane it ran in.
    for tier, lane in (("priority", "latency-critical"), ("flex", "cost-sensitive")):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, service_tier=tier
        )
        assert raw.headers["x-switchyard-lane"] == lane, (tier, dict(raw.headers))
        assert raw.parse().service_tier == tier, raw.parse()
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=2, service_tier=tier, stream=True
            )
        )
        assert {c.service_tier for c in chunks} == {tier}, chunks
    try:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, service_tier="scale"
        )
        raise AssertionError("an unknown tier was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "service_tier", e.body


@check
def completions_both_ways():
    whole = client.completions.create(model=MODEL, prompt="one two three", max_tokens=5)
    assert whole.object == "text_completion", whole
    assert whole.choices[0].text == "one two three one two", whole.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="one two three", max_tokens=5, stream=True
        )
        if c.choices
    )
    assert streamed == whole.choices[0].text, (streamed, whole.choices[0].text)


def synthetic(prompt, tokens):
    """The synthetic engine's answer: the prompt's words over and over."""
    words = prompt.split()
    return " ".join(words[i % len(words)] for i in range(tokens))


@check
def completions_take_a_batch_of_prompts():
    prompts = ["alpha beta", "gamma delta epsilon", "zeta"]
    expected = {
        p * 2 + i: synthetic(prompt, 4) for p, prompt in enumerate(prompts) for i in range(2)
    }
    whole = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, n=2)
    assert {c.index: c.text for c in whole.choices} == expected, whole.choices
    assert [c.index for c in whole.choices] == list(range(6)), whole.choices
    alone = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=1).usage.prompt_tokens
        for p in prompts
    ]
    assert whole.usage.prompt_tokens == sum(alone), (whole.usage, alone)
    assert whole.usage.completion_tokens == 6 * 4, whole.usage
    streamed = {}
    for chunk in client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=4, n=2, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == expected, streamed
    # Token ids need the model's tokenizer at the router; the synthetic engine publishes none.
    try:
        client.completions.create(model=MODEL, prompt=[[1, 2, 3]], max_tokens=4)
    except openai.BadRequestError as refused:
        assert refused.body["param"] == "prompt", refused.body
        assert "send the prompt as text" in refused.body["message"], refused.body
    else:
        raise AssertionError("token ids were taken without a tokenizer to check them")


@check
def echo_needs_an_engine_that_scores_prompts():
    # The synthetic engine has no model to score a prompt with: refused naming `echo`.
    try:
        client.completions.create(model=MODEL, prompt="one two", max_tokens=2, echo=True)
    except openai.BadRequestError as refused:
        assert refused.body["param"] == "echo", refused.body
        assert "score a prompt" in refused.body["message"], refused.body
    else:
        raise AssertionError("an echo was answered without scoring the prompt")


def check_logprob_entries(entries, text, top):
    """Chat `logprobs.content` entries: one per token, adding up to the text, each a log
    probability with at most `top` alternatives, most likely first."""
    assert entries, entries
    assert "".join(e.token for e in entries) == text, (entries, text)
    for e in entries:
        assert e.logprob <= 0, e
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token, e
        assert 1 <= len(e.top_logprobs) <= top, e
        ranked = [t.logprob for t in e.top_logprobs]
        assert ranked == sorted(ranked, reverse=True), e


@check
def chat_logprobs_both_ways():
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=2
    )
    entries = r.choices[0].logprobs.content
    check_logprob_entries(entries, r.choices[0].message.content, 2)
    assert len(entries) == r.usage.completion_tokens, (entries, r.usage)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=2, stream=True
    )
    parts, streamed = [], []
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].logprobs is not None:
                streamed.extend(chunk.choices[0].logprobs.content or [])
    check_logprob_entries(streamed, "".join(parts), 2)
    assert [e.token for e in streamed] == [e.token for e in entries]


@check
def completion_logprobs():
    r = client.completions.create(model=MODEL, prompt="one two three", max_tokens=4, logprobs=1)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text, (lp, r.choices[0].text)
    assert len(lp.token_logprobs) == len(lp.tokens) == r.usage.completion_tokens, lp
    assert all(x <= 0 for x in lp.token_logprobs), lp
    assert all(len(top) == 1 for top in lp.top_logprobs), lp
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset), lp


@check
def models_list():
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids, ids
    assert client.models.retrieve(MODEL).id == MODEL


@check
def unknown_model_is_404():
    try:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=2)
    except openai.NotFoundError as e:
        assert e.status_code == 404
        assert e.body["code"] == "model_not_found", e.body
        assert e.body["param"] == "model", e.body
        return
    raise AssertionError("expected NotFoundError")


@check
def bad_request_is_400():
    try:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=0)
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert e.body["param"] == "max_tokens", e.body
        return
    raise AssertionError("expected BadRequestError")


@check
def min_p_through_extra_body():
    # Not in the SDK's signature (vLLM's and llama.cpp's): sent as extra_body, as their users do.
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0.8, extra_body={"min_p": 0.05}
    )
    assert r.usage.completion_tokens == 3, r.usage
    try:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=3, extra_body={"min_p": 1.5}
        )
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert e.body["param"] == "min_p", e.body
        assert "between 0 and 1" in e.body["message"], e.body
        return
    raise AssertionError("expected BadRequestError")


@check
def several_choices_both_ways():
    # n choices: one generation each, the prompt counted once and every completion.
    one = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, seed=3)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, seed=3, n=2)
    assert [c.index for c in r.choices] == [0, 1], r.choices
    assert all(c.message.content and c.finish_reason == "length" for c in r.choices), r
    assert r.usage.prompt_tokens == one.usage.prompt_tokens, (r.usage, one.usage)
    assert r.usage.completion_tokens == 8, r.usage
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=4,
        seed=3,
        n=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finishes, usage = {}, {}, None
    for chunk in stream:
        for choice in chunk.choices:
            parts.setdefault(choice.index, []).append(choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert sorted(parts) == [0, 1, 2], parts
    assert all("".join(p) for p in parts.values()), parts
    assert finishes == {0: "length", 1: "length", 2: "length"}, finishes
    assert usage is not None and usage.completion_tokens == 12, usage
    try:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=17)
    except openai.BadRequestError as e:
        assert e.body["param"] == "n", e.body
        return
    raise AssertionError("expected BadRequestError")


@check
def bad_lane_header_is_400():
    try:
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=2,
            extra_headers={"x-switchyard-class": "fastest"},
        )
    except openai.BadRequestError as e:
        assert e.body["param"] == "x-switchyard-class", e.body
        return
    raise AssertionError("expected BadRequestError")


finish("openai-sdk")
