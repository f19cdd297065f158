//! Header parsing of safetensors and GGUF files written here by small
//! writers, and fuzzing of both parsers with generated and mutated bytes.

use std::io::Cursor;

use mem_budget::{
    estimate_weights, read_gguf_header, read_safetensors_header, Error, HeaderLimits, MetaValue,
    TransformerShape, WeightFormat, WeightType,
};
use proptest::prelude::*;

/// Writes a safetensors file: header JSON then zeroed data.
fn safetensors(tensors: &[(&str, &str, &[u64])]) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let size = match *dtype {
            "F32" | "I32" => 4,
            "F16" | "BF16" => 2,
            _ => 1,
        };
        let bytes = shape.iter().product::<u64>() * size;
        entries.push(format!(
            r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{offset},{}]}}"#,
            offset + bytes
        ));
        offset += bytes;
    }
    entries.push(r#""__metadata__":{"format":"pt"}"#.to_string());
    let json = format!("{{{}}}", entries.join(","));
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.resize(out.len() + offset as usize, 0);
    out
}

/// A metadata value to write into a GGUF header.
enum V<'a> {
    U32(u32),
    Str(&'a str),
    F32(f32),
    Bool(bool),
    StrArray(&'a [&'a str]),
    I16Array(&'a [i16]),
    Nested,
}

fn gguf_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Writes a GGUF v3 file: header, metadata, tensor infos, aligned zeroed data.
/// `tensors`: name, GGUF dims (innermost first), ggml type id.
fn gguf(meta: &[(&str, V<'_>)], tensors: &[(&str, &[u64], u32)]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        gguf_string(&mut out, key);
        match value {
            V::U32(v) => {
                out.extend_from_slice(&4u32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            V::Str(s) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                gguf_string(&mut out, s);
            }
            V::F32(v) => {
                out.extend_from_slice(&6u32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            V::Bool(b) => {
                out.extend_from_slice(&7u32.to_le_bytes());
                out.push(u8::from(*b));
            }
            V::StrArray(items) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&8u32.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for s in *items {
                    gguf_string(&mut out, s);
                }
            }
            V::I16Array(items) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&3u32.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for v in *items {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            V::Nested => {
                // An array of two arrays of u8: [[1, 2], [3]].
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&2u64.to_le_bytes());
                for inner in [&[1u8, 2][..], &[3u8][..]] {
                    out.extend_from_slice(&0u32.to_le_bytes());
                    out.extend_from_slice(&(inner.len() as u64).to_le_bytes());
                    out.extend_from_slice(inner);
                }
            }
        }
    }
    let mut offset = 0u64;
    let mut sizes = Vec::new();
    for (name, dims, ty) in tensors {
        gguf_string(&mut out, name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in *dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        let t = WeightType::from_ggml(*ty).unwrap();
        let bytes = t.bytes_for(dims.iter().product()).unwrap();
        sizes.push(bytes);
        offset += bytes.div_ceil(32) * 32;
    }
    let data_start = out.len().div_ceil(32) * 32;
    out.resize(data_start + offset as usize, 0);
    out
}

fn sample_gguf() -> Vec<u8> {
    gguf(
        &[
            ("general.architecture", V::Str("llama")),
            ("general.alignment", V::U32(32)),
            ("llama.embedding_length", V::U32(512)),
            ("llama.block_count", V::U32(2)),
            ("llama.attention.head_count", V::U32(8)),
            ("llama.attention.head_count_kv", V::U32(2)),
            ("llama.feed_forward_length", V::U32(1024)),
            ("llama.rope.freq_base", V::F32(10000.0)),
            ("general.quantized", V::Bool(true)),
            (
                "tokenizer.ggml.tokens",
                V::StrArray(&["<s>", "</s>", "hello", "world"]),
            ),
            ("tokenizer.ggml.token_type", V::I16Array(&[1, 1, 2, 2])),
            ("test.nested", V::Nested),
        ],
        &[
            ("token_embd.weight", &[512, 4], 8),       // Q8_0
            ("blk.0.attn_q.weight", &[512, 512], 12),  // Q4_K
            ("blk.0.ffn_up.weight", &[512, 1024], 14), // Q6_K
            ("blk.0.attn_norm.weight", &[512], 0),     // F32
            ("output.weight", &[512, 4], 1),           // F16
        ],
    )
}

#[test]
fn safetensors_sizes_from_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let bytes = {
        let json = r#"{"__metadata__":{"format":"pt"},
            "embeddings.weight":{"dtype":"F32","shape":[1000,384],"data_offsets":[0,1536000]},
            "layer.0.dense.weight":{"dtype":"F32","shape":[1536,384],"data_offsets":[1536000,3895296]},
            "layer.0.dense.bias":{"dtype":"F32","shape":[1536],"data_offsets":[3895296,3901440]},
            "position_ids":{"dtype":"I64","shape":[1,512],"data_offsets":[3901440,3905536]}}"#;
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out.resize(out.len() + 3_905_536, 0);
        out
    };
    std::fs::write(&path, &bytes).unwrap();
    let info = estimate_weights(&path).unwrap();
    assert_eq!(info.format, WeightFormat::Safetensors);
    assert_eq!(info.tensors.len(), 4);
    assert_eq!(
        info.tensors[0].name, "embeddings.weight",
        "ordered by data offset"
    );
    assert_eq!(info.stored_bytes(), 3_905_536);
    assert_eq!(info.params(), 384_000 + 589_824 + 1536 + 512);
    assert_eq!(info.metadata["format"], MetaValue::String("pt".into()));
    // F16 halves the floats; the I64 position ids keep their 4096 bytes.
    assert_eq!(
        info.bytes_as(WeightType::F16),
        (384_000 + 589_824 + 1536) * 2 + 4096
    );
    // Q8_0: both matrices (inner 384 = 12 blocks of 32) at 34 B per 32; the
    // 1-D bias stays F32.
    assert_eq!(
        info.bytes_as(WeightType::Q8_0),
        (384_000 + 589_824) / 32 * 34 + 1536 * 4 + 4096
    );
    // Q4_K needs inner dims that are multiples of 256: 384 is not, so nothing changes.
    assert_eq!(info.bytes_as(WeightType::Q4_K), info.stored_bytes());
    let by = info.by_candidate();
    assert_eq!(by.len(), WeightType::CANDIDATES.len());
    assert_eq!(by[0], (WeightType::F32, info.stored_bytes()));
}

#[test]
fn safetensors_writer_round_trip() {
    let bytes = safetensors(&[("a", "F16", &[64, 256]), ("b", "BF16", &[3])]);
    let info = read_safetensors_header(
        Cursor::new(&bytes),
        Some(bytes.len() as u64),
        &HeaderLimits::default(),
    )
    .unwrap();
    assert_eq!(info.stored_bytes(), 64 * 256 * 2 + 6);
    assert_eq!(info.bytes_as(WeightType::Q4_K), 64 * 144 + 6);
}

#[test]
fn gguf_v3_with_every_metadata_kind() {
    let bytes = sample_gguf();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let info = estimate_weights(&path).unwrap();
    assert_eq!(info.format, WeightFormat::Gguf { version: 3 });
    let t = &info.tensors;
    assert_eq!(t.len(), 5);
    assert_eq!(
        t[0].shape,
        vec![4, 512],
        "GGUF dims are reversed to row-major"
    );
    assert_eq!(t[0].dtype, WeightType::Q8_0);
    assert_eq!(t[0].bytes, 2048 / 32 * 34);
    assert_eq!(t[1].bytes, 512 * 512 / 256 * 144);
    assert_eq!(t[2].bytes, 512 * 1024 / 256 * 210);
    assert_eq!(t[3].bytes, 512 * 4);
    assert_eq!(t[4].bytes, 2048 * 2);
    assert_eq!(
        info.metadata["tokenizer.ggml.tokens"],
        MetaValue::Array {
            element_type: 8,
            len: 4
        }
    );
    assert_eq!(
        info.metadata["test.nested"],
        MetaValue::Array {
            element_type: 9,
            len: 2
        }
    );
    assert_eq!(info.metadata["general.quantized"], MetaValue::Bool(true));
    let shape = TransformerShape::from_gguf(&info).unwrap();
    assert_eq!(
        (shape.hidden, shape.layers, shape.heads, shape.kv_heads),
        (512, 2, 8, 2)
    );
    assert_eq!(shape.vocab, 4);
    // All as F32: every float tensor at 4 bytes per weight.
    assert_eq!(info.bytes_as(WeightType::F32), info.params() * 4);
}

fn expect_header_error(result: mem_budget::Result<mem_budget::WeightsInfo>, needle: &str) {
    match result {
        Err(e) => assert!(
            e.to_string().contains(needle),
            "expected {needle:?} in: {e}"
        ),
        Ok(info) => panic!(
            "expected an error containing {needle:?}, parsed {} tensors",
            info.tensors.len()
        ),
    }
}

#[test]
fn bad_headers_are_clear_errors() {
    let limits = HeaderLimits::default();
    let st =
        |b: &[u8]| read_safetensors_header(Cursor::new(b.to_vec()), Some(b.len() as u64), &limits);
    let gg = |b: &[u8]| read_gguf_header(Cursor::new(b.to_vec()), Some(b.len() as u64), &limits);

    // Absurd safetensors header length: refused before allocating.
    let mut absurd = u64::MAX.to_le_bytes().to_vec();
    absurd.extend_from_slice(b"{}");
    expect_header_error(st(&absurd), "over the limit");
    // Truncated: the header claims more than the file holds.
    let good = safetensors(&[("a", "F32", &[4, 4])]);
    expect_header_error(st(&good[..20]), "runs past the end");
    // Data offsets past the end of the file.
    expect_header_error(st(&good[..good.len() - 1]), "past the");
    // Unknown dtype.
    let bad = safetensors(&[("a", "Q9", &[4])]);
    assert!(matches!(st(&bad), Err(Error::UnknownDtype { .. })));
    // Offsets that disagree with the shape.
    let json = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
    let mut wrong = (json.len() as u64).to_le_bytes().to_vec();
    wrong.extend_from_slice(json);
    wrong.resize(wrong.len() + 16, 0);
    expect_header_error(st(&wrong), "needs 16");
    // A shape whose size overflows.
    let json = br#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#;
    let mut huge = (json.len() as u64).to_le_bytes().to_vec();
    huge.extend_from_slice(json);
    expect_header_error(st(&huge), "overflows");

    let good = sample_gguf();
    expect_header_error(gg(b"GGUX\x03\0\0\0"), "magic");
    let mut v1 = good.clone();
    v1[4] = 1;
    expect_header_error(gg(&v1), "version 1 is not supported");
    // Absurd tensor and metadata counts.
    let mut many = good.clone();
    many[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_header_error(gg(&many), "tensors, over the limit");
    let mut many = good.clone();
    many[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    expect_header_error(gg(&many), "metadata entries, over the limit");
    // Absurd key length.
    let mut long = good.clone();
    long[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    expect_header_error(gg(&long), "over the limit");
    // Truncated anywhere in the header.
    for cut in [3, 10, 30, 100, 300] {
        assert!(gg(&good[..cut]).is_err(), "cut at {cut}");
    }
    // Tensor data past the end of the file.
    expect_header_error(gg(&good[..good.len() - 32]), "runs past");
    // Unknown ggml type.
    let bad = gguf(&[], &[("t", &[32], 0)]);
    let mut bad = bad;
    // 24 bytes of preamble, the name (8 + 1), n_dims (4), one dim (8): the type id.
    let pos = 45;
    bad[pos..pos + 4].copy_from_slice(&99u32.to_le_bytes());
    assert!(
        matches!(gg(&bad), Err(Error::UnknownDtype { .. })),
        "{:?}",
        gg(&bad)
    );
    // Not a whole number of blocks.
    let odd = gguf(&[], &[("t", &[32], 0)]);
    let mut odd = odd;
    let pos = 45;
    odd[pos..pos + 4].copy_from_slice(&12u32.to_le_bytes()); // Q4_K needs 256
    expect_header_error(gg(&odd), "whole number");
    // Neither format.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.bin");
    std::fs::write(&p, b"hello world").unwrap();
    assert!(matches!(
        estimate_weights(&p),
        Err(Error::UnknownFormat { .. })
    ));
    assert!(matches!(
        estimate_weights(dir.path().join("missing")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn tight_limits_are_enforced() {
    let limits = HeaderLimits {
        max_array_len: 3,
        ..HeaderLimits::default()
    };
    let good = sample_gguf();
    expect_header_error(
        read_gguf_header(Cursor::new(&good), Some(good.len() as u64), &limits),
        "array of 4 entries, over the limit of 3",
    );
    let limits = HeaderLimits {
        max_nesting: 1,
        ..HeaderLimits::default()
    };
    expect_header_error(
        read_gguf_header(Cursor::new(&good), Some(good.len() as u64), &limits),
        "nested deeper",
    );
}

#[test]
fn block_sizes_match_ggml() {
    let cases = [
        (WeightType::Q4_0, 32, 18),
        (WeightType::Q4_1, 32, 20),
        (WeightType::Q5_0, 32, 22),
        (WeightType::Q5_1, 32, 24),
        (WeightType::Q8_0, 32, 34),
        (WeightType::Q8_1, 32, 36),
        (WeightType::Q2_K, 256, 84),
        (WeightType::Q3_K, 256, 110),
        (WeightType::Q4_K, 256, 144),
        (WeightType::Q5_K, 256, 176),
        (WeightType::Q6_K, 256, 210),
        (WeightType::Q8_K, 256, 292),
        (WeightType::F16, 1, 2),
        (WeightType::BF16, 1, 2),
        (WeightType::F32, 1, 4),
    ];
    for (t, n, b) in cases {
        assert_eq!(t.block(), (n, b), "{t}");
        assert_eq!(WeightType::from_ggml(t.ggml_id().unwrap()), Some(t));
    }
    assert_eq!(WeightType::Q8_0.bits_per_weight(), 8.5);
    assert_eq!(WeightType::Q4_K.bytes_for(100), None);
}

fn limits_small() -> HeaderLimits {
    HeaderLimits {
        max_header_bytes: 1 << 20,
        max_string: 1 << 16,
        ..HeaderLimits::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary bytes: an error or a parse, never a panic; with and
    /// without a known file length.
    #[test]
    fn fuzz_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512), gguf_magic in any::<bool>()) {
        let mut bytes = bytes;
        if gguf_magic && bytes.len() >= 8 {
            bytes[..4].copy_from_slice(b"GGUF");
            bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
        }
        let limits = limits_small();
        let _ = read_gguf_header(Cursor::new(&bytes), Some(bytes.len() as u64), &limits);
        let _ = read_gguf_header(Cursor::new(&bytes), None, &HeaderLimits::default());
        let _ = read_safetensors_header(Cursor::new(&bytes), Some(bytes.len() as u64), &limits);
        let _ = read_safetensors_header(Cursor::new(&bytes), None, &HeaderLimits::default());
    }

    /// Mutations of a valid GGUF header: flipped bytes, overwritten words
    /// and truncation give an error or a consistent parse, never a panic.
    #[test]
    fn fuzz_mutated_gguf(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                         word in any::<prop::sample::Index>(), value in any::<u64>(),
                         cut in any::<prop::sample::Index>()) {
        let mut bytes = sample_gguf();
        let header_end = 700.min(bytes.len());
        for (i, b) in flips {
            let i = i.index(header_end);
            bytes[i] ^= b;
        }
        let w = word.index(header_end - 8);
        bytes[w..w + 8].copy_from_slice(&value.to_le_bytes());
        let limits = limits_small();
        if let Ok(info) = read_gguf_header(Cursor::new(&bytes), Some(bytes.len() as u64), &limits) {
            prop_assert!(info.stored_bytes() <= bytes.len() as u64);
        }
        let cut = cut.index(bytes.len());
        let _ = read_gguf_header(Cursor::new(&bytes[..cut]), Some(cut as u64), &limits);
        let _ = read_gguf_header(Cursor::new(&bytes[..cut]), None, &limits);
    }

    /// Mutations of a valid safetensors header.
    #[test]
    fn fuzz_mutated_safetensors(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                                cut in any::<prop::sample::Index>()) {
        let mut bytes = safetensors(&[("a.weight", "F32", &[16, 32]), ("a.bias", "F16", &[16]), ("b", "BF16", &[2, 2, 2])]);
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for (i, b) in flips {
            let i = i.index(header_end);
            bytes[i] ^= b;
        }
        let limits = limits_small();
        if let Ok(info) = read_safetensors_header(Cursor::new(&bytes), Some(bytes.len() as u64), &limits) {
            prop_assert!(info.stored_bytes() <= bytes.len() as u64);
        }
        let cut = cut.index(bytes.len());
        let _ = read_safetensors_header(Cursor::new(&bytes[..cut]), Some(cut as u64), &limits);
    }
}
