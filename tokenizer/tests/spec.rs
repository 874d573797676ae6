//! A tokenizer built from a small byte-level BPE spec: what it encodes, and that the spec's wire
//! form rebuilds exactly the same tokenizer. (The real model's vocabulary is checked against
//! llama.cpp's ids in worker-gpu's real-model tests.)

use switchyard_tokenizer::{
    ChatMessage, Detokenizer, GgufTokenizer, TokenizerError, TokenizerSpec,
};

/// GPT-2's byte-level alphabet in byte order: the vocabulary's first 256 tokens.
fn byte_alphabet() -> Vec<String> {
    let printable = |b: u32| {
        (u32::from(b'!')..=u32::from(b'~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).unwrap().to_string()
        })
        .collect()
}

const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

fn spec() -> TokenizerSpec {
    let merges = [
        "H e", "l l", "ll o", "He llo", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld",
    ];
    let mut tokens = byte_alphabet();
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push("<|im_start|>".into());
    tokens.push("<|im_end|>".into());
    let mut token_types = vec![1; tokens.len()];
    let n = token_types.len();
    token_types[n - 2] = 3;
    token_types[n - 1] = 3;
    TokenizerSpec {
        model: "gpt2".into(),
        tokens,
        token_types,
        merges: merges.iter().map(|m| m.to_string()).collect(),
        pre: Some("smollm".into()),
        add_space_prefix: false,
        add_bos: false,
        bos_id: Some(n as u32 - 2),
        eos_id: Some(n as u32 - 1),
        eot_id: None,
        chat_template: Some(CHATML.into()),
    }
}

fn id(spec: &TokenizerSpec, token: &str) -> u32 {
    spec.tokens.iter().position(|t| t == token).unwrap() as u32
}

#[test]
fn merges_specials_and_digits_tokenize_like_llama_cpp_would() {
    let spec = spec();
    let tok = GgufTokenizer::from_spec(spec.clone()).unwrap();
    assert_eq!(
        tok.encode("Hello world").unwrap(),
        [id(&spec, "Hello"), id(&spec, "Ġworld")]
    );
    // Control tokens are one id each; `smollm` splits digits one by one.
    assert_eq!(
        tok.encode("<|im_start|>12<|im_end|>").unwrap(),
        [
            id(&spec, "<|im_start|>"),
            id(&spec, "1"),
            id(&spec, "2"),
            id(&spec, "<|im_end|>")
        ]
    );
    assert!(tok.stop_ids().contains(&id(&spec, "<|im_end|>")));
    // Control tokens render as nothing; a split multi-byte character streams whole.
    let ids = tok.encode("<|im_start|>Hello €").unwrap();
    assert_eq!(tok.decode(&ids), "Hello €");
    let mut d = Detokenizer::default();
    let streamed: String = ids.iter().map(|i| d.push(&tok, *i)).collect();
    assert_eq!(streamed + &d.finish(), "Hello €");
}

#[test]
fn the_spec_round_trips_through_its_bytes_to_the_same_ids() {
    let original = GgufTokenizer::from_spec(spec()).unwrap();
    let bytes = original.spec().to_bytes();
    let parsed = TokenizerSpec::from_bytes(&bytes).unwrap();
    assert_eq!(&parsed, original.spec());
    let rebuilt = GgufTokenizer::from_spec(parsed).unwrap();
    for text in [
        "Hello world",
        "Hello, world! 12345 apples",
        "<|im_start|>user\nhi<|im_end|>",
        "naïve café — 日本語 🚀",
    ] {
        assert_eq!(
            rebuilt.encode(text).unwrap(),
            original.encode(text).unwrap(),
            "{text:?}"
        );
    }
    let chat = [
        ChatMessage {
            role: "system".into(),
            content: "be brief".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: "Hello world".into(),
        },
    ];
    let rendered = original.render_chat(&chat).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(rebuilt.render_chat(&chat).unwrap(), rendered);
    assert_eq!(
        rebuilt.encode_chat(&chat).unwrap(),
        original.encode(&rendered).unwrap()
    );
}

#[test]
fn bos_is_prepended_when_the_model_asks_for_it() {
    let mut spec = spec();
    spec.add_bos = true;
    let bos = spec.bos_id.unwrap();
    let tok = GgufTokenizer::from_spec(spec).unwrap();
    assert_eq!(tok.encode("Hello").unwrap()[0], bos);
}

#[test]
fn without_a_template_chats_render_as_a_transcript() {
    let mut spec = spec();
    spec.chat_template = None;
    let tok = GgufTokenizer::from_spec(spec).unwrap();
    let chat = [ChatMessage {
        role: "user".into(),
        content: "hi".into(),
    }];
    assert_eq!(tok.render_chat(&chat).unwrap(), "user: hi\nassistant:");
}

#[test]
fn a_broken_template_fails_chats_but_not_the_tokenizer() {
    let mut spec = spec();
    spec.chat_template = Some("{% for m in messages %}".into());
    let tok = GgufTokenizer::from_spec(spec).unwrap();
    assert!(!tok.encode("Hello").unwrap().is_empty());
    let error = tok.encode_chat(&[]).unwrap_err();
    assert!(matches!(error, TokenizerError::Template(_)), "{error}");
}

#[test]
fn unusable_specs_are_refused_with_the_reason() {
    let refused = |change: fn(&mut TokenizerSpec)| {
        let mut spec = spec();
        change(&mut spec);
        GgufTokenizer::from_spec(spec).unwrap_err().to_string()
    };
    assert!(refused(|s| s.model = "llama".into()).contains("`llama` is not supported"));
    assert!(
        refused(|s| {
            s.token_types.pop();
        })
        .contains("tokenizer.ggml.token_type")
    );
    assert!(refused(|s| s.add_space_prefix = true).contains("add_space_prefix"));
    assert!(refused(|s| s.merges.push("nospace".into())).contains("entry `nospace`"));

    let error = TokenizerSpec::from_bytes(b"{\"model\":\"gpt2\"}").unwrap_err();
    assert!(error.to_string().contains("switchyard-bpe-v1"), "{error}");
    // A field this version does not know could change the ids: refused, not ignored.
    let mut value: serde_json::Value = serde_json::from_slice(&spec().to_bytes()).unwrap();
    value["normalizer"] = "nfc".into();
    let error = TokenizerSpec::from_bytes(&serde_json::to_vec(&value).unwrap()).unwrap_err();
    assert!(error.to_string().contains("normalizer"), "{error}");
}
