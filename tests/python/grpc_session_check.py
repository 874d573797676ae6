#!/usr/bin/env python3
"""Drives a Switchyard router's gRPC API from Python with the repository's client
(`client/python/switchyard_client.py`, on `grpcio`).

Usage: grpc_session_check.py TARGET MODEL IDLE_S
(TARGET like 127.0.0.1:50051; MODEL a model served by the synthetic engine, whose answer is the
prompt's words over and over; IDLE_S the router's --idle-timeout in seconds). Prints one line per check and, at the end,
"grpc-python: N passed, M failed"; exits non-zero when a check failed.
The end-to-end test `tests/tests/python_grpc.rs` runs it against real router and worker processes.
"""

import asyncio
import sys
import traceback
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "client" / "python"))
import switchyard_client as sy  # noqa: E402

TARGET, MODEL, IDLE_S = sys.argv[1], sys.argv[2], float(sys.argv[3])
# Long enough that a request is still generating when the check steers it.
LONG = 2000
results = []


def synthetic(prompt: str, tokens: int) -> str:
    words = prompt.split()
    return " ".join(words[i % len(words)] for i in range(tokens))


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


async def first_tokens(request: sy.Request, at_least: int) -> int:
    """Reads `request` until it has produced `at_least` tokens; returns how many it has."""
    seen = 0
    async for message in request:
        if isinstance(message, sy.pb.Tokens):
            seen += len(message.token_ids)
            if seen >= at_least:
                return seen
    raise AssertionError(f"request ended after {seen} tokens")


async def models_are_listed_with_their_workers():
    models = await sy.list_models(TARGET)
    expect(len(models.get(MODEL, [])) >= 1, f"{MODEL} has no ready worker: {models}")


async def two_requests_share_one_session():
    async with await sy.Session.open(TARGET) as session:
        cheap = await session.start(
            model=MODEL, messages=[("user", "alpha beta")], max_tokens=6,
            request_class="cost-sensitive",
        )
        urgent = await session.start(
            model=MODEL, messages=[("user", "gamma delta epsilon")], max_tokens=5,
            request_class="latency-critical",
        )
        expect(cheap.request_id != urgent.request_id, "request ids are made up unique")
        a, b = await asyncio.gather(cheap.collect(), urgent.collect())
    expect(a.text == synthetic("alpha beta", 6), f"cost-sensitive text {a.text!r}")
    expect(b.text == synthetic("gamma delta epsilon", 5), f"latency-critical text {b.text!r}")
    expect(a.finished.reason == sy.pb.FINISH_REASON_LENGTH, f"{a.finished}")
    expect(a.finished.usage.completion_tokens == 6, f"{a.finished.usage}")
    expect(b.accepted.lane == sy.pb.LANE_LATENCY_CRITICAL, f"{b.accepted}")
    expect(a.accepted.lane == sy.pb.LANE_COST_SENSITIVE, f"{a.accepted}")


async def cancel_stops_a_running_request():
    async with await sy.Session.open(TARGET) as session:
        request = await session.start(model=MODEL, messages=[("user", "one two")], max_tokens=LONG)
        await first_tokens(request, 1)
        expect(await session.cancel(request.request_id), "cancel of an open request is sent")
        completion = await request.collect()
        finished = completion.finished
        expect(finished.reason == sy.pb.FINISH_REASON_CANCELLED, f"{finished}")
        expect(finished.usage.completion_tokens < LONG, f"{finished.usage}")
        expect(not await session.cancel(request.request_id), "an ended request is not cancelled")


async def interrupt_redirects_a_running_request():
    async with await sy.Session.open(TARGET) as session:
        request = await session.start(
            model=MODEL, messages=[("user", "alpha beta gamma")], max_tokens=40
        )
        before = await first_tokens(request, 4)
        sent = await session.interrupt(request.request_id, [("user", "delta epsilon")])
        expect(sent, "interrupt of an open request is sent")
        after = await request.collect()
    expect(after.finished.reason == sy.pb.FINISH_REASON_LENGTH, f"{after.finished}")
    # max_tokens bounds the whole request, across the redirect.
    expect(before + len(after.token_ids) == 40, f"{before} + {len(after.token_ids)} tokens")
    expect(after.text.endswith(synthetic("delta epsilon", 4)), f"redirected text {after.text!r}")


async def a_refused_interrupt_leaves_its_request_running():
    async with await sy.Session.open(TARGET) as session:
        request = await session.start(model=MODEL, messages=[("user", "keep going")], max_tokens=30)
        await first_tokens(request, 1)
        await session.interrupt(request.request_id, [("robot", "beep")])
        completion = await request.collect()
    expect(len(completion.rejected) == 1, f"rejected: {completion.rejected}")
    rejected = completion.rejected[0]
    expect(rejected.frame == "interrupt", f"{rejected}")
    expect(rejected.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], f"{rejected}")
    expect("role" in rejected.field, f"{rejected}")
    expect(completion.finished.reason == sy.pb.FINISH_REASON_LENGTH, f"{completion.finished}")


async def a_request_naming_no_bound_gets_the_routers_default():
    async with await sy.Session.open(TARGET) as session:
        completion = await (
            await session.start(model=MODEL, messages=[("user", "unbounded words")])
        ).collect()
    expect(completion.finished.reason == sy.pb.FINISH_REASON_LENGTH, f"{completion.finished}")
    expect(completion.text == synthetic("unbounded words", 256), f"{completion.text[:80]!r}…")


async def bad_requests_fail_naming_their_field():
    async with await sy.Session.open(TARGET) as session:
        for fields, code, field in [
            ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "model"),
            ({"max_tokens": 10**6}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
        ]:
            request = await session.start(
                **{"model": MODEL, "messages": [("user", "hi")], "max_tokens": 4, **fields}
            )
            try:
                await request.collect()
            except sy.RequestFailed as failed:
                expect(failed.code == code, f"{fields}: {failed}")
                expect(failed.field == field, f"{fields}: {failed}")
            else:
                raise AssertionError(f"{fields} did not fail")
        # The session carries on after them, and an id open on it is refused before sending.
        running = await session.start(
            model=MODEL, messages=[("user", "still here")], max_tokens=3, request_id="mine"
        )
        try:
            await session.start(
                model=MODEL, messages=[("user", "x")], max_tokens=3, request_id="mine"
            )
        except ValueError:
            pass
        else:
            raise AssertionError("a duplicate request id was sent")
        expect((await running.collect()).text == synthetic("still here", 3), "session carried on")


async def closing_the_session_ends_what_is_open_on_it():
    session = await sy.Session.open(TARGET)
    request = await session.start(model=MODEL, messages=[("user", "a b")], max_tokens=LONG)
    await first_tokens(request, 1)
    await session.close()
    try:
        await request.collect()
    except sy.RequestFailed as failed:
        expect(failed.code == grpc.StatusCode.CANCELLED, f"{failed}")
    else:
        raise AssertionError("the open request did not end with the session")
    try:
        await session.start(model=MODEL, messages=[("user", "x")], max_tokens=1)
    except sy.SessionClosed:
        pass
    else:
        raise AssertionError("a closed session started a request")


async def an_unused_session_outlives_the_idle_timeout():
    """The router closes connections silent for its idle timeout (IDLE_S here); the client's
    pings keep an unused session open past it."""
    async with await sy.Session.open(TARGET, keepalive_s=IDLE_S / 4) as session:
        # The scenario itself: nothing sent on the session for twice the idle timeout.
        await asyncio.sleep(IDLE_S * 2)
        completion = await (
            await session.start(model=MODEL, messages=[("user", "still open")], max_tokens=2)
        ).collect()
    expect(completion.text == synthetic("still open", 2), f"{completion.text!r}")


async def generate_answers_one_request():
    completion = await sy.generate(
        TARGET, model=MODEL, messages=[("user", "solo run")], max_tokens=4, timeout=30
    )
    expect(completion.text == synthetic("solo run", 4), f"{completion.text!r}")
    expect(completion.accepted.request_id != "", "Generate names the request")
    try:
        await sy.generate(TARGET, model="", messages=[("user", "x")], max_tokens=4, timeout=30)
    except sy.RequestFailed as failed:
        expect(failed.code == grpc.StatusCode.INVALID_ARGUMENT, f"{failed}")
        expect("model" in failed.message, f"{failed}")
    else:
        raise AssertionError("an empty model did not fail")


async def embeddings_share_the_session_with_generations():
    async with await sy.Session.open(TARGET) as session:
        vector = await session.start(model=MODEL, prompt="the cat sat", embed=True)
        text = await session.start(model=MODEL, messages=[("user", "beside it")], max_tokens=3)
        embedded = await vector.collect()
        generated = await text.collect()
    norm = sum(x * x for x in embedded.embedding) ** 0.5
    expect(len(embedded.embedding) > 0 and abs(norm - 1) < 1e-4, f"{embedded.embedding}")
    expect(embedded.text == "" and embedded.token_ids == [], "an embedding has no tokens")
    expect(embedded.finished.usage.completion_tokens == 0, f"{embedded.finished.usage}")
    expect(generated.text == synthetic("beside it", 3), f"{generated.text!r}")
    try:
        await sy.generate(TARGET, model=MODEL, messages=[("user", "x")], embed=True, timeout=30)
    except sy.RequestFailed as failed:
        expect(failed.code == grpc.StatusCode.INVALID_ARGUMENT, f"{failed}")
        expect("messages" in failed.message, f"{failed}")
    else:
        raise AssertionError("an embedding of messages was not refused")


CHECKS = [
    models_are_listed_with_their_workers,
    two_requests_share_one_session,
    cancel_stops_a_running_request,
    interrupt_redirects_a_running_request,
    a_refused_interrupt_leaves_its_request_running,
    a_request_naming_no_bound_gets_the_routers_default,
    bad_requests_fail_naming_their_field,
    closing_the_session_ends_what_is_open_on_it,
    an_unused_session_outlives_the_idle_timeout,
    generate_answers_one_request,
    embeddings_share_the_session_with_generations,
]


async def main() -> int:
    for check in CHECKS:
        try:
            await asyncio.wait_for(check(), timeout=60)
            results.append(True)
            print(f"PASS {check.__name__}", flush=True)
        except Exception:  # noqa: BLE001 - report every failure and go on
            results.append(False)
            print(f"FAIL {check.__name__}", flush=True)
            traceback.print_exc(file=sys.stdout)
    failed = results.count(False)
    print(f"grpc-python: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
