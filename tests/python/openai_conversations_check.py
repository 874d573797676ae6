#!/usr/bin/env python3
"""OpenAI's Conversations API (`client.conversations`) against a Switchyard router with the
official `openai` SDK, as the OpenAI Agents SDK's `OpenAIConversationsSession` and an app
keeping its chats server-side use it: a conversation made with items and metadata, read and
its metadata replaced; responses that go on from it (whole and streamed) and add their turn to
it; its items listed page by page, added, read and deleted; items added by reference to a
stored response's; and refusals that name what is wrong.

Usage: openai_conversations_check.py BASE_URL MODEL
Prints one line per check and, at the end, "openai-conversations: N passed, M failed"; exits
non-zero when a check failed. The end-to-end test `tests/tests/openai.rs` runs it.
"""

import sys

import openai
from openai import OpenAI

from checklist import check, finish, refused_naming

BASE_URL, MODEL = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=120)


def every_item(conversation_id):
    """Every item, oldest first, through the SDK's own paging (two at a time)."""
    page = client.conversations.items.list(conversation_id, order="asc", limit=2)
    return list(page)


@check
def a_conversation_is_made_read_and_its_metadata_replaced():
    made = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "My name is Ada."}],
        metadata={"topic": "names"},
    )
    assert made.object == "conversation" and made.id.startswith("conv_"), made
    assert made.metadata == {"topic": "names"}, made
    read = client.conversations.retrieve(made.id)
    assert read.id == made.id and read.created_at == made.created_at, read
    updated = client.conversations.update(made.id, metadata={"topic": "people"})
    assert updated.metadata == {"topic": "people"}, updated
    items = every_item(made.id)
    assert len(items) == 1 and items[0].type == "message", items
    assert items[0].content[0].type == "input_text", items[0]
    assert items[0].content[0].text == "My name is Ada.", items[0]
    assert items[0].id.startswith("msg_") and items[0].status == "completed", items[0]


@check
def responses_go_on_from_a_conversation_and_add_their_turns():
    conversation = client.conversations.create()
    first = client.responses.create(
        model=MODEL, input="Remember the word kiwi.", conversation=conversation.id,
        max_output_tokens=8,
    )
    assert first.conversation.id == conversation.id, first
    second = client.responses.create(
        model=MODEL, input=[{"role": "user", "content": "Which word?"}],
        conversation={"id": conversation.id}, max_output_tokens=8,
    )
    alone = client.responses.create(
        model=MODEL, input="Which word?", max_output_tokens=8, store=False
    )
    # The second turn's prompt holds the first turn: its question and its answer.
    assert second.usage.input_tokens >= alone.usage.input_tokens + first.usage.output_tokens, (
        second.usage, alone.usage, first.usage,
    )
    items = every_item(conversation.id)
    kinds = [(i.type, i.role) for i in items]
    assert kinds == [("message", "user"), ("message", "assistant")] * 2, kinds
    assert items[0].content[0].text == "Remember the word kiwi.", items[0]
    assert items[1].id == first.output[0].id, (items[1], first.output)
    # Listed as OpenAI lists them: text in parts, whatever shape the input had.
    assert items[2].content[0].type == "input_text", items[2]
    assert items[2].content[0].text == "Which word?" and items[2].status == "completed", items[2]
    assert items[3].content[0].text == second.output_text, (items[3], second.output_text)


@check
def a_streamed_response_adds_its_turn_before_it_completes():
    conversation = client.conversations.create()
    with client.responses.stream(
        model=MODEL, input="Say hello.", conversation=conversation.id, max_output_tokens=8
    ) as stream:
        # The last event carries the response (`response.incomplete` at the output bound).
        for event in stream:
            last = event
    final = last.response
    assert last.type in ("response.completed", "response.incomplete"), last.type
    # Read as soon as the stream said it finished: the turn is there.
    items = every_item(conversation.id)
    assert [i.role for i in items] == ["user", "assistant"], items
    assert items[1].content[0].text == final.output_text, (items, final.output_text)


@check
def items_are_added_read_paged_and_deleted():
    conversation = client.conversations.create()
    added = client.conversations.items.create(
        conversation.id,
        items=[
            {"type": "message", "role": "user", "content": f"Line {n}."} for n in range(5)
        ],
    )
    assert [i.content[0].text for i in added.data] == [f"Line {n}." for n in range(5)], added
    assert added.first_id == added.data[0].id and added.last_id == added.data[-1].id, added
    newest = client.conversations.items.list(conversation.id, limit=2)
    assert [i.content[0].text for i in newest.data] == ["Line 4.", "Line 3."], newest
    assert newest.has_more, newest
    assert len(every_item(conversation.id)) == 5
    third = added.data[2]
    read = client.conversations.items.retrieve(third.id, conversation_id=conversation.id)
    assert read.id == third.id and read.content[0].text == "Line 2.", read
    after = client.conversations.items.delete(third.id, conversation_id=conversation.id)
    assert after.id == conversation.id and after.object == "conversation", after
    left = [i.content[0].text for i in every_item(conversation.id)]
    assert left == ["Line 0.", "Line 1.", "Line 3.", "Line 4."], left


@check
def referred_items_are_added_as_the_items_they_name():
    answered = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=4)
    (asked,) = client.responses.input_items.list(answered.id).data
    said = answered.output[0]
    conversation = client.conversations.create(
        items=[{"type": "item_reference", "id": asked.id}]
    )
    client.conversations.items.create(
        conversation.id, items=[{"type": "item_reference", "id": said.id}]
    )
    kept = every_item(conversation.id)
    assert [item.id for item in kept] == [asked.id, said.id], kept
    assert kept[1].content[0].text == answered.output_text, kept[1]
    # A turn's items are kept by the conversation (even a turn not stored as a response), and
    # referred to from there.
    turn = client.responses.create(
        model=MODEL, input="And again.", conversation=conversation.id, store=False,
        max_output_tokens=4,
    )
    again = client.responses.create(
        model=MODEL, input=[{"type": "item_reference", "id": turn.output[0].id}],
        max_output_tokens=2, store=False,
    )
    inline = client.responses.create(
        model=MODEL, input=[{"role": "assistant", "content": turn.output_text}],
        max_output_tokens=2, store=False,
    )
    assert again.usage.input_tokens == inline.usage.input_tokens, (again.usage, inline.usage)
    try:
        client.conversations.items.create(
            conversation.id, items=[{"type": "item_reference", "id": "msg_unknown"}]
        )
        raise AssertionError("a reference to nothing was added")
    except openai.NotFoundError as error:
        assert error.body["param"] == "items[0].id", error.body


@check
def a_deleted_conversation_is_gone():
    conversation = client.conversations.create()
    deleted = client.conversations.delete(conversation.id)
    assert deleted.deleted and deleted.id == conversation.id, deleted
    try:
        client.conversations.retrieve(conversation.id)
        raise AssertionError("a deleted conversation was read")
    except openai.NotFoundError as error:
        assert "not stored here" in error.message, error.message
    try:
        client.responses.create(model=MODEL, input="Hi", conversation=conversation.id)
        raise AssertionError("a response went on from a deleted conversation")
    except openai.NotFoundError as error:
        assert error.body["param"] == "conversation", error.body


@check
def bad_asks_are_refused_by_name():
    conversation = client.conversations.create()
    cases = [
        (
            lambda: client.conversations.items.create(
                conversation.id, items=[{"type": "message", "role": "robot", "content": "x"}]
            ),
            "items[0].role",
        ),
        (
            lambda: client.conversations.items.create(
                conversation.id,
                items=[{"type": "message", "role": "user", "content": "x"}] * 21,
            ),
            "items",
        ),
        (
            lambda: client.conversations.create(metadata={"k": "v" * 600}),
            "metadata.k",
        ),
        (
            lambda: client.conversations.items.list(conversation.id, after="msg_nothing"),
            "after",
        ),
        (
            lambda: client.responses.create(
                model=MODEL, input="Hi", conversation=conversation.id,
                previous_response_id="resp_x",
            ),
            "conversation",
        ),
    ]
    refused_naming(cases, openai.BadRequestError)
    try:
        client.conversations.items.retrieve("msg_nothing", conversation_id=conversation.id)
        raise AssertionError("a missing item was read")
    except openai.NotFoundError as error:
        assert "has no item" in error.message, error.message


finish("openai-conversations")
