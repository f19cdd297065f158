//! The chunker: windows, overlap, UTF-8 across blocks, bounded memory.

use std::io::Read;

use proptest::prelude::*;
use runtime::chunk::{Chunker, ChunkerConfig, WhitespaceTokens};

fn chunks(text: &str, max: usize, overlap: usize, block: usize) -> Vec<runtime::chunk::Chunk> {
    let config = ChunkerConfig {
        max_tokens: max,
        overlap,
        read_block: block,
        max_unbroken: 1 << 16,
    };
    Chunker::new(text.as_bytes(), WhitespaceTokens, config)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

#[test]
fn windows_overlap_and_cover_everything() {
    let words: Vec<String> = (0..1000).map(|i| format!("w{i}")).collect();
    let text = words.join(" ");
    let cs = chunks(&text, 100, 10, 37);
    // 1000 words, windows of 100 advancing by 90: 11 windows.
    assert_eq!(cs.len(), 11);
    for (i, c) in cs.iter().enumerate() {
        assert_eq!(c.index, i);
        assert_eq!(&text[c.bytes.start as usize..c.bytes.end as usize], c.text);
        assert!(c.tokens <= 100);
        assert_eq!(c.text.split_whitespace().next().unwrap(), words[i * 90]);
    }
    assert!(cs.last().unwrap().text.ends_with("w999"));
    // Every word appears in some window.
    let seen: std::collections::HashSet<&str> = cs.iter().flat_map(|c| c.text.split(' ')).collect();
    assert_eq!(seen.len(), 1000);
}

#[test]
fn short_text_is_one_chunk_and_empty_text_none() {
    let cs = chunks("  hello   world ", 10, 2, 3);
    assert_eq!(cs.len(), 1);
    assert_eq!(cs[0].text, "hello   world");
    assert!(chunks("   \n ", 10, 2, 4).is_empty());
    assert!(chunks("", 10, 2, 4).is_empty());
}

#[test]
fn multibyte_text_split_across_blocks() {
    let text = "héllo wörld ünïcödé 日本語 テキスト ".repeat(50);
    for block in [1, 2, 3, 5, 7, 64] {
        let cs = chunks(&text, 16, 4, block);
        assert!(!cs.is_empty());
        for c in &cs {
            assert_eq!(&text[c.bytes.start as usize..c.bytes.end as usize], c.text);
        }
    }
}

#[test]
fn invalid_utf8_and_bad_config_are_errors() {
    let bytes = b"fine words \xff\xfe here".to_vec();
    let config = ChunkerConfig {
        max_tokens: 2,
        overlap: 0,
        read_block: 4,
        max_unbroken: 64,
    };
    let results: Vec<_> = Chunker::new(&bytes[..], WhitespaceTokens, config)
        .unwrap()
        .collect();
    let err = results
        .iter()
        .find_map(|r| r.as_ref().err())
        .expect("an error");
    assert!(
        err.to_string().contains("invalid UTF-8 at byte 11"),
        "{err}"
    );
    // After an error the iterator ends.
    assert!(results.last().unwrap().is_err());

    let bad = ChunkerConfig {
        max_tokens: 8,
        overlap: 8,
        ..ChunkerConfig::default()
    };
    let err = Chunker::new(&b""[..], WhitespaceTokens, bad)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("overlap = 8") && err.contains("max_tokens = 8"),
        "{err}"
    );
}

#[test]
fn an_unbroken_run_is_cut_instead_of_buffered_forever() {
    let text = "x".repeat(10_000);
    let config = ChunkerConfig {
        max_tokens: 4,
        overlap: 1,
        read_block: 100,
        max_unbroken: 1000,
    };
    let cs: Vec<_> = Chunker::new(text.as_bytes(), WhitespaceTokens, config)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let total: usize = cs.iter().map(|c| c.text.len()).sum();
    assert!(total >= 10_000, "no byte lost: {total}");
}

/// An endless-looking reader that makes `len` bytes of words on the fly.
struct Generated {
    left: usize,
    n: u64,
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut written = 0;
        while written + 16 <= buf.len() && self.left > 0 {
            let word = format!("w{} ", self.n % 100_000);
            let take = word.len().min(self.left);
            buf[written..written + take].copy_from_slice(&word.as_bytes()[..take]);
            written += take;
            self.left -= take;
            self.n += 1;
        }
        Ok(written)
    }
}

#[test]
fn a_100_mb_stream_is_chunked_in_bounded_memory() {
    let len = 100 << 20;
    let config = ChunkerConfig::default();
    let mut chunks = 0usize;
    let mut bytes = 0u64;
    let mut max_text = 0usize;
    for c in Chunker::new(Generated { left: len, n: 0 }, WhitespaceTokens, config).unwrap() {
        let c = c.unwrap();
        chunks += 1;
        bytes = c.bytes.end;
        max_text = max_text.max(c.text.len());
    }
    assert!(bytes >= len as u64 - 16, "reached the end: {bytes}");
    assert!(chunks > (len / 8 / 254), "{chunks} windows");
    assert!(max_text < 254 * 8, "windows stay window-sized: {max_text}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn windows_are_slices_of_the_text(
        words in proptest::collection::vec("[a-zé日]{1,6}", 0..300),
        max in 2usize..40,
        overlap_frac in 0.0f64..0.9,
        block in 1usize..50,
    ) {
        let text = words.join(" ");
        let overlap = ((max as f64) * overlap_frac) as usize;
        let overlap = overlap.min(max - 1);
        let cs = chunks(&text, max, overlap, block);
        let mut covered_to = 0u64;
        for (i, c) in cs.iter().enumerate() {
            prop_assert_eq!(&text[c.bytes.start as usize..c.bytes.end as usize], c.text.as_str());
            prop_assert!(c.tokens <= max);
            let gap = if c.bytes.start > covered_to {
                &text[covered_to as usize..c.bytes.start as usize]
            } else {
                ""
            };
            prop_assert!(gap.trim().is_empty(), "window {} skips {:?}", i, gap);
            covered_to = c.bytes.end;
        }
        if !words.is_empty() {
            prop_assert_eq!(covered_to as usize, text.len());
        }
    }
}
