#!/usr/bin/env python3
"""Stored chat completions (`store=True`, then `client.chat.completions.retrieve / list /
update / delete / messages.list`) against a Switchyard router with the official `openai` SDK,
as an app that logs its chats server-side (or an evals pipeline reading them back) uses them:
completions made whole and streamed are read back with their messages, listed by metadata and
model page by page in both orders, their metadata replaced, deleted; and refusals that name
what is wrong.

Usage: openai_chat_store_check.py BASE_URL MODEL [READ_URL]
Completions are made at BASE_URL and read, listed, changed and deleted at READ_URL (default
BASE_URL): another router replica's door, to check the cluster answers as one.
Prints one line per check and, at the end, "openai-chat-store: N passed, M failed"; exits
non-zero when a check failed. The end-to-end tests `tests/tests/openai.rs` run it.
"""

import sys
import uuid

import openai
from openai import OpenAI

from checklist import check, finish, refused_naming

BASE_URL, MODEL = sys.argv[1], sys.argv[2]
READ_URL = sys.argv[3] if len(sys.argv) > 3 else BASE_URL
maker = OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=120)
reader = OpenAI(base_url=READ_URL, api_key="unused", max_retries=0, timeout=120)
# Each run's completions carry its own tag, so listings see only this run's.
RUN = uuid.uuid4().hex[:12]

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Name a colour."},
]


def make(store=True, **extra):
    return maker.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, store=store, **extra
    )


@check
def a_stored_completion_is_read_back_with_its_messages():
    made = make(metadata={"run": RUN, "case": "read"})
    assert made.id.startswith("chatcmpl-"), made.id
    read = reader.chat.completions.retrieve(made.id)
    assert read.id == made.id and read.created == made.created, read
    assert read.choices[0].message.content == made.choices[0].message.content, read
    assert read.usage == made.usage, (read.usage, made.usage)
    assert read.metadata == {"run": RUN, "case": "read"}, read
    messages = list(reader.chat.completions.messages.list(made.id, limit=1))
    assert [(m.role, m.content) for m in messages] == [
        (m["role"], m["content"]) for m in MESSAGES
    ], messages
    assert [m.id for m in messages] == [f"{made.id}-0", f"{made.id}-1"], messages
    newest = reader.chat.completions.messages.list(made.id, order="desc")
    assert [m.role for m in newest.data] == ["user", "system"], newest
    # A message sent as parts is kept as OpenAI keeps it: its text, and the parts.
    parts = [{"type": "text", "text": "Name"}, {"type": "text", "text": "a colour."}]
    made = maker.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=4, store=True
    )
    (kept,) = reader.chat.completions.messages.list(made.id).data
    assert kept.content == "Name\na colour.", kept
    assert [p.text for p in kept.content_parts] == ["Name", "a colour."], kept


@check
def a_streamed_completion_is_stored_whole():
    stream = make(stream=True, stream_options={"include_usage": True}, metadata={"run": RUN})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    read = reader.chat.completions.retrieve(chunks[0].id)
    assert read.choices[0].message.content == text, (read, text)
    assert read.usage == chunks[-1].usage, (read.usage, chunks[-1].usage)
    assert read.choices[0].finish_reason == next(
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ), read


@check
def completions_are_listed_by_metadata_and_model_page_by_page():
    tag = f"{RUN}-list"
    made = [make(metadata={"run": tag, "n": str(i)}).id for i in range(3)]
    maker.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # not stored
    # The SDK pages on `after` (two at a time here) until `has_more` is false.
    listed = [c.id for c in reader.chat.completions.list(metadata={"run": tag}, limit=2)]
    assert listed == made, (listed, made)
    newest = reader.chat.completions.list(metadata={"run": tag}, order="desc", limit=2)
    assert [c.id for c in newest.data] == made[:0:-1] and newest.has_more, newest
    one = reader.chat.completions.list(metadata={"run": tag, "n": "1"}, model=MODEL)
    assert [c.id for c in one.data] == [made[1]], one
    other_model = reader.chat.completions.list(metadata={"run": tag}, model="no-such-model")
    assert other_model.data == [] and not other_model.has_more, other_model


@check
def metadata_is_replaced_then_the_completion_deleted():
    made = make(metadata={"run": RUN, "state": "new"})
    changed = reader.chat.completions.update(made.id, metadata={"run": RUN, "state": "seen"})
    assert changed.metadata == {"run": RUN, "state": "seen"}, changed
    seen = reader.chat.completions.list(metadata={"run": RUN, "state": "seen"})
    assert [c.id for c in seen.data] == [made.id], seen
    deleted = reader.chat.completions.delete(made.id)
    assert deleted.deleted and deleted.id == made.id, deleted
    for call in (
        lambda: reader.chat.completions.retrieve(made.id),
        lambda: reader.chat.completions.delete(made.id),
        lambda: reader.chat.completions.messages.list(made.id),
    ):
        try:
            call()
            raise AssertionError("a deleted completion was found")
        except openai.NotFoundError as error:
            assert "store: true" in error.message, error.message


@check
def an_unstored_completion_is_a_404_that_says_why():
    made = maker.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    try:
        reader.chat.completions.retrieve(made.id)
        raise AssertionError("an unstored completion was found")
    except openai.NotFoundError as error:
        assert "store: true" in error.message, error.message


@check
def bad_input_is_a_400_naming_it():
    cases = [
        (lambda: make(store="yes"), "store"),
        (lambda: make(metadata={"k": "v" * 600}), "metadata.k"),
        (lambda: reader.chat.completions.list(limit=0), "limit"),
        (lambda: reader.chat.completions.list(order="newest"), "order"),
        (lambda: reader.chat.completions.list(after="chatcmpl-nothing"), "after"),
        (
            lambda: reader.chat.completions.update(
                make(metadata={"run": RUN}).id, metadata={"k": 1}
            ),
            "metadata.k",
        ),
    ]
    refused_naming(cases, openai.BadRequestError)


finish("openai-chat-store")
