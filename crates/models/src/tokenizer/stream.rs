//! Decoding a stream of generated ids into text at UTF-8 boundaries.

use super::Tokenizer;
use crate::error::Result;

/// Turns generated ids into text as they come, one call per id.
///
/// A token may end in the middle of a UTF-8 character (byte-fallback tokens,
/// byte-level BPE pieces of an emoji): such bytes are held until the
/// character is complete, so every string returned is whole text and their
/// concatenation equals [`Tokenizer::decode`] of all the ids. Bytes that can
/// never become UTF-8 are written as U+FFFD, as `decode` writes them.
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    special: bool,
    pending: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    pub(super) fn new(tok: &'a Tokenizer, special: bool) -> Self {
        Self {
            tok,
            special,
            pending: Vec::new(),
        }
    }

    /// Adds one id; returns the text that is now complete (maybe empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.tok.check(id)?;
        self.tok.piece_into(id, self.special, &mut self.pending);
        Ok(self.take_complete())
    }

    /// Bytes held back, waiting for the rest of a character.
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    /// Ends the stream: whatever is held back, with U+FFFD for an
    /// incomplete character.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }

    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Safety of the slice: from_utf8 vouched for these bytes.
                    out.push_str(
                        std::str::from_utf8(&self.pending[start..start + valid])
                            .unwrap_or_default(),
                    );
                    start += valid;
                    match e.error_len() {
                        // Invalid bytes: write U+FFFD like from_utf8_lossy.
                        Some(n) => {
                            out.push('\u{FFFD}');
                            start += n;
                        }
                        // An incomplete character at the end: hold it.
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}
