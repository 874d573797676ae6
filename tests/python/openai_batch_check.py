#!/usr/bin/env python3
"""The Batch API (`client.files.create(purpose="batch")`, `client.batches.create / retrieve /
list / cancel`, `client.files.content`) against a Switchyard router with the official `openai`
SDK, as a pipeline that sends its bulk work as batches uses it: batches of chat completions,
completions and responses run to the end, their answers read back in input order; a bad file
fails the batch naming each bad line; a cancelled or expired batch keeps what was answered and
says why the rest was not; files are listed, read and deleted; refusals name what is wrong.

Usage: openai_batch_check.py BASE_URL MODEL [OTHER_URL]
Files are uploaded at BASE_URL; batches are created, followed and read at OTHER_URL (default
BASE_URL): another router replica's door, to check the cluster answers as one. The workers
must be slow enough that a batch of 40 requests of 200 tokens takes over 2 s at 8 at a time
(the synthetic engine's default 60 tokens/s is).
Prints one line per check and, at the end, "openai-batch: N passed, M failed"; exits non-zero
when a check failed. The end-to-end tests `tests/tests/batches.rs` run it.
"""

import json
import sys
import time
import uuid

import openai
from openai import OpenAI

from checklist import check, finish, refused_naming

BASE_URL, MODEL = sys.argv[1], sys.argv[2]
OTHER_URL = sys.argv[3] if len(sys.argv) > 3 else BASE_URL
uploader = OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=120)
client = OpenAI(base_url=OTHER_URL, api_key="unused", max_retries=0, timeout=120)
RUN = uuid.uuid4().hex[:12]
ENDED = ("completed", "failed", "expired", "cancelled")


def chat_line(custom_id, content, **body):
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": MODEL,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": content}],
            **body,
        },
    }


def upload(lines, name="requests.jsonl"):
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    made = uploader.files.create(file=(name, text.encode()), purpose="batch")
    assert made.purpose == "batch" and made.bytes == len(text.encode()), made
    return made


def wait(batch, patience=120):
    deadline = time.monotonic() + patience
    while batch.status not in ENDED:
        assert time.monotonic() < deadline, f"still {batch.status}: {batch}"
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    return batch


def lines_of(file_id):
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def run(lines, endpoint="/v1/chat/completions", **extra):
    made = upload(lines)
    batch = client.batches.create(
        input_file_id=made.id, endpoint=endpoint, completion_window="24h", **extra
    )
    assert batch.status == "validating" and batch.input_file_id == made.id, batch
    return wait(batch)


@check
def a_chat_batch_answers_every_request_in_input_order():
    lines = [chat_line(f"q{i}", f"Question {i}?") for i in range(6)]
    lines.insert(3, chat_line("bad", "Hi", max_tokens=-1))
    batch = run(lines, metadata={"run": RUN, "job": "chat"})
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (7, 6, 1), counts
    assert batch.metadata == {"run": RUN, "job": "chat"}, batch
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at, batch
    output = lines_of(batch.output_file_id)
    assert [line["custom_id"] for line in output] == [f"q{i}" for i in range(6)], output
    for line in output:
        response = line["response"]
        assert response["status_code"] == 200 and line["error"] is None, line
        body = response["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"], body
        # A batch runs in the cost-sensitive lane: OpenAI's name for it is "flex".
        assert body["service_tier"] == "flex", body
        assert response["request_id"], line
        assert line["id"].startswith("batch_req_"), line
    errors = lines_of(batch.error_file_id)
    assert [line["custom_id"] for line in errors] == ["bad"], errors
    assert errors[0]["response"]["status_code"] == 400, errors
    assert errors[0]["response"]["body"]["error"]["param"] == "max_tokens", errors
    assert "max_tokens" in errors[0]["error"]["message"], errors
    used = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in output)
    assert batch.usage.input_tokens == used > 0, (batch.usage, used)
    assert batch.usage.total_tokens == used + batch.usage.output_tokens, batch.usage
    written = client.files.retrieve(batch.output_file_id)
    assert written.purpose == "batch_output", written
    assert written.filename == f"{batch.id}_output.jsonl", written


@check
def completions_and_responses_batches_run_too():
    completions = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": MODEL, "prompt": f"Once upon a time {i}", "max_tokens": 4}}
        for i in range(2)
    ]
    batch = run(completions, endpoint="/v1/completions")
    assert batch.request_counts.completed == 2, batch
    bodies = [line["response"]["body"] for line in lines_of(batch.output_file_id)]
    assert [b["object"] for b in bodies] == ["text_completion"] * 2, bodies
    responses = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
         "body": {"model": MODEL, "input": f"Say {i}", "max_output_tokens": 4, "store": False}}
        for i in range(2)
    ]
    batch = run(responses, endpoint="/v1/responses")
    assert batch.request_counts.completed == 2, batch
    bodies = [line["response"]["body"] for line in lines_of(batch.output_file_id)]
    assert [b["object"] for b in bodies] == ["response"] * 2, bodies
    assert all(b["status"] in ("completed", "incomplete") for b in bodies), bodies
    assert batch.usage.output_tokens > 0, batch


@check
def a_bad_file_fails_the_batch_naming_each_bad_line():
    good = chat_line("a", "Hi")
    wrong_url = {**chat_line("b", "Hi"), "url": "/v1/completions"}
    streaming = chat_line("c", "Hi", stream=True)
    batch = run([good, good, wrong_url, streaming])
    assert batch.status == "failed" and batch.failed_at, batch
    found = [(e.code, e.line, e.param) for e in batch.errors.data]
    assert found == [
        ("duplicate_custom_id", 2, "custom_id"),
        ("mismatched_url", 3, "url"),
        ("invalid_body", 4, "body"),
    ], found
    assert batch.output_file_id is None and batch.error_file_id is None, batch
    assert batch.request_counts.completed == 0, batch


def slow_lines(count):
    return [
        chat_line(f"s{i}", f"Tell a long story {i}", max_tokens=200, ignore_eos=True)
        for i in range(count)
    ]


@check
def a_cancelled_batch_keeps_what_was_answered_and_says_why_the_rest_was_not():
    made = upload(slow_lines(40))
    batch = client.batches.create(
        input_file_id=made.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at, cancelling
    batch = wait(cancelling)
    assert batch.status == "cancelled" and batch.cancelled_at, batch
    counts = batch.request_counts
    assert counts.total == 40 and counts.completed + counts.failed == 40, counts
    assert counts.completed < 40, counts
    unanswered = [line for line in lines_of(batch.error_file_id)
                  if line["error"]["code"] == "batch_cancelled"]
    assert len(unanswered) == 40 - counts.completed, (len(unanswered), counts)
    assert all(line["response"] is None for line in unanswered), unanswered[:1]
    # Asking again is no error once it is cancelled; a batch that completed is refused.
    assert client.batches.cancel(batch.id).status == "cancelled"
    done = run([chat_line("x", "Hi")])
    try:
        client.batches.cancel(done.id)
    except openai.BadRequestError as refused:
        assert "completed" in refused.message, refused
    else:
        raise AssertionError("a completed batch was cancelled")


@check
def a_batch_past_its_window_expires_keeping_what_was_answered():
    made = upload(slow_lines(20))
    # Switchyard takes windows shorter than OpenAI's only "24h" (here 2 s).
    batch = client.batches.create(
        input_file_id=made.id, endpoint="/v1/chat/completions", completion_window="2s"
    )
    assert batch.expires_at == batch.created_at + 2, batch
    batch = wait(batch)
    assert batch.status == "expired" and batch.expired_at, batch
    counts = batch.request_counts
    assert counts.total == 20 and counts.completed + counts.failed == 20, counts
    expired = [line for line in lines_of(batch.error_file_id)
               if line["error"]["code"] == "batch_expired"]
    assert len(expired) == 20 - counts.completed > 0, (len(expired), counts)


@check
def files_are_listed_read_and_deleted():
    first = upload([chat_line("a", "Hi")], name=f"{RUN}-1.jsonl")
    second = upload([chat_line("b", "Hi")], name=f"{RUN}-2.jsonl")
    newest = client.files.list(purpose="batch", limit=1)
    assert [f.id for f in newest.data] == [second.id] and newest.has_more, newest
    after = client.files.list(purpose="batch", limit=1, after=second.id)
    assert [f.id for f in after.data] == [first.id], after
    oldest_first = [f.id for f in client.files.list(purpose="batch", order="asc")]
    assert oldest_first.index(first.id) < oldest_first.index(second.id), oldest_first
    outputs = client.files.list(purpose="batch_output")
    assert all(f.purpose == "batch_output" for f in outputs.data), outputs
    assert client.files.retrieve(first.id).filename == f"{RUN}-1.jsonl"
    assert json.loads(client.files.content(first.id).text)["custom_id"] == "a"
    deleted = client.files.delete(first.id)
    assert deleted.deleted and deleted.id == first.id, deleted
    for call in (lambda: client.files.retrieve(first.id),
                 lambda: client.files.content(first.id),
                 lambda: client.files.delete(first.id)):
        try:
            call()
        except openai.NotFoundError as missing:
            assert first.id in missing.message, missing
        else:
            raise AssertionError("a deleted file was found")


@check
def batches_are_listed_newest_first():
    made = upload([chat_line("a", "Hi")])
    older = client.batches.create(
        input_file_id=made.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    newer = client.batches.create(
        input_file_id=made.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    page = client.batches.list(limit=1)
    assert [b.id for b in page.data] == [newer.id] and page.has_more, page
    page = client.batches.list(limit=1, after=newer.id)
    assert [b.id for b in page.data] == [older.id], page
    for batch in (older, newer):
        assert wait(batch).status == "completed"


@check
def refusals_name_what_is_wrong():
    made = upload([chat_line("a", "Hi")])
    refused_naming(
        [
            (lambda: uploader.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune"),
             "purpose"),
            (lambda: client.batches.create(input_file_id=made.id, endpoint="/v1/moderations",
                                           completion_window="24h"), "endpoint"),
            (lambda: client.batches.create(input_file_id=made.id,
                                           endpoint="/v1/chat/completions",
                                           completion_window="48h"), "completion_window"),
            (lambda: client.batches.create(input_file_id="file-nope",
                                           endpoint="/v1/chat/completions",
                                           completion_window="24h"), "input_file_id"),
            (lambda: client.batches.create(input_file_id=made.id,
                                           endpoint="/v1/chat/completions",
                                           completion_window="24h",
                                           metadata={"k": "v" * 600}), "metadata.k"),
            (lambda: client.batches.list(limit=101), "limit"),
        ],
        openai.BadRequestError,
    )
    gone = made.id[:-4] + "0000"
    for call in (lambda: client.batches.create(input_file_id=gone,
                                               endpoint="/v1/chat/completions",
                                               completion_window="24h"),
                 lambda: client.batches.retrieve("batch_" + gone[5:]),
                 lambda: client.batches.cancel("batch_" + gone[5:])):
        try:
            call()
        except openai.NotFoundError:
            pass
        else:
            raise AssertionError("found what was never made")


finish("openai-batch")
