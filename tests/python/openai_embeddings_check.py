#!/usr/bin/env python3
"""`client.embeddings.create` against a Switchyard router with the official `openai` SDK, as a
retrieval pipeline uses it: one text and a batch of texts (answered in order, the SDK's default
base64 and floats agreeing), unit-length vectors, usage counted, and refusals that name the
field at fault.

Usage: openai_embeddings_check.py BASE_URL MODEL [real]
With `real` the model is a real one (its vectors are its hidden states: a paraphrase lands
nearer than an unrelated sentence, and token-id input embeds as its text does); without it the
model is the synthetic load-test engine, whose vectors hash words.
Prints one line per check and, at the end, "openai-embeddings: N passed, M failed"; exits
non-zero when a check failed. The end-to-end tests run it.
"""

import math
import sys

import json
import urllib.request

import openai
from openai import OpenAI

from checklist import check, finish, refused_naming

BASE_URL, MODEL = sys.argv[1], sys.argv[2]
REAL = len(sys.argv) > 3 and sys.argv[3] == "real"
client = OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=120)
CAT = "The cat sat on the mat and watched the birds outside the window."
KITTEN = "A cat was sitting on the rug, watching birds through the window."
BONDS = "Quarterly revenue rose five percent on strong bond trading."


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def vector(text, **extra):
    return client.embeddings.create(model=MODEL, input=text, **extra).data[0].embedding


@check
def one_text_is_one_unit_vector_with_its_usage():
    answer = client.embeddings.create(model=MODEL, input=CAT)
    assert answer.object == "list" and answer.model == MODEL, answer
    assert len(answer.data) == 1 and answer.data[0].index == 0, answer
    embedding = answer.data[0].embedding
    assert len(embedding) >= 16, len(embedding)
    norm = math.sqrt(sum(x * x for x in embedding))
    assert abs(norm - 1.0) < 1e-3, norm
    assert answer.usage.prompt_tokens > 0, answer.usage
    assert answer.usage.total_tokens == answer.usage.prompt_tokens, answer.usage


@check
def base64_and_floats_carry_the_same_vector():
    # The SDK asks for base64 by default and decodes it itself.
    encoded = vector(CAT)
    floats = vector(CAT, encoding_format="float")
    assert len(encoded) == len(floats)
    assert max(abs(a - b) for a, b in zip(encoded, floats)) < 1e-6


@check
def a_batch_of_texts_comes_back_in_order():
    texts = [BONDS, CAT, KITTEN, "hello"]
    answer = client.embeddings.create(model=MODEL, input=texts)
    assert [d.index for d in answer.data] == [0, 1, 2, 3], answer.data
    for text, item in zip(texts, answer.data):
        alone = vector(text)
        assert cosine(alone, item.embedding) > 0.9999, text
    single = sum(client.embeddings.create(model=MODEL, input=t).usage.prompt_tokens for t in texts)
    assert answer.usage.prompt_tokens == single, (answer.usage, single)


@check
def a_paraphrase_lands_nearer_than_an_unrelated_sentence():
    cat, kitten, bonds = (vector(t) for t in (CAT, KITTEN, BONDS))
    assert cosine(cat, kitten) > cosine(cat, bonds), (cosine(cat, kitten), cosine(cat, bonds))


@check
def token_ids_embed_as_their_text_does_or_are_refused_without_a_tokenizer():
    if REAL:
        root = BASE_URL.rstrip("/").removesuffix("/v1")
        asked = urllib.request.Request(
            f"{root}/tokenize",
            data=json.dumps({"model": MODEL, "prompt": CAT}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(asked, timeout=60) as answer:
            ids = json.load(answer)["tokens"]
        by_ids = client.embeddings.create(model=MODEL, input=[ids]).data[0].embedding
        assert cosine(by_ids, vector(CAT)) > 0.9999
    else:
        # The load-test engine publishes no tokenizer: the router cannot check ids.
        refused_naming(
            [(lambda: client.embeddings.create(model=MODEL, input=[[1, 2, 3]]), "input")],
            openai.BadRequestError,
        )


@check
def refusals_name_the_field_at_fault():
    refused_naming(
        [
            (lambda: client.embeddings.create(model=MODEL, input=""), "input"),
            (lambda: client.embeddings.create(model=MODEL, input=[]), "input"),
            (lambda: client.embeddings.create(model=MODEL, input=["ok", ""]), "input[1]"),
            (lambda: client.embeddings.create(model=MODEL, input=["x"] * 2049), "input"),
            (
                lambda: client.embeddings.create(model=MODEL, input=CAT, encoding_format="int8"),
                "encoding_format",
            ),
            (lambda: client.embeddings.create(model=MODEL, input=CAT, dimensions=3), "dimensions"),
            (lambda: client.embeddings.create(model="", input=CAT), "model"),
        ],
        openai.BadRequestError,
    )


@check
def an_unknown_model_is_not_found():
    try:
        client.embeddings.create(model="no-such-model", input=CAT)
    except openai.NotFoundError as error:
        assert error.body["code"] == "model_not_found", error.body
    else:
        raise AssertionError("an unknown model was embedded")


finish("openai-embeddings")
