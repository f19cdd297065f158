//! The encoder against candle-transformers' BertModel on the same weights.
//!
//! These tests need the model: run `scripts/fetch-model.sh` (scripts/test.sh
//! does). They fail, never skip, when it is absent.

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use models::{Embed, Error, LoadOptions, MiniLm, Tokens};
use quant::Format;

fn dir() -> PathBuf {
    // Tests run from crates/models; model_dir() searches its ancestors.
    match models::model_dir() {
        Ok(d) => d,
        Err(e) => panic!("the MiniLM model is needed by these tests: {e}"),
    }
}

const SENTENCES: [&str; 50] = [
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Hi",
    "ok",
    "",
    "Rust is a systems programming language focused on safety, speed and concurrency.",
    "The quarterly report shows revenue grew by twelve percent while costs stayed flat, which pleased the board and the investors alike.",
    "Quantum entanglement links the states of two particles regardless of distance.",
    "Ich habe heute keine Zeit, weil ich arbeiten muss.",
    "Le chat dort sur le canapé depuis ce matin.",
    "東京は日本の首都です。",
    "Emoji test 🙂🚀 with some text around it.",
    "ERROR 0x80070005: access denied while opening C:\\Windows\\System32\\config",
    "fn main() { println!(\"hello\"); }",
    "SELECT name, count(*) FROM users GROUP BY name HAVING count(*) > 1;",
    "The mitochondria is the powerhouse of the cell.",
    "Please remind me to buy milk, eggs, and bread on the way home tonight.",
    "What is the capital of Australia?",
    "Canberra is the capital city of Australia.",
    "I can't believe it's not butter!",
    "The stock market crashed in 1929, leading to the Great Depression.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She sells sea shells by the sea shore.",
    "The quick brown fox jumps over the lazy dog.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua.",
    "To be, or not to be, that is the question.",
    "My flight was delayed by three hours because of a storm over Chicago.",
    "The new phone has a better camera but the battery life is worse than last year's model.",
    "Neural networks learn representations from data through gradient descent.",
    "How do I reset my password if I no longer have access to my email?",
    "The recipe calls for two cups of flour, one egg, and a pinch of salt.",
    "Football fans celebrated in the streets after the final whistle.",
    "The museum opens at nine and closes at five on weekdays.",
    "Climate change is raising sea levels around the world.",
    "A B C D E F G H I J K L M N O P",
    "1234567890 3.14159 2.71828 6.02e23",
    "The patient was prescribed antibiotics for a bacterial infection of the lungs.",
    "Our team shipped the release on Friday afternoon despite the outage.",
    "Why is the sky blue? Because air scatters short wavelengths of sunlight more than long ones, and our eyes are more sensitive to blue than violet.",
    "word ",
];

fn long_sentence() -> String {
    // Longer than the 256-token limit: truncation must match on both sides.
    "antidisestablishmentarianism and more words ".repeat(80)
}

fn all_sentences() -> Vec<String> {
    let mut v: Vec<String> = SENTENCES.iter().map(|s| s.to_string()).collect();
    v[49] = long_sentence();
    v
}

/// candle-transformers' BertModel on the same weights, fed the same tokens
/// (padded batch with an attention mask), mean pooled and normalised.
fn reference(tokens: &[Tokens]) -> Vec<Vec<f32>> {
    static MODEL: OnceLock<BertModel> = OnceLock::new();
    let model = MODEL.get_or_init(|| {
        let d = dir();
        let config: Config =
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[d.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )
            .unwrap()
        };
        BertModel::load(vb, &config).unwrap()
    });
    let l = tokens.iter().map(Tokens::len).max().unwrap();
    let n = tokens.len();
    let mut ids = vec![0u32; n * l];
    let mut mask = vec![0u32; n * l];
    for (i, t) in tokens.iter().enumerate() {
        ids[i * l..i * l + t.len()].copy_from_slice(&t.ids);
        mask[i * l..i * l + t.len()].iter_mut().for_each(|m| *m = 1);
    }
    let ids = Tensor::from_vec(ids, (n, l), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (n, l), &Device::Cpu).unwrap();
    let out = model
        .forward(&ids, &ids.zeros_like().unwrap(), Some(&mask))
        .unwrap();
    let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let sum = out.broadcast_mul(&m).unwrap().sum(1).unwrap();
    let pooled = sum.broadcast_div(&m.sum(1).unwrap()).unwrap();
    let norm = pooled
        .sqr()
        .unwrap()
        .sum_keepdim(1)
        .unwrap()
        .sqrt()
        .unwrap();
    pooled.broadcast_div(&norm).unwrap().to_vec2().unwrap()
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    let d: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    d / (na * nb)
}

fn reference_embeddings() -> &'static (Vec<Tokens>, Vec<Vec<f32>>) {
    static REF: OnceLock<(Vec<Tokens>, Vec<Vec<f32>>)> = OnceLock::new();
    REF.get_or_init(|| {
        let m = MiniLm::load(dir(), &LoadOptions::default()).unwrap();
        let s = all_sentences();
        let refs: Vec<&str> = s.iter().map(String::as_str).collect();
        let tokens = m.tokenize(&refs).unwrap();
        let r = reference(&tokens);
        (tokens, r)
    })
}

/// Lowest cosine between `options`' embeddings and the reference.
fn min_cosine(options: &LoadOptions) -> (f32, MiniLm) {
    let m = MiniLm::load(dir(), options).unwrap();
    let (tokens, r) = reference_embeddings();
    // Mixed order and batch sizes: halves, so the batch holds short and long texts.
    let mut got = m.embed_tokens(&tokens[..25]).unwrap();
    got.extend(m.embed_tokens(&tokens[25..]).unwrap());
    let worst = got
        .iter()
        .zip(r)
        .map(|(a, b)| cos(a, b))
        .fold(f32::INFINITY, f32::min);
    (worst, m)
}

#[test]
fn f32_matches_bert_model() {
    let (tokens, _) = reference_embeddings();
    assert_eq!(tokens[49].len(), 256, "long input truncated to 256 tokens");
    assert_eq!(tokens[14].len(), 2, "empty text is [CLS] [SEP], not padded");
    let (worst, m) = min_cosine(&LoadOptions::default());
    assert!(worst >= 0.9999, "f32 min cosine {worst}");
    assert!(m.formats().values().all(|f| *f == Format::F32));
    assert_eq!(m.formats().len(), 36);
}

#[test]
fn mixed_plan_matches_bert_model() {
    let mut o = LoadOptions::default();
    o.plan
        .insert("encoder.layer.5.output.dense.weight".into(), Format::Q8_0);
    // Only a 1536-input layer is quantized: no padding needed, same code path.
    assert_eq!(MiniLm::memory(dir(), &o).unwrap().stride, 384);
    let (worst, m) = min_cosine(&o);
    assert!(worst >= 0.999, "mixed plan min cosine {worst}");
    assert_eq!(
        m.formats()["encoder.layer.5.output.dense.weight"],
        Format::Q8_0
    );
    assert_eq!(
        m.formats()["encoder.layer.4.output.dense.weight"],
        Format::F32
    );
}

#[test]
fn f32_unpadded_and_padded_agree() {
    // One 384-input Q4_0 layer (a format that fits 384 as well as 512) makes
    // the loader pad the hidden width to 512 for every layer, the f32 ones
    // included; without pad_inputs the same plan runs 384 wide. The pad is
    // zeros, so the two must give the same embeddings.
    let mut padded = LoadOptions::default();
    padded.plan.insert(
        "encoder.layer.0.attention.output.dense.weight".into(),
        Format::Q4_0,
    );
    let unpadded = LoadOptions {
        pad_inputs: false,
        ..padded.clone()
    };
    assert_eq!(MiniLm::memory(dir(), &padded).unwrap().stride, 512);
    assert_eq!(MiniLm::memory(dir(), &unpadded).unwrap().stride, 384);
    let a = MiniLm::load(dir(), &padded).unwrap();
    let b = MiniLm::load(dir(), &unpadded).unwrap();
    assert_eq!(a.formats(), b.formats(), "the same plan on both sides");
    assert_eq!(
        a.formats()["encoder.layer.0.attention.output.dense.weight"],
        Format::Q4_0
    );
    let (tokens, _) = reference_embeddings();
    let (ea, eb) = (
        a.embed_tokens(tokens).unwrap(),
        b.embed_tokens(tokens).unwrap(),
    );
    assert_eq!((ea.len(), eb.len()), (tokens.len(), tokens.len()));
    let worst = ea
        .iter()
        .zip(&eb)
        .map(|(x, y)| cos(x, y))
        .fold(f32::INFINITY, f32::min);
    eprintln!("padded against unpadded: min cosine {worst}");
    assert!(
        worst >= 0.99999,
        "padded against unpadded: min cosine {worst}"
    );
}

#[test]
fn q8_0_plan_within_bound() {
    let (worst, m) = min_cosine(&LoadOptions::uniform(Format::Q8_0));
    assert!(worst >= 0.99, "Q8_0 min cosine {worst}");
    assert!(m.formats().values().all(|f| *f == Format::Q8_0));
    assert!(m.weight_bytes() < 70_000_000, "{}", m.weight_bytes());
}

#[test]
fn int4_plan_within_bound() {
    // The INT4 plan: Q4_K where the input dim allows it (1536: the FFN
    // output matrices), Q8_0 where it does not (384).
    let o = LoadOptions {
        pad_inputs: false,
        ..LoadOptions::uniform(Format::Q4_K)
    };
    let (worst, m) = min_cosine(&o);
    eprintln!("INT4 plan min cosine {worst}");
    // Measured 0.981 on these 50 sentences (AMD EPYC, AVX-512 VNNI; the
    // Q8_0 layers on quant's int8 kernel). The bound leaves 0.01 for CPUs
    // whose kernels quantize activations differently (candle's Q8_K path).
    assert!(worst >= 0.97, "INT4 plan min cosine {worst}");
    assert_eq!(
        m.formats()["encoder.layer.0.output.dense.weight"],
        Format::Q4_K
    );
    assert_eq!(
        m.formats()["encoder.layer.0.intermediate.dense.weight"],
        Format::Q8_0
    );
}

#[test]
fn padding_lets_q4_k_take_every_matrix() {
    // With the 384 → 512 zero pad every matrix takes Q4_K. All-Q4_K is
    // smaller but lossier than the INT4 plan above (measured min cosine
    // 0.912 on these sentences, AMD EPYC with AVX-512 VNNI, hence the 0.9
    // bound); it is offered, not the default INT4 plan.
    let (worst, m) = min_cosine(&LoadOptions::uniform(Format::Q4_K));
    eprintln!("all-Q4_K min cosine {worst}");
    assert!(m.formats().values().all(|f| *f == Format::Q4_K));
    assert!(worst >= 0.9, "all-Q4_K min cosine {worst}");
}

#[test]
fn published_similarities() {
    let m = MiniLm::load(dir(), &LoadOptions::default()).unwrap();
    let v = m
        .embed(&[
            "The weather is lovely today.",
            "It's so sunny outside!",
            "He drove to the stadium.",
        ])
        .unwrap();
    for (got, want) in [
        (cos(&v[0], &v[1]), 0.6660),
        (cos(&v[0], &v[2]), 0.1046),
        (cos(&v[1], &v[2]), 0.1411),
    ] {
        assert!(
            (got - want).abs() < 1e-3,
            "similarity {got}, published {want}"
        );
    }
    for x in &v {
        assert!((x.iter().map(|a| a * a).sum::<f32>() - 1.0).abs() < 1e-5);
    }
}

#[test]
fn paraphrases_score_above_unrelated() {
    let m = MiniLm::load(dir(), &LoadOptions::uniform(Format::Q8_0)).unwrap();
    let pairs = [
        ("A man is eating food.", "A man is eating a piece of bread."),
        (
            "What is the capital of Australia?",
            "Which city is Australia's capital?",
        ),
        (
            "How do I reset my password?",
            "I forgot my password, how can I change it?",
        ),
        (
            "The cat sleeps on the sofa.",
            "A cat is napping on the couch.",
        ),
    ];
    let unrelated = [
        ("A man is eating food.", "The stock market crashed in 1929."),
        (
            "What is the capital of Australia?",
            "Photosynthesis converts light into energy.",
        ),
        ("How do I reset my password?", "The cat sleeps on the sofa."),
        (
            "The cat sleeps on the sofa.",
            "Our team shipped the release on Friday.",
        ),
    ];
    let score = |ps: &[(&str, &str)]| -> Vec<f32> {
        ps.iter()
            .map(|(a, b)| {
                let v = m.embed(&[a, b]).unwrap();
                cos(&v[0], &v[1])
            })
            .collect()
    };
    let p = score(&pairs);
    let u = score(&unrelated);
    let min_p = p.iter().copied().fold(f32::INFINITY, f32::min);
    let max_u = u.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    assert!(min_p > max_u, "paraphrases {p:?} vs unrelated {u:?}");
}

#[test]
fn batch_composition_does_not_change_results() {
    let m = MiniLm::load(dir(), &LoadOptions::uniform(Format::Q8_0)).unwrap();
    let s = [
        "Hi",
        "A woman is playing violin.",
        "The recipe calls for two cups of flour, one egg, and a pinch of salt.",
    ];
    let together = m.embed(&s).unwrap();
    for (i, t) in s.iter().enumerate() {
        let alone = m.embed(&[t]).unwrap();
        assert!(cos(&alone[0], &together[i]) > 0.99999, "{t}");
    }
    assert!(m.embed(&[]).unwrap().is_empty());
    let p = m.profile();
    assert_eq!(p.texts, 6);
    assert!(p.matmul_ns > 0 && p.tokens > 0);
}

#[test]
fn bad_tokens_are_errors_not_panics() {
    let m = MiniLm::load(dir(), &LoadOptions::default()).unwrap();
    let bad = Tokens {
        ids: vec![101, 999_999, 102],
        type_ids: vec![],
    };
    assert!(matches!(
        m.embed_tokens(&[bad]),
        Err(Error::BadToken {
            id: 999_999,
            limit: 30522,
            ..
        })
    ));
    assert!(matches!(
        m.embed_tokens(&[Tokens::default()]),
        Err(Error::EmptySequence { index: 0 })
    ));
    let long = Tokens {
        ids: vec![101; 600],
        type_ids: vec![],
    };
    assert!(matches!(
        m.embed_tokens(&[long]),
        Err(Error::TooLong {
            len: 600,
            limit: 512,
            ..
        })
    ));
    let bad_type = Tokens {
        ids: vec![101, 102],
        type_ids: vec![0, 7],
    };
    assert!(matches!(
        m.embed_tokens(&[bad_type]),
        Err(Error::BadToken { id: 7, .. })
    ));
    let e = MiniLm::load("/nonexistent/model", &LoadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("scripts/fetch-model.sh"), "{e}");
    let o = LoadOptions {
        max_tokens: 1000,
        ..LoadOptions::default()
    };
    assert!(matches!(
        MiniLm::load(dir(), &o),
        Err(Error::BadConfig { .. })
    ));
}

#[test]
fn sizes_and_embed_trait() {
    let f = MiniLm::load(dir(), &LoadOptions::default()).unwrap();
    let q = MiniLm::load(dir(), &LoadOptions::uniform(Format::Q8_0)).unwrap();
    assert!(
        f.weight_bytes() > 85_000_000 && f.weight_bytes() < 95_000_000,
        "{}",
        f.weight_bytes()
    );
    assert!(q.weight_bytes() < f.weight_bytes());
    assert!(q.resident_bytes() >= q.weight_bytes());
    let e: &dyn Embed = &q;
    assert_eq!(e.dim(), 384);
    assert_eq!(q.config().num_hidden_layers, 6);
}

#[test]
fn q8_0_word_table_keeps_the_plan_under_40_percent_of_f32() {
    let f = MiniLm::load(dir(), &LoadOptions::default()).unwrap();
    let (worst, q) = min_cosine(&LoadOptions::uniform(Format::Q8_0));
    assert!(
        worst >= 0.99,
        "Q8_0 with a Q8_0 word table: min cosine {worst}"
    );
    // The table: 30522 x 384 values, 34 bytes per 32 instead of 128.
    assert_eq!(q.word_embedding_bytes(), 30522 * 384 / 32 * 34);
    assert_eq!(f.word_embedding_bytes(), 30522 * 384 * 4);
    let (qb, fb) = (q.resident_bytes() as f64, f.resident_bytes() as f64);
    assert!(
        qb <= 0.40 * fb,
        "Q8_0 resident {qb} vs f32 {fb}: {:.1}%",
        100.0 * qb / fb
    );
    // An f32 table can still be asked for: the same answers as before.
    let mut o = LoadOptions::uniform(Format::Q8_0);
    o.word_embeddings = Some(Format::F32);
    let (worst_f32_table, m) = min_cosine(&o);
    assert!(worst_f32_table >= 0.99, "{worst_f32_table}");
    assert_eq!(m.word_embedding_bytes(), 30522 * 384 * 4);
    o.word_embeddings = Some(Format::Q4_K);
    assert!(matches!(
        MiniLm::load(dir(), &o),
        Err(Error::BadConfig { .. })
    ));
}

#[test]
fn memory_facts_match_what_the_loaded_model_holds() {
    for format in [Format::F32, Format::Q8_0, Format::Q4_K] {
        let options = LoadOptions::uniform(format);
        let facts = MiniLm::memory(dir(), &options).unwrap();
        let m = MiniLm::load(dir(), &options).unwrap();
        assert_eq!(facts.weights, m.resident_bytes(), "{format}");
        assert!(facts.load_peak > facts.weights, "{format}");
        assert_eq!(facts.hidden, 384);
        assert_eq!(facts.max_tokens, 256);
        // The forward's buffers, allocated once per call: hidden state and
        // attention context (stride wide), the work buffer (the intermediate,
        // 1536, is wider than q/k/v's 1152), f32, and what the linear layers
        // take per row: the int8 kernel's scratch for the widest input (1536
        // bytes and a scale per 32), or candle's copies inside its calls.
        let widest = [
            (1152, facts.stride),
            (384, facts.stride),
            (1536, facts.stride),
            (384, 1536),
        ];
        let layers = widest.map(|(o, i)| quant::forward_into_bytes(format, o, i));
        let scratch = layers.iter().map(|f| f.scratch).max().unwrap();
        let transient = layers.iter().map(|f| f.transient).max().unwrap();
        let per_block = layers.iter().map(|f| f.per_block).max().unwrap();
        let per_call = layers.iter().map(|f| f.per_call).max().unwrap();
        assert_eq!(
            facts.per_token,
            4 * (2 * facts.stride as u64 + 1536) + scratch.max(12),
            "{format}"
        );
        // Candle's copies are held for one chunk of rows at a time.
        assert_eq!(facts.per_chunk_token, transient, "{format}");
        assert_eq!(facts.per_chunk_block, per_block, "{format}");
        assert_eq!(facts.per_chunk_call, per_call, "{format}");
        assert_eq!(facts.chunk_rows, quant::CANDLE_CHUNK_ROWS as u64);
        // A batch holds one chunk's candle buffers at its peak: the copies
        // per row, the AMX blocks in flight, the per-call bookkeeping.
        let one_chunk = |rows: u64| {
            rows * transient
                + quant::candle_blocks_in_flight(rows as usize) * per_block
                + if transient > 0 { per_call } else { 0 }
        };
        for (tokens, rows) in [(1, 1), (31, 31), (40, 40), (223, 64)] {
            assert_eq!(
                facts.batch_bytes(tokens, 1),
                tokens * facts.per_token + one_chunk(rows) + facts.per_text,
                "{format}, {tokens} tokens"
            );
        }
        // Uniform Q4_K: the FFN's 1536-wide input has the largest AMX
        // blocks (on a CPU with AMX-INT8; none elsewhere), none for others.
        let ffn_block = quant::forward_into_bytes(Format::Q4_K, 384, 1536).per_block;
        match format {
            Format::Q4_K => {
                assert_eq!(per_block, ffn_block);
                assert!(per_block == 0 || per_block == 32 * (1536 + 16));
            }
            _ => assert_eq!(per_block, 0, "{format}"),
        }
        assert_eq!(
            facts.batch_bytes(1000, 2) - facts.batch_bytes(999, 2),
            facts.per_token
        );
        match format {
            Format::F32 => assert_eq!((scratch, transient), (0, 0)),
            Format::Q8_0 if quant::int8_kernel_available() => {
                assert_eq!((scratch, transient), (1536 + 4 * 48, 0))
            }
            _ => assert!(transient >= 4 * (1536 + 384), "{format}: {transient}"),
        }
        // Less than the layer-by-layer buffers of before (the attention
        // output and the intermediate twice).
        assert!(facts.per_token < 4 * (facts.stride as u64 + 2 * 1536));
    }
}

#[test]
fn the_int4_plan_keeps_the_weights_q4_k_hurts_most_more_precise() {
    let dir = dir();
    let sens = models::minilm_sensitivities(&dir).unwrap();
    assert_eq!(sens.len(), 36, "six layers of six linear weights");
    // Every weight is calibrated at the padded width, so the K-quants fit.
    for s in &sens {
        assert!(s.shape[1] % 256 == 0, "{} {:?}", s.name, s.shape);
        assert!(
            s.candidates.iter().any(|c| c.format == Format::Q4_K),
            "{}",
            s.name
        );
    }
    // As small as Q4_K: every weight in Q4_K.
    let all4 = models::minilm_int4_plan(&sens, 0.0).unwrap();
    assert!(
        all4.plan.values().all(|&f| f == Format::Q4_K),
        "{:?}",
        all4.plan
    );
    // The default share of the way to Q8_0's size: some weights stay Q4_K,
    // the rest are more precise, and the embeddings are closer to f32 on
    // real sentences than uniform Q4_K's (measured: 0.952 against 0.912).
    let mixed = models::minilm_int4_plan(&sens, models::MINILM_INT4_PLAN_MIX).unwrap();
    let q4 = mixed.plan.values().filter(|&&f| f == Format::Q4_K).count();
    assert!(q4 > 0 && q4 < 36, "{:?}", mixed.plan);
    let f32 = MiniLm::load(&dir, &LoadOptions::uniform(Format::F32)).unwrap();
    let min_cos = |options: &LoadOptions| {
        let m = MiniLm::load(&dir, options).unwrap();
        let a = m.embed(&SENTENCES).unwrap();
        let b = f32.embed(&SENTENCES).unwrap();
        a.iter()
            .zip(&b)
            .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>())
            .fold(f32::INFINITY, f32::min)
    };
    let (plan_cos, uniform_cos) = (min_cos(&mixed), min_cos(&all4));
    assert!(plan_cos >= 0.95, "INT4 plan min cosine {plan_cos}");
    assert!(
        plan_cos > uniform_cos,
        "plan {plan_cos} vs uniform Q4_K {uniform_cos}"
    );
    // A share outside 0..=1 is refused, naming the value.
    match models::minilm_int4_plan(&sens, 1.5) {
        Err(Error::InvalidConfig { field, value, .. }) => {
            assert_eq!((field.as_str(), value.as_str()), ("mix", "1.5"));
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}
