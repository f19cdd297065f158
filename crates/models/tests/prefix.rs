//! Shared KV prefixes on the real SmolLM2-135M (fetched by
//! `scripts/fetch-model.sh smollm2-135m`): a sequence started from another's
//! shared blocks gives the logits of one that computed everything, keeps
//! working once the other and the prefix are gone, and the blocks go back
//! to the pool when the last holder lets go.

use std::path::PathBuf;

use models::decoder::{Decoder, DecoderConfig, LogitsWanted, SequenceStep};

fn model(rel: &str) -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for dir in here.ancestors() {
        let p = dir.join(rel);
        if p.is_file() {
            return p;
        }
    }
    panic!("{rel} not found; run scripts/fetch-model.sh smollm2-135m from the repository root");
}

fn run(dec: &Decoder, seq: &mut models::decoder::Sequence, tokens: &[u32]) -> Vec<f32> {
    let mut st = [SequenceStep {
        seq,
        tokens,
        logits: LogitsWanted::Last,
    }];
    dec.step(&mut st).unwrap().last(0).unwrap().to_vec()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff <= 1e-3 * scale,
        "{what}: max abs diff {diff} over max |logit| {scale}"
    );
}

#[test]
fn a_sequence_from_a_shared_prefix_equals_one_that_computed_it() {
    let dec = Decoder::load(
        model("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"),
        DecoderConfig {
            max_step_tokens: 256,
            kv_budget_bytes: 64 << 20,
            ..DecoderConfig::default()
        },
    )
    .expect("SmolLM2 loads");
    let unit = dec.prefix_unit().expect("llama layers have no window");
    let v = dec.config().vocab as u32;
    let shared: Vec<u32> = (0..2 * unit as u32).map(|i| (i * 97 + 5) % v).collect();
    let first: Vec<u32> = shared.iter().copied().chain([11, 12, 13]).collect();
    let second: Vec<u32> = shared
        .iter()
        .copied()
        .chain([400, 401, 402, 403, 404])
        .collect();

    // The first prompt computes everything and shares its first two units.
    let mut a = dec.new_sequence();
    run(&dec, &mut a, &first);
    assert!(
        dec.share_prefix(&mut a, unit + 1).is_none(),
        "not a whole unit"
    );
    assert!(
        dec.share_prefix(&mut a, 3 * unit).is_none(),
        "not cached yet"
    );
    let prefix = dec
        .share_prefix(&mut a, 2 * unit)
        .expect("two units are cached");
    assert_eq!(prefix.tokens(), 2 * unit);
    let in_use = dec.kv_bytes_in_use();

    // Cut into pieces of one unit and joined back, it is the same prefix.
    let pieces = prefix.pieces(dec.kv_layout(), unit).unwrap();
    assert_eq!(pieces.len(), 2);
    assert_eq!((pieces[1].start(), pieces[1].tokens()), (unit, unit));
    assert!(
        dec.sequence_from_prefix(&pieces[1]).is_err(),
        "a piece after 0"
    );
    assert!(models::decoder::SharedPrefix::join(&pieces[1..]).is_none());
    assert!(models::decoder::SharedPrefix::join(&[pieces[0].clone(), pieces[0].clone()]).is_none());
    let joined = models::decoder::SharedPrefix::join(&pieces).unwrap();
    assert_eq!(joined.tokens(), 2 * unit);
    drop((pieces, prefix));
    let prefix = joined;

    // The second starts after the prefix and reads only its own tokens.
    let mut b = dec.sequence_from_prefix(&prefix).unwrap();
    assert_eq!(b.len(), 2 * unit);
    assert_eq!(
        dec.kv_bytes_in_use(),
        in_use,
        "the prefix's blocks are shared, not copied"
    );
    let got = run(&dec, &mut b, &second[2 * unit..]);
    let mut c = dec.new_sequence();
    let want = run(&dec, &mut c, &second);
    assert_close(&got, &want, "logits after a shared prefix");

    // The first sequence and the prefix go; the second decodes on.
    drop(a);
    drop(prefix);
    for t in [7u32, 8, 9, 10] {
        let got = run(&dec, &mut b, &[t]);
        let want = run(&dec, &mut c, &[t]);
        assert_close(&got, &want, "decoding after the sharers left");
    }
    drop((b, c));
    assert_eq!(
        dec.kv_bytes_in_use(),
        0,
        "every block went back to the pool"
    );
}

#[test]
fn a_sliding_window_model_has_no_prefix_unit_and_foreign_prefixes_are_refused() {
    let gemma = Decoder::load(
        model("models/gemma3-270m/gemma-3-270m-q4_k_m.gguf"),
        DecoderConfig {
            kv_budget_bytes: 16 << 20,
            ..DecoderConfig::default()
        },
    )
    .expect("Gemma 3 loads");
    assert_eq!(gemma.prefix_unit(), None);
    let smol = Decoder::load(
        model("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"),
        DecoderConfig {
            kv_budget_bytes: 16 << 20,
            ..DecoderConfig::default()
        },
    )
    .expect("SmolLM2 loads");
    let unit = smol.prefix_unit().unwrap();
    let mut s = smol.new_sequence();
    let toks: Vec<u32> = (0..unit as u32).collect();
    run(&smol, &mut s, &toks);
    let p = smol.share_prefix(&mut s, unit).unwrap();
    assert!(gemma.sequence_from_prefix(&p).is_err());
    let mut g = gemma.new_sequence();
    assert!(smol.share_prefix(&mut g, unit).is_none());
}
