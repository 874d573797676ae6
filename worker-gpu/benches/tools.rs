//! What tool calling's constrained decoding costs per token: the grammar's allowed-token mask
//! computed and applied to a 49 152-token logits row, then the sampled token consumed
//! (`mask_call_token`: replaying a `get_weather` call; `mask_text_token`: an `auto` answer in
//! plain text). The scheduler thread does this per token per stream of a tool request, beside
//! the decode step (SmolLM2 on this VM: ~8 ms a step for one stream). Once per request, at
//! `submit`: `compile_grammar`; once per model, on its first tool request: `token_trie`.
//! Needs the real model (`scripts/fetch-model.sh`); without it, nothing is measured.

use std::path::PathBuf;

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use switchyard_proto::v1;
use switchyard_worker::engine::Tools;
use switchyard_worker_gpu::gguf::GgufFile;
use switchyard_worker_gpu::tokenizer::GgufTokenizer;
use switchyard_worker_gpu::tools::{Grammars, tool_set};

fn tools(mode: v1::ToolChoiceMode) -> Tools {
    Tools {
        tools: vec![v1::Tool {
            name: "get_weather".into(),
            description: "The current weather in a city".into(),
            parameters_json: r#"{"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}"#.into(),
        }],
        choice: v1::ToolChoice {
            mode: mode as i32,
            ..Default::default()
        },
    }
}

fn bench(c: &mut Criterion) {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        eprintln!("SKIPPED: {} is missing", path.display());
        return;
    }
    let file = GgufFile::open(&path).unwrap();
    let tok = GgufTokenizer::from_gguf(&file.content).unwrap();
    let mut group = c.benchmark_group("tools");
    group.sample_size(10);
    group.bench_function("token_trie", |b| {
        b.iter(|| black_box(Grammars::new(&tok).unwrap()))
    });
    let grammars = Grammars::new(&tok).unwrap();
    let required = tool_set(&tools(v1::ToolChoiceMode::Required)).unwrap();
    let auto = tool_set(&tools(v1::ToolChoiceMode::Auto)).unwrap();
    group.bench_function("compile_grammar", |b| {
        b.iter(|| black_box(grammars.constraint(&tok, &required, "b_", &[]).unwrap()))
    });
    let mut row = vec![0.0f32; tok.vocab_size()];
    for (name, set, answer) in [
        (
            "mask_call_token",
            &required,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>",
        ),
        (
            "mask_text_token",
            &auto,
            "The weather in Paris is mild today, with some clouds in the afternoon and a light breeze from the west.",
        ),
    ] {
        let ids = tok.encode(answer).unwrap();
        group.throughput(Throughput::Elements(ids.len() as u64));
        group.bench_function(name, |b| {
            b.iter_batched(
                || grammars.constraint(&tok, set, "b_", &[]).unwrap(),
                |mut constraint| {
                    for id in &ids {
                        // A fresh row per token, as the model gives.
                        row.fill(0.0);
                        constraint.mask(&mut row).unwrap();
                        assert!(row[*id as usize].is_finite(), "{name}: {id} masked");
                        constraint.consume(*id).unwrap();
                    }
                    constraint
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
