//! Byte-level BPE (`tokenizer.ggml.model = gpt2`).
//!
//! The regex split and the merge loop are the `tokenizers` crate's: its
//! `ByteLevel` pre-tokenizer runs the GPT-2 expression
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//! (with onig, which has the look-ahead the expression needs) and maps bytes
//! to the printable characters GGUF vocabularies are written in; for the
//! SmolLM family an isolating `\p{N}` split runs first, as in llama.cpp.

use std::collections::HashMap;
use std::sync::LazyLock;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    Model, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, PreTokenizerWrapper,
    SplitDelimiterBehavior,
};

use crate::error::{Error, Result};

pub(super) struct Bpe {
    model: BPE,
    pre: Sequence,
}

impl std::fmt::Debug for Bpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bpe").finish_non_exhaustive()
    }
}

fn tk(e: impl std::fmt::Display) -> Error {
    Error::TokenizerBuild(e.to_string())
}

impl Bpe {
    pub(super) fn new(
        token_to_id: &HashMap<String, u32>,
        merges: Vec<(String, String)>,
        split_digits: bool,
    ) -> Result<Self> {
        let vocab: Vocab = token_to_id.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let model = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tk)?;
        let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
        if split_digits {
            let digits = Split::new(
                SplitPattern::Regex(r"\p{N}".to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(tk)?;
            steps.push(digits.into());
        }
        steps.push(ByteLevel::new(false, false, true).into());
        Ok(Self {
            model,
            pre: Sequence::new(steps),
        })
    }

    pub(super) fn tokenize(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut pre = PreTokenizedString::from(text);
        self.pre.pre_tokenize(&mut pre).map_err(tk)?;
        for (piece, _, _) in pre.get_splits(OffsetReferential::Normalized, OffsetType::Byte) {
            let toks = self.model.tokenize(piece).map_err(tk)?;
            out.extend(toks.iter().map(|t| t.id));
        }
        Ok(())
    }
}

/// GPT-2's map from a printable character back to the byte it stands for.
static CHAR_BYTE: LazyLock<HashMap<char, u8>> = LazyLock::new(|| {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .filter_map(|(b, c)| Some((char::from_u32(c)?, b as u8)))
        .collect()
});

/// Appends the bytes a byte-level token text stands for; a character outside
/// the map (not written by a byte-level vocabulary) is kept as its UTF-8.
pub(super) fn byte_decode(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        match CHAR_BYTE.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_covers_every_byte_once() {
        assert_eq!(CHAR_BYTE.len(), 256);
        let mut out = Vec::new();
        byte_decode("\u{120}hello\u{10A}", &mut out);
        assert_eq!(out, b" hello\n");
    }
}
