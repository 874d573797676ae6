#!/usr/bin/env python3
"""The OpenAI Agents SDK (`openai-agents`) against a Switchyard router: an agent run twice in
one `OpenAIConversationsSession` (its history kept server-side in a stored conversation), the
session read back, its last item popped, and the session cleared — what an app built on the
SDK does with Switchyard as its OpenAI endpoint.

Usage: agents_sdk_check.py BASE_URL MODEL
A real model is needed: the SDK fails a run whose answer its bound cut, and the load-test
engine always runs to the bound. Prints one line per check and, at the end, "agents-sdk: N passed, M failed"; exits non-zero
when a check failed. The end-to-end test `tests/tests/real_model.rs` runs it.
"""

import asyncio
import sys

import openai
from agents import (
    Agent,
    ModelSettings,
    OpenAIConversationsSession,
    OpenAIResponsesModel,
    Runner,
    set_tracing_disabled,
)

from checklist import check, finish

BASE_URL, MODEL = sys.argv[1], sys.argv[2]
# Traces would go to OpenAI's servers: none here.
set_tracing_disabled(True)
client = openai.AsyncOpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=120)
agent = Agent(
    name="Assistant",
    instructions="Answer in one short sentence.",
    model=OpenAIResponsesModel(model=MODEL, openai_client=client),
    # Greedy, so the run is the same every time; the SDK takes an answer cut by its bound as
    # a failure, so the bound leaves the model room to end.
    model_settings=ModelSettings(temperature=0, max_tokens=400),
)


def run(coroutine):
    return asyncio.run(coroutine)


@check
def a_session_keeps_the_conversation_server_side():
    async def body():
        session = OpenAIConversationsSession(openai_client=client)
        first = await Runner.run(agent, "What is the capital of France?", session=session)
        second = await Runner.run(agent, "And of Italy?", session=session)
        assert first.final_output and second.final_output, (first, second)
        items = await session.get_items()
        roles = [item.get("role") for item in items]
        assert roles == ["user", "assistant", "user", "assistant"], items
        assert items[0]["content"][0]["text"] == "What is the capital of France?", items[0]
        # The conversation the session made holds the same turns.
        conversation_id = await session._get_session_id()
        listed = await client.conversations.items.list(conversation_id, order="asc")
        assert [item.id for item in listed.data] == [item["id"] for item in items], listed
        # The second run read the first: its prompt is longer than the first's by a turn.
        usage = [r.context_wrapper.usage.input_tokens for r in (first, second)]
        assert usage[1] > usage[0], usage
        popped = await session.pop_item()
        assert popped["role"] == "assistant", popped
        assert len(await session.get_items()) == 3
        await session.clear_session()
        try:
            await client.conversations.retrieve(conversation_id)
            raise AssertionError("a cleared session's conversation is still there")
        except openai.NotFoundError:
            pass

    run(body())


finish("agents-sdk")
