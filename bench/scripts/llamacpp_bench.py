#!/usr/bin/env python3
"""llama.cpp side of `scripts/bench-engine.sh`: the same measurements as `switchyard-bench
engine`, through llama-cpp-python's low-level API (the llama.cpp C API).

Concurrency is measured the way llama.cpp's server runs parallel slots: one `llama_decode` per
step over a batch holding the next token of every active sequence (distinct seq ids in one
unified KV cache). Greedy decoding; prints one JSON object.
"""
import argparse
import ctypes
import json
import resource
import time

import numpy as np
import llama_cpp as L


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--stream-tokens", type=int, default=128)
    ap.add_argument("--streams", default="4,16")
    ap.add_argument("--ttft-prompts", default="128,512,2048")
    a = ap.parse_args()
    streams = [int(x) for x in a.streams.split(",") if x]
    max_seq = max(streams + [1])

    L.llama_backend_init()
    t0 = time.perf_counter()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(a.model_path.encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx = 8192
    cp.n_batch = 2048
    cp.n_ubatch = 512
    cp.n_seq_max = max_seq
    cp.n_threads = a.threads
    cp.n_threads_batch = a.threads
    if hasattr(cp, "kv_unified"):
        cp.kv_unified = True
    ctx = L.llama_init_from_model(model, cp)
    load_s = time.perf_counter() - t0
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    eos = L.llama_vocab_eos(vocab)
    batch = L.llama_batch_init(2048, 0, max_seq)

    def clear():
        mem = L.llama_get_memory(ctx)
        L.llama_memory_clear(mem, True)

    def tokenize(text: str):
        buf = (L.llama_token * 8192)()
        n = L.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 8192, False, True)
        return list(buf[:n])

    def decode(entries):
        """entries: list of (token, pos, seq, want_logits)."""
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = want
        rc = L.llama_decode(ctx, batch)
        assert rc == 0, f"llama_decode returned {rc}"

    def argmax(i):
        ptr = L.llama_get_logits_ith(ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    def prefill(ids, seq):
        # Chunks of n_batch; logits only for the last prompt token.
        for start in range(0, len(ids), 2048):
            chunk = ids[start:start + 2048]
            decode([(t, start + j, seq, start + j == len(ids) - 1) for j, t in enumerate(chunk)])
        return argmax(len(ids) - 1 - ((len(ids) - 1) // 2048) * 2048)

    def chat(text):
        return tokenize(f"<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")

    def generate(prompts, max_tokens):
        """Greedy, all sequences batched per step. Returns (tokens, ttfts, wall, first-token time)."""
        clear()
        start = time.perf_counter()
        nxt, pos, ttft, count, alive = [], [], [], [], []
        # Prefill one after another (like the server admitting requests), then batched decode.
        for s, ids in enumerate(prompts):
            nxt.append(prefill(ids, s))
            ttft.append(time.perf_counter() - start)
            pos.append(len(ids))
            count.append(1)
            alive.append(nxt[-1] != eos and max_tokens > 1)
        first_done = time.perf_counter()
        while any(alive):
            act = [s for s in range(len(prompts)) if alive[s]]
            decode([(nxt[s], pos[s], s, True) for s in act])
            for i, s in enumerate(act):
                pos[s] += 1
                nxt[s] = argmax(i)
                count[s] += 1
                if nxt[s] == eos or count[s] >= max_tokens:
                    alive[s] = False
        return sum(count), ttft, time.perf_counter() - start, time.perf_counter() - first_done

    out = {"engine": "llama.cpp", "version": L.__version__, "load_s": round(load_s, 3)}
    n, _, wall, after_first = generate([chat("Write a long story about a lighthouse keeper.")], a.decode_tokens)
    out["decode_tok_s"] = round((n - 1) / after_first, 2)
    out["aggregate_tok_s"] = {}
    for k in streams:
        prompts = [chat(f"Story number {i}: tell me about a lighthouse keeper.") for i in range(k)]
        n, _, wall, _ = generate(prompts, a.stream_tokens)
        out["aggregate_tok_s"][str(k)] = round(n / wall, 2)
    out["ttft_s"] = {}
    for k in [int(x) for x in a.ttft_prompts.split(",") if x]:
        text = "Summarize:"
        base = len(tokenize(text))
        text += " the" * (k - base)
        ids = tokenize(text)
        assert len(ids) == k, (len(ids), k)
        _, ttft, _, _ = generate([ids], 1)
        out["ttft_s"][str(k)] = round(ttft[0], 4)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
