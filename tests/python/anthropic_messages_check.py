#!/usr/bin/env python3
"""Anthropic's Messages API (`POST /v1/messages`) against a Switchyard router with the official
`anthropic` SDK, as a coding agent built on it uses it: text answers whole and streamed
(through the SDK's own stream accumulator), the output bound, a tool call, its result sent
back and answered, a named stop sequence, a token count, and errors in the API's shape.

Usage: anthropic_messages_check.py BASE_URL MODEL [text-only | through-gateway]
BASE_URL is the router's HTTP root (`http://127.0.0.1:8080`; the SDK adds `/v1/messages`).
With `text-only` (a load-test engine, which refuses tools and stop sequences) only the text
checks run; with `through-gateway` (a model served through a gateway, which the router cannot
tokenize) all but the token count. Prints one line per check and, at the end, "anthropic-messages: N passed, M failed"; exits non-zero when a
check failed. The end-to-end tests `tests/tests/openai.rs` (synthetic engine, text only) and
`tests/tests/real_model.rs` (the real model) run it.
"""

import sys

import anthropic

from checklist import check, finish

BASE_URL, MODEL = sys.argv[1], sys.argv[2]
TEXT_ONLY = sys.argv[3:] == ["text-only"]
THROUGH_GATEWAY = sys.argv[3:] == ["through-gateway"]
client = anthropic.Anthropic(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=120)
WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city's name."}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def text_of(message):
    return "".join(block.text for block in message.content if block.type == "text")


def a_text_answer_whole():
    message = client.messages.create(
        model=MODEL,
        max_tokens=32,
        system="Answer in one sentence.",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert message.type == "message" and message.role == "assistant", message
    assert message.id, message
    assert message.stop_reason in ("end_turn", "max_tokens"), message.stop_reason
    assert text_of(message).strip(), message
    assert message.usage.output_tokens >= 1, message.usage


def the_output_bound_is_max_tokens():
    message = client.messages.create(
        model=MODEL,
        max_tokens=4,
        messages=[{"role": "user", "content": "Write a long story about a lighthouse."}],
    )
    assert message.stop_reason == "max_tokens", message
    assert message.usage.output_tokens == 4, message.usage


def a_streamed_answer_matches_its_events():
    # The SDK's accumulator raises on an event out of order.
    with client.messages.stream(
        model=MODEL,
        max_tokens=48,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text_of(final) != "", (streamed, final)
    assert final.stop_reason in ("end_turn", "max_tokens"), final
    assert final.usage.output_tokens >= 1 and final.usage.input_tokens >= 1, final.usage


def a_conversation():
    message = client.messages.create(
        model=MODEL,
        max_tokens=24,
        messages=[
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello Ada."}]},
            {"role": "user", "content": "What is my name?"},
        ],
    )
    assert text_of(message).strip(), message


def an_image_is_refused_naming_the_block():
    try:
        client.messages.create(
            model=MODEL,
            max_tokens=8,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
                        }
                    ],
                }
            ],
        )
    except anthropic.BadRequestError as error:
        assert error.body["type"] == "error", error.body
        assert error.body["error"]["type"] == "invalid_request_error", error.body
        assert error.body["error"]["message"].startswith("messages[0].content[0].type"), error.body
    else:
        raise AssertionError("an image was accepted")


def an_unknown_model_is_not_found():
    try:
        client.messages.create(
            model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    except anthropic.NotFoundError as error:
        assert error.body["error"]["type"] == "not_found_error", error.body
    else:
        raise AssertionError("an unknown model was served")


def a_tool_call_then_its_result_answered():
    first = client.messages.create(
        model=MODEL,
        max_tokens=64,
        messages=[{"role": "user", "content": "What is the weather like in Oslo?"}],
        tools=[WEATHER],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    assert first.stop_reason == "tool_use", first
    (call,) = [block for block in first.content if block.type == "tool_use"]
    assert call.name == "get_weather" and call.id, call
    assert isinstance(call.input["city"], str), call.input
    second = client.messages.create(
        model=MODEL,
        max_tokens=48,
        messages=[
            {"role": "user", "content": "What is the weather like in Oslo?"},
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}
                ],
            },
        ],
        tools=[WEATHER],
        tool_choice={"type": "none"},
    )
    assert text_of(second).strip(), second
    assert all(block.type == "text" for block in second.content), second.content


def a_streamed_tool_call():
    with client.messages.stream(
        model=MODEL,
        max_tokens=64,
        messages=[{"role": "user", "content": "What is the weather like in Lima?"}],
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    ) as stream:
        final = stream.get_final_message()
    (call,) = [block for block in final.content if block.type == "tool_use"]
    assert isinstance(call.input["city"], str), call.input
    assert final.stop_reason == "tool_use", final


def a_token_count_is_the_prompt_the_model_reads():
    request = dict(
        model=MODEL,
        system="Answer briefly.",
        messages=[{"role": "user", "content": "What is the weather like in Rome?"}],
        tools=[WEATHER],
    )
    counted = client.messages.count_tokens(**request).input_tokens
    message = client.messages.create(max_tokens=8, **request)
    usage = message.usage
    assert counted == usage.input_tokens + usage.cache_read_input_tokens > 0, (counted, usage)
    try:
        client.messages.count_tokens(model="no-such-model", messages=request["messages"])
    except anthropic.NotFoundError as error:
        assert error.body["error"]["type"] == "not_found_error", error.body
    else:
        raise AssertionError("an unknown model's tokens were counted")


def a_stop_sequence_is_named():
    message = client.messages.create(
        model=MODEL,
        max_tokens=32,
        system="Answer in one sentence.",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        stop_sequences=["Paris"],
    )
    assert message.stop_reason == "stop_sequence", message
    assert message.stop_sequence == "Paris", message
    assert "Paris" not in text_of(message), message


def a_server_tool_is_refused_naming_it():
    try:
        client.messages.create(
            model=MODEL,
            max_tokens=8,
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    except anthropic.BadRequestError as error:
        assert error.body["error"]["message"].startswith("tools[0].type"), error.body
    else:
        raise AssertionError("a server tool was accepted")


CHECKS = [
    a_text_answer_whole,
    the_output_bound_is_max_tokens,
    a_streamed_answer_matches_its_events,
    a_conversation,
    an_image_is_refused_naming_the_block,
    an_unknown_model_is_not_found,
]
if not TEXT_ONLY:
    CHECKS += [
        a_tool_call_then_its_result_answered,
        a_streamed_tool_call,
        a_stop_sequence_is_named,
        a_server_tool_is_refused_naming_it,
    ]
if not TEXT_ONLY and not THROUGH_GATEWAY:
    CHECKS.append(a_token_count_is_the_prompt_the_model_reads)
for fn in CHECKS:
    check(fn)
finish("anthropic-messages")
