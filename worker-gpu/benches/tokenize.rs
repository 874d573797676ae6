//! How long tokenizing a chat prompt takes with SmolLM2's tokenizer (the workers publish it,
//! and the router encodes every request's prompt once with it): the router tokenizes prompts
//! of more than 2 KiB of text on the blocking pool, not on a runtime thread, because longer
//! ones take more than ~0.5 ms. Needs the model file (`scripts/fetch-model.sh`).

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use switchyard_tokenizer::{ChatMessage, GgufTokenizer};
use switchyard_worker_gpu::tokenizer::spec_from_gguf;

/// Source text to tokenize: code and prose, like a coding agent's prompts.
const TEXT: &str = include_str!("../src/scheduler.rs");

fn model_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn prompt(bytes: usize) -> Vec<ChatMessage> {
    let mut content = String::with_capacity(bytes + TEXT.len());
    while content.len() < bytes {
        content.push_str(TEXT);
    }
    let mut end = bytes;
    while !content.is_char_boundary(end) {
        end -= 1;
    }
    content.truncate(end);
    vec![ChatMessage {
        role: "user".into(),
        content,
    }]
}

fn tokenize(c: &mut Criterion) {
    let path = model_path();
    let Ok(mut file) = std::fs::File::open(&path) else {
        eprintln!("{} is missing: run scripts/fetch-model.sh", path.display());
        return;
    };
    let content = gguf_file::Content::read(&mut file).expect("a GGUF file");
    let tokenizer = GgufTokenizer::from_spec(spec_from_gguf(&content).expect("tokenizer metadata"))
        .expect("a byte-level BPE tokenizer");
    let mut group = c.benchmark_group("encode_chat");
    for kib in [2, 4, 40, 400] {
        let messages = prompt(kib * 1024);
        let tokens = tokenizer.encode_chat(&messages).expect("encodes").len();
        eprintln!("{kib} KiB of text: {tokens} tokens");
        group.throughput(Throughput::Elements(tokens as u64));
        if kib >= 400 {
            group.sample_size(10);
        }
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{kib}KiB")),
            &messages,
            |b, m| b.iter(|| black_box(tokenizer.encode_chat(m).expect("encodes"))),
        );
    }
    group.finish();
}

criterion_group!(benches, tokenize);
criterion_main!(benches);
