#!/usr/bin/env python3
"""Tool calling and structured output through a Switchyard router's OpenAI API with the
official `openai` SDK, the way an agent uses them: offer tools, get calls (whole and streamed),
send the results back, get an answer; ask for JSON (any object, or of a schema) and parse it.

Usage: openai_tools_check.py BASE_URL MODEL
Prints one line per check and, at the end, "openai-tools: N passed, M failed"; exits non-zero
when a check failed. The end-to-end test `tests/tests/real_model.rs` runs it against a real
model, straight and through a wafer-scale gateway worker.
"""

import json
import sys

import openai
from openai import OpenAI

from checklist import check, finish

BASE_URL, MODEL = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=120)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name."}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def arguments_of(call, tool):
    """The call's arguments, checked against the tool's schema's required string fields."""
    assert call.type == "function", call
    assert call.id, call
    assert call.function.name == tool["function"]["name"], call
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments, dict), arguments
    for name in tool["function"]["parameters"]["required"]:
        assert isinstance(arguments.get(name), str), arguments
    return arguments


def one_weather_call():
    """The answer to QUESTION with `get_weather` required, once: a small model allowed
    parallel calls may repeat its call until max_tokens."""
    return client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=64,
        temperature=0,
    )


def required_call_whole():
    choice = one_weather_call().choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None, choice.message
    assert len(choice.message.tool_calls) == 1, choice.message
    arguments_of(choice.message.tool_calls[0], WEATHER)


def required_call_streamed_matches_whole():
    def ask(stream):
        return client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            tools=[WEATHER],
            tool_choice="required",
            max_tokens=64,
            temperature=0,
            stream=stream,
        )

    whole = ask(False).choices[0].message.tool_calls
    # Put the streamed pieces together as the SDK's users do: by index.
    calls, finish = {}, None
    for chunk in ask(True):
        for choice in chunk.choices:
            for piece in choice.delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = piece.id or call["id"]
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    # Parallel calls allowed: the model may go on calling until max_tokens cuts the last one.
    assert finish in ("tool_calls", "length"), finish
    assert calls and calls[0]["id"], calls
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole
    ], (calls, whole)


def named_function_and_one_call():
    response = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        max_tokens=64,
        temperature=0,
    )
    calls = response.choices[0].message.tool_calls
    assert len(calls) == 1, calls
    arguments_of(calls[0], TIME)


def the_result_goes_back_and_the_model_answers():
    first = one_weather_call()
    call = first.choices[0].message.tool_calls[0]
    messages = QUESTION + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees Celsius."},
    ]
    answer = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=32,
        temperature=0,
    )
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length"), choice
    assert not choice.message.tool_calls, choice.message
    assert choice.message.content, choice.message


CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}
CITY_QUESTION = [{"role": "user", "content": "Give the name and population of France's capital."}]


def json_mode_answers_a_json_object():
    response = client.chat.completions.create(
        model=MODEL,
        messages=CITY_QUESTION,
        response_format={"type": "json_object"},
        max_tokens=96,
        temperature=0,
    )
    choice = response.choices[0]
    # The engine ends the answer when the object closes, within the bound.
    assert choice.finish_reason == "stop", choice
    assert isinstance(json.loads(choice.message.content), dict), choice.message.content


def a_json_schema_answer_matches_the_schema_streamed_too():
    def ask(stream):
        return client.chat.completions.create(
            model=MODEL,
            messages=CITY_QUESTION,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True},
            },
            max_tokens=96,
            temperature=0,
            stream=stream,
        )

    whole = ask(False).choices[0].message.content
    answer = json.loads(whole)
    assert set(answer) == {"city", "population"}, answer
    assert isinstance(answer["city"], str) and isinstance(answer["population"], int), answer
    streamed = "".join(
        choice.delta.content or "" for chunk in ask(True) for choice in chunk.choices
    )
    assert streamed == whole, (streamed, whole)


def a_bad_schema_is_a_400_naming_it():
    try:
        client.chat.completions.create(
            model=MODEL,
            messages=CITY_QUESTION,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
            max_tokens=8,
        )
    except openai.BadRequestError as e:
        assert e.body["param"] == "response_format.json_schema.schema", e.body
        return
    raise AssertionError("a schema that is not an object was accepted")


def a_bad_tool_is_a_400_naming_it():
    bad = {"type": "function", "function": {"name": "get weather", "parameters": {}}}
    try:
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[bad], max_tokens=8
        )
    except openai.BadRequestError as e:
        assert e.body["param"] == "tools[0].function.name", e.body
        return
    raise AssertionError("an invalid tool name was accepted")


def a_result_for_no_call_is_a_400_naming_it():
    messages = QUESTION + [{"role": "tool", "tool_call_id": "call_none", "content": "x"}]
    try:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    except openai.BadRequestError as e:
        assert e.body["param"] == "messages[1].tool_call_id", e.body
        return
    raise AssertionError("a tool result answering no call was accepted")


for fn in (
    required_call_whole,
    required_call_streamed_matches_whole,
    named_function_and_one_call,
    the_result_goes_back_and_the_model_answers,
    a_bad_tool_is_a_400_naming_it,
    a_result_for_no_call_is_a_400_naming_it,
    json_mode_answers_a_json_object,
    a_json_schema_answer_matches_the_schema_streamed_too,
    a_bad_schema_is_a_400_naming_it,
):
    check(fn)
finish("openai-tools")
