//! The tokenizer a worker publishes (`Worker.GetTokenizer`: its `TokenizerSpec` bytes) rebuilds,
//! wherever it is parsed, exactly the real model's tokenizer: llama.cpp's ids for the pinned
//! strings and the golden prompts, and the same chat-template rendering. Skipped (with a note)
//! when `models/SmolLM2-135M-Instruct.Q4_1.gguf` is absent.

use std::path::PathBuf;

use switchyard_worker_gpu::gguf::GgufFile;
use switchyard_worker_gpu::tokenizer::{
    ChatMessage, GgufTokenizer, SPEC_FORMAT, TokenizerSpec, spec_from_gguf,
};

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

#[derive(serde::Deserialize)]
struct Golden {
    cases: Vec<Case>,
}
#[derive(serde::Deserialize)]
struct Case {
    prompt: String,
    prompt_ids: Vec<u32>,
}

#[test]
fn the_published_spec_rebuilds_the_same_tokenizer() {
    let Some(path) = model_path() else { return };
    let file = GgufFile::open(&path).unwrap();
    let local = GgufTokenizer::from_gguf(&file.content).unwrap();
    assert_eq!(&spec_from_gguf(&file.content).unwrap(), local.spec());

    let bytes = local.spec().to_bytes();
    eprintln!("{SPEC_FORMAT} spec: {} bytes", bytes.len());
    let remote =
        switchyard_tokenizer::GgufTokenizer::from_spec(TokenizerSpec::from_bytes(&bytes).unwrap())
            .unwrap();
    assert_eq!(remote.spec(), local.spec());
    assert_eq!(remote.vocab_size(), local.vocab_size());
    assert_eq!(remote.stop_ids(), local.stop_ids());

    // llama.cpp's ids.
    assert_eq!(
        remote.encode("Hello, world!").unwrap(),
        [19556, 28, 905, 17]
    );
    assert_eq!(
        remote.encode("12345 apples").unwrap(),
        [33, 34, 35, 36, 37, 13855]
    );
    assert_eq!(
        remote.encode("<|im_start|>user\nhi<|im_end|>").unwrap(),
        [1, 4093, 198, 6004, 2]
    );
    let fixture: Golden = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden_smollm2.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for case in &fixture.cases {
        assert_eq!(remote.encode(&case.prompt).unwrap(), case.prompt_ids);
    }
    let text = "naïve café — 日本語 🚀 done";
    assert_eq!(remote.encode(text).unwrap(), local.encode(text).unwrap());
    assert_eq!(remote.decode(&remote.encode(text).unwrap()), text);

    // A chat renders and encodes as the engine does it (template, then encode).
    let chat = [
        ChatMessage {
            role: "system".into(),
            content: "Answer briefly.".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        },
    ];
    let rendered = local.render_chat(&chat).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(remote.render_chat(&chat).unwrap(), rendered);
    assert_eq!(
        remote.encode_chat(&chat).unwrap(),
        local.encode(&rendered).unwrap()
    );
}
