//! [`RuleBasedEmbedder`]: feature hashing of words and character n-grams.

use serde::{Deserialize, Serialize};

use crate::{Embed, Result};

/// Settings of the [`RuleBasedEmbedder`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuleBasedConfig {
    /// Output dimension. Default 384 (the same as all-MiniLM-L6-v2).
    pub dim: usize,
    /// Shortest character n-gram. Default 3.
    pub min_ngram: usize,
    /// Longest character n-gram. Default 5.
    pub max_ngram: usize,
    /// Weight of a word. Default 1.0.
    pub word_weight: f32,
    /// Weight of a pair of adjacent words. Default 0.5.
    pub bigram_weight: f32,
    /// Weight of a character n-gram. Default 0.25.
    pub char_weight: f32,
}

impl Default for RuleBasedConfig {
    fn default() -> Self {
        Self {
            dim: 384,
            min_ngram: 3,
            max_ngram: 5,
            word_weight: 1.0,
            bigram_weight: 0.5,
            char_weight: 0.25,
        }
    }
}

/// A sentence embedder that never fails: lower-cased words, pairs of adjacent
/// words and character n-grams of each word (with `<` `>` boundary marks) are
/// hashed (FNV-1a, a fixed function, so results are identical across runs,
/// machines and versions) into `dim` signed buckets; the vector is L2
/// normalised. Texts sharing words and word pieces come out similar; it knows
/// nothing of meaning. An empty text maps to one fixed unit vector.
#[derive(Debug, Clone, Default)]
pub struct RuleBasedEmbedder {
    config: RuleBasedConfig,
}

/// FNV-1a (the `fnv` crate's) over the parts, each followed by a 0xff
/// separator so that ("ab", "c") and ("a", "bc") differ.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    for p in parts {
        h.write(p);
        h.write_u8(0xff);
    }
    h.finish()
}

impl RuleBasedEmbedder {
    /// An embedder with `config` (a `dim` of 0 is taken as 1, an n-gram range
    /// with `min > max` as the single length `min`).
    pub fn new(config: RuleBasedConfig) -> Self {
        let mut config = config;
        config.dim = config.dim.max(1);
        config.min_ngram = config.min_ngram.max(1);
        config.max_ngram = config.max_ngram.max(config.min_ngram);
        Self { config }
    }

    /// The settings in use.
    pub fn config(&self) -> &RuleBasedConfig {
        &self.config
    }

    fn add(&self, v: &mut [f32], kind: &[u8], parts: &[&[u8]], w: f32) {
        let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
        all.push(kind);
        all.extend_from_slice(parts);
        let h = fnv1a(&all);
        let idx = (h % v.len() as u64) as usize;
        let sign = if (h >> 63) == 0 { 1.0 } else { -1.0 };
        v[idx] += sign * w;
    }

    /// The embedding of one text: `dim` values, unit L2 norm.
    pub fn embed_one(&self, text: &str) -> Vec<f32> {
        let c = &self.config;
        let mut v = vec![0f32; c.dim];
        let lower = text.to_lowercase();
        let words: Vec<&str> = lower
            .split(|ch: char| !ch.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        for (i, w) in words.iter().enumerate() {
            self.add(&mut v, b"w", &[w.as_bytes()], c.word_weight);
            if let Some(next) = words.get(i + 1) {
                self.add(
                    &mut v,
                    b"b",
                    &[w.as_bytes(), next.as_bytes()],
                    c.bigram_weight,
                );
            }
            let marked: Vec<char> = std::iter::once('<')
                .chain(w.chars())
                .chain(std::iter::once('>'))
                .collect();
            for n in c.min_ngram..=c.max_ngram {
                if n > marked.len() {
                    break;
                }
                for win in marked.windows(n) {
                    let s: String = win.iter().collect();
                    self.add(&mut v, b"c", &[s.as_bytes()], c.char_weight);
                }
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        } else {
            // No features (empty text, or weights all zero): a fixed unit vector.
            let idx = (fnv1a(&[b"empty"]) % c.dim as u64) as usize;
            v[idx] = 1.0;
        }
        v
    }
}

impl Embed for RuleBasedEmbedder {
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        Ok(texts.iter().map(|t| self.embed_one(t)).collect())
    }

    fn dim(&self) -> usize {
        self.config.dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn unit_norm_deterministic_and_total() {
        let e = RuleBasedEmbedder::default();
        for t in [
            "",
            "   ",
            "Hello, world!",
            "ünïcödé 東京 🙂",
            &"long ".repeat(5000),
        ] {
            let v = e.embed_one(t);
            assert_eq!(v.len(), 384);
            let n: f32 = v.iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-4, "{t:?} norm {n}");
            assert_eq!(v, e.embed_one(t));
        }
        // Fixed hash: FNV-1a of "a" then the 0xff separator, as computed
        // by the reference definition (offset 0xcbf29ce484222325, prime
        // 0x100000001b3), so bucket indices never change across versions.
        assert_eq!(fnv1a(&[b"a"]), 0x089b_c907_b544_c769);
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    #[test]
    fn shared_words_score_higher() {
        let e = RuleBasedEmbedder::default();
        let a = e.embed_one("The cat sits on the mat");
        let b = e.embed_one("A cat is sitting on a mat");
        let c = e.embed_one("Quarterly revenue grew by twelve percent");
        assert!(
            cos(&a, &b) > cos(&a, &c) + 0.2,
            "{} vs {}",
            cos(&a, &b),
            cos(&a, &c)
        );
        assert!(cos(&a, &e.embed_one("the CAT sits, on the mat!")) > 0.999);
    }

    #[test]
    fn odd_configs_do_not_panic() {
        let e = RuleBasedEmbedder::new(RuleBasedConfig {
            dim: 0,
            min_ngram: 9,
            max_ngram: 2,
            ..Default::default()
        });
        assert_eq!(e.embed(&["abc", ""]).unwrap()[0], vec![1.0]);
    }
}
