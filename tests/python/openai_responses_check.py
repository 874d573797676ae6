#!/usr/bin/env python3
"""OpenAI's Responses API (`client.responses`) against a Switchyard router with the official
`openai` SDK, as an agent uses it: text answers whole and streamed (through the SDK's own
stream accumulator, which checks every event's order and identity), the output bound, stored
responses (retrieved, their input items listed, deleted, and gone on from with
`previous_response_id`), the output text's log probabilities, a function call, its result
sent back as input items or after the stored call and answered, a JSON schema answer, and
refusals that name their field; background responses polled until they end, one
cancelled midway, and one streamed whose client goes away and picks the stream up again
(`retrieve(stream=True, starting_after=N)`); item references to stored responses' and
conversations' items, and a function call referred to by its id.

Usage: openai_responses_check.py BASE_URL MODEL [text-only]
With `text-only` (a load-test engine, which refuses tools and schemas) only the text checks
run. Prints one line per check and, at the end, "openai-responses: N passed, M failed"; exits
non-zero when a check failed. The end-to-end tests `tests/tests/openai.rs` (synthetic engine,
text only) and `tests/tests/real_model.rs` (the real model) run it.
"""

import json
import sys
import time

import openai
from openai import OpenAI

from checklist import check, finish

BASE_URL, MODEL = sys.argv[1], sys.argv[2]
TEXT_ONLY = sys.argv[3:] == ["text-only"]
client = OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=120)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city's name."}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def a_text_answer_whole():
    response = client.responses.create(
        model=MODEL,
        instructions="Answer in one sentence.",
        input="What is the capital of France?",
        max_output_tokens=24,
        metadata={"ticket": "T-1"},
    )
    assert response.object == "response" and response.id, response
    assert response.status in ("completed", "incomplete"), response.status
    assert response.output_text.strip(), response
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    assert response.metadata == {"ticket": "T-1"}, response.metadata
    assert response.instructions == "Answer in one sentence."
    usage = response.usage
    assert usage.output_tokens >= 1 and usage.input_tokens >= 1, usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens, usage


def the_output_bound_makes_it_incomplete():
    response = client.responses.create(
        model=MODEL, input="Write a long story about a lighthouse.", max_output_tokens=4
    )
    assert response.status == "incomplete", response
    assert response.incomplete_details.reason == "max_output_tokens", response
    assert response.usage.output_tokens == 4, response.usage
    assert response.output[0].status == "incomplete", response.output


def a_streamed_answer_matches_its_events():
    deltas, kinds = [], []
    # The SDK's accumulator raises on an event out of order or naming the wrong item.
    with client.responses.stream(
        model=MODEL,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}],
        max_output_tokens=96,
    ) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        # The last event carries the whole response (`completed`, or `incomplete` when the
        # bound cut it: a load-test engine always writes to the bound).
        final = event.response
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds
    assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
    assert "".join(deltas) == final.output_text != "", (deltas, final.output_text)


def the_output_texts_log_probabilities():
    asked = dict(
        model=MODEL,
        input="Say hello.",
        max_output_tokens=8,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
    )
    response = client.responses.create(**asked)
    assert response.top_logprobs == 2, response
    part = response.output[0].content[0]
    assert part.logprobs, part
    # The tokens spell the text, each with its two likeliest alternatives (a load-test
    # engine is certain of each token: it has one).
    assert "".join(lp.token for lp in part.logprobs) == part.text, (part.logprobs, part.text)
    alternatives = (1, 2) if TEXT_ONLY else (2,)
    for lp in part.logprobs:
        assert lp.logprob <= 0 and len(lp.top_logprobs) in alternatives, lp
    # Streamed, each delta carries its tokens', and together they are the text's.
    streamed = []
    with client.responses.stream(**asked) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                streamed += event.logprobs
        final = event.response
    tokens = final.output[0].content[0].logprobs
    assert [lp.token for lp in streamed] == [lp.token for lp in tokens], (streamed, tokens)


def raw_events_are_numbered_in_order():
    stream = client.responses.create(
        model=MODEL, input="Count to three.", max_output_tokens=12, stream=True
    )
    numbers = [event.sequence_number for event in stream]
    assert numbers == list(range(len(numbers))) and len(numbers) >= 6, numbers


def a_conversation_in_input_items():
    response = client.responses.create(
        model=MODEL,
        input=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "My name is Ada."},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello Ada.", "annotations": []}],
            },
            {"role": "user", "content": "What is my name?"},
        ],
        max_output_tokens=16,
    )
    assert response.output_text.strip(), response


def a_stored_response_is_retrieved_listed_and_deleted():
    response = client.responses.create(model=MODEL, input="Name a colour.", max_output_tokens=8)
    assert response.store is True, response
    kept = client.responses.retrieve(response.id)
    assert (kept.id, kept.output_text, kept.usage) == (
        response.id,
        response.output_text,
        response.usage,
    ), kept
    items = client.responses.input_items.list(response.id)
    (item,) = items.data
    assert item.type == "message" and item.role == "user" and item.id, item
    assert item.content[0].text == "Name a colour.", item
    assert client.responses.delete(response.id) is None
    try:
        client.responses.retrieve(response.id)
    except openai.NotFoundError as error:
        assert "is not stored here" in error.body["message"], error.body
    else:
        raise AssertionError("a deleted response was still there")


def a_streamed_response_is_stored_too():
    with client.responses.stream(model=MODEL, input="Say hi.", max_output_tokens=8) as stream:
        for event in stream:
            pass
        # `completed`, or `incomplete` when the bound cut it.
        final = event.response
    kept = client.responses.retrieve(final.id)
    assert (kept.output_text, kept.status) == (final.output_text, final.status), kept
    going_on = client.responses.create(
        model=MODEL, previous_response_id=final.id, input="Again.", max_output_tokens=4
    )
    assert going_on.previous_response_id == final.id, going_on


def a_conversation_goes_on_from_a_stored_response():
    first = client.responses.create(
        model=MODEL,
        instructions="You are terse.",
        input="My name is Ada.",
        max_output_tokens=16,
    )
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input="What is my name?",
        max_output_tokens=16,
        # A long session would outgrow the context: its oldest turns would then go.
        truncation="auto",
    )
    assert second.previous_response_id == first.id, second
    assert second.truncation == "auto" and first.truncation == "disabled", second
    assert second.output_text.strip(), second
    # The model read the first turn and its answer again (its instructions hold for one
    # request only, as OpenAI's do).
    seen, before = second.usage.input_tokens, first.usage.input_tokens
    assert seen > before + first.usage.output_tokens - 8, (first.usage, second.usage)


def what_is_not_stored_is_a_404_naming_it():
    unsaved = client.responses.create(
        model=MODEL, input="Hi", max_output_tokens=4, store=False
    )
    assert unsaved.store is False, unsaved
    for previous in (unsaved.id, "resp_123"):
        try:
            client.responses.create(model=MODEL, input="Hi", previous_response_id=previous)
        except openai.NotFoundError as error:
            assert error.body["param"] == "previous_response_id", error.body
            assert error.body["code"] == "previous_response_not_found", error.body
        else:
            raise AssertionError(f"previous_response_id {previous} was accepted")


def poll(response_id, until, deadline_s=60):
    """Reads the response until `until(response)` holds (the API's own way: polling)."""
    deadline = time.monotonic() + deadline_s
    while True:
        response = client.responses.retrieve(response_id)
        if until(response):
            return response
        assert time.monotonic() < deadline, f"still {response.status}: {response}"
        time.sleep(0.05)


def a_background_response_is_polled_until_it_ends():
    started = client.responses.create(
        model=MODEL, input="Name a colour.", max_output_tokens=8, background=True
    )
    assert started.background is True and started.status == "in_progress", started
    ended = poll(started.id, lambda r: r.status not in ("queued", "in_progress"))
    assert ended.status in ("completed", "incomplete"), ended
    assert ended.background is True and ended.output_text.strip(), ended
    going_on = client.responses.create(
        model=MODEL, previous_response_id=ended.id, input="Another.", max_output_tokens=4
    )
    assert going_on.previous_response_id == ended.id, going_on


def a_background_response_is_cancelled_midway():
    started = client.responses.create(
        model=MODEL, input="Write a very long story.", max_output_tokens=4000, background=True
    )
    # It runs without the client: its output grows as the client polls.
    running = poll(started.id, lambda r: r.output_text)
    assert running.status == "in_progress", running
    try:
        client.responses.create(model=MODEL, input="And?", previous_response_id=started.id)
        raise AssertionError("a response went on from one still running")
    except openai.BadRequestError as error:
        assert error.body["param"] == "previous_response_id", error.body
    cancelled = client.responses.cancel(started.id)
    assert cancelled.status == "cancelled", cancelled
    assert cancelled.output_text.startswith(running.output_text), (cancelled, running)
    assert cancelled.usage is None, cancelled
    kept = client.responses.retrieve(started.id)
    assert (kept.status, kept.output_text) == ("cancelled", cancelled.output_text), kept
    # Cancelling again answers the same; a response that was not a background one is refused.
    assert client.responses.cancel(started.id).status == "cancelled"
    plain = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    try:
        client.responses.cancel(plain.id)
        raise AssertionError("a response that was not a background one was cancelled")
    except openai.BadRequestError as error:
        assert "not a background response" in error.body["message"], error.body


def a_background_stream_is_picked_up_where_it_broke():
    stream = client.responses.create(
        model=MODEL, input="Tell a story.", max_output_tokens=48, background=True, stream=True
    )
    seen = []
    for event in stream:
        seen.append(event)
        if len(seen) == 5:
            break
    # The client goes away; the response goes on without it.
    stream.close()
    response_id = seen[0].response.id
    assert seen[0].type == "response.created" and seen[0].response.background, seen[0]
    last = seen[-1].sequence_number
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=last))
    events = seen + rest
    numbers = [event.sequence_number for event in events]
    assert numbers == list(range(len(numbers))), numbers
    ended = events[-1]
    assert ended.type in ("response.completed", "response.incomplete"), ended
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed and streamed == ended.response.output_text, (streamed, ended.response)
    # The whole stream again from its start, through the SDK's own stream accumulator (which
    # checks every event's order and identity), and the stored response the same.
    with client.responses.stream(response_id=response_id) as again:
        replayed = [event.sequence_number for event in again]
        # The accumulator's final response is one that completed (not one cut at the bound).
        if ended.type == "response.completed":
            assert again.get_final_response().output_text == streamed
    assert replayed == numbers, replayed
    kept = client.responses.retrieve(response_id)
    assert (kept.status, kept.output_text) == (ended.response.status, streamed), kept
    try:
        list(client.responses.retrieve(response_id, stream=True, starting_after=numbers[-1] + 1))
        raise AssertionError("a stream was resumed past its end")
    except openai.BadRequestError as error:
        assert error.body["param"] == "starting_after", error.body
    try:
        client.responses.cancel(response_id)
        raise AssertionError("a completed response was cancelled")
    except openai.BadRequestError as error:
        assert "cannot be cancelled" in error.body["message"], error.body


def item_references_bring_stored_items():
    first = client.responses.create(model=MODEL, input="Remember the word kiwi.", max_output_tokens=8)
    (asked,) = client.responses.input_items.list(first.id).data
    said = first.output[0]
    referred = client.responses.create(
        model=MODEL,
        input=[
            {"type": "item_reference", "id": asked.id},
            {"type": "item_reference", "id": said.id},
            {"role": "user", "content": "Which word?"},
        ],
        max_output_tokens=4,
    )
    inline = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Remember the word kiwi."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "Which word?"},
        ],
        max_output_tokens=4,
        store=False,
    )
    # The model read the referenced items as if they had been sent.
    assert referred.usage.input_tokens == inline.usage.input_tokens, (referred.usage, inline.usage)
    listed = [item.id for item in client.responses.input_items.list(referred.id, order="asc").data]
    assert listed[:2] == [asked.id, said.id], listed
    # An item of a stored conversation too.
    conversation = client.conversations.create(items=[{"role": "user", "content": "Hi there."}])
    (kept,) = client.conversations.items.list(conversation.id).data
    from_conversation = client.responses.create(
        model=MODEL, input=[{"type": "item_reference", "id": kept.id}], max_output_tokens=2
    )
    alone = client.responses.create(model=MODEL, input="Hi there.", max_output_tokens=2, store=False)
    assert from_conversation.usage.input_tokens == alone.usage.input_tokens, from_conversation
    # An id naming nothing kept is a 404 naming the reference.
    unsaved = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    for unknown in (unsaved.output[0].id, "msg_mine"):
        try:
            client.responses.create(
                model=MODEL, input=[{"type": "item_reference", "id": unknown}], max_output_tokens=2
            )
            raise AssertionError(f"a reference to {unknown} was resolved")
        except openai.NotFoundError as error:
            assert error.body["param"] == "input[0].id", error.body


def a_missing_input_is_a_400_naming_it():
    try:
        client.responses.create(model=MODEL, input=[])
    except openai.BadRequestError as error:
        assert error.body["param"] == "input", error.body
    else:
        raise AssertionError("an empty input was accepted")


def a_function_call_then_its_result_answered():
    first = client.responses.create(
        model=MODEL,
        input="What is the weather like in Oslo?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=64,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1, first.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id, call
    assert isinstance(json.loads(call.arguments)["city"], str), call.arguments
    second = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is the weather like in Oslo?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
        ],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=48,
    )
    assert second.output_text.strip(), second
    assert all(item.type == "message" for item in second.output), second.output


def one_weather_call(city):
    """A stored response asking about `city`'s weather that calls the tool once, and the call."""
    first = client.responses.create(
        model=MODEL,
        input=f"What is the weather like in {city}?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=64,
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    return first, call


def a_stored_call_answered_with_its_result_only():
    """The agent loop of the OpenAI Agents SDK: the next request sends the call's output
    alone and names the response that made the call."""
    first, call = one_weather_call("Rome")
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Rain, 14 C"}],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=48,
    )
    assert second.output_text.strip(), second
    assert all(item.type == "message" for item in second.output), second.output


def a_call_referenced_answered_with_its_result():
    """A stateless agent loop that refers to the model's call by its id instead of sending it
    back whole."""
    _, call = one_weather_call("Oslo")
    second = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is the weather like in Oslo?"},
            {"type": "item_reference", "id": call.id},
            {"type": "function_call_output", "call_id": call.call_id, "output": "Snow, -3 C"},
        ],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=48,
    )
    assert second.output_text.strip(), second
    (listed,) = [
        item for item in client.responses.input_items.list(second.id).data
        if item.type == "function_call"
    ]
    assert (listed.id, listed.arguments) == (call.id, call.arguments), listed


def a_streamed_call_matches_its_events():
    with client.responses.stream(
        model=MODEL,
        input="What is the weather like in Lima?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        max_output_tokens=64,
    ) as stream:
        pieces = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    (call,) = [item for item in final.output if item.type == "function_call"]
    assert "".join(pieces) == call.arguments, (pieces, call.arguments)
    assert isinstance(json.loads(call.arguments)["city"], str), call.arguments


def a_json_schema_answer():
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string"}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model=MODEL,
        input="What is the capital of Italy?",
        text={"format": {"type": "json_schema", "name": "capital", "schema": schema}},
        max_output_tokens=48,
    )
    assert isinstance(json.loads(response.output_text)["capital"], str), response.output_text


def a_bad_tool_is_a_400_naming_it():
    try:
        client.responses.create(
            model=MODEL,
            input="Hi",
            tools=[{"type": "function", "name": "bad name", "parameters": {"type": "object"}}],
        )
    except openai.BadRequestError as error:
        assert error.body["param"] == "tools[0].name", error.body
        assert error.body["message"].startswith("tools[0].name: "), error.body
    else:
        raise AssertionError("a tool name with a space was accepted")


CHECKS = [
    a_text_answer_whole,
    the_output_bound_makes_it_incomplete,
    a_streamed_answer_matches_its_events,
    the_output_texts_log_probabilities,
    raw_events_are_numbered_in_order,
    a_conversation_in_input_items,
    a_stored_response_is_retrieved_listed_and_deleted,
    a_streamed_response_is_stored_too,
    a_conversation_goes_on_from_a_stored_response,
    what_is_not_stored_is_a_404_naming_it,
    a_background_response_is_polled_until_it_ends,
    a_background_response_is_cancelled_midway,
    a_background_stream_is_picked_up_where_it_broke,
    item_references_bring_stored_items,
    a_missing_input_is_a_400_naming_it,
]
if not TEXT_ONLY:
    CHECKS += [
        a_function_call_then_its_result_answered,
        a_stored_call_answered_with_its_result_only,
        a_call_referenced_answered_with_its_result,
        a_streamed_call_matches_its_events,
        a_json_schema_answer,
        a_bad_tool_is_a_400_naming_it,
    ]
for fn in CHECKS:
    check(fn)
finish("openai-responses")
