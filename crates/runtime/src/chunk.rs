//! Long inputs: split a stream of text into model-sized windows in bounded
//! memory.
//!
//! [`Chunker`] reads any [`Read`] a block at a time, decodes UTF-8 across
//! block boundaries, and yields [`Chunk`]s of at most `max_tokens` tokens
//! that overlap by `overlap` tokens. Only the current window and one read
//! block are held, so a 100 MB document is chunked in a few hundred KiB.
//!
//! ```
//! use runtime::chunk::{Chunker, ChunkerConfig, WhitespaceTokens};
//!
//! let text = "one two three four five six seven";
//! let config = ChunkerConfig { max_tokens: 3, overlap: 1, ..ChunkerConfig::default() };
//! let chunks: Vec<String> = Chunker::new(text.as_bytes(), WhitespaceTokens, config)
//!     .unwrap()
//!     .map(|c| c.unwrap().text)
//!     .collect();
//! assert_eq!(chunks, ["one two three", "three four five", "five six seven"]);
//! ```

use std::io::Read;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a text's tokens are: byte ranges into the text, in order.
///
/// The MiniLM tokenizer gives real word-piece offsets; [`WhitespaceTokens`]
/// counts words, for tests and for budgets that need no model.
pub trait TokenOffsets {
    /// The byte range of each token of `text`, ascending, special tokens
    /// excluded.
    fn offsets(&self, text: &str) -> Vec<Range<usize>>;
}

/// Whitespace-separated words as tokens.
#[derive(Debug, Clone, Copy, Default)]
pub struct WhitespaceTokens;

impl TokenOffsets for WhitespaceTokens {
    fn offsets(&self, text: &str) -> Vec<Range<usize>> {
        let mut out = Vec::new();
        let mut start = None;
        for (i, c) in text.char_indices() {
            match (c.is_whitespace(), start) {
                (true, Some(s)) => {
                    out.push(s..i);
                    start = None;
                }
                (false, None) => start = Some(i),
                _ => {}
            }
        }
        if let Some(s) = start {
            out.push(s..text.len());
        }
        out
    }
}

impl<F: Fn(&str) -> Vec<Range<usize>>> TokenOffsets for F {
    fn offsets(&self, text: &str) -> Vec<Range<usize>> {
        self(text)
    }
}

/// Window sizes of a [`Chunker`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ChunkerConfig {
    /// Tokens per window, special tokens excluded. Default 254, so a window
    /// with `[CLS]` and `[SEP]` is MiniLM's 256.
    pub max_tokens: usize,
    /// Tokens shared by consecutive windows. Default 32. Must be smaller than
    /// `max_tokens`.
    pub overlap: usize,
    /// Bytes read from the stream at a time. Default 64 KiB.
    pub read_block: usize,
    /// A run of text with no whitespace longer than this many bytes is cut
    /// where it stands, so one enormous "word" cannot grow the buffer without
    /// bound. Default 1 MiB.
    pub max_unbroken: usize,
}

impl Default for ChunkerConfig {
    fn default() -> Self {
        ChunkerConfig {
            max_tokens: 254,
            overlap: 32,
            read_block: 64 * 1024,
            max_unbroken: 1 << 20,
        }
    }
}

/// One window of a long text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The window's text.
    pub text: String,
    /// Its byte range in the whole stream.
    pub bytes: Range<u64>,
    /// Tokens it holds.
    pub tokens: usize,
    /// Its position: 0 for the first window.
    pub index: usize,
}

/// Splits a stream into overlapping token windows. An iterator of
/// `Result<Chunk>`; a read error or invalid UTF-8 ends it with an error.
#[derive(Debug)]
pub struct Chunker<R, T> {
    reader: R,
    tokens: T,
    config: ChunkerConfig,
    /// Decoded text not yet consumed; `buf_start` is its offset in the stream.
    buf: String,
    buf_start: u64,
    /// Bytes read but not yet decodable (a UTF-8 sequence split by a block).
    carry: Vec<u8>,
    eof: bool,
    failed: bool,
    index: usize,
    /// Token offsets into `buf` (recomputed after each read) and the first
    /// token the next window starts with.
    offsets: Vec<Range<usize>>,
    pos: usize,
    stale: bool,
    /// Stream offset where the last emitted window ended.
    emitted_to: u64,
}

impl<R: Read, T: TokenOffsets> Chunker<R, T> {
    /// A chunker over `reader`.
    pub fn new(reader: R, tokens: T, config: ChunkerConfig) -> Result<Self> {
        if config.max_tokens == 0 || config.overlap >= config.max_tokens {
            return Err(Error::invalid(
                "overlap",
                format!("{} with max_tokens = {}", config.overlap, config.max_tokens),
                "max_tokens above 0 and overlap smaller than max_tokens",
            ));
        }
        if config.read_block == 0 || config.max_unbroken < config.read_block {
            return Err(Error::invalid(
                "read_block",
                format!(
                    "{} with max_unbroken = {}",
                    config.read_block, config.max_unbroken
                ),
                "read_block above 0 and at most max_unbroken",
            ));
        }
        Ok(Chunker {
            reader,
            tokens,
            config,
            buf: String::new(),
            buf_start: 0,
            carry: Vec::new(),
            eof: false,
            failed: false,
            index: 0,
            offsets: Vec::new(),
            pos: 0,
            stale: true,
            emitted_to: 0,
        })
    }

    /// Reads one block into `buf`.
    fn fill(&mut self) -> Result<()> {
        let mut block = vec![0u8; self.config.read_block];
        let n = loop {
            match self.reader.read(&mut block) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Io(e)),
            }
        };
        if n == 0 {
            self.eof = true;
            if !self.carry.is_empty() {
                return Err(Error::InvalidInput(format!(
                    "the stream ends inside a UTF-8 sequence at byte {}",
                    self.buf_start + self.buf.len() as u64
                )));
            }
            return Ok(());
        }
        self.carry.extend_from_slice(&block[..n]);
        let valid = match std::str::from_utf8(&self.carry) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(e) => {
                return Err(Error::InvalidInput(format!(
                    "invalid UTF-8 at byte {} of the stream",
                    self.buf_start + self.buf.len() as u64 + e.valid_up_to() as u64
                )))
            }
        };
        let rest = self.carry.split_off(valid);
        // `carry[..valid]` is valid UTF-8 (checked above).
        self.buf
            .push_str(std::str::from_utf8(&self.carry).unwrap_or_default());
        self.carry = rest;
        Ok(())
    }

    /// The byte offset up to which tokens of `buf` cannot change when more
    /// text arrives: the last whitespace, or all of it at end of stream.
    fn stable_end(&self) -> usize {
        if self.eof || self.buf.len() > self.config.max_unbroken {
            return self.buf.len();
        }
        self.buf
            .char_indices()
            .rev()
            .find(|(_, c)| c.is_whitespace())
            .map_or(0, |(i, _)| i)
    }

    fn next_chunk(&mut self) -> Result<Option<Chunk>> {
        let max = self.config.max_tokens;
        loop {
            if self.stale {
                let stable = self.stable_end();
                self.offsets = self
                    .tokens
                    .offsets(&self.buf[..stable])
                    .into_iter()
                    .filter(|r| r.end <= stable && r.start < r.end)
                    .collect();
                self.pos = 0;
                self.stale = false;
            }
            let avail = self.offsets.len() - self.pos;
            if avail <= max && !self.eof {
                // Drop what no later window needs, then read on. Draining
                // only here keeps the work per byte constant.
                let keep_from = self.offsets.get(self.pos).map_or(
                    // No pending token: keep the unstable tail.
                    self.stable_end_cached(),
                    |r| r.start,
                );
                self.buf.drain(..keep_from);
                self.buf_start += keep_from as u64;
                self.fill()?;
                self.stale = true;
                continue;
            }
            let window = &self.offsets[self.pos..self.pos + avail.min(max)];
            // Tokens the previous window emitted (the overlap) are not news.
            let fresh = window
                .iter()
                .filter(|r| self.buf_start + r.end as u64 > self.emitted_to)
                .count();
            if window.is_empty() || fresh == 0 {
                return Ok(None);
            }
            let take = window.len();
            let (start, end) = (window[0].start, window[take - 1].end);
            let chunk = Chunk {
                text: self.buf[start..end].to_string(),
                bytes: self.buf_start + start as u64..self.buf_start + end as u64,
                tokens: take,
                index: self.index,
            };
            self.index += 1;
            self.emitted_to = chunk.bytes.end;
            self.pos += if take < avail {
                take - self.config.overlap
            } else {
                take
            };
            return Ok(Some(chunk));
        }
    }

    /// Where the stable text ended when offsets were last computed.
    fn stable_end_cached(&self) -> usize {
        self.offsets.last().map_or(0, |r| r.end).min(self.buf.len())
    }
}

impl<R: Read, T: TokenOffsets> Iterator for Chunker<R, T> {
    type Item = Result<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.next_chunk() {
            Ok(Some(c)) => Some(Ok(c)),
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}
