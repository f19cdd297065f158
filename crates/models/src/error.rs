//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in `models`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A model file is missing.
    #[error("model file {path} not found; run scripts/fetch-model.sh (it honours SNUG_MODEL_DIR) or point SNUG_MODEL_DIR at a directory holding model.safetensors, tokenizer.json and config.json")]
    ModelMissing {
        /// The file that was looked for.
        path: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not a BERT config this encoder can run.
    #[error("config {path}: {reason}")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// The tokenizer failed to load or to encode.
    #[error("tokenizer: {0}; check that tokenizer.json is the one shipped with the model (scripts/fetch-model.sh)")]
    Tokenizer(String),
    /// A token sequence is longer than the model's position table.
    #[error("sequence {index} has {len} tokens, over the model's limit of {limit}; truncate it (LoadOptions::max_tokens) or split the text into windows")]
    TooLong {
        /// Index of the sequence in the batch.
        index: usize,
        /// Its length in tokens.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A token sequence is empty.
    #[error("sequence {index} has no tokens; a sequence needs at least [CLS] and [SEP]")]
    EmptySequence {
        /// Index of the sequence in the batch.
        index: usize,
    },
    /// A token id or token type id is out of range.
    #[error("sequence {index}: token {what} {id} is out of range (the model has {limit}); tokenize with this model's tokenizer")]
    BadToken {
        /// Index of the sequence in the batch.
        index: usize,
        /// `id` or `type id`.
        what: &'static str,
        /// The offending value.
        id: u32,
        /// The number of valid values.
        limit: usize,
    },
    /// The encoder runs on the CPU only.
    #[error("device {0} is not supported; this encoder's fused kernels run on the CPU, load it with Device::Cpu")]
    UnsupportedDevice(String),
    /// A GGUF file could not be read or parsed (truncated, corrupt, not GGUF).
    #[error("reading the GGUF file {path}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What the GGUF reader reported.
        #[source]
        source: candle_core::Error,
    },
    /// The GGUF names an architecture the decoder does not implement.
    #[error("GGUF architecture `{arch}` is not supported; the decoder runs {supported}")]
    UnknownArchitecture {
        /// `general.architecture` as found in the file.
        arch: String,
        /// The architectures that are supported.
        supported: &'static str,
    },
    /// A metadata key the decoder needs is missing or has a bad value.
    #[error("GGUF metadata `{key}`: {reason}")]
    BadMetadata {
        /// The key.
        key: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// A tensor the decoder needs is missing or has the wrong shape or type.
    #[error("GGUF tensor `{name}`: {reason}")]
    BadTensor {
        /// The tensor name.
        name: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// A sequence would run past the decoder's context.
    #[error("sequence {index} would reach {needed} positions, over the context of {limit}; shorten the prompt or max tokens, or raise DecoderConfig::context (the model was trained for {trained})")]
    ContextOverflow {
        /// Index of the sequence in the step.
        index: usize,
        /// Positions the sequence would hold after the step.
        needed: usize,
        /// The configured context.
        limit: usize,
        /// The model's trained context.
        trained: usize,
    },
    /// A step holds more tokens than the step token budget.
    #[error("the step holds {tokens} tokens, over the step budget of {limit}; split the prefill into chunks (Decoder::prefill does)")]
    StepTooLarge {
        /// Tokens in the step.
        tokens: usize,
        /// DecoderConfig::max_step_tokens.
        limit: usize,
    },
    /// The KV budget cannot hold even one block.
    #[error("the KV budget of {budget} bytes cannot hold one KV block of {block_bytes} bytes ({block_tokens} tokens); raise DecoderConfig::kv_budget_bytes or lower kv_block_tokens")]
    KvBudgetTooSmall {
        /// DecoderConfig::kv_budget_bytes.
        budget: usize,
        /// Bytes of the largest block (after the pool's size-class rounding).
        block_bytes: usize,
        /// Tokens per block.
        block_tokens: usize,
    },
    /// The KV budget is spent: a step needs blocks that the pool cannot give.
    #[error("KV cache full: sequence {index} needs a block of {block_bytes} bytes, {in_use} of the {budget}-byte KV budget are held; finish or drop sequences, or raise DecoderConfig::kv_budget_bytes")]
    KvExhausted {
        /// Index of the sequence in the step.
        index: usize,
        /// Bytes of the block asked for.
        block_bytes: usize,
        /// Bytes held by live blocks.
        in_use: usize,
        /// DecoderConfig::kv_budget_bytes.
        budget: usize,
        /// The pool's answer.
        #[source]
        source: buffer_pool::Error,
    },
    /// A sequence in a step belongs to another decoder.
    #[error("sequence {index} was made by another decoder (or for another KV layout); make sequences with Decoder::new_sequence")]
    ForeignSequence {
        /// Index of the sequence in the step.
        index: usize,
    },
    /// A sequence of a decoder step has no tokens.
    #[error(
        "sequence {index} of the step has no tokens; each sequence of a step brings at least one"
    )]
    EmptyTokens {
        /// Index of the sequence in the step.
        index: usize,
    },
    /// A configuration value (decoder or sampling setting) outside its
    /// documented range.
    #[error("invalid configuration: {field} = {value}: expected {expected}")]
    InvalidConfig {
        /// Which field.
        field: String,
        /// Its value, as text.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// An error from the buffer pool that holds the KV cache.
    #[error("KV buffer pool")]
    Pool(#[from] buffer_pool::Error),
    /// An error from candle.
    #[error("a candle tensor operation failed")]
    Candle(#[from] candle_core::Error),
    /// An error from the quant crate.
    #[error("loading or running quantized weights")]
    Quant(#[from] quant::Error),
    // --- GGUF files, tokenizers, chat templates, sampling ---
    /// A GGUF model named to [`crate::gguf_path`] is not one this crate knows.
    #[error("unknown model {name:?}; known: {known}")]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// The names that exist.
        known: &'static str,
    },
    /// A GGUF model file is missing.
    #[error("GGUF file {path} of model {name} not found; run scripts/fetch-model.sh {name} (it honours SNUG_MODELS_ROOT)")]
    GgufMissing {
        /// The model's name.
        name: String,
        /// The file that was looked for.
        path: PathBuf,
    },
    /// A GGUF header could not be read.
    #[error("reading the GGUF header of {path}")]
    GgufHeader {
        /// The file.
        path: PathBuf,
        /// What candle's GGUF reader said.
        #[source]
        source: candle_core::Error,
    },
    /// A `tokenizer.*` metadata value is missing or malformed.
    #[error("GGUF tokenizer metadata {key}: {reason}")]
    BadTokenizerMetadata {
        /// The metadata key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The GGUF names a tokenizer model or pre-tokenizer this crate does not implement.
    #[error("unsupported {what} {name:?}; supported: {supported}")]
    UnsupportedTokenizer {
        /// Which setting.
        what: &'static str,
        /// Its value in the file.
        name: String,
        /// The values this crate implements.
        supported: &'static str,
    },
    /// The tokenizer's pieces (BPE merges, regexes) could not be built or run.
    #[error("building or running the BPE tokenizer: {0}")]
    TokenizerBuild(String),
    /// A token id is not in the vocabulary.
    #[error("token id {id} is out of range; the vocabulary has {vocab} tokens")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// The model has no chat template (`tokenizer.chat_template`).
    #[error("the model has no chat template (tokenizer.chat_template); it is a base model: give it plain text, or use ChatTemplate::plain_fallback")]
    NoChatTemplate,
    /// The chat template failed to parse or to render.
    #[error("chat template")]
    ChatTemplate {
        /// minijinja's error.
        #[source]
        source: minijinja::Error,
    },
    /// Logits of the wrong length were given to a sampler.
    #[error("{len} logits given; the sampler needs at least 1 (one per vocabulary token)")]
    EmptyLogits {
        /// Number of logits.
        len: usize,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::InvalidConfig`] for `field` holding `value`.
    pub fn invalid(
        field: impl Into<String>,
        value: impl std::fmt::Display,
        expected: impl Into<String>,
    ) -> Error {
        Error::InvalidConfig {
            field: field.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;

    /// Every cause's message appears once in the report an error-chain
    /// printer makes (each layer, then `: `, then its cause): no layer pastes
    /// its cause into its own message.
    fn assert_each_cause_once(e: &(dyn std::error::Error + 'static), depth: usize) {
        let layers: Vec<String> = std::iter::successors(Some(e), |e| e.source())
            .map(|e| e.to_string())
            .collect();
        assert_eq!(layers.len(), depth, "{layers:?}");
        let report = layers.join(": ");
        let once = |cause: &String| report.matches(cause.as_str()).count() == 1;
        assert!(layers[1..].iter().all(once), "{report}");
    }

    #[test]
    fn error_chain_prints_each_cause_once() {
        let candle = candle_core::Error::Msg("shape mismatch in matmul".into());
        assert_each_cause_once(&Error::Quant(quant::Error::Candle(candle)), 3);
        let io = Error::Io {
            path: "model.safetensors".into(),
            source: std::io::Error::other("disk on fire"),
        };
        assert_each_cause_once(&io, 2);
    }
}
