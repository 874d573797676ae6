#!/usr/bin/env python3
"""Tool calls and JSON answers side by side: the same requests, alternated one at a time, to a
Switchyard router and to llama.cpp's llama-server (`--jinja`), both serving the same GGUF model.

Usage: tool_calls_anchor.py SWITCHYARD_URL LLAMA_SERVER_URL MODEL [ROUNDS]
(URLs like http://127.0.0.1:8080/v1). Three tasks per question: a required call of one tool
(`parallel_tool_calls: false`), a named call with two tools offered, and an answer in a JSON
schema. Each answer is checked (the tool's name, arguments that parse as a JSON object with the
schema's required string fields; JSON of the schema) and timed (the whole request, greedy,
non-streamed). Prints one row per system and task: valid answers, latency p50 / p90, completion
tokens p50, and the latency ratio Switchyard / llama-server. `bench/tool-calls.sh` starts both.
"""

import json
import statistics
import sys
import time

from openai import OpenAI

SWITCHYARD, LLAMA, MODEL = sys.argv[1], sys.argv[2], sys.argv[3]
ROUNDS = int(sys.argv[4]) if len(sys.argv) > 4 else 2
CITIES = ["Paris", "Oslo", "Lima", "Tokyo", "Nairobi", "Quebec", "Perth", "Cairo"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


def call_valid(message, tool):
    calls = message.tool_calls or []
    if len(calls) != 1 or calls[0].function.name != tool["function"]["name"]:
        return False
    try:
        arguments = json.loads(calls[0].function.arguments)
    except ValueError:
        return False
    return isinstance(arguments, dict) and all(
        isinstance(arguments.get(k), str) for k in tool["function"]["parameters"]["required"]
    )


def json_valid(message):
    try:
        answer = json.loads(message.content or "")
    except ValueError:
        return False
    return isinstance(answer, dict) and set(answer) == {"city", "country"} and all(
        isinstance(v, str) for v in answer.values()
    )


def tasks(city):
    ask = [{"role": "user", "content": f"What is the weather like in {city} right now?"}]
    return {
        "required call": (
            dict(messages=ask, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False),
            lambda m: call_valid(m, WEATHER),
        ),
        "named call": (
            dict(
                messages=[{"role": "user", "content": f"What time is it in {city}?"}],
                tools=[WEATHER, TIME],
                tool_choice={"type": "function", "function": {"name": "get_time"}},
                parallel_tool_calls=False,
            ),
            lambda m: call_valid(m, TIME),
        ),
        "json schema": (
            dict(
                messages=[{"role": "user", "content": f"Which country is {city} in?"}],
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "place", "schema": CITY_SCHEMA},
                },
            ),
            json_valid,
        ),
    }


clients = {
    "switchyard": OpenAI(base_url=SWITCHYARD, api_key="unused", max_retries=0, timeout=300),
    "llama-server": OpenAI(base_url=LLAMA, api_key="unused", max_retries=0, timeout=300),
}
# Untimed, once per task and system: the first requests pay for one-off work (a router
# fetching its worker's tokenizer, a grammar library's first compile).
for fields, _ in tasks("Rome").values():
    for client in clients.values():
        try:
            client.chat.completions.create(model=MODEL, max_tokens=96, temperature=0, **fields)
        except Exception as e:  # noqa: BLE001 - the timed run reports it
            print(f"warm-up: {e}", file=sys.stderr)
results = {}  # (system, task) -> [(valid, seconds, completion tokens)]
for _ in range(ROUNDS):
    for city in CITIES:
        for task, (fields, valid) in tasks(city).items():
            # Alternated request by request, so both see the same moment of the machine.
            for system, client in clients.items():
                started = time.perf_counter()
                try:
                    response = client.chat.completions.create(
                        model=MODEL, max_tokens=96, temperature=0, **fields
                    )
                    elapsed = time.perf_counter() - started
                    ok = valid(response.choices[0].message)
                    tokens = response.usage.completion_tokens if response.usage else None
                except Exception as e:  # noqa: BLE001 - a refusal is an invalid answer here
                    print(f"{system} {task} {city}: {e}", file=sys.stderr)
                    elapsed, ok, tokens = time.perf_counter() - started, False, None
                results.setdefault((system, task), []).append((ok, elapsed, tokens))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


print(f"{MODEL}, greedy, max_tokens 96, {ROUNDS} x {len(CITIES)} questions per task, alternated")
print(f"{'task':<15}{'system':<14}{'valid':>8}{'p50 ms':>9}{'p90 ms':>9}{'tokens p50':>12}{'ours/theirs':>13}")
for task in tasks("x"):
    p50 = {}
    for system in clients:
        rows = results[(system, task)]
        seconds = [s for _, s, _ in rows]
        tokens = [t for _, _, t in rows if t is not None]
        p50[system] = statistics.median(seconds)
        ratio = "" if system == "switchyard" else f"{p50['switchyard'] / p50[system]:.2f}x"
        print(
            f"{task:<15}{system:<14}{sum(ok for ok, _, _ in rows):>4}/{len(rows):<3}"
            f"{p50[system] * 1e3:>9.0f}{pct(seconds, 0.9) * 1e3:>9.0f}"
            f"{(statistics.median(tokens) if tokens else float('nan')):>12.0f}{ratio:>13}"
        )
