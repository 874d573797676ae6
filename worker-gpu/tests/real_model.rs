//! Tests against the real SmolLM2-135M-Instruct Q4_1 GGUF (`scripts/fetch-model.sh` puts it in
//! `models/`; CI runs that script first). When the file is absent each test prints why it is
//! skipped and returns.
//!
//! - tokenizer: llama.cpp's ids for the reference strings;
//! - chat template rendered by minijinja;
//! - golden: greedy ids and top-5 logits against llama.cpp's (fixture recorded by
//!   `tests/fixtures/record_golden.py`); greedy ids are compared up to llama.cpp's first
//!   near-tie, and at least three prompts must match for 16 ids.

use std::path::{Path, PathBuf};

use candle_core::Device;
use switchyard_worker_gpu::gguf::{GgufFile, Repack};
use switchyard_worker_gpu::model::{Llama, argmax, logits_rows};
use switchyard_worker_gpu::tokenizer::{ChatMessage, Detokenizer, GgufTokenizer};

fn model_path() -> Option<PathBuf> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: {} is missing; run scripts/fetch-model.sh to enable the real-model tests",
            path.display()
        );
        None
    }
}

fn tokenizer(path: &Path) -> GgufTokenizer {
    let file = GgufFile::open(path).unwrap();
    GgufTokenizer::from_gguf(&file.content).unwrap()
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let Some(path) = model_path() else { return };
    let tok = tokenizer(&path);
    assert_eq!(tok.encode("Hello, world!").unwrap(), [19556, 28, 905, 17]);
    assert_eq!(
        tok.encode("12345 apples").unwrap(),
        [33, 34, 35, 36, 37, 13855]
    );
    assert_eq!(
        tok.encode("<|im_start|>user\nhi<|im_end|>").unwrap(),
        [1, 4093, 198, 6004, 2]
    );
    assert_eq!(tok.decode(&[19556, 28, 905, 17]), "Hello, world!");
    assert!(tok.stop_ids().contains(&2));
}

#[test]
fn detokenizer_streams_multibyte_text_intact() {
    let Some(path) = model_path() else { return };
    let tok = tokenizer(&path);
    let text = "naïve café — 日本語 🚀 done";
    let ids = tok.encode(text).unwrap();
    let mut d = Detokenizer::default();
    let mut out = String::new();
    for id in ids {
        // Every chunk is valid UTF-8 by construction (String); no replacement chars appear.
        out.push_str(&d.push(&tok, id));
    }
    out.push_str(&d.finish());
    assert_eq!(out, text);
}

#[test]
fn chat_template_renders_chatml() {
    let Some(path) = model_path() else { return };
    let tok = tokenizer(&path);
    let text = tok
        .render_chat(&[ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }])
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[derive(serde::Deserialize)]
struct Golden {
    cases: Vec<Case>,
}
#[derive(serde::Deserialize)]
struct Case {
    prompt: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    /// Per generated position: llama.cpp's five highest logits as (token id, value).
    top_logits: Vec<Vec<(u32, f32)>>,
}

/// Below this top-1/top-2 margin (logits) llama.cpp's own choice is a coin flip: its batched and
/// token-by-token evaluations of the same ids already differ by more (up to 0.67, see
/// `record_golden.py`), so greedy ids are compared only up to the first such position.
const NEAR_TIE: f32 = 0.1;

/// Greedy ids compared exactly per prompt (issue 3: at least the first 16). Later positions
/// still get the logit check; exact ids there would test rounding, not the model — our logits
/// sit within ~1 of llama.cpp's (its own batched evaluation already strays by 0.67).
const EXACT_IDS: usize = 16;

/// How one case compared.
struct Compared {
    /// Greedy ids compared exactly (up to the first near-tie or the end).
    exact: usize,
    /// Largest |ours − llama.cpp| over llama.cpp's top-5 logits at every position.
    max_logit_diff: f32,
}

/// Runs one case teacher-forced on llama.cpp's greedy ids: our argmax must be llama.cpp's token
/// for the first [`EXACT_IDS`] positions (or until its first near-tie), and our logits of its top-5 tokens must lie
/// within `logit_tol` of its values. While every earlier id matched, teacher-forced and
/// free-running greedy decoding see the same context, so `exact` ids are our own greedy output.
fn compare(model: &Llama, case: &Case, logit_tol: f32) -> Compared {
    let n = case.greedy_ids.len();
    let (mut cache_store, mut cache) = model
        .single_sequence(case.prompt_ids.len() + n + 1)
        .unwrap();
    let mut logits = model
        .prefill(&case.prompt_ids, &mut cache, &mut cache_store)
        .unwrap();
    let mut exact = 0;
    let mut diverged = false;
    let mut max_logit_diff = 0f32;
    for (pos, (&want, top)) in case.greedy_ids.iter().zip(&case.top_logits).enumerate() {
        let row = &logits_rows(&logits).unwrap()[0];
        for &(id, theirs) in top {
            let d = (row[id as usize] - theirs).abs();
            max_logit_diff = max_logit_diff.max(d);
            assert!(
                d <= logit_tol,
                "prompt {:?} position {pos}: logit of token {id} is {}, llama.cpp {theirs}",
                case.prompt,
                row[id as usize]
            );
        }
        let margin = top[0].1 - top[1].1;
        if !diverged && (margin < NEAR_TIE || pos == EXACT_IDS) {
            diverged = true;
        }
        if !diverged {
            assert_eq!(
                argmax(row),
                want,
                "prompt {:?}: greedy id {pos} differs from llama.cpp (its margin {margin:.3})",
                case.prompt
            );
            exact += 1;
        }
        logits = model
            .decode(&[want], &mut [&mut cache], &mut cache_store)
            .unwrap();
    }
    Compared {
        exact,
        max_logit_diff,
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn golden(repack: Repack, logit_tol: f32) {
    let Some(path) = model_path() else { return };
    let fixture_path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden_smollm2.json");
    let fixture: Golden =
        serde_json::from_str(&std::fs::read_to_string(&fixture_path).unwrap()).unwrap();
    let mut file = GgufFile::open(&path).unwrap();
    let tok = GgufTokenizer::from_gguf(&file.content).unwrap();
    let model = Llama::load(&mut file, &Device::Cpu, repack).unwrap();
    let mut full = 0;
    for case in &fixture.cases {
        assert_eq!(tok.encode(&case.prompt).unwrap(), case.prompt_ids);
        let c = compare(&model, case, logit_tol);
        eprintln!(
            "{:?}: {} greedy ids equal, max top-5 logit diff {:.3}",
            case.prompt, c.exact, c.max_logit_diff
        );
        if c.exact >= 16 {
            full += 1;
        }
    }
    assert!(
        full >= 3,
        "only {full} prompts matched llama.cpp for 16 greedy ids"
    );
}

#[test]
fn golden_greedy_ids_match_llama_cpp() {
    golden(Repack::None, 1.5);
}

/// Prefill of a long prompt in one piece, token by token, in chunks, and a final decode step
/// all predict the same next token; a decode step computes exactly what a one-token prefill
/// does. (Whole and split prefill are not bit-identical: attention sums over a different
/// number of rows round differently, and 8-bit activation quantization can turn such an ulp
/// into a whole quantization step — llama.cpp's logits move the same way, see
/// tests/fixtures/record_golden.py.)
#[test]
fn prefill_chunks_and_decode_agree() {
    let Some(path) = model_path() else { return };
    let mut file = GgufFile::open(&path).unwrap();
    let tok = GgufTokenizer::from_gguf(&file.content).unwrap();
    let model = Llama::load(&mut file, &Device::Cpu, Repack::None)
        .unwrap()
        .with_dense_from_rows(usize::MAX);
    let ids = tok.encode("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n").unwrap();
    let (head, last) = ids.split_at(ids.len() - 1);
    let (mut whole_store, mut whole) = model.single_sequence(64).unwrap();
    let a = logits_rows(&model.prefill(&ids, &mut whole, &mut whole_store).unwrap()).unwrap();
    let (mut steps_store, mut steps) = model.single_sequence(64).unwrap();
    let mut b = vec![];
    for id in &ids {
        b = logits_rows(&model.prefill(&[*id], &mut steps, &mut steps_store).unwrap()).unwrap();
    }
    let (mut chunked_store, mut chunked) = model.single_sequence(64).unwrap();
    model
        .prefill(&ids[..20], &mut chunked, &mut chunked_store)
        .unwrap();
    let c = logits_rows(
        &model
            .prefill(&ids[20..], &mut chunked, &mut chunked_store)
            .unwrap(),
    )
    .unwrap();
    let (mut dec_store, mut dec) = model.single_sequence(64).unwrap();
    model.prefill(head, &mut dec, &mut dec_store).unwrap();
    let d = logits_rows(&model.decode(last, &mut [&mut dec], &mut dec_store).unwrap()).unwrap();
    let (mut one_store, mut one) = model.single_sequence(64).unwrap();
    model.prefill(head, &mut one, &mut one_store).unwrap();
    let e = logits_rows(&model.prefill(last, &mut one, &mut one_store).unwrap()).unwrap();
    assert_eq!(d, e, "a decode step differs from a one-token prefill");
    // The golden test's tolerance against llama.cpp; a different pick only on a near-tie.
    for (name, other) in [("token by token", &b), ("in chunks", &c), ("decode", &d)] {
        let diff = max_abs_diff(&a[0], &other[0]);
        assert!(diff < 1.5, "{name}: logits differ by {diff}");
        let (x, y) = (argmax(&a[0]) as usize, argmax(&other[0]) as usize);
        assert!(
            a[0][x] - a[0][y] < 0.5,
            "{name} picks {y} ({}), whole prefill {x} ({})",
            a[0][y],
            a[0][x]
        );
    }
}

/// Turn 2 of a conversation computed on turn 1's cached blocks (its prompt prefilled, its reply
/// decoded step by step, as the engine leaves them) against turn 2 computed from scratch:
/// the logits of every step within the golden tolerance, and greedy ids equal wherever the
/// recomputed run's choice is not a near-tie (both teacher-forced on that run's ids, so a
/// near-tie only skips its own comparison).
#[test]
fn a_suffix_prefilled_on_cached_blocks_matches_recomputation() {
    use switchyard_worker_gpu::model::SeqCache;
    const BLOCK: usize = 32;
    let Some(path) = model_path() else { return };
    let mut file = GgufFile::open(&path).unwrap();
    let tok = GgufTokenizer::from_gguf(&file.content).unwrap();
    let model = Llama::load(&mut file, &Device::Cpu, Repack::None).unwrap();
    let chat = |turns: &[(&str, &str)]| {
        let msgs: Vec<ChatMessage> = turns
            .iter()
            .map(|(role, content)| ChatMessage {
                role: role.to_string(),
                content: content.to_string(),
            })
            .collect();
        tok.encode(&tok.render_chat(&msgs).unwrap()).unwrap()
    };
    let system = "You are a careful coding assistant. Answer briefly, with code when it helps, \
                  and explain each step in one sentence.";
    let question = "How do I reverse a list in Python?";
    let turn1 = chat(&[("system", system), ("user", question)]);
    let mut store = model.kv_store(64);
    let mut first = SeqCache::new((0..16).collect(), 0);
    let mut logits = model.prefill(&turn1, &mut first, &mut store).unwrap();
    let mut reply_ids = Vec::new();
    for _ in 0..24 {
        let id = argmax(&logits_rows(&logits).unwrap()[0]);
        reply_ids.push(id);
        logits = model.decode(&[id], &mut [&mut first], &mut store).unwrap();
    }
    let reply = tok.decode(&reply_ids);
    let turn2 = chat(&[
        ("system", system),
        ("user", question),
        ("assistant", &reply),
        ("user", "And a tuple?"),
    ]);
    // The engine's rule: reuse the longest run of identical leading full blocks.
    let filled = &[turn1.as_slice(), &reply_ids].concat()[..first.len()];
    let same = turn2.iter().zip(filled).take_while(|(a, b)| a == b).count();
    let cached = same.min(turn2.len() - 1) / BLOCK * BLOCK;
    assert!(cached >= 2 * BLOCK, "only {cached} tokens shared");
    let reused = cached / BLOCK;
    let mut table: Vec<u32> = first.table()[..reused].to_vec();
    table.extend(32..48);
    let mut warm = SeqCache::new(table, cached);
    let mut cold = SeqCache::new((48..64).collect(), 0);
    let mut warm_logits = model
        .prefill(&turn2[cached..], &mut warm, &mut store)
        .unwrap();
    let mut cold_logits = model.prefill(&turn2, &mut cold, &mut store).unwrap();
    let mut exact = 0;
    for step in 0..16 {
        let w = &logits_rows(&warm_logits).unwrap()[0];
        let c = &logits_rows(&cold_logits).unwrap()[0];
        // The suffix prefilled on cached blocks against the whole prompt from scratch.
        let diff = max_abs_diff(w, c);
        assert!(diff < 1.5, "step {step}: logits differ by {diff}");
        let pick = argmax(c);
        let mut sorted = c.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] >= NEAR_TIE {
            assert_eq!(argmax(w), pick, "step {step}: greedy ids differ");
            exact += 1;
        }
        warm_logits = model.decode(&[pick], &mut [&mut warm], &mut store).unwrap();
        cold_logits = model.decode(&[pick], &mut [&mut cold], &mut store).unwrap();
    }
    eprintln!(
        "{cached} of {} prompt tokens cached; {exact} greedy ids equal",
        turn2.len()
    );
    assert!(exact >= 8, "only {exact} of 16 steps were not near-ties");
}

/// An engine over the real model with the given compute threads (0: the process-wide pools).
fn real_engine(path: &Path, compute_threads: usize) -> switchyard_worker_gpu::CandleEngine {
    engine_with(
        path,
        switchyard_worker_gpu::SchedulerLimits {
            kv_budget_bytes: 64 * 1024 * 1024,
            max_seqs: 4,
            max_queue: 8,
            prefill_chunk: 64,
            prefill_pack: switchyard_worker_gpu::PrefillPack::AtMost(usize::MAX),
            step_target: None,
            prefix_cache: false,
            compute_threads,
        },
        switchyard_worker_gpu::model::DENSE_FROM_ROWS,
    )
}

/// An engine over the real model with `limits`, its prompt chunks multiplied densely from
/// `dense_from_rows` rows (`usize::MAX`: never).
fn engine_with(
    path: &Path,
    limits: switchyard_worker_gpu::SchedulerLimits,
    dense_from_rows: usize,
) -> switchyard_worker_gpu::CandleEngine {
    let mut file = GgufFile::open(path).unwrap();
    let tok = GgufTokenizer::from_gguf(&file.content).unwrap();
    let model = Llama::load(&mut file, &Device::Cpu, Repack::Q8_0)
        .unwrap()
        .with_dense_from_rows(dense_from_rows);
    switchyard_worker_gpu::CandleEngine::start(model, tok, vec!["m".into()], limits, "cpu".into())
        .unwrap()
}

/// With the dense prompt path off (`--dense-prefill-from-rows 0`), a long prompt (a real
/// system prompt, well over 256 tokens) answered greedily computes the same — ids and log
/// probabilities, bit for bit — cold, again with its prefix cached (only a short suffix
/// prefilled), and on an engine that caches nothing: how a prompt is split into prefill steps
/// never changes the answer. (With the dense path, the default, a cold 256+-token chunk rounds
/// otherwise than the quantized kernel a short cached suffix takes; this test then fails.)
#[tokio::test]
async fn without_the_dense_path_a_long_prompt_computes_the_same_cold_cached_and_uncached() {
    use switchyard_worker::{Engine, EngineEvent};
    let Some(path) = model_path() else { return };
    let system = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../bench/prompts/coding-assistant-system.txt"),
    )
    .unwrap();
    let ids = tokenizer(&path)
        .encode(&format!(
            "{system}\nQuestion: what does a mutex protect?\nAnswer:"
        ))
        .unwrap();
    assert!(ids.len() > 300, "{} tokens", ids.len());
    let limits = |prefix_cache| switchyard_worker_gpu::SchedulerLimits {
        kv_budget_bytes: 64 * 1024 * 1024,
        max_seqs: 4,
        max_queue: 8,
        prefill_chunk: 512,
        prefill_pack: switchyard_worker_gpu::PrefillPack::AtMost(usize::MAX),
        step_target: None,
        prefix_cache,
        compute_threads: 0,
    };
    // (id, its log probability's bits) of each generated token.
    let answer = |engine: &switchyard_worker_gpu::CandleEngine| {
        let mut request = ids_request(ids.clone(), 16);
        request.sampling.logprobs = Some(0);
        let mut rx = engine
            .submit(request, tokio_util::sync::CancellationToken::new())
            .unwrap();
        async move {
            let mut out = vec![];
            while let Some(event) = rx.recv().await {
                if let EngineEvent::Token { id, logprobs, .. } = event.unwrap() {
                    let chosen = logprobs.and_then(|l| l.chosen).expect("asked for");
                    out.push((id, chosen.logprob.to_bits()));
                }
            }
            out
        }
    };
    let cached = engine_with(&path, limits(true), usize::MAX);
    let cold = answer(&cached).await;
    let hit = answer(&cached).await;
    let stats = cached.prefix_cache_stats().unwrap();
    assert!(stats.hit_tokens as usize > ids.len() - 64, "{stats:?}");
    let uncached = answer(&engine_with(&path, limits(false), usize::MAX)).await;
    assert_eq!(cold.len(), 16);
    assert_eq!(hit, cold, "a cache hit computed otherwise");
    assert_eq!(uncached, cold);
}

fn ids_request(ids: Vec<u32>, max_tokens: u32) -> switchyard_worker::EngineRequest {
    switchyard_worker::EngineRequest {
        request_id: format!("r-{}", ids.len()),
        model: "m".into(),
        prompt: switchyard_worker::Prompt::Text(String::new()),
        sampling: switchyard_worker::Sampling {
            max_tokens,
            ..Default::default()
        },
        resume_tokens: vec![],
        latency_critical: false,
        min_tokens_per_s: 0.0,
        prompt_ids: Some(ids),
        tools: Default::default(),
        embed: false,
    }
}

/// The ids a request generates.
async fn generated(mut rx: switchyard_worker::EngineStream) -> Vec<u32> {
    let mut ids = vec![];
    while let Some(event) = rx.recv().await {
        match event.unwrap() {
            switchyard_worker::EngineEvent::Token { id, .. } => ids.push(id),
            switchyard_worker::EngineEvent::ToolCall(call) => {
                panic!("no tools were offered: {call:?}")
            }
            switchyard_worker::EngineEvent::StopSequence(_)
            | switchyard_worker::EngineEvent::PromptLogprobs(_)
            | switchyard_worker::EngineEvent::Embedding(_) => {}
            switchyard_worker::EngineEvent::Done { .. } => break,
        }
    }
    ids
}

/// A follow-up turn whose history is cached has only a few tokens to prefill: it gets its
/// first token before a long cold prompt that arrived just before it (shortest remaining
/// prefill first), instead of waiting for all of that prompt's chunks; the long one still
/// completes.
#[tokio::test]
async fn a_short_prefill_is_not_stuck_behind_a_long_one() {
    use switchyard_worker::{Engine, EngineEvent};
    let Some(path) = model_path() else { return };
    let engine = real_engine(&path, 0);
    // Six 64-token chunks for the long prompt; the short one arrives during the first.
    let long: Vec<u32> = (0..384).map(|i| 100 + (i * 7) % 5000).collect();
    let short: Vec<u32> = (0..8).map(|i| 200 + i).collect();
    let cancel = tokio_util::sync::CancellationToken::new;
    let mut long_rx = engine.submit(ids_request(long, 2), cancel()).unwrap();
    let mut short_rx = engine.submit(ids_request(short, 2), cancel()).unwrap();
    let first = tokio::select! {
        biased;
        Some(Ok(EngineEvent::Token { .. })) = short_rx.recv() => "short",
        Some(Ok(EngineEvent::Token { .. })) = long_rx.recv() => "long",
    };
    assert_eq!(first, "short");
    assert_eq!(generated(long_rx).await.len(), 2);
}

/// An engine on a one-thread compute pool of its own (what `switchyard up` gives each of
/// several engines sharing a small host) generates exactly what an engine on the
/// process-wide pools does: the kernels' results do not depend on how work is split.
#[tokio::test]
async fn an_engine_on_its_own_one_thread_pool_generates_the_same() {
    use switchyard_worker::Engine;
    let Some(path) = model_path() else { return };
    let shared = real_engine(&path, 0);
    let own = real_engine(&path, 1);
    assert!(
        own.hardware().ends_with(", 1 threads"),
        "{}",
        own.hardware()
    );
    let cancel = tokio_util::sync::CancellationToken::new;
    // Long enough that the prompt runs through the dense (f32) prefill path too.
    let prompt: Vec<u32> = (0..100).map(|i| 300 + (i * 13) % 4000).collect();
    let a = generated(
        shared
            .submit(ids_request(prompt.clone(), 12), cancel())
            .unwrap(),
    )
    .await;
    let b = generated(own.submit(ids_request(prompt, 12), cancel()).unwrap()).await;
    assert_eq!(a.len(), 12);
    assert_eq!(a, b);
}

/// `ignore_eos`: the greedy answer that ends on `<|im_end|>` after a few tokens goes on, the
/// same up to there, to `max_tokens`, and never holds an end-of-sequence token.
#[tokio::test]
async fn ignore_eos_generates_max_tokens_past_the_answers_end() {
    use switchyard_worker::{Engine, EngineEvent, StopReason};
    let Some(path) = model_path() else { return };
    let tok = tokenizer(&path);
    let prompt = tok
        .encode(
            "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n\
             <|im_start|>assistant\n",
        )
        .unwrap();
    let engine = real_engine(&path, 0);
    let run = |ignore_eos: bool| {
        let mut request = ids_request(prompt.clone(), 24);
        request.sampling.ignore_eos = ignore_eos;
        let mut rx = engine
            .submit(request, tokio_util::sync::CancellationToken::new())
            .unwrap();
        async move {
            let mut ids = vec![];
            loop {
                match rx.recv().await.expect("a Done event").unwrap() {
                    EngineEvent::Token { id, .. } => ids.push(id),
                    EngineEvent::ToolCall(call) => panic!("no tools were offered: {call:?}"),
                    EngineEvent::StopSequence(_)
                    | EngineEvent::PromptLogprobs(_)
                    | EngineEvent::Embedding(_) => {}
                    EngineEvent::Done { reason, .. } => return (ids, reason),
                }
            }
        }
    };
    let (answer, reason) = run(false).await;
    assert_eq!(reason, StopReason::Stop);
    // (The end-of-sequence token itself may come as the carrier of held-back text.)
    let answer: Vec<u32> = answer
        .into_iter()
        .filter(|id| !tok.stop_ids().contains(id))
        .collect();
    assert!(answer.len() < 24, "{answer:?}");
    let (long, reason) = run(true).await;
    assert_eq!(reason, StopReason::Length);
    assert_eq!(long.len(), 24);
    assert_eq!(long[..answer.len()], answer[..]);
    assert!(
        long.iter().all(|id| !tok.stop_ids().contains(id)),
        "{long:?}"
    );
}

/// `min_p` close to 1 keeps only the most likely token at each step (anything else would have
/// to be within 1.5 × ln(1/0.99) ≈ 0.015 of its logit): at temperature 1.5, where the same
/// seeds without it wander off the greedy answer, every seed reproduces the greedy answer.
#[tokio::test]
async fn min_p_near_one_reproduces_the_greedy_answer_at_any_seed() {
    use switchyard_worker::Engine;
    let Some(path) = model_path() else { return };
    let tok = tokenizer(&path);
    let prompt = tok
        .encode(
            "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n\
             <|im_start|>assistant\n",
        )
        .unwrap();
    let engine = real_engine(&path, 0);
    let run = |temperature: Option<f32>, min_p: f32, seed: u64| {
        let mut request = ids_request(prompt.clone(), 16);
        request.sampling.temperature = temperature;
        request.sampling.min_p = min_p;
        request.sampling.seed = Some(seed);
        generated(
            engine
                .submit(request, tokio_util::sync::CancellationToken::new())
                .unwrap(),
        )
    };
    let greedy = run(None, 0.0, 0).await;
    assert_eq!(greedy.len(), 16, "{greedy:?}");
    let mut wandered = 0;
    for seed in 1..=4 {
        assert_eq!(run(Some(1.5), 0.99, seed).await, greedy, "seed {seed}");
        if run(Some(1.5), 0.0, seed).await != greedy {
            wandered += 1;
        }
    }
    assert!(wandered > 0, "sampling at 1.5 never left the greedy answer");
}

/// Tool calling: the answer decoded under the tool call grammar.
mod tools {
    use super::*;
    use switchyard_proto::v1;
    use switchyard_worker::engine::Tools;
    use switchyard_worker::{
        Engine, EngineError, EngineEvent, EngineRequest, Message, Prompt, Sampling, StopReason,
    };
    use switchyard_worker_gpu::tokenizer::tools::{Parsed, ToolCallParser};

    fn tool(name: &str, description: &str, parameters: serde_json::Value) -> v1::Tool {
        v1::Tool {
            name: name.into(),
            description: description.into(),
            parameters_json: parameters.to_string(),
        }
    }

    fn get_weather() -> v1::Tool {
        tool(
            "get_weather",
            "The current weather in a city",
            serde_json::json!({
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            }),
        )
    }

    fn get_time() -> v1::Tool {
        tool(
            "get_time",
            "The current time in a time zone",
            serde_json::json!({
                "type": "object",
                "properties": {"zone": {"type": "string"}},
                "required": ["zone"],
            }),
        )
    }

    fn request(question: &str, tools: Vec<v1::Tool>, choice: v1::ToolChoice) -> EngineRequest {
        EngineRequest {
            request_id: format!("tools-{question}"),
            model: "m".into(),
            prompt: Prompt::Chat(vec![Message {
                role: "user".into(),
                content: question.into(),
                ..Default::default()
            }]),
            sampling: Sampling {
                max_tokens: 96,
                ..Default::default()
            },
            resume_tokens: vec![],
            latency_critical: false,
            min_tokens_per_s: 0.0,
            prompt_ids: None,
            tools: Tools { tools, choice },
            embed: false,
        }
    }

    fn choice(mode: v1::ToolChoiceMode, function: &str, single_call: bool) -> v1::ToolChoice {
        v1::ToolChoice {
            mode: mode as i32,
            function: function.into(),
            single_call,
        }
    }

    /// Everything a generation sent, in order.
    #[derive(Debug, Default)]
    struct Run {
        events: Vec<EngineEvent>,
        ids: Vec<u32>,
        reason: Option<StopReason>,
    }

    async fn run(engine: &switchyard_worker_gpu::CandleEngine, request: EngineRequest) -> Run {
        let mut rx = engine
            .submit(request, tokio_util::sync::CancellationToken::new())
            .unwrap();
        let mut out = Run::default();
        while let Some(event) = rx.recv().await {
            let event = event.unwrap();
            match &event {
                EngineEvent::Token { id, .. } => out.ids.push(*id),
                EngineEvent::Done { reason, .. } => out.reason = Some(*reason),
                EngineEvent::ToolCall(_)
                | EngineEvent::StopSequence(_)
                | EngineEvent::PromptLogprobs(_)
                | EngineEvent::Embedding(_) => {}
            }
            out.events.push(event);
        }
        out
    }

    /// Text and calls (id, name, arguments) as a client assembles them from events.
    fn assembled(events: &[EngineEvent]) -> (String, Vec<(String, String, String)>) {
        let mut text = String::new();
        let mut calls: Vec<(String, String, String)> = vec![];
        for event in events {
            match event {
                EngineEvent::Token { text: t, .. } => text.push_str(t),
                EngineEvent::ToolCall(d) => {
                    let i = d.index as usize;
                    if i == calls.len() {
                        assert!(!d.id.is_empty() && !d.name.is_empty(), "{d:?}");
                        calls.push((d.id.clone(), d.name.clone(), String::new()));
                    }
                    calls[i].2.push_str(&d.arguments);
                }
                EngineEvent::Done { .. }
                | EngineEvent::StopSequence(_)
                | EngineEvent::PromptLogprobs(_)
                | EngineEvent::Embedding(_) => {}
            }
        }
        (text, calls)
    }

    fn object(arguments: &str) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::from_str(arguments) {
            Ok(serde_json::Value::Object(map)) => map,
            other => panic!("arguments `{arguments}` are not an object: {other:?}"),
        }
    }

    /// The calls a generation completed, at least one: all of them when the grammar ended it,
    /// all but the last when max_tokens did (SmolLM2-135M, allowed parallel calls, tends to
    /// repeat its call until cut off).
    fn complete_calls<'a>(
        out: &Run,
        calls: &'a [(String, String, String)],
    ) -> &'a [(String, String, String)] {
        let complete = match out.reason {
            Some(StopReason::ToolCalls) => calls,
            Some(StopReason::Length) => &calls[..calls.len().saturating_sub(1)],
            other => panic!("ended with {other:?}"),
        };
        assert!(!complete.is_empty(), "{calls:?}");
        complete
    }

    /// The chat a template without tool support renders: tools in the system turn, the
    /// assistant's calls in the answer format, results as one user turn; the router's
    /// `encode_chat_tools` and the engine's own rendering give the same ids.
    #[test]
    fn a_chat_with_tools_renders_in_smollm2s_template() {
        let Some(path) = model_path() else { return };
        let tok = tokenizer(&path);
        let messages = vec![
            Message {
                role: "user".into(),
                content: "Weather in Paris?".into(),
                ..Default::default()
            },
            Message {
                role: "assistant".into(),
                tool_calls: vec![v1::ToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city": "Paris"}"#.into(),
                }],
                ..Default::default()
            },
            Message {
                role: "tool".into(),
                content: "sunny, 21 C".into(),
                tool_call_id: "call_1".into(),
                ..Default::default()
            },
        ];
        let tools = Tools {
            tools: vec![get_weather()],
            choice: choice(v1::ToolChoiceMode::Auto, "", false),
        };
        let set = switchyard_worker_gpu::tools::tool_set(&tools).unwrap();
        let plain = switchyard_worker_gpu::tools::plain_messages(&messages, &set);
        let text = tok.render_chat(&plain).unwrap();
        eprintln!("{text}");
        assert!(text.starts_with("<|im_start|>system\n# Tools\n"), "{text}");
        assert!(text.contains(r#"<tools>
{"type":"function","function":{"name":"get_weather","description":"The current weather in a city","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}
</tools>"#));
        assert!(text.ends_with(
            "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
        ), "{text}");
        // What a router computes from the same chat (the shared tokenizer's entry point).
        use switchyard_worker_gpu::tokenizer::tools::{ToolCallText, ToolTurn};
        let turns: Vec<ToolTurn> = messages
            .iter()
            .map(|m| ToolTurn {
                role: m.role.clone(),
                content: m.content.clone(),
                tool_calls: m
                    .tool_calls
                    .iter()
                    .map(|c| ToolCallText {
                        id: c.id.clone(),
                        name: c.name.clone(),
                        arguments: c.arguments.clone(),
                    })
                    .collect(),
                tool_call_id: m.tool_call_id.clone(),
            })
            .collect();
        assert_eq!(
            tok.encode_chat_tools(&turns, &set).unwrap(),
            tok.encode(&text).unwrap()
        );
    }

    #[tokio::test]
    async fn a_required_call_names_the_tool_with_valid_arguments() {
        let Some(path) = model_path() else { return };
        let engine = real_engine(&path, 0);
        let started = std::time::Instant::now();
        let out = run(
            &engine,
            request(
                "What is the weather like in Paris?",
                vec![get_weather()],
                choice(v1::ToolChoiceMode::Required, "", false),
            ),
        )
        .await;
        let (text, calls) = assembled(&out.events);
        eprintln!(
            "{} tokens in {:?}: {calls:?}",
            out.ids.len(),
            started.elapsed()
        );
        assert_eq!(text, "", "calls only: no text");
        for (id, name, arguments) in complete_calls(&out, &calls) {
            assert!(id.starts_with("call_"), "{id}");
            assert_eq!(name, "get_weather");
            assert!(object(arguments)["city"].is_string(), "{arguments}");
        }
    }

    #[tokio::test]
    async fn a_named_function_is_the_one_called_and_single_call_makes_one() {
        let Some(path) = model_path() else { return };
        let engine = real_engine(&path, 0);
        let out = run(
            &engine,
            request(
                "What is the weather like in Paris?",
                vec![get_weather(), get_time()],
                choice(v1::ToolChoiceMode::Auto, "get_time", false),
            ),
        )
        .await;
        let (_, calls) = assembled(&out.events);
        for (_, name, arguments) in complete_calls(&out, &calls) {
            assert_eq!(name, "get_time");
            assert!(object(arguments)["zone"].is_string(), "{arguments}");
        }

        let out = run(
            &engine,
            request(
                "What is the weather like in Paris, London and Rome?",
                vec![get_weather(), get_time()],
                choice(v1::ToolChoiceMode::Required, "", true),
            ),
        )
        .await;
        let (_, calls) = assembled(&out.events);
        assert_eq!(out.reason, Some(StopReason::ToolCalls));
        assert_eq!(calls.len(), 1, "{calls:?}");
    }

    #[tokio::test]
    async fn auto_answers_in_text_or_valid_calls() {
        let Some(path) = model_path() else { return };
        let engine = real_engine(&path, 0);
        for question in ["Hi! How are you?", "What is the weather like in Paris?"] {
            let out = run(
                &engine,
                request(
                    question,
                    vec![get_weather(), get_time()],
                    choice(v1::ToolChoiceMode::Auto, "", false),
                ),
            )
            .await;
            let (text, calls) = assembled(&out.events);
            eprintln!("{question} -> {text:?} {calls:?} {:?}", out.reason);
            if calls.is_empty() {
                assert!(!text.is_empty());
                assert!(!text.starts_with("<tool_call>"));
                assert!(matches!(
                    out.reason,
                    Some(StopReason::Stop | StopReason::Length)
                ));
            } else {
                assert_eq!(text, "");
                assert_eq!(out.reason, Some(StopReason::ToolCalls));
                for (_, name, arguments) in &calls {
                    assert!(name == "get_weather" || name == "get_time", "{name}");
                    object(arguments);
                }
            }
        }
    }

    /// A generation resumed mid-call on another engine delivers exactly the rest: the first
    /// run's events up to the cut plus the resumed run's are the calls the whole text spells.
    #[tokio::test]
    async fn a_call_resumed_mid_arguments_goes_on_without_repeating_or_losing_text() {
        let Some(path) = model_path() else { return };
        let engine = real_engine(&path, 0);
        let ask = || {
            request(
                "What is the weather like in Paris?",
                vec![get_weather()],
                choice(v1::ToolChoiceMode::Required, "", false),
            )
        };
        let first = run(&engine, ask()).await;
        let half = first.ids.len() / 2;
        assert!(half > 10, "{} tokens", first.ids.len());
        // What the first worker delivered before failing: its events up to token `half`.
        let cut = first
            .events
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, EngineEvent::Token { .. }))
            .nth(half)
            .map(|(i, _)| i)
            .unwrap();
        let mut resumed_request = ask();
        resumed_request.resume_tokens = first.ids[..half].to_vec();
        let second = run(&real_engine(&path, 0), resumed_request).await;
        assert_eq!(second.reason, first.reason);

        let mut delivered: Vec<EngineEvent> = first.events[..cut].to_vec();
        delivered.extend(second.events.iter().cloned());
        let (text, calls) = assembled(&delivered);

        // What the whole text spells, parsed in one go.
        let all: Vec<u32> = first.ids[..half]
            .iter()
            .chain(&second.ids)
            .copied()
            .collect();
        let tok = tokenizer(&path);
        let set = switchyard_worker_gpu::tools::tool_set(&ask().tools).unwrap();
        let mut parser = ToolCallParser::new(
            &set,
            &switchyard_worker_gpu::tools::id_prefix(&ask().request_id),
        );
        let mut pieces = parser.push(&tok.decode(&all));
        pieces.extend(parser.finish());
        let mut expected: Vec<(String, String, String)> = vec![];
        for piece in pieces {
            match piece {
                Parsed::Call {
                    index,
                    id,
                    name,
                    arguments,
                } => {
                    if index as usize == expected.len() {
                        expected.push((id, name, String::new()));
                    }
                    expected[index as usize].2.push_str(&arguments);
                }
                Parsed::Text(t) => panic!("text {t:?} in a required call"),
            }
        }
        assert_eq!(text, "");
        assert_eq!(calls, expected);
        assert!(object(&calls[0].2)["city"].is_string());
        if second.ids == first.ids[half..] {
            assert_eq!(calls, assembled(&first.events).1);
        }
    }

    /// `response_format`: the answer is JSON (an object; of the schema) and ends when it
    /// closes, well within the bound; a resumed answer goes on to the same JSON.
    #[tokio::test]
    async fn a_json_answer_is_an_object_of_its_schema_and_ends_when_it_closes() {
        use v1::response_format::Kind;
        let Some(path) = model_path() else { return };
        let engine = real_engine(&path, 0);
        let ask = |kind: Kind, schema: serde_json::Value| {
            let mut r = request(
                "Give the name and population of France's capital.",
                vec![],
                v1::ToolChoice::default(),
            );
            r.sampling.max_tokens = 200;
            r.sampling.response_format = Some(v1::ResponseFormat {
                kind: kind as i32,
                schema_json: schema.to_string(),
                ..Default::default()
            });
            r
        };
        let object_run = run(&engine, ask(Kind::JsonObject, serde_json::Value::Null)).await;
        let (text, calls) = assembled(&object_run.events);
        assert!(calls.is_empty());
        assert_eq!(object_run.reason, Some(StopReason::Stop), "{text}");
        object(&text);

        let schema = serde_json::json!({
            "type": "object",
            "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
            "required": ["city", "population"],
            "additionalProperties": false,
        });
        let first = run(&engine, ask(Kind::JsonSchema, schema.clone())).await;
        let (text, _) = assembled(&first.events);
        assert_eq!(first.reason, Some(StopReason::Stop), "{text}");
        let answer = object(&text);
        assert_eq!(answer.len(), 2, "{text}");
        assert!(
            answer["city"].is_string() && answer["population"].is_i64(),
            "{text}"
        );

        // Resumed halfway on another engine: the rest follows the same grammar to the same end.
        let half = first.ids.len() / 2;
        let mut resumed = ask(Kind::JsonSchema, schema);
        resumed.resume_tokens = first.ids[..half].to_vec();
        let second = run(&real_engine(&path, 0), resumed).await;
        assert_eq!(second.ids, first.ids[half..]);

        // Tools and a JSON answer together are refused by name, before any token.
        let mut both = ask(Kind::JsonObject, serde_json::Value::Null);
        both.tools = Tools {
            tools: vec![get_weather()],
            choice: v1::ToolChoice::default(),
        };
        match engine.submit(both, tokio_util::sync::CancellationToken::new()) {
            Err(EngineError::InvalidField { field, .. }) => {
                assert_eq!(field, "sampling.response_format")
            }
            other => panic!("not refused: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_schema_the_grammar_library_refuses_fails_before_any_token() {
        let Some(path) = model_path() else { return };
        let engine = real_engine(&path, 0);
        let bad = tool(
            "broken",
            "",
            serde_json::json!({"type": "object", "properties": {"a": {"type": "strin"}}}),
        );
        let refused = engine.submit(
            request(
                "What is the weather like in Paris?",
                vec![get_weather(), bad],
                choice(v1::ToolChoiceMode::Auto, "", false),
            ),
            tokio_util::sync::CancellationToken::new(),
        );
        match refused {
            Err(EngineError::InvalidField { field, .. }) => {
                assert_eq!(field, "tools[1].parameters_json")
            }
            other => panic!("not refused: {other:?}"),
        }
        let not_json = v1::Tool {
            parameters_json: "{".into(),
            ..get_weather()
        };
        let refused = engine.submit(
            request(
                "What is the weather like in Paris?",
                vec![not_json],
                choice(v1::ToolChoiceMode::Required, "", false),
            ),
            tokio_util::sync::CancellationToken::new(),
        );
        assert!(
            matches!(&refused, Err(EngineError::InvalidField { field, .. }) if field == "tools[0].parameters_json"),
            "{refused:?}"
        );
    }
}

/// The vector an embedding request answers with, and its `Done` usage's prompt tokens.
async fn embedding_of(engine: &switchyard_worker_gpu::CandleEngine, text: &str) -> (Vec<f32>, u32) {
    use switchyard_worker::{Engine, EngineEvent};
    let request = switchyard_worker::EngineRequest {
        request_id: format!("embed-{text}"),
        prompt: switchyard_worker::Prompt::Text(text.into()),
        prompt_ids: None,
        embed: true,
        ..ids_request(Vec::new(), 1)
    };
    let mut rx = engine
        .submit(request, tokio_util::sync::CancellationToken::new())
        .unwrap();
    let mut vector = None;
    while let Some(event) = rx.recv().await {
        match event.unwrap() {
            EngineEvent::Embedding(v) => vector = Some(v),
            EngineEvent::Done {
                prompt_tokens,
                completion_tokens,
                ..
            } => {
                assert_eq!(completion_tokens, 0, "an embedding generates nothing");
                return (vector.expect("the vector comes before Done"), prompt_tokens);
            }
            other => panic!("an embedding request sent {other:?}"),
        }
    }
    panic!("the embedding request ended without Done")
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
    dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt())
}

/// An embedding is the prompt's final hidden states mean-pooled and scaled to length 1: as
/// wide as the model, the same however the prompt is split into prefill chunks (and whether a
/// generation cached the same prompt's blocks first: none are reused), and it places a
/// paraphrase nearer than an unrelated sentence.
#[tokio::test]
async fn an_embedding_is_a_unit_mean_of_hidden_states_whatever_the_chunking() {
    use switchyard_worker::Engine;
    let Some(path) = model_path() else { return };
    let limits = |prefill_chunk| switchyard_worker_gpu::SchedulerLimits {
        kv_budget_bytes: 64 * 1024 * 1024,
        max_seqs: 4,
        max_queue: 8,
        prefill_chunk,
        prefill_pack: switchyard_worker_gpu::PrefillPack::AtMost(usize::MAX),
        step_target: None,
        prefix_cache: true,
        compute_threads: 0,
    };
    let whole = engine_with(&path, limits(512), usize::MAX);
    let chunked = engine_with(&path, limits(4), usize::MAX);
    let text = "The cat sat on the mat and watched the birds outside the window.";
    // A generation first, so the prompt's blocks are cached: the embedding must not use them.
    let ids = tokenizer(&path).encode(text).unwrap();
    generated(
        whole
            .submit(ids_request(ids.clone(), 2), Default::default())
            .unwrap(),
    )
    .await;
    let (a, prompt_tokens) = embedding_of(&whole, text).await;
    let (b, _) = embedding_of(&chunked, text).await;
    assert_eq!(prompt_tokens as usize, ids.len());
    assert_eq!(a.len(), 576, "SmolLM2-135M's hidden size");
    let norm = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    assert!(
        cosine(&a, &b) > 0.9999,
        "chunked: cosine {}",
        cosine(&a, &b)
    );

    let near = embedding_of(
        &whole,
        "A cat was sitting on the rug, watching birds through the window.",
    )
    .await
    .0;
    let far = embedding_of(
        &whole,
        "Quarterly revenue rose five percent on strong bond trading.",
    )
    .await
    .0;
    assert!(
        cosine(&a, &near) > cosine(&a, &far),
        "paraphrase {} vs unrelated {}",
        cosine(&a, &near),
        cosine(&a, &far)
    );
    assert!(whole.embeds());
}

/// The engine's embeddings are llama.cpp's: each fixed text's vector points the same way as
/// the one `llama-server --embeddings --pooling mean` answered (recorded by
/// `tests/fixtures/record_embeddings.py`). Not bit for bit: this engine multiplies a Q8_0
/// repack of the Q4_1 weights; on these texts the cosines are ≥ 0.9996.
#[tokio::test]
async fn embeddings_point_where_llama_cpps_do() {
    let Some(path) = model_path() else { return };
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/embeddings_smollm2.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let engine = real_engine(&path, 0);
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let theirs: Vec<f32> = serde_json::from_value(case["embedding"].clone()).unwrap();
        let (ours, _) = embedding_of(&engine, text).await;
        assert_eq!(ours.len(), theirs.len());
        let similarity = cosine(&ours, &theirs);
        assert!(similarity > 0.999, "{text:?}: cosine {similarity}");
    }
}
