//! A rule-based embedder that never fails: feature hashing of words and character trigrams.

use crate::backend::{Backend, Deadline};
use crate::error::BackendError;

/// Embeds texts by hashing their lower-cased words and character trigrams into `dims` signed
/// buckets and normalising to unit length. Texts that share words land close together; it is a
/// last resort, not a semantic model. It never fails; an empty text gives a zero vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashingEmbedder {
    dims: usize,
}

impl HashingEmbedder {
    /// An embedder producing vectors of `dims` dimensions (at least 1; 384 matches MiniLM).
    pub fn new(dims: usize) -> Self {
        Self { dims: dims.max(1) }
    }

    /// Vector length.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Embeds one text.
    pub fn embed_one(&self, text: &str) -> Vec<f32> {
        let mut v = vec![0.0f32; self.dims];
        let lower = text.to_lowercase();
        for word in lower
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            self.add(&mut v, word.as_bytes(), 1.0);
            let padded: Vec<char> = std::iter::once('^')
                .chain(word.chars())
                .chain(std::iter::once('$'))
                .collect();
            for tri in padded.windows(3) {
                let s: String = tri.iter().collect();
                self.add(&mut v, s.as_bytes(), 0.5);
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }

    fn add(&self, v: &mut [f32], bytes: &[u8], weight: f32) {
        let h = fnv1a(bytes);
        let idx = (h % self.dims as u64) as usize;
        let sign = if (h >> 63) & 1 == 1 { -1.0 } else { 1.0 };
        v[idx] += sign * weight;
    }
}

impl Default for HashingEmbedder {
    /// 384 dimensions, as all-MiniLM-L6-v2.
    fn default() -> Self {
        Self::new(384)
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Backend<[String], Vec<Vec<f32>>> for HashingEmbedder {
    fn call(&self, texts: &[String], _deadline: Deadline) -> Result<Vec<Vec<f32>>, BackendError> {
        Ok(texts.iter().map(|t| self.embed_one(t)).collect())
    }

    fn is_loaded(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn similar_texts_are_closer_and_vectors_are_unit() {
        let e = HashingEmbedder::default();
        let a = e.embed_one("The cat sits on the mat");
        let b = e.embed_one("A cat sat on a mat");
        let c = e.embed_one("Quarterly revenue grew by eight percent");
        assert_eq!(a.len(), 384);
        assert!((cos(&a, &a) - 1.0).abs() < 1e-5);
        assert!(
            cos(&a, &b) > cos(&a, &c) + 0.2,
            "{} vs {}",
            cos(&a, &b),
            cos(&a, &c)
        );
        assert!(e.embed_one("").iter().all(|x| *x == 0.0));
        assert_eq!(e.embed_one("Same"), e.embed_one("same"));
    }
}
