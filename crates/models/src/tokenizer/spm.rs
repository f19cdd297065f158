//! SentencePiece with scores and byte fallback (`tokenizer.ggml.model =
//! llama`), the algorithm of llama.cpp's `llm_tokenizer_spm`: start from one
//! symbol per UTF-8 character, repeatedly merge the adjacent pair whose
//! concatenation is the vocabulary token with the highest score (ties: the
//! leftmost), and write a symbol that is no token as `<0xXX>` byte tokens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

#[derive(Debug)]
pub(super) struct Spm {
    scores: Vec<f32>,
    /// The token for each byte: `<0xXX>`, else the one-byte text.
    byte_tokens: Vec<Option<u32>>,
}

#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

#[derive(Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    // The heap pops the greatest: highest score, then the leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// The byte a `<0xXX>` token stands for.
pub(super) fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

impl Spm {
    pub(super) fn new(token_to_id: &HashMap<String, u32>, scores: Vec<f32>) -> Self {
        let byte_tokens = (0..=255u8)
            .map(|b| {
                token_to_id
                    .get(&format!("<0x{b:02X}>"))
                    .copied()
                    .or_else(|| {
                        b.is_ascii()
                            .then(|| token_to_id.get(&(b as char).to_string()).copied())
                            .flatten()
                    })
            })
            .collect();
        Self {
            scores,
            byte_tokens,
        }
    }

    /// Tokenizes `text` (spaces already written as `▁`) onto `out`.
    pub(super) fn tokenize(&self, text: &str, vocab: &HashMap<String, u32>, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        let mut iter = text.char_indices().peekable();
        while let Some((start, c)) = iter.next() {
            let i = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: iter.peek().map(|_| i + 1),
            });
        }
        let mut heap = BinaryHeap::with_capacity(symbols.len());
        let try_add = |heap: &mut BinaryHeap<Bigram>,
                       symbols: &[Symbol],
                       left: Option<usize>,
                       right: Option<usize>| {
            let (Some(l), Some(r)) = (left, right) else {
                return;
            };
            let size = symbols[l].len + symbols[r].len;
            let s = symbols[l].start;
            if let Some(&id) = vocab.get(&text[s..s + size]) {
                heap.push(Bigram {
                    score: self.scores[id as usize],
                    left: l,
                    right: r,
                    size,
                });
            }
        };
        for i in 1..symbols.len() {
            try_add(&mut heap, &symbols, Some(i - 1), Some(i));
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            symbols[b.left].len += r.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(b.left);
            }
            try_add(&mut heap, &symbols, l.prev, Some(b.left));
            try_add(&mut heap, &symbols, Some(b.left), r.next);
        }
        let mut i = Some(0);
        while let Some(k) = i {
            let s = symbols[k];
            let piece = &text[s.start..s.start + s.len];
            match vocab.get(piece) {
                Some(&id) => out.push(id),
                None => out.extend(piece.bytes().filter_map(|b| self.byte_tokens[b as usize])),
            }
            i = s.next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let toks = ["a", "b", "ab", "bc", "c", "<0xC3>", "<0xA9>"];
        let scores = vec![0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0];
        let vocab: HashMap<String, u32> = toks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let spm = Spm::new(&vocab, scores);
        let mut out = Vec::new();
        // "bc" outscores "ab": a + bc, then é as two byte tokens.
        spm.tokenize("abcé", &vocab, &mut out);
        assert_eq!(out, vec![0, 3, 5, 6]);
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0x0>"), None);
    }
}
