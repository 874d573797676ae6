//! Engine tests on a tiny random-weight llama GGUF written by the test itself: loading,
//! batched decode == each sequence alone, KV freed on cancel, admission limits, sampling
//! determinism, resume.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Device;
use switchyard_worker::{
    Engine, EngineError, EngineEvent, EngineRequest, Prompt, Sampling, StopReason,
};
use switchyard_worker_gpu::gguf::{GgufFile, Repack};
use switchyard_worker_gpu::model::{Llama, Logits, ModelError, SeqCache, argmax, logits_rows};

/// Positions per KV block.
const BLOCK: usize = 32;
use switchyard_proto::v1;
use switchyard_worker_gpu::testing::{TinySpec, write_tiny_llama};
use switchyard_worker_gpu::tokenizer::GgufTokenizer;
use switchyard_worker_gpu::{CandleEngine, PrefillPack, SchedulerLimits};
use tokio_util::sync::CancellationToken;

fn tiny_file(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path, TinySpec::default()).unwrap();
    path
}

fn load(path: &Path, repack: Repack) -> (Llama, GgufTokenizer) {
    let mut file = GgufFile::open(path).unwrap();
    let tok = GgufTokenizer::from_gguf(&file.content).unwrap();
    (Llama::load(&mut file, &Device::Cpu, repack).unwrap(), tok)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn loads_tiny_model_config() {
    let dir = tempfile::tempdir().unwrap();
    let (model, tok) = load(&tiny_file(&dir), Repack::Q8_0);
    assert_eq!(model.config.n_layer, 2);
    assert_eq!(model.config.n_head_kv, 2);
    assert_eq!(model.config.context_length, 256);
    assert_eq!(tok.vocab_size(), model.config.vocab_size);
    assert_eq!(tok.encode("<|im_start|>hello").unwrap()[0], 1);
}

#[test]
fn batched_decode_equals_each_sequence_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = load(&tiny_file(&dir), Repack::Q8_0);
    let prompts: [&[u32]; 3] = [&[5, 6, 7, 8, 9], &[40, 41], &[100, 3, 200, 17, 18, 19, 20]];
    let steps = 6;
    // Alone: each sequence prefilled then decoded greedily by itself.
    let mut alone: Vec<Vec<Vec<f32>>> = Vec::new();
    let mut inputs: Vec<Vec<u32>> = Vec::new();
    for p in prompts {
        let (mut cache_store, mut cache) = model.single_sequence(64).unwrap();
        let mut rows = vec![
            logits_rows(&model.prefill(p, &mut cache, &mut cache_store).unwrap())
                .unwrap()
                .remove(0),
        ];
        let mut ids = vec![];
        for _ in 0..steps {
            let next = switchyard_worker_gpu::model::argmax(rows.last().unwrap());
            ids.push(next);
            let l = model
                .decode(&[next], &mut [&mut cache], &mut cache_store)
                .unwrap();
            rows.push(logits_rows(&l).unwrap().remove(0));
        }
        alone.push(rows);
        inputs.push(ids);
    }
    // Together: prefill each, then every decode step is one batched forward over all three.
    // One store shared by the three sequences, their blocks interleaved.
    let blocks_each = 64 / BLOCK;
    let mut store = model.kv_store(3 * blocks_each);
    let mut caches: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let table = (0..blocks_each).map(|b| (b * 3 + i) as u32).collect();
            let mut c = SeqCache::new(table, 0);
            let first = logits_rows(&model.prefill(p, &mut c, &mut store).unwrap())
                .unwrap()
                .remove(0);
            (c, first)
        })
        .collect();
    for (i, (_, first)) in caches.iter().enumerate() {
        assert!(max_abs_diff(first, &alone[i][0]) < 1e-4);
    }
    for step in 0..steps {
        let tokens: Vec<u32> = inputs.iter().map(|ids| ids[step]).collect();
        let mut refs: Vec<_> = caches.iter_mut().map(|(c, _)| c).collect();
        let rows = logits_rows(&model.decode(&tokens, &mut refs, &mut store).unwrap()).unwrap();
        assert_eq!(rows.len(), 3);
        for (i, row) in rows.iter().enumerate() {
            let d = max_abs_diff(row, &alone[i][step + 1]);
            assert!(
                d < 1e-3,
                "sequence {i} step {step}: batched logits differ by {d}"
            );
        }
    }
}

/// The tiny model on one matmul path throughout (so chunks must agree with the whole), a
/// 30-token prompt and the logits of its last token, prefilled whole.
fn one_path_model_and_whole_prompt(dir: &tempfile::TempDir) -> (Llama, Vec<u32>, Vec<f32>) {
    let (model, _) = load(&tiny_file(dir), Repack::None);
    let model = model.with_dense_from_rows(usize::MAX);
    let prompt: Vec<u32> = (10..40).collect();
    let (mut store, mut cache) = model.single_sequence(64).unwrap();
    let logits = logits_rows(&model.prefill(&prompt, &mut cache, &mut store).unwrap()).unwrap();
    (model, prompt, logits[0].clone())
}

#[test]
fn chunked_prefill_equals_whole_prefill() {
    let dir = tempfile::tempdir().unwrap();
    let (model, prompt, a) = one_path_model_and_whole_prompt(&dir);
    let (mut chunked_store, mut chunked) = model.single_sequence(64).unwrap();
    model
        .prefill(&prompt[..7], &mut chunked, &mut chunked_store)
        .unwrap();
    model
        .prefill(&prompt[7..20], &mut chunked, &mut chunked_store)
        .unwrap();
    let b = logits_rows(
        &model
            .prefill(&prompt[20..], &mut chunked, &mut chunked_store)
            .unwrap(),
    )
    .unwrap();
    assert!(max_abs_diff(&a, &b[0]) < 1e-3);
    assert_eq!(chunked.len(), 30);
}

#[test]
fn an_abandoned_prefill_chunk_leaves_the_sequence_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (model, prompt, a) = one_path_model_and_whole_prompt(&dir);
    let (mut store, mut cache) = model.single_sequence(64).unwrap();
    model
        .prefill(&prompt[..10], &mut cache, &mut store)
        .unwrap();
    // Given up after the first of the two layers has written its keys and values.
    let asked = std::cell::Cell::new(0);
    let given_up = model.prefill_unless(
        &prompt[10..],
        &mut cache,
        &mut store,
        || {
            asked.set(asked.get() + 1);
            asked.get() > 1
        },
        Logits::LastToken,
    );
    assert!(
        matches!(given_up, Err(ModelError::Abandoned)),
        "{given_up:?}"
    );
    assert_eq!(
        asked.get(),
        2,
        "asked before each layer, not only at the end"
    );
    assert_eq!(
        cache.len(),
        10,
        "the abandoned chunk is not part of the sequence"
    );
    // Computed again from there, the chunk gives what the whole prompt gives.
    let b = logits_rows(
        &model
            .prefill(&prompt[10..], &mut cache, &mut store)
            .unwrap(),
    )
    .unwrap();
    assert!(max_abs_diff(&a, &b[0]) < 1e-3);
}

/// A pass packing several sequences' chunks — fresh prompts, the next chunk of a started one,
/// a decode token — gives each what it gets in a pass of its own, whatever output it asks for,
/// on host and device blocks; given up, it leaves every sequence as it was.
#[test]
fn sequences_packed_into_one_pass_get_what_each_gets_alone() {
    use switchyard_worker_gpu::model::{Chunk, KvMemory};
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = load(&tiny_file(&dir), Repack::Q8_0);
    let model = model.with_dense_from_rows(usize::MAX);
    let started = prompt(10, 3);
    let decoding = prompt(33, 4);
    // (tokens already in the cache, this pass's tokens, output)
    let parts: [(&[u32], Vec<u32>, Logits); 4] = [
        (&[], prompt(20, 1), Logits::LastToken),
        (&started, prompt(13, 2), Logits::EveryToken),
        (&[], prompt(7, 5), Logits::HiddenSum),
        (&decoding, vec![17], Logits::LastToken),
    ];
    let blocks_each = 2;
    for memory in [KvMemory::Host, KvMemory::Device] {
        let fresh = |store: &mut _, i: usize, before: &[u32]| {
            let table = (0..blocks_each).map(|b| (b * 4 + i) as u32).collect();
            let mut cache = SeqCache::new(table, 0);
            if !before.is_empty() {
                model.prefill(before, &mut cache, store).unwrap();
            }
            cache
        };
        let alone: Vec<Vec<Vec<f32>>> = parts
            .iter()
            .enumerate()
            .map(|(i, (before, tokens, logits))| {
                let mut store = model.kv_store_in(4 * blocks_each, memory);
                let mut cache = fresh(&mut store, i, before);
                let out = model
                    .prefill_unless(tokens, &mut cache, &mut store, || false, *logits)
                    .unwrap();
                logits_rows(&out).unwrap()
            })
            .collect();
        let mut store = model.kv_store_in(4 * blocks_each, memory);
        let mut caches: Vec<SeqCache> = parts
            .iter()
            .enumerate()
            .map(|(i, (before, ..))| fresh(&mut store, i, before))
            .collect();
        fn chunks<'a>(
            caches: &'a mut [SeqCache],
            parts: &'a [(&[u32], Vec<u32>, Logits)],
        ) -> Vec<Chunk<'a>> {
            caches
                .iter_mut()
                .zip(parts)
                .map(|(cache, (_, tokens, logits))| Chunk {
                    tokens,
                    cache,
                    logits: *logits,
                })
                .collect()
        }
        let given_up = model.forward(&mut chunks(&mut caches, &parts), &mut store, || true);
        assert!(matches!(given_up, Err(ModelError::Abandoned)), "{memory:?}");
        let lens: Vec<usize> = caches.iter().map(SeqCache::len).collect();
        assert_eq!(
            lens,
            [0, 10, 0, 33],
            "{memory:?}: given up, nothing is added"
        );
        let packed = model
            .forward(&mut chunks(&mut caches, &parts), &mut store, || false)
            .unwrap();
        for (i, (out, want)) in packed.iter().zip(&alone).enumerate() {
            let got = logits_rows(out).unwrap();
            assert_eq!(got.len(), want.len(), "{memory:?} sequence {i}");
            for (row, (g, w)) in got.iter().zip(want).enumerate() {
                let d = max_abs_diff(g, w);
                assert!(
                    d < 1e-3,
                    "{memory:?} sequence {i} row {row}: differs by {d}"
                );
            }
            let len = parts[i].0.len() + parts[i].1.len();
            assert_eq!(caches[i].len(), len, "{memory:?} sequence {i}");
        }
    }
}

/// Long prompt chunks multiply against dequantized weights; they must agree with the quantized
/// path up to activation rounding, on the same prediction.
#[test]
fn dense_prefill_agrees_with_quantized_prefill() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = load(&tiny_file(&dir), Repack::Q8_0);
    let model = model.with_dense_from_rows(8);
    let prompt: Vec<u32> = (10..40).collect();
    let (mut cache_store, mut cache) = model.single_sequence(64).unwrap();
    let dense = logits_rows(
        &model
            .prefill(&prompt, &mut cache, &mut cache_store)
            .unwrap(),
    )
    .unwrap();
    let model = model.with_dense_from_rows(usize::MAX);
    let (mut cache_store, mut cache) = model.single_sequence(64).unwrap();
    let quantized = logits_rows(
        &model
            .prefill(&prompt, &mut cache, &mut cache_store)
            .unwrap(),
    )
    .unwrap();
    let diff = max_abs_diff(&dense[0], &quantized[0]);
    assert!(diff > 0.0, "the dense path was not taken");
    assert!(diff < 0.5, "dense and quantized prefill differ by {diff}");
    assert_eq!(argmax(&dense[0]), argmax(&quantized[0]));
}

fn engine(path: &Path, limits: SchedulerLimits) -> CandleEngine {
    let (model, tok) = load(path, Repack::Q8_0);
    CandleEngine::start(model, tok, vec!["tiny".into()], limits, "cpu: test".into()).unwrap()
}

fn limits() -> SchedulerLimits {
    SchedulerLimits {
        kv_budget_bytes: 64 * 1024 * 1024,
        max_seqs: 4,
        max_queue: 8,
        prefill_chunk: 16,
        prefill_pack: PrefillPack::AtMost(usize::MAX),
        step_target: None,
        prefix_cache: true,
        compute_threads: 0,
    }
}

fn request(text: &str, max_tokens: u32) -> EngineRequest {
    EngineRequest {
        request_id: format!("r-{text}"),
        model: "tiny".into(),
        prompt: Prompt::Text(text.into()),
        sampling: Sampling {
            max_tokens,
            ..Default::default()
        },
        resume_tokens: vec![],
        latency_critical: false,
        min_tokens_per_s: 0.0,
        prompt_ids: None,
        tools: Default::default(),
        embed: false,
    }
}

/// All events of one stream.
async fn collect(rx: switchyard_worker::EngineStream) -> (Vec<u32>, String, StopReason, u32) {
    collect_with_stop(rx).await.0
}

/// [`collect`], and the stop sequence the engine said ended the generation.
async fn collect_with_stop(
    mut rx: switchyard_worker::EngineStream,
) -> ((Vec<u32>, String, StopReason, u32), Option<String>) {
    let mut ids = vec![];
    let mut text = String::new();
    let mut stop = None;
    while let Some(ev) = rx.recv().await {
        match ev.unwrap() {
            EngineEvent::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            EngineEvent::ToolCall(call) => panic!("no tools were offered: {call:?}"),
            EngineEvent::StopSequence(matched) => stop = Some(matched),
            EngineEvent::PromptLogprobs(_) | EngineEvent::Embedding(_) => {}
            EngineEvent::Done {
                reason,
                completion_tokens,
                ..
            } => return ((ids, text, reason, completion_tokens), stop),
        }
    }
    panic!("stream ended without Done");
}

#[tokio::test]
async fn generates_max_tokens_and_is_deterministic_greedy() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&tiny_file(&dir), limits());
    assert_eq!(e.kind(), "candle");
    let a = collect(
        e.submit(request("hello world", 12), CancellationToken::new())
            .unwrap(),
    )
    .await;
    let b = collect(
        e.submit(request("hello world", 12), CancellationToken::new())
            .unwrap(),
    )
    .await;
    assert_eq!(a.0, b.0);
    assert!(a.2 == StopReason::Length || a.2 == StopReason::Stop);
    if a.2 == StopReason::Length {
        assert_eq!(a.0.len(), 12);
        assert_eq!(a.3, 12);
    }
}

#[tokio::test]
async fn concurrent_streams_match_solo_runs() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&tiny_file(&dir), limits());
    let prompts = ["hello", "abc def", "the sea", "xyz 123"];
    let mut solo = vec![];
    for p in prompts {
        solo.push(
            collect(e.submit(request(p, 10), CancellationToken::new()).unwrap())
                .await
                .0,
        );
    }
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| e.submit(request(p, 10), CancellationToken::new()).unwrap())
        .collect();
    let together = futures_join(rxs).await;
    for (i, t) in together.iter().enumerate() {
        assert_eq!(t.0, solo[i], "prompt {i} differs when batched");
    }
}

async fn futures_join(
    rxs: Vec<switchyard_worker::EngineStream>,
) -> Vec<(Vec<u32>, String, StopReason, u32)> {
    let handles: Vec<_> = rxs
        .into_iter()
        .map(|rx| tokio::spawn(collect(rx)))
        .collect();
    let mut out = vec![];
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn seeded_sampling_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&tiny_file(&dir), limits());
    let mk = |seed| {
        let mut r = request("hello", 16);
        r.sampling.temperature = Some(1.5);
        r.sampling.top_p = Some(0.95);
        r.sampling.top_k = Some(50);
        r.sampling.seed = Some(seed);
        r
    };
    let a = collect(e.submit(mk(1), CancellationToken::new()).unwrap()).await;
    let b = collect(e.submit(mk(1), CancellationToken::new()).unwrap()).await;
    assert_eq!(a.0, b.0);
    assert_eq!(a.1, b.1);
}

#[tokio::test]
async fn cancel_frees_kv_and_ends_with_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&tiny_file(&dir), limits());
    let cancel = CancellationToken::new();
    let mut rx = e.submit(request("hello", 200), cancel.clone()).unwrap();
    // Wait for the first token: the sequence is admitted and holds KV.
    match rx.recv().await.unwrap().unwrap() {
        EngineEvent::Token { .. } => {}
        other => panic!("expected a token, got {other:?}"),
    }
    assert!(e.load().kv_used_bytes > 0);
    cancel.cancel();
    let mut reason = None;
    while let Some(ev) = rx.recv().await {
        if let EngineEvent::Done { reason: r, .. } = ev.unwrap() {
            reason = Some(r);
        }
    }
    assert_eq!(reason, Some(StopReason::Cancelled));
    // By the time its end arrives the load says so: what the worker reports then (its
    // metrics, the routers' view) must not count the freed blocks as used.
    assert_eq!(e.load().kv_used_bytes, 0, "{:?}", e.load());
    assert_eq!(e.active(), 0);
}

#[tokio::test]
async fn a_finished_generation_has_freed_its_kv_when_its_end_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&tiny_file(&dir), limits());
    for max_tokens in [1, 12] {
        let (ids, _, reason, _) = collect(
            e.submit(request("hello", max_tokens), CancellationToken::new())
                .unwrap(),
        )
        .await;
        assert_eq!(
            (ids.len(), reason),
            (max_tokens as usize, StopReason::Length)
        );
        assert_eq!(e.load().kv_used_bytes, 0, "{:?}", e.load());
        assert_eq!(e.active(), 0);
    }
}

#[tokio::test]
async fn a_reader_that_stops_pauses_its_own_sequence_only() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&tiny_file(&dir), limits());
    let alone = collect(
        e.submit(request("hello", 180), CancellationToken::new())
            .unwrap(),
    )
    .await;
    assert_eq!(alone.0.len(), 180, "the reference runs to max_tokens");
    let unread = e
        .submit(request("hello", 180), CancellationToken::new())
        .unwrap();
    // Another sequence runs its 150 steps to the end while the first one's reader sleeps.
    let other = collect(
        e.submit(request("the sea", 150), CancellationToken::new())
            .unwrap(),
    )
    .await;
    assert_eq!(other.2, StopReason::Length);
    assert!(
        unread.len() < 70,
        "{} events piled up for a reader that read nothing",
        unread.len()
    );
    // The finished one leaves the batch within the scheduler iteration that sent its end.
    assert!(
        wait_until(|| e.active() == 1).await,
        "the unread sequence is paused, not ended ({} active)",
        e.active()
    );
    // Reading resumes it: the same greedy tokens as when read throughout.
    let resumed = collect(unread).await;
    assert_eq!(resumed.0, alone.0);
    assert_eq!(resumed.2, alone.2);
}

/// Prompts admitted together share a step's prefill chunk, in one forward pass: four 10-token
/// prompts take one pass under a 64-token chunk and three under a 16-token one (10 + 6, 4 +
/// 10 + 2, 8) — four when a pass may hold one prompt — and each is answered as it is alone.
#[tokio::test]
async fn prompts_admitted_together_share_each_prefill_pass() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_file(&dir);
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(10, 7 + i)).collect();
    let ids_request = |i: usize| EngineRequest {
        request_id: format!("r-{i}"),
        prompt_ids: Some(prompts[i].clone()),
        ..request("ids", 3)
    };
    let alone = engine(&path, limits());
    let mut want = Vec::new();
    for i in 0..4 {
        let stream = alone.submit(ids_request(i), CancellationToken::new());
        want.push(collect(stream.unwrap()).await.0);
    }
    // (chunk, most prompts a pass packs, passes)
    for (chunk, most, passes) in [(64, usize::MAX, 1), (16, usize::MAX, 3), (64, 1, 4)] {
        let e = engine(
            &path,
            SchedulerLimits {
                prefill_chunk: chunk,
                prefill_pack: PrefillPack::AtMost(most),
                ..limits()
            },
        );
        // Four running generations hold every slot; the four prompts queue behind them and
        // are all admitted in the iteration that reaps the runners (one cancel for all).
        let runners = CancellationToken::new();
        let held: Vec<_> = (0..4)
            .map(|i| e.submit(request(&format!("run {i}"), 200), runners.clone()))
            .collect();
        assert!(wait_until(|| e.active() == 4).await);
        let queued: Vec<_> = (0..4)
            .map(|i| e.submit(ids_request(i), CancellationToken::new()).unwrap())
            .collect();
        assert!(
            wait_until(|| e.load().queued_prompt_tokens == 40).await,
            "{:?}",
            e.load()
        );
        let before = e.prefill_stats().unwrap();
        runners.cancel();
        for (i, stream) in queued.into_iter().enumerate() {
            assert_eq!(collect(stream).await.0, want[i], "chunk {chunk} prompt {i}");
        }
        let after = e.prefill_stats().unwrap();
        let case = format!("chunk {chunk}, at most {most} a pass");
        assert_eq!(after.passes - before.passes, passes, "{case}");
        // Every prompt's chunks, and its 10 tokens, counted once (16: 2 + 3 + 1 chunks).
        let chunks = if chunk == 16 { 6 } else { 4 };
        assert_eq!(after.sequences - before.sequences, chunks, "{case}");
        assert_eq!(after.tokens - before.tokens, 40, "{case}");
        drop(held);
    }
}

async fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    false
}

#[tokio::test]
async fn admission_limits() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_file(&dir);
    // Context 256: prompt + max_tokens beyond it is refused naming the limit and the field to
    // lower, with the reason clients that trim and retry look for.
    let e = engine(&path, limits());
    let err = e
        .submit(request("hello", 300), CancellationToken::new())
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::ExceedsContext { field, detail }
            if field == "sampling.max_tokens" && detail.contains("context length of 256")),
        "{err:?}"
    );
    assert_eq!(
        err.reason(),
        Some(switchyard_proto::CONTEXT_LENGTH_EXCEEDED)
    );
    // A request bigger than the whole KV budget can never fit.
    let per_token = 2 * 2 * 2 * 16 * 4; // layers × (k,v) × kv heads × head dim × f32
    let small = SchedulerLimits {
        kv_budget_bytes: per_token * 40,
        max_seqs: 1,
        max_queue: 1,
        prefill_chunk: 16,
        prefill_pack: PrefillPack::AtMost(usize::MAX),
        step_target: None,
        prefix_cache: true,
        compute_threads: 0,
    };
    let e = engine(&path, small);
    let err = e
        .submit(request("hello", 100), CancellationToken::new())
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidArgument(m) if m.contains("kv_budget_bytes")),
        "{err:?}"
    );
    // One running (max_seqs 1), one queued (max_queue 1), the third is shed. The first asks
    // for most of the context so that it is still running when the others arrive (a tiny-model
    // step takes microseconds; it is cancelled below).
    let e = engine(
        &path,
        SchedulerLimits {
            kv_budget_bytes: per_token * 256,
            max_seqs: 1,
            max_queue: 1,
            prefill_chunk: 16,
            prefill_pack: PrefillPack::AtMost(usize::MAX),
            step_target: None,
            prefix_cache: true,
            compute_threads: 0,
        },
    );
    let c1 = CancellationToken::new();
    let mut first = e.submit(request("hi", 240), c1.clone()).unwrap();
    assert!(matches!(
        first.recv().await.unwrap().unwrap(),
        EngineEvent::Token { .. }
    ));
    let c2 = CancellationToken::new();
    let second = e.submit(request("yo", 5), c2.clone()).unwrap();
    let third = e.submit(request("ho", 5), CancellationToken::new());
    assert!(
        matches!(third, Err(EngineError::ResourceExhausted(_))),
        "{third:?}"
    );
    assert_eq!(e.load().queued, 1);
    // When the first ends, the queued one runs to completion.
    c1.cancel();
    let (_, _, reason, _) = collect(second).await;
    assert!(reason == StopReason::Length || reason == StopReason::Stop);
}

#[tokio::test]
async fn resume_continues_after_the_given_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&tiny_file(&dir), limits());
    let full = collect(
        e.submit(request("hello", 10), CancellationToken::new())
            .unwrap(),
    )
    .await;
    if full.2 != StopReason::Length {
        return; // hit EOS early with these random weights: nothing to resume
    }
    let mut r = request("hello", 10);
    r.resume_tokens = full.0[..4].to_vec();
    let rest = collect(e.submit(r, CancellationToken::new()).unwrap()).await;
    assert_eq!(rest.0, full.0[4..].to_vec());
    assert_eq!(rest.3, 10, "completion_tokens counts the resumed ones");
}

#[tokio::test]
async fn stop_sequence_is_not_emitted() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&tiny_file(&dir), limits());
    let full = collect(
        e.submit(request("hello", 20), CancellationToken::new())
            .unwrap(),
    )
    .await;
    // Stop on a piece of text from the middle of the greedy output.
    let chars: Vec<char> = full.1.chars().collect();
    if chars.len() < 6 {
        return;
    }
    let stop: String = chars[3..5].iter().collect();
    let mut r = request("hello", 20);
    r.sampling.stop = vec![stop.clone()];
    let (got, matched) = collect_with_stop(e.submit(r, CancellationToken::new()).unwrap()).await;
    assert_eq!(got.2, StopReason::Stop);
    let expect = &full.1[..full.1.find(&stop).unwrap()];
    assert_eq!(got.1, expect);
    // The engine says which stop ended it; an end of turn or the bound names none.
    assert_eq!(matched, Some(stop));
    let (_, unmatched) = collect_with_stop(
        e.submit(request("hello", 20), CancellationToken::new())
            .unwrap(),
    )
    .await;
    assert_eq!(unmatched, None);
}

#[test]
fn rejects_unknown_model_and_bad_sampling() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&tiny_file(&dir), limits());
    let mut r = request("hello", 5);
    r.model = "other".into();
    assert!(
        matches!(e.submit(r, CancellationToken::new()), Err(EngineError::InvalidArgument(m)) if m.contains("model"))
    );
    let mut r = request("hello", 5);
    r.sampling.top_p = Some(1.5);
    assert!(
        matches!(e.submit(r, CancellationToken::new()), Err(EngineError::InvalidArgument(m)) if m.contains("top_p"))
    );
}

#[test]
fn a_fresh_engine_advertises_a_measured_prefill_rate() {
    // Routers compare workers by this rate: one that has not served yet must report a
    // measurement too (from its warm-up), not "unknown", which a router fills with a guess.
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&tiny_file(&dir), limits());
    let load = e.load();
    assert!(
        load.prefill_tokens_per_s.is_finite() && load.prefill_tokens_per_s > 0.0,
        "{load:?}"
    );
    // And how it prefills: one chunk per step, which routers count steps by.
    assert_eq!(
        load.prefill_chunk_tokens,
        Some(limits().prefill_chunk as u32),
        "{load:?}"
    );
}

#[tokio::test]
async fn latency_critical_work_jumps_the_queue_and_load_reports_prefill() {
    let dir = tempfile::tempdir().unwrap();
    let one_at_a_time = SchedulerLimits {
        max_seqs: 1,
        ..limits()
    };
    let e = engine(&tiny_file(&dir), one_at_a_time);
    let c1 = CancellationToken::new();
    let mut first = e.submit(request("hi there", 200), c1.clone()).unwrap();
    assert!(matches!(
        first.recv().await.unwrap().unwrap(),
        EngineEvent::Token { .. }
    ));
    // Its prompt was prefilled and measured.
    assert!(e.load().prefill_tokens_per_s > 0.0, "{:?}", e.load());
    // Two wait behind it: a cost-sensitive one, then a latency-critical one.
    let cheap = e
        .submit(request("cheap work", 200), CancellationToken::new())
        .unwrap();
    let urgent = EngineRequest {
        latency_critical: true,
        min_tokens_per_s: 0.0,
        ..request("urgent work", 200)
    };
    let urgent = e.submit(urgent, CancellationToken::new()).unwrap();
    assert!(wait_until(|| e.load().queued == 2).await, "{:?}", e.load());
    let urgent_tokens = e
        .prompt_ids(&Prompt::Text("urgent work".into()))
        .unwrap()
        .len() as u64;
    let expected = e
        .prompt_ids(&Prompt::Text("cheap work".into()))
        .unwrap()
        .len() as u64
        + urgent_tokens;
    // (`queued` counts a request at submit; its prompt once the scheduler took it in.) The
    // latency-critical prompt is also reported apart: it waits only behind its own lane.
    assert!(
        wait_until(|| {
            let load = e.load();
            load.queued_prompt_tokens == expected
                && load.queued_latency_critical_prompt_tokens == Some(urgent_tokens)
        })
        .await,
        "expected {expected} ({urgent_tokens} latency-critical): {:?}",
        e.load()
    );
    // The running one ends: the latency-critical request is taken in first although it came
    // later. Neither stream is read yet, and a sequence whose reader lags pauses once its
    // event buffer is full, so whichever is taken in holds the only slot until it is read:
    // the state below lasts, however late this task looks.
    c1.cancel();
    let cheap_tokens = expected - urgent_tokens;
    assert!(
        wait_until(|| {
            let load = e.load();
            load.queued_prompt_tokens == cheap_tokens
                && load.queued_latency_critical_prompt_tokens == Some(0)
        })
        .await,
        "the latency-critical request should run while the cheap one waits: {:?}",
        e.load()
    );
    let mut cheap = cheap;
    tokio::select! {
        biased;
        event = cheap.recv() => panic!("the cheap request must still wait, got {event:?}"),
        () = std::future::ready(()) => {}
    }
    let (_, _, _, urgent_completion) = collect(urgent).await;
    assert!(urgent_completion > 0);
    let (_, _, _, cheap_completion) = collect(cheap).await;
    assert!(cheap_completion > 0);
    assert!(
        wait_until(|| {
            let load = e.load();
            load.queued_prompt_tokens == 0 && load.queued_latency_critical_prompt_tokens == Some(0)
        })
        .await
    );
}

/// A request for the prompt `ids` (as a router sends them, already tokenized).
fn ids_request(name: &str, ids: Vec<u32>, max_tokens: u32) -> EngineRequest {
    EngineRequest {
        prompt_ids: Some(ids),
        tools: Default::default(),
        ..request(name, max_tokens)
    }
}

/// Ids and `Done.cached_prompt_tokens` of one generation.
async fn run_ids(e: &CandleEngine, name: &str, ids: Vec<u32>, max_tokens: u32) -> (Vec<u32>, u32) {
    let mut rx = e
        .submit(ids_request(name, ids, max_tokens), CancellationToken::new())
        .unwrap();
    let mut out = vec![];
    while let Some(ev) = rx.recv().await {
        match ev.unwrap() {
            EngineEvent::Token { id, .. } => out.push(id),
            EngineEvent::ToolCall(call) => panic!("no tools were offered: {call:?}"),
            EngineEvent::StopSequence(_)
            | EngineEvent::PromptLogprobs(_)
            | EngineEvent::Embedding(_) => {}
            EngineEvent::Done {
                cached_prompt_tokens,
                ..
            } => return (out, cached_prompt_tokens),
        }
    }
    panic!("stream ended without Done");
}

fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32).map(|i| 3 + (i * 31 + seed) % 240).collect()
}

#[tokio::test]
async fn a_second_turn_reuses_the_first_turns_blocks_and_generates_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_file(&dir);
    let cached = engine(&path, limits());
    let plain = engine(
        &path,
        SchedulerLimits {
            prefix_cache: false,
            ..limits()
        },
    );
    assert!(plain.prefix_cache().is_none(), "off: nothing is published");
    let publisher = cached.prefix_cache().expect("on: blocks are published");
    let (_, mut events) = publisher.subscribe();

    let turn1 = prompt(75, 1);
    let (reply, hit) = run_ids(&cached, "t1", turn1.clone(), 20).await;
    assert_eq!(hit, 0, "nothing cached yet");
    assert_eq!(run_ids(&plain, "t1", turn1.clone(), 20).await.0, reply);
    // Turn 2 resends turn 1, the reply and a new message.
    let mut turn2 = turn1.clone();
    turn2.extend(&reply);
    turn2.extend(prompt(30, 9));
    let (on, hit) = run_ids(&cached, "t2", turn2.clone(), 20).await;
    let (off, none) = run_ids(&plain, "t2", turn2.clone(), 20).await;
    assert_eq!(none, 0);
    assert_eq!(on, off, "cached and recomputed prefixes generate the same");
    // Every full block of turn 1's prompt and reply (less the reply's last id, which was
    // sampled but never run through the model) is reused.
    let reusable = (turn1.len() + reply.len() - 1) / BLOCK * BLOCK;
    assert_eq!(
        hit as usize,
        reusable.min((turn2.len() - 1) / BLOCK * BLOCK)
    );
    assert!(hit >= 64, "{hit}");

    let stats = cached.prefix_cache_stats().unwrap();
    assert_eq!(stats.lookups, 2);
    assert_eq!(stats.hit_tokens, u64::from(hit));
    assert_eq!(stats.block_tokens as usize, BLOCK);
    assert!(stats.cached_blocks > 0);
    // What was published names exactly the blocks a router computes from the same ids.
    let mut stored = std::collections::HashSet::new();
    while let Ok(batch) = events.try_recv() {
        stored.extend(batch.stored);
    }
    let names = switchyard_proto::kv_blocks::block_hashes(&turn2, BLOCK);
    assert!(names.len() >= 3);
    for (i, name) in names.iter().take(hit as usize / BLOCK).enumerate() {
        assert!(
            stored.contains(name),
            "block {i} of turn 2 was not published"
        );
    }
}

#[tokio::test]
async fn eviction_under_pressure_keeps_every_request_whole() {
    let dir = tempfile::tempdir().unwrap();
    // Eight blocks: room for two 100-token sequences, nowhere near every prompt below.
    let per_block = 2 * 2 * 2 * 16 * 4 * BLOCK as u64;
    let e = engine(
        &tiny_file(&dir),
        SchedulerLimits {
            kv_budget_bytes: per_block * 8,
            ..limits()
        },
    );
    let prompts: Vec<Vec<u32>> = (0..6).map(|s| prompt(90, s * 7 + 1)).collect();
    let mut first = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        first.push(run_ids(&e, &format!("a{i}"), p.clone(), 8).await.0);
    }
    let stats = e.prefix_cache_stats().unwrap();
    assert!(stats.evictions > 0, "{stats:?}");
    assert!(stats.cached_blocks + stats.free_blocks <= 8);
    // Requests at once beyond what fits wait for room; none fails; outputs are unchanged
    // whether their prefix survived in the cache or not.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (i, p) in prompts.iter().enumerate() {
        let rx_i = e
            .submit(
                ids_request(&format!("b{i}"), p.clone(), 8),
                CancellationToken::new(),
            )
            .unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            let (ids, _, _, _) = collect(rx_i).await;
            tx.send((i, ids)).unwrap();
        });
    }
    drop(tx);
    let mut seen = 0;
    while let Some((i, ids)) = rx.recv().await {
        assert_eq!(ids, first[i], "prompt {i}");
        seen += 1;
    }
    assert_eq!(seen, prompts.len());
    assert_eq!(e.active(), 0);
    let stats = e.prefix_cache_stats().unwrap();
    assert_eq!(stats.active_blocks, 0, "every block released: {stats:?}");
}

/// The GPU path keeps blocks as device tensors and attends with candle ops; on the CPU the same
/// code runs over CPU tensors, so it is checked here against the host kernels, including a
/// sequence whose first blocks are another's cached prefix.
#[test]
fn device_block_store_agrees_with_host_blocks_and_shares_a_prefix() {
    use switchyard_worker_gpu::model::KvMemory;
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = load(&tiny_file(&dir), Repack::Q8_0);
    let model = model.with_dense_from_rows(usize::MAX);
    let ids = prompt(80, 5);
    let mut last = Vec::new();
    for memory in [KvMemory::Host, KvMemory::Device] {
        let mut store = model.kv_store_in(8, memory);
        // Whole prompt in sequence A (blocks 0..3).
        let mut a = SeqCache::new(vec![0, 1, 2, 3], 0);
        let whole = logits_rows(&model.prefill(&ids, &mut a, &mut store).unwrap()).unwrap();
        // Sequence B starts from A's first two blocks (64 cached tokens) and computes the rest
        // in its own blocks.
        let mut b = SeqCache::new(vec![0, 1, 5, 6], 2 * BLOCK);
        let suffix = logits_rows(
            &model
                .prefill(&ids[2 * BLOCK..], &mut b, &mut store)
                .unwrap(),
        )
        .unwrap();
        assert!(max_abs_diff(&whole[0], &suffix[0]) < 1e-3, "{memory:?}");
        // Both decode a step together.
        let next = argmax(&whole[0]);
        let rows = logits_rows(
            &model
                .decode(&[next, next], &mut [&mut a, &mut b], &mut store)
                .unwrap(),
        )
        .unwrap();
        assert!(max_abs_diff(&rows[0], &rows[1]) < 1e-3, "{memory:?}");
        last.push(rows[0].clone());
    }
    assert!(
        max_abs_diff(&last[0], &last[1]) < 1e-3,
        "host and device paths differ"
    );
}

/// While a sequence whose lane promises a decode rate decodes, the engine cuts its prefill
/// chunk to keep that rate and reports the chunk in force (routers count a prompt's steps by
/// it); without such a sequence it reports `--prefill-chunk` again.
#[tokio::test]
async fn a_promised_decode_rate_cuts_the_reported_prefill_chunk_while_it_decodes() {
    let dir = tempfile::tempdir().unwrap();
    let wide = SchedulerLimits {
        prefill_chunk: 256,
        step_target: None,
        ..limits()
    };
    let e = engine(&tiny_file(&dir), wide);
    assert_eq!(e.load().prefill_chunk_tokens, Some(256));
    // A rate no step can keep: the chunk falls to its floor.
    let promised = EngineRequest {
        min_tokens_per_s: 1e6,
        ..request("keep pace", 200)
    };
    let cancel = CancellationToken::new();
    let mut stream = e.submit(promised, cancel.clone()).unwrap();
    // Three tokens: the iteration that decoded the second has published its load. The stream
    // is not read further, so it stays (paused) among the decoding sequences.
    for _ in 0..3 {
        assert!(matches!(
            stream.recv().await,
            Some(Ok(EngineEvent::Token { .. }))
        ));
    }
    assert_eq!(
        e.load().prefill_chunk_tokens,
        Some(switchyard_worker_gpu::pacing::MIN_PACED_CHUNK as u32)
    );

    cancel.cancel();
    drop(stream);
    // A later request without a promise ends after the cancelled one was retired and the
    // load published without it.
    let (_, _, reason, _) = collect(
        e.submit(request("after", 2), CancellationToken::new())
            .unwrap(),
    )
    .await;
    assert_eq!(reason, StopReason::Length);
    assert_eq!(e.load().prefill_chunk_tokens, Some(256));
}

/// A step target cuts the chunk to what the measured prefill rate gets done in it, with or
/// without sequences decoding, and the engine reports that chunk.
#[tokio::test]
async fn a_step_target_cuts_the_prefill_chunk_to_what_fits_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_file(&dir);
    let wide = SchedulerLimits {
        prefill_chunk: 256,
        ..limits()
    };
    let untargeted = engine(&path, wide.clone());
    assert_eq!(untargeted.load().prefill_chunk_tokens, Some(256));
    // No prefill fits in a nanosecond: the chunk falls to its floor, one KV block.
    let targeted = engine(
        &path,
        SchedulerLimits {
            step_target: Some(Duration::from_nanos(1)),
            ..wide.clone()
        },
    );
    let floor = Some(switchyard_worker_gpu::pacing::MIN_PACED_CHUNK as u32);
    assert_eq!(targeted.load().prefill_chunk_tokens, floor);
    // Prompts still prefill (in floor-sized chunks) and generate as without the target.
    let prompt = "the keeper wrote each wave down; ".repeat(4);
    let cut = collect(
        targeted
            .submit(request(&prompt, 4), CancellationToken::new())
            .unwrap(),
    )
    .await;
    let whole = collect(
        untargeted
            .submit(request(&prompt, 4), CancellationToken::new())
            .unwrap(),
    )
    .await;
    assert_eq!(cut.0, whole.0);
    assert_eq!(targeted.load().prefill_chunk_tokens, floor);
    // A day per step: the configured chunk fits.
    let loose = engine(
        &path,
        SchedulerLimits {
            step_target: Some(Duration::from_secs(86_400)),
            ..wide
        },
    );
    assert_eq!(loose.load().prefill_chunk_tokens, Some(256));
}

#[tokio::test]
async fn a_long_text_prompt_is_encoded_by_its_reader_and_generates_as_its_ids_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-long.gguf");
    let spec = TinySpec {
        context_length: 8_192,
        ..TinySpec::default()
    };
    write_tiny_llama(&path, spec).unwrap();
    let e = engine(&path, limits());
    // More text than the engine encodes on the caller's thread.
    let long = "the keeper wrote each wave down; ".repeat(100);
    assert!(long.len() > switchyard_worker_gpu::tokenizer::ENCODE_INLINE_BYTES);
    let ids = e.prompt_ids(&Prompt::Text(long.clone())).unwrap();
    let as_text = collect(
        e.submit(request(&long, 6), CancellationToken::new())
            .unwrap(),
    )
    .await;
    let mut by_ids = request(&long, 6);
    by_ids.prompt_ids = Some(ids);
    let as_ids = collect(e.submit(by_ids, CancellationToken::new()).unwrap()).await;
    assert_eq!(as_text.0, as_ids.0);
    assert!(!as_text.0.is_empty());

    // Refused once encoded: the refusal is the stream's one event, not `submit`'s answer.
    let too_long = "the keeper wrote each wave down; ".repeat(1_000);
    let mut refused = e
        .submit(request(&too_long, 6), CancellationToken::new())
        .unwrap();
    let first = refused.recv().await;
    assert!(
        matches!(&first, Some(Err(EngineError::ExceedsContext { field, detail }))
            if field == "prompt" && detail.contains("context length is 8192")),
        "{first:?}"
    );
    assert!(refused.recv().await.is_none());
    assert_eq!(e.load().queued, 0);
}

/// `--max-model-len` cuts the context an engine publishes (and enforces) below the model's
/// own; a figure above the model's is refused with the model's length named.
#[test]
fn max_model_len_caps_the_published_context() {
    let dir = tempfile::tempdir().unwrap();
    let args = |max_model_len| switchyard_worker_gpu::GpuEngineArgs {
        engine: switchyard_worker_gpu::GpuEngineKind::Candle,
        model_path: tiny_file(&dir),
        device: switchyard_worker_gpu::DeviceChoice::Cpu,
        max_model_len,
        ..Default::default()
    };
    let context = |engine: &CandleEngine| {
        // What the engine publishes to routers (the trait's), not its inherent figure.
        let model = engine.models()[0].clone();
        Engine::context_length(engine, &model)
    };
    let own = switchyard_worker_gpu::build_candle(&args(0)).unwrap();
    assert_eq!(context(&own), Some(256));
    let capped = switchyard_worker_gpu::build_candle(&args(100)).unwrap();
    assert_eq!(context(&capped), Some(100));
    let Err(error) = switchyard_worker_gpu::build_candle(&args(300)) else {
        panic!("a --max-model-len above the model's context was accepted");
    };
    assert!(
        error.to_string().contains("context length of 256"),
        "{error}"
    );
}

/// An idle worker's `/metrics` reads these counters: before its first request they must
/// already say how many KV blocks are free (they read 0 free blocks until a request came,
/// which looks like a full cache).
#[test]
fn a_fresh_engine_reports_its_kv_blocks_free() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&tiny_file(&dir), limits());
    let stats = e.prefix_cache_stats().unwrap();
    assert!(stats.free_blocks > 0, "{stats:?}");
    assert_eq!(
        (stats.active_blocks, stats.cached_blocks),
        (0, 0),
        "{stats:?}"
    );
}

/// Operator mistakes the engine cannot run with are refused before it starts, naming the flag
/// and what to do, rather than failing in its warm-up or under a configuration field's name.
#[test]
fn unusable_flags_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_file(&dir);
    let args = || switchyard_worker_gpu::GpuEngineArgs {
        engine: switchyard_worker_gpu::GpuEngineKind::Candle,
        model_path: path.clone(),
        device: switchyard_worker_gpu::DeviceChoice::Cpu,
        ..Default::default()
    };
    let refused =
        |args: switchyard_worker_gpu::GpuEngineArgs| match switchyard_worker_gpu::build_candle(
            &args,
        ) {
            Ok(_) => panic!("{args:?} was accepted"),
            Err(error) => error.to_string(),
        };
    // No room for a prompt token and a generated one.
    let error = refused(switchyard_worker_gpu::GpuEngineArgs {
        max_model_len: 1,
        ..args()
    });
    assert!(
        error.contains("--max-model-len 1: must be at least 2"),
        "{error}"
    );
    let error = refused(switchyard_worker_gpu::GpuEngineArgs {
        kv_budget_bytes: 1000,
        ..args()
    });
    assert!(
        error.starts_with("invalid engine options: --kv-budget-bytes 1000: less than one KV block"),
        "{error}"
    );
    // More KV than the host has memory: it aborted on an allocation of the block table, and a
    // budget merely above the host's memory was taken and killed the worker under load.
    let error = refused(switchyard_worker_gpu::GpuEngineArgs {
        kv_budget_bytes: u64::MAX,
        ..args()
    });
    assert!(
        error.starts_with(&format!(
            "invalid engine options: --kv-budget-bytes {}: more than",
            u64::MAX
        )),
        "{error}"
    );
    // Every request passes the queue on its way to the scheduler: with no room in it, an idle
    // worker registered as ready and shed every request.
    let error = refused(switchyard_worker_gpu::GpuEngineArgs {
        max_queue: 0,
        ..args()
    });
    assert!(
        error.contains("--max-queue 0: must be at least 1"),
        "{error}"
    );
    // No client can ask for a model named "": a worker serving only that served nothing.
    for models in [vec![String::new()], vec!["a".into(), String::new()]] {
        let error = refused(switchyard_worker_gpu::GpuEngineArgs {
            models: models.clone(),
            ..args()
        });
        assert!(
            error.contains("--model: an empty model name"),
            "{models:?}: {error}"
        );
    }
    // A file cut short in its tensor data (an interrupted download) names the file.
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 1]).unwrap();
    let error = refused(switchyard_worker_gpu::GpuEngineArgs {
        model_path: cut.clone(),
        ..args()
    });
    assert!(
        error.contains(&format!("model file {}: tensor `", cut.display())),
        "{error}"
    );
    // A directory is not "no such file".
    let error = refused(switchyard_worker_gpu::GpuEngineArgs {
        model_path: dir.path().to_path_buf(),
        ..args()
    });
    assert!(error.contains("is a directory, not a GGUF file"), "{error}");
}

/// A GPU's budget on the CPU it fell back to (`--device auto` or `cuda` without a usable GPU,
/// as the GPU overlay's pods on a node without one): the documented fallback keeps serving,
/// its KV cut to the memory left beside the weights, instead of aborting or being refused.
#[test]
fn a_fallback_to_the_cpu_cuts_a_budget_beyond_memory_to_what_is_left() {
    let Some(limit) = switchyard_worker_gpu::device::memory_limit_bytes() else {
        println!("SKIPPED: this host's memory cannot be read");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_file(&dir);
    let block_bytes = load(&path, Repack::Q8_0).0.kv_bytes_per_block();
    let engine = switchyard_worker_gpu::build_candle(&switchyard_worker_gpu::GpuEngineArgs {
        engine: switchyard_worker_gpu::GpuEngineKind::Candle,
        model_path: path,
        device: switchyard_worker_gpu::DeviceChoice::Auto,
        kv_budget_bytes: u64::MAX,
        ..Default::default()
    })
    .unwrap();
    let stats = engine.prefix_cache_stats().unwrap();
    let budget = stats.free_blocks as u64 * block_bytes;
    assert!(budget > 0 && budget <= limit, "{budget} of {limit}");
}

/// A KV budget that holds fewer tokens than the model's context caps the context the engine
/// publishes, so routers refuse (or bound) a request it could never hold before placing it,
/// instead of placing it and the worker refusing it with a message about its budget; an
/// explicit `--max-model-len` beyond what the budget holds is a contradiction, refused naming
/// both flags.
#[test]
fn a_kv_budget_below_the_context_caps_the_published_context() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_file(&dir);
    let block_bytes = load(&path, Repack::Q8_0).0.kv_bytes_per_block();
    let args = |max_model_len| switchyard_worker_gpu::GpuEngineArgs {
        engine: switchyard_worker_gpu::GpuEngineKind::Candle,
        model_path: path.clone(),
        device: switchyard_worker_gpu::DeviceChoice::Cpu,
        // Four blocks and a half: 128 tokens of the tiny model's 256.
        kv_budget_bytes: 4 * block_bytes + block_bytes / 2,
        max_model_len,
        ..Default::default()
    };
    let engine = switchyard_worker_gpu::build_candle(&args(0)).unwrap();
    let model = engine.models()[0].clone();
    assert_eq!(
        Engine::context_length(&engine, &model),
        Some(4 * BLOCK as u32)
    );
    let within = switchyard_worker_gpu::build_candle(&args(100)).unwrap();
    assert_eq!(Engine::context_length(&within, &model), Some(100));
    let Err(error) = switchyard_worker_gpu::build_candle(&args(200)) else {
        panic!("--max-model-len beyond what --kv-budget-bytes holds was accepted");
    };
    let error = error.to_string();
    assert!(
        error.contains("--max-model-len 200")
            && error.contains("--kv-budget-bytes")
            && error.contains("128 tokens"),
        "{error}"
    );
}

/// A scored generation's events: the prompt's scores, the first token's log probabilities
/// and `Done.cached_prompt_tokens`.
async fn scored(
    e: &CandleEngine,
    name: &str,
    ids: Vec<u32>,
    top: u32,
) -> (Vec<v1::TokenLogprobs>, Option<v1::TokenLogprobs>, u32) {
    let mut request = ids_request(name, ids, 1);
    request.sampling.prompt_logprobs = Some(top);
    request.sampling.logprobs = Some(top);
    let mut rx = e.submit(request, CancellationToken::new()).unwrap();
    let (mut prompt, mut first) = (Vec::new(), None);
    while let Some(ev) = rx.recv().await {
        match ev.unwrap() {
            EngineEvent::PromptLogprobs(entries) => {
                assert!(first.is_none(), "the scores come before the first token");
                prompt = entries;
            }
            EngineEvent::Token { logprobs, .. } => first = logprobs.map(|l| *l),
            EngineEvent::Done {
                cached_prompt_tokens,
                ..
            } => return (prompt, first, cached_prompt_tokens),
            EngineEvent::ToolCall(_) | EngineEvent::StopSequence(_) | EngineEvent::Embedding(_) => {
            }
        }
    }
    panic!("stream ended without Done");
}

/// Two score lists agree: the same tokens, log probabilities within float noise (prefills of
/// other shapes sum in another order).
fn assert_same_scores(a: &v1::TokenLogprobs, b: &v1::TokenLogprobs, what: &str) {
    let pairs = |l: &v1::TokenLogprobs| -> Vec<(u32, f32)> {
        l.chosen
            .iter()
            .chain(&l.top)
            .map(|t| (t.token_id, t.logprob))
            .collect()
    };
    let (a, b) = (pairs(a), pairs(b));
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for ((ida, la), (idb, lb)) in a.iter().zip(&b) {
        assert!(
            ida == idb && (la - lb).abs() < 1e-3,
            "{what}: {a:?} vs {b:?}"
        );
    }
}

/// A scored prompt (`prompt_logprobs`): one entry per prompt token, the first naming it with
/// nothing to predict it, every later one the model's log probability of that token after the
/// ones before it, with the most likely tokens there — what generating from the shorter prompt
/// reports for its first token. Computed whole however the prompt is chunked, and never from
/// the prefix cache, which keeps no logits.
#[tokio::test]
async fn a_scored_prompt_gives_every_prompt_tokens_log_probability() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_file(&dir);
    let ids = prompt(40, 7);
    let e = engine(&file, limits());
    // Cache the prompt's blocks first: the scored run must not start from them.
    run_ids(&e, "warm", ids.clone(), 1).await;
    let (_, cached) = run_ids(&e, "warm-again", ids.clone(), 1).await;
    assert!(cached > 0, "the prompt is in the prefix cache");
    let (entries, first, cached) = scored(&e, "scored", ids.clone(), 3).await;
    assert_eq!(cached, 0, "computed whole");
    assert_eq!(entries.len(), ids.len());
    let first_entry = entries[0].chosen.clone().expect("named");
    assert_eq!((first_entry.token_id, first_entry.logprob), (ids[0], 0.0));
    assert!(entries[0].top.is_empty());
    for (entry, id) in entries.iter().zip(&ids).skip(1) {
        let chosen = entry.chosen.clone().expect("chosen");
        assert_eq!(chosen.token_id, *id);
        assert!(chosen.logprob < 0.0 && entry.top.len() == 3, "{entry:?}");
        assert!(entry.top[0].logprob >= chosen.logprob, "{entry:?}");
    }
    assert!(first.is_some(), "and the generation goes on after it");

    // Each position scored as generation from the prompt before it sees it.
    for i in [1, 9, 16, 17, 39] {
        let (_, first, _) = scored(&e, &format!("prefix-{i}"), ids[..i].to_vec(), 3).await;
        let mut predicted = first.expect("logprobs");
        // Compare the alternatives: the generated token is the sampler's, not ids[i].
        predicted.chosen = None;
        let mut at = entries[i].clone();
        at.chosen = None;
        assert_same_scores(&at, &predicted, &format!("position {i}"));
    }

    // Another chunking (the default limits cut the prompt at 16), the same scores.
    let whole = engine(
        &file,
        SchedulerLimits {
            prefill_chunk: 512,
            ..limits()
        },
    );
    let (unchunked, _, _) = scored(&whole, "unchunked", ids.clone(), 3).await;
    for (i, (a, b)) in entries.iter().zip(&unchunked).enumerate() {
        assert_same_scores(a, b, &format!("unchunked position {i}"));
    }
}
