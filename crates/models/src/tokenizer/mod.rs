//! Tokenizers read from a GGUF file's metadata, matching llama.cpp token for
//! token.
//!
//! Two tokenizer models are supported, chosen by `tokenizer.ggml.model`:
//!
//! - `gpt2`: byte-level BPE over `tokenizer.ggml.merges`, with the regex
//!   pre-tokenizer named by `tokenizer.ggml.pre` (`smollm` and the family that
//!   shares its rules, or `gpt2`). The regex split and the merge loop come from
//!   the `tokenizers` crate (onig regexes): its `ByteLevel` pre-tokenizer runs
//!   the same GPT-2 expression llama.cpp runs, and its BPE applies merges by
//!   rank like llama.cpp's.
//! - `llama`: SentencePiece with scores and byte fallback, as llama.cpp's
//!   `llm_tokenizer_spm`: spaces become `▁`, the text is split into UTF-8
//!   characters, the adjacent pair whose concatenation is the best-scored
//!   token is merged until none is left, and a character that is no token is
//!   written as its `<0xXX>` byte tokens.
//!
//! Before either runs, special tokens are split out of the text as llama.cpp
//! does: control and unknown tokens only when `parse_special` is set,
//! user-defined tokens always, longest first.
//!
//! Decoding follows llama.cpp's `token_to_piece`; [`StreamDecoder`] yields
//! text only at UTF-8 boundaries, for streaming generation.

mod bpe;
mod spm;
mod stream;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::{Error, Result};

pub use self::stream::StreamDecoder;

/// What a token is, from `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenType {
    /// 0: no type given.
    Undefined,
    /// 1: an ordinary piece of text.
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: a control token (`<|im_start|>`, `<bos>`): never produced from plain
    /// text, matched in the text only when special tokens are parsed.
    Control,
    /// 4: a user-defined token: always matched as a whole in the text.
    UserDefined,
    /// 5: a reserved, unused token.
    Unused,
    /// 6: a byte-fallback token `<0xXX>`.
    Byte,
}

impl TokenType {
    fn from_gguf(v: i64) -> Option<Self> {
        Some(match v {
            0 => Self::Undefined,
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }
}

/// The tokenizer family (`tokenizer.ggml.model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenizerModel {
    /// `gpt2`: byte-level BPE.
    Bpe,
    /// `llama`: SentencePiece with scores and byte fallback.
    SentencePiece,
}

/// Token attributes as llama.cpp keeps them (a token may gain `CONTROL` when
/// its text names an end of turn).
mod attr {
    pub(super) const UNKNOWN: u8 = 1 << 0;
    pub(super) const UNUSED: u8 = 1 << 1;
    pub(super) const NORMAL: u8 = 1 << 2;
    pub(super) const CONTROL: u8 = 1 << 3;
    pub(super) const USER_DEFINED: u8 = 1 << 4;
    pub(super) const BYTE: u8 = 1 << 5;
}

/// Texts llama.cpp treats as end of generation when they are tokens
/// (`llama-vocab.cpp`, the EOG list).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "[e~[",
];

/// Texts llama.cpp takes for the end-of-turn token when the file names none;
/// the first one present wins.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "<end_of_utterance>",
];

/// Pre-tokenizers (`tokenizer.ggml.pre`) that llama.cpp runs with the
/// SmolLM rules: single digits split off, then the GPT-2 expression.
const SMOLLM_FAMILY: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
];

/// A tokenizer built from a GGUF file's `tokenizer.*` metadata.
///
/// ```no_run
/// let tok = models::Tokenizer::from_gguf_file(models::gguf_path("smollm2-135m")?)?;
/// let ids = tok.encode("Hello world", true, true)?;
/// assert_eq!(tok.decode(&ids, false)?, "Hello world");
/// # Ok::<(), models::Error>(())
/// ```
#[derive(Debug)]
pub struct Tokenizer {
    model: TokenizerModel,
    pre: String,
    tokens: Vec<String>,
    attrs: Vec<u8>,
    types: Vec<TokenType>,
    token_to_id: HashMap<String, u32>,
    specials: Specials,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eog: BTreeSet<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    chat_template: Option<String>,
    engine: Engine,
}

#[derive(Debug)]
enum Engine {
    Bpe(Box<bpe::Bpe>),
    Spm(spm::Spm),
}

/// The special tokens split out of the text before the tokenizer proper runs,
/// in llama.cpp's order (longest text first).
#[derive(Debug)]
struct Specials {
    /// Ids, longest text first (ties by id).
    order: Vec<u32>,
    /// Text -> rank in `order`.
    by_text: HashMap<String, usize>,
    /// Distinct text lengths in bytes, longest first.
    lengths: Vec<usize>,
    /// Whether some special token starts with this byte.
    first_byte: [bool; 256],
}

/// One piece of the text after special tokens are split out.
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

fn meta<'a>(c: &'a Content, key: &str) -> Option<&'a Value> {
    c.metadata.get(key)
}

fn bad(key: &str, reason: impl Into<String>) -> Error {
    Error::BadTokenizerMetadata {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn meta_array<'a>(c: &'a Content, key: &str) -> Result<Option<&'a Vec<Value>>> {
    match meta(c, key) {
        None => Ok(None),
        Some(v) => v
            .to_vec()
            .map(Some)
            .map_err(|_| bad(key, "expected an array")),
    }
}

fn value_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn meta_id(c: &Content, key: &str, n: usize) -> Result<Option<u32>> {
    let Some(v) = meta(c, key) else {
        return Ok(None);
    };
    let id = value_i64(v).ok_or_else(|| bad(key, "expected an integer"))?;
    // llama.cpp disables an out-of-range special token rather than failing.
    Ok(u32::try_from(id).ok().filter(|&i| (i as usize) < n))
}

fn meta_bool(c: &Content, key: &str) -> Result<Option<bool>> {
    match meta(c, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(bad(key, "expected a boolean")),
    }
}

impl Tokenizer {
    /// Reads the GGUF header of `path` (no tensor data) and builds its tokenizer.
    pub fn from_gguf_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut f = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = Content::read(&mut f).map_err(|source| Error::GgufHeader {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_gguf(&content)
    }

    /// Builds the tokenizer from GGUF metadata already read.
    pub fn from_gguf(c: &Content) -> Result<Self> {
        let model_name = match meta(c, "tokenizer.ggml.model") {
            None => return Err(bad("tokenizer.ggml.model", "missing")),
            Some(v) => v
                .to_string()
                .map_err(|_| bad("tokenizer.ggml.model", "expected a string"))?
                .clone(),
        };
        let model = match model_name.as_str() {
            "gpt2" => TokenizerModel::Bpe,
            "llama" => TokenizerModel::SentencePiece,
            other => {
                return Err(Error::UnsupportedTokenizer {
                    what: "tokenizer model (tokenizer.ggml.model)",
                    name: other.to_string(),
                    supported: "gpt2, llama",
                })
            }
        };
        let pre = match meta(c, "tokenizer.ggml.pre") {
            None => "default".to_string(),
            Some(v) => v
                .to_string()
                .map_err(|_| bad("tokenizer.ggml.pre", "expected a string"))?
                .clone(),
        };

        let tokens: Vec<String> = meta_array(c, "tokenizer.ggml.tokens")?
            .ok_or_else(|| bad("tokenizer.ggml.tokens", "missing"))?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.to_string().cloned().map_err(|_| {
                    bad(
                        "tokenizer.ggml.tokens",
                        format!("entry {i} is not a string"),
                    )
                })
            })
            .collect::<Result<_>>()?;
        let n = tokens.len();
        if n == 0 || n > u32::MAX as usize {
            return Err(bad(
                "tokenizer.ggml.tokens",
                format!("{n} tokens; expected between 1 and {}", u32::MAX),
            ));
        }

        let types: Vec<TokenType> = match meta_array(c, "tokenizer.ggml.token_type")? {
            None => vec![TokenType::Normal; n],
            Some(a) => {
                if a.len() != n {
                    return Err(bad(
                        "tokenizer.ggml.token_type",
                        format!("{} entries for {n} tokens", a.len()),
                    ));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        value_i64(v).and_then(TokenType::from_gguf).ok_or_else(|| {
                            bad(
                                "tokenizer.ggml.token_type",
                                format!("entry {i} is {v:?}; expected an integer 0..=6"),
                            )
                        })
                    })
                    .collect::<Result<_>>()?
            }
        };
        let scores: Vec<f32> = match meta_array(c, "tokenizer.ggml.scores")? {
            None => vec![0.0; n],
            Some(a) => {
                if a.len() != n {
                    return Err(bad(
                        "tokenizer.ggml.scores",
                        format!("{} entries for {n} tokens", a.len()),
                    ));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.to_f32().map_err(|_| {
                            bad("tokenizer.ggml.scores", format!("entry {i} is not an f32"))
                        })
                    })
                    .collect::<Result<_>>()?
            }
        };

        let mut attrs: Vec<u8> = types
            .iter()
            .map(|t| match t {
                TokenType::Undefined => 0,
                TokenType::Normal => attr::NORMAL,
                TokenType::Unknown => attr::UNKNOWN,
                TokenType::Control => attr::CONTROL,
                TokenType::UserDefined => attr::USER_DEFINED,
                TokenType::Unused => attr::UNUSED,
                TokenType::Byte => attr::BYTE,
            })
            .collect();

        // Like llama.cpp: a later token with the same text wins the lookup.
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            token_to_id.insert(t.clone(), i as u32);
        }

        let (def_bos, def_eos) = match model {
            TokenizerModel::SentencePiece => (Some(1), Some(2)),
            TokenizerModel::Bpe => (None, None),
        };
        let in_range = |d: Option<u32>| d.filter(|&i| (i as usize) < n);
        let bos = meta_id(c, "tokenizer.ggml.bos_token_id", n)?.or(in_range(def_bos));
        let eos = meta_id(c, "tokenizer.ggml.eos_token_id", n)?.or(in_range(def_eos));
        let eot_key = meta_id(c, "tokenizer.ggml.eot_token_id", n)?;
        let eom_key = meta_id(c, "tokenizer.ggml.eom_token_id", n)?;

        let (def_add_bos, def_space_prefix) = match model {
            TokenizerModel::SentencePiece => (true, true),
            TokenizerModel::Bpe => (false, false),
        };
        let add_bos = meta_bool(c, "tokenizer.ggml.add_bos_token")?.unwrap_or(def_add_bos);
        let add_eos = meta_bool(c, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let add_space_prefix =
            meta_bool(c, "tokenizer.ggml.add_space_prefix")?.unwrap_or(def_space_prefix);
        if add_bos && bos.is_none() {
            return Err(bad(
                "tokenizer.ggml.bos_token_id",
                "missing or out of range while tokenizer.ggml.add_bos_token is true",
            ));
        }
        if add_eos && eos.is_none() {
            return Err(bad(
                "tokenizer.ggml.eos_token_id",
                "missing or out of range while tokenizer.ggml.add_eos_token is true",
            ));
        }

        // End of generation: llama.cpp's list of texts, plus eos / eot / eom.
        let mut eog = BTreeSet::new();
        let eot = eot_key.or_else(|| EOT_TEXTS.iter().find_map(|t| token_to_id.get(*t).copied()));
        for text in EOG_TEXTS.iter().chain(EOT_TEXTS) {
            if let Some(&id) = token_to_id.get(*text) {
                attrs[id as usize] |= attr::CONTROL;
                if EOG_TEXTS.contains(text) {
                    eog.insert(id);
                }
            }
        }
        eog.extend(eos);
        eog.extend(eot);
        eog.extend(eom_key);
        // Control tokens named "unused" are unused (llama.cpp does the same).
        for (i, t) in tokens.iter().enumerate() {
            if attrs[i] & attr::CONTROL != 0 && t.contains("unused") {
                attrs[i] |= attr::UNUSED;
            }
        }

        let specials = Specials::new(&tokens, &attrs);

        let engine = match model {
            TokenizerModel::Bpe => {
                let digits = if SMOLLM_FAMILY.contains(&pre.as_str()) {
                    true
                } else if pre == "gpt2" {
                    false
                } else {
                    return Err(Error::UnsupportedTokenizer {
                        what: "BPE pre-tokenizer (tokenizer.ggml.pre)",
                        name: pre,
                        supported: "smollm, starcoder, refact, command-r, codeshell, exaone, minerva-7b, gpt2",
                    });
                };
                let merges = meta_array(c, "tokenizer.ggml.merges")?.ok_or_else(|| {
                    bad(
                        "tokenizer.ggml.merges",
                        "missing (a gpt2 tokenizer needs its merges)",
                    )
                })?;
                let merges = merges
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let s = v.to_string().map_err(|_| {
                            bad(
                                "tokenizer.ggml.merges",
                                format!("entry {i} is not a string"),
                            )
                        })?;
                        // llama.cpp splits at the first space after the first character.
                        let first = s.chars().next().map_or(0, char::len_utf8);
                        let pos = s[first..].find(' ').map(|p| p + first).ok_or_else(|| {
                            bad(
                                "tokenizer.ggml.merges",
                                format!("entry {i} ({s:?}) is not two pieces separated by a space"),
                            )
                        })?;
                        Ok((s[..pos].to_string(), s[pos + 1..].to_string()))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Engine::Bpe(Box::new(bpe::Bpe::new(&token_to_id, merges, digits)?))
            }
            TokenizerModel::SentencePiece => Engine::Spm(spm::Spm::new(&token_to_id, scores)),
        };

        let chat_template = match meta(c, "tokenizer.chat_template") {
            None => None,
            Some(v) => Some(
                v.to_string()
                    .map_err(|_| bad("tokenizer.chat_template", "expected a string"))?
                    .clone(),
            ),
        };

        Ok(Self {
            model,
            pre,
            tokens,
            attrs,
            types,
            token_to_id,
            specials,
            bos,
            eos,
            eot,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            chat_template,
            engine,
        })
    }

    /// The tokenizer family.
    pub fn model(&self) -> TokenizerModel {
        self.model
    }

    /// The pre-tokenizer name (`tokenizer.ggml.pre`; `default` when absent).
    pub fn pre_tokenizer(&self) -> &str {
        &self.pre
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-turn token (`<|im_end|>`, `<end_of_turn>`, ...), when the
    /// vocabulary has one.
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// Every token that ends generation (eos, eot and the texts llama.cpp
    /// treats so), ascending.
    pub fn eog_tokens(&self) -> impl Iterator<Item = u32> + '_ {
        self.eog.iter().copied()
    }

    /// Whether `id` ends generation.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// Whether [`encode`](Self::encode) with `add_special` puts the BOS token first.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether [`encode`](Self::encode) with `add_special` puts the EOS token last.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// The `tokenizer.chat_template` (Jinja) text, when the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The text of token `id` as stored in the vocabulary (`Ġ` and `▁` not
    /// undone; see [`decode`](Self::decode) for text).
    pub fn token_text(&self, id: u32) -> Result<&str> {
        self.check(id)?;
        Ok(&self.tokens[id as usize])
    }

    /// The type of token `id`.
    pub fn token_type(&self, id: u32) -> Result<TokenType> {
        self.check(id)?;
        Ok(self.types[id as usize])
    }

    /// Whether `id` is a control or unknown token (not text; [`decode`](Self::decode)
    /// writes it only with `special`).
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & (attr::CONTROL | attr::UNKNOWN) != 0)
    }

    /// The id of the token whose vocabulary text is exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    fn check(&self, id: u32) -> Result<()> {
        if (id as usize) < self.tokens.len() {
            Ok(())
        } else {
            Err(Error::TokenOutOfRange {
                id,
                vocab: self.tokens.len(),
            })
        }
    }

    /// Token ids for `text`, as llama.cpp's `llama_tokenize` gives them.
    ///
    /// `add_special` adds BOS (and EOS) where the model asks for them
    /// (`tokenizer.ggml.add_bos_token`); `parse_special` matches control
    /// tokens written in the text (`<|im_start|>`) as single tokens, where
    /// otherwise they are tokenized as plain text. User-defined tokens are
    /// always matched.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let fragments = self.partition(text, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match &self.engine {
            Engine::Spm(spm) => {
                let mut prev_special = true;
                let mut buf = String::new();
                for f in &fragments {
                    match f {
                        Fragment::Text(t) => {
                            buf.clear();
                            if self.add_space_prefix && prev_special {
                                buf.push(' ');
                            }
                            buf.push_str(t);
                            let escaped = buf.replace(' ', "\u{2581}");
                            spm.tokenize(&escaped, &self.token_to_id, &mut out);
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(*id);
                            prev_special = true;
                        }
                    }
                }
            }
            Engine::Bpe(bpe) => {
                for f in &fragments {
                    match f {
                        Fragment::Text(t) => bpe.tokenize(t, &mut out)?,
                        Fragment::Token(id) => out.push(*id),
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// Splits special tokens out of `text` the way llama.cpp's
    /// `tokenizer_st_partition` does: for each special token, longest first,
    /// every occurrence (leftmost first, not overlapping) inside text not yet
    /// claimed becomes that token. Candidates are found by hashing each
    /// substring of a special token's length, so the cost grows with the text
    /// times the number of distinct lengths, not times the number of tokens.
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        if text.is_empty() {
            return Vec::new();
        }
        let bytes = text.as_bytes();
        // (rank, start, len) for every occurrence of an eligible special token.
        let mut hits: Vec<(usize, usize, usize)> = Vec::new();
        for start in 0..bytes.len() {
            if !self.specials.first_byte[bytes[start] as usize] || !text.is_char_boundary(start) {
                continue;
            }
            for &len in &self.specials.lengths {
                let end = start + len;
                if end > bytes.len() || !text.is_char_boundary(end) {
                    continue;
                }
                if let Some(&rank) = self.specials.by_text.get(&text[start..end]) {
                    let id = self.specials.order[rank] as usize;
                    if !parse_special && self.attrs[id] & (attr::CONTROL | attr::UNKNOWN) != 0 {
                        continue;
                    }
                    hits.push((rank, start, len));
                }
            }
        }
        if hits.is_empty() {
            return vec![Fragment::Text(text)];
        }
        hits.sort_unstable();
        let mut claimed = vec![false; bytes.len()];
        let mut taken: Vec<(usize, usize, u32)> = Vec::new();
        for (rank, start, len) in hits {
            if claimed[start..start + len].iter().any(|&c| c) {
                continue;
            }
            claimed[start..start + len]
                .iter_mut()
                .for_each(|c| *c = true);
            taken.push((start, len, self.specials.order[rank]));
        }
        taken.sort_unstable();
        let mut out = Vec::with_capacity(taken.len() * 2 + 1);
        let mut pos = 0;
        for (start, len, id) in taken {
            if start > pos {
                out.push(Fragment::Text(&text[pos..start]));
            }
            out.push(Fragment::Token(id));
            pos = start + len;
        }
        if pos < text.len() {
            out.push(Fragment::Text(&text[pos..]));
        }
        out
    }

    /// The bytes token `id` stands for (llama.cpp's `token_to_piece`): control
    /// and unknown tokens are empty unless `special`; unused tokens are empty.
    pub fn token_bytes(&self, id: u32, special: bool) -> Result<Vec<u8>> {
        self.check(id)?;
        let mut out = Vec::new();
        self.piece_into(id, special, &mut out);
        Ok(out)
    }

    fn piece_into(&self, id: u32, special: bool, out: &mut Vec<u8>) {
        let a = self.attrs[id as usize];
        let text = &self.tokens[id as usize];
        if a & (attr::CONTROL | attr::UNKNOWN) != 0 {
            if special {
                out.extend_from_slice(text.as_bytes());
            }
            return;
        }
        if a & attr::USER_DEFINED != 0 {
            out.extend_from_slice(text.as_bytes());
        } else if a & attr::NORMAL != 0 {
            match &self.engine {
                Engine::Spm(_) => {
                    out.extend_from_slice(text.replace('\u{2581}', " ").as_bytes());
                }
                Engine::Bpe(_) => bpe::byte_decode(text, out),
            }
        } else if a & attr::BYTE != 0 {
            if let Some(b) = spm::parse_byte_token(text) {
                out.push(b);
            }
        }
    }

    /// The text of `ids`. Control tokens are written only when `special`;
    /// bytes that do not form UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32], special: bool) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            self.check(id)?;
            self.piece_into(id, special, &mut bytes);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// A decoder for a stream of generated ids that yields text only at
    /// UTF-8 boundaries.
    pub fn stream_decoder(&self, special: bool) -> StreamDecoder<'_> {
        StreamDecoder::new(self, special)
    }
}

impl Specials {
    fn new(tokens: &[String], attrs: &[u8]) -> Self {
        let mut order: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| {
                attrs[i as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0
                    && !tokens[i as usize].is_empty()
            })
            .collect();
        order.sort_by(|&a, &b| {
            tokens[b as usize]
                .len()
                .cmp(&tokens[a as usize].len())
                .then(a.cmp(&b))
        });
        let mut by_text = HashMap::with_capacity(order.len());
        for (rank, &id) in order.iter().enumerate() {
            by_text.entry(tokens[id as usize].clone()).or_insert(rank);
        }
        let mut lengths: Vec<usize> = order.iter().map(|&i| tokens[i as usize].len()).collect();
        lengths.dedup();
        let mut first_byte = [false; 256];
        for &id in &order {
            first_byte[tokens[id as usize].as_bytes()[0] as usize] = true;
        }
        Self {
            order,
            by_text,
            lengths,
            first_byte,
        }
    }
}
