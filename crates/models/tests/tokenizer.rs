//! GGUF tokenizers against llama.cpp (the golden ids written by
//! `scripts/tokenizer-golden.sh`), decoding, streaming, end-of-generation
//! tokens and chat templates, on SmolLM2-135M and Gemma-3-270M.
//!
//! The models come from `scripts/fetch-model.sh all`; without them these
//! tests fail, naming the script.

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use models::{ChatTemplate, Error, Message, Tokenizer, TokenizerModel};

const MODELS: [&str; 2] = ["smollm2-135m", "gemma3-270m"];

fn tokenizer(name: &str) -> &'static Tokenizer {
    static CELLS: [OnceLock<Tokenizer>; 2] = [OnceLock::new(), OnceLock::new()];
    let i = MODELS
        .iter()
        .position(|m| *m == name)
        .expect("a known model");
    CELLS[i].get_or_init(|| {
        let path = models::gguf_path(name).unwrap_or_else(|e| panic!("{e}"));
        Tokenizer::from_gguf_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
}

/// One id list per text.
type IdsPerText = Vec<Vec<u32>>;

struct Golden {
    texts: Vec<String>,
    /// model -> (default ids, --no-bos ids).
    models: HashMap<String, (IdsPerText, IdsPerText)>,
}

fn golden() -> &'static Golden {
    static G: OnceLock<Golden> = OnceLock::new();
    G.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/tokenizer_golden.json"
        );
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("{path}: {e}; write it with scripts/tokenizer-golden.sh"));
        let v: serde_json::Value = serde_json::from_str(&text).expect("golden JSON parses");
        let texts: Vec<String> = serde_json::from_value(v["texts"].clone()).expect("texts");
        let mut models = HashMap::new();
        for name in MODELS {
            let m = &v["models"][name];
            let d: Vec<Vec<u32>> =
                serde_json::from_value(m["default"].clone()).expect("default ids");
            let n: Vec<Vec<u32>> = serde_json::from_value(m["no_bos"].clone()).expect("no_bos ids");
            assert_eq!(d.len(), texts.len());
            assert_eq!(n.len(), texts.len());
            models.insert(name.to_string(), (d, n));
        }
        Golden { texts, models }
    })
}

fn check_golden(name: &str) {
    let tok = tokenizer(name);
    let g = golden();
    assert_eq!(g.texts.len(), 200);
    let (default, no_bos) = &g.models[name];
    let mut bad = Vec::new();
    for (i, text) in g.texts.iter().enumerate() {
        let ours = tok.encode(text, tok.add_bos(), true).unwrap();
        if ours != default[i] {
            bad.push(format!(
                "#{i} {text:?} (default)\n  ours   {ours:?}\n  llama  {:?}",
                default[i]
            ));
        }
        let ours = tok.encode(text, false, true).unwrap();
        if ours != no_bos[i] {
            bad.push(format!(
                "#{i} {text:?} (--no-bos)\n  ours   {ours:?}\n  llama  {:?}",
                no_bos[i]
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{name}: {} of {} encodings differ from llama-tokenize:\n{}",
        bad.len(),
        2 * g.texts.len(),
        bad.iter().take(12).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn smollm2_matches_llama_tokenize_on_200_strings() {
    check_golden("smollm2-135m");
}

#[test]
fn gemma3_matches_llama_tokenize_on_200_strings() {
    check_golden("gemma3-270m");
}

#[test]
fn metadata_of_both_models() {
    let s = tokenizer("smollm2-135m");
    assert_eq!(s.model(), TokenizerModel::Bpe);
    assert_eq!(s.pre_tokenizer(), "smollm");
    assert_eq!(s.vocab_size(), 49_152);
    assert!(!s.add_bos());
    let im_end = s.token_id("<|im_end|>").unwrap();
    let eot = s.token_id("<|endoftext|>").unwrap();
    assert!(s.is_eog(im_end) && s.is_eog(eot));
    assert!(!s.is_eog(s.token_id("<|im_start|>").unwrap()));
    assert!(s.chat_template().is_some());

    let g = tokenizer("gemma3-270m");
    assert_eq!(g.model(), TokenizerModel::SentencePiece);
    assert_eq!(g.vocab_size(), 262_144);
    assert!(g.add_bos());
    assert_eq!(g.bos(), Some(2));
    assert_eq!(g.eos(), Some(1));
    let end_of_turn = g.token_id("<end_of_turn>").unwrap();
    assert!(g.is_eog(end_of_turn) && g.is_eog(1));
    assert_eq!(g.eot(), Some(end_of_turn));
    assert!(g.chat_template().is_none());
}

#[test]
fn decode_inverts_encode_and_streams_at_utf8_boundaries() {
    for name in MODELS {
        let tok = tokenizer(name);
        for text in &golden().texts {
            // Without special-token parsing, every string is plain text.
            let ids = tok.encode(text, false, false).unwrap();
            assert_eq!(&tok.decode(&ids, true).unwrap(), text, "{name}: {ids:?}");
            let mut stream = tok.stream_decoder(true);
            let mut streamed = String::new();
            for &id in &ids {
                streamed.push_str(&stream.push(id).unwrap());
            }
            assert_eq!(stream.pending_bytes(), 0, "{name}: {text:?}");
            streamed.push_str(&stream.finish());
            assert_eq!(&streamed, text, "{name}");
        }
    }
}

#[test]
fn stream_holds_a_split_character_back() {
    // Gemma writes a character missing from its vocabulary as byte tokens.
    let tok = tokenizer("gemma3-270m");
    let ids: Vec<u32> = "é"
        .bytes()
        .map(|b| tok.token_id(&format!("<0x{b:02X}>")).unwrap())
        .collect();
    let mut s = tok.stream_decoder(false);
    assert_eq!(s.push(ids[0]).unwrap(), "");
    assert_eq!(s.pending_bytes(), 1);
    assert_eq!(s.push(ids[1]).unwrap(), "é");
}

#[test]
fn control_tokens_are_text_only_when_parsed_and_shown() {
    let s = tokenizer("smollm2-135m");
    let im_start = s.token_id("<|im_start|>").unwrap();
    let parsed = s.encode("<|im_start|>user", false, true).unwrap();
    assert_eq!(parsed[0], im_start);
    let plain = s.encode("<|im_start|>user", false, false).unwrap();
    assert!(!plain.contains(&im_start) && plain.len() > 3, "{plain:?}");
    assert_eq!(s.decode(&parsed, false).unwrap(), "user");
    assert_eq!(s.decode(&parsed, true).unwrap(), "<|im_start|>user");
}

#[test]
fn ids_out_of_range_are_errors() {
    for name in MODELS {
        let tok = tokenizer(name);
        let n = tok.vocab_size() as u32;
        let e = tok.decode(&[1, n], false).unwrap_err();
        assert!(
            matches!(e, Error::TokenOutOfRange { id, .. } if id == n),
            "{e}"
        );
        assert!(e.to_string().contains(&n.to_string()), "{e}");
        assert!(tok.stream_decoder(false).push(u32::MAX).is_err());
        assert!(tok.token_text(n).is_err());
    }
}

#[test]
fn a_long_text_encodes() {
    // 10k+ tokens: the special-token split and both tokenizers stay linear.
    let text = golden().texts.join(" ").repeat(6);
    for name in MODELS {
        let tok = tokenizer(name);
        let t = std::time::Instant::now();
        let ids = tok.encode(&text, false, true).unwrap();
        eprintln!(
            "{name}: {} tokens from {} bytes in {:?}",
            ids.len(),
            text.len(),
            t.elapsed()
        );
        assert!(ids.len() > 10_000, "{}", ids.len());
    }
}

#[test]
fn smollm2_chat_template_renders_chatml() {
    let t = ChatTemplate::from_tokenizer(tokenizer("smollm2-135m")).unwrap();
    let msgs = [
        Message::new("user", "What is the capital of France?"),
        Message::new("assistant", "Paris."),
        Message::new("user", "And of Italy?"),
    ];
    let s = t.render(&msgs, true).unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
         <|im_start|>assistant\nParis.<|im_end|>\n\
         <|im_start|>user\nAnd of Italy?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // With a system message of its own, no default one is added; without the
    // generation prompt, the text ends after the last turn.
    let s = t
        .render(
            &[
                Message::new("system", "Be brief."),
                Message::new("user", "Hi"),
            ],
            false,
        )
        .unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
    // Messages come from JSON too.
    let m: Vec<Message> = serde_json::from_str(r#"[{"role":"user","content":"Hi"}]"#).unwrap();
    assert_eq!(m[0], Message::new("user", "Hi"));
}

#[test]
fn gemma3_base_has_no_chat_template() {
    let e = ChatTemplate::from_tokenizer(tokenizer("gemma3-270m")).unwrap_err();
    assert!(matches!(e, Error::NoChatTemplate));
    assert!(e.to_string().contains("plain_fallback"), "{e}");
}

fn content(meta: Vec<(&str, Value)>) -> Content {
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

fn strs(v: &[&str]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
}

#[test]
fn unknown_tokenizer_model_or_pre_tokenizer_is_named() {
    let e = Tokenizer::from_gguf(&content(vec![
        ("tokenizer.ggml.model", Value::String("bert".into())),
        ("tokenizer.ggml.tokens", strs(&["a"])),
    ]))
    .unwrap_err();
    assert!(e.to_string().contains("\"bert\""), "{e}");
    let e = Tokenizer::from_gguf(&content(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("qwen2".into())),
        ("tokenizer.ggml.tokens", strs(&["a"])),
        ("tokenizer.ggml.merges", strs(&[])),
    ]))
    .unwrap_err();
    assert!(e.to_string().contains("\"qwen2\""), "{e}");
    let e = Tokenizer::from_gguf(&content(vec![(
        "tokenizer.ggml.model",
        Value::String("llama".into()),
    )]))
    .unwrap_err();
    assert!(e.to_string().contains("tokenizer.ggml.tokens"), "{e}");
}
