#!/usr/bin/env python3
"""What scoring a prompt costs (`/v1/completions` with `echo` and `logprobs`, as evaluation
harnesses ask) against a plain prefill of a prompt as long, on a running Switchyard HTTP API,
with the official `openai` SDK: alternated pairs, a fresh prompt each (nothing from the prefix
cache: a scored prompt never reuses it, so neither may the plain one).

Usage: bench/scoring.py BASE_URL MODEL [PAIRS]   (e.g. http://127.0.0.1:8080/v1; 6 pairs)
Run it against a release build (`scripts/up.sh`); prints one line of medians and their ratio.
"""

import random
import statistics
import sys
import time

from openai import OpenAI

BASE_URL, MODEL = sys.argv[1], sys.argv[2]
PAIRS = int(sys.argv[3]) if len(sys.argv) > 3 else 6
client = OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=600)
WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly judge".split()
# A run's own prompts: an earlier run's are in the prefix cache.
SALT = random.randrange(10**9)


def prompt(i: int, words: int = 400) -> str:
    return f"Document {SALT}-{i}: " + " ".join(
        WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(words)
    )


def timed(i: int, scored: bool):
    extra = {"echo": True, "logprobs": 1} if scored else {}
    started = time.perf_counter()
    answer = client.completions.create(
        model=MODEL, prompt=prompt(i), max_tokens=1, temperature=0, **extra
    )
    return time.perf_counter() - started, answer.usage.prompt_tokens


plain, scored, tokens = [], [], []
for pair in range(PAIRS):
    for kind, into in ((False, plain), (True, scored)):
        seconds, prompt_tokens = timed(pair * 2 + kind, kind)
        into.append(seconds)
        tokens.append(prompt_tokens)
p, s = statistics.median(plain), statistics.median(scored)
print(
    f"{PAIRS} pairs, ~{statistics.mean(tokens):.0f}-token prompts: plain prefill + 1 token "
    f"{p * 1e3:.0f} ms median, scored (echo + logprobs) {s * 1e3:.0f} ms median: {s / p:.2f}x"
)
