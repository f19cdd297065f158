//! [`MiniLm`]: the all-MiniLM-L6-v2 sentence encoder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Storage, Tensor};
use candle_nn::VarBuilder;
use quant::{Format, LinearScratch, QLinear};
use serde::{Deserialize, Serialize};
use tokenizers::{Tokenizer, TruncationParams};

use crate::kernels::{self, AttentionShape, EmbeddingTables, Q8Rows, WordTable};
use crate::{Embed, Error, Result};

/// The BERT settings read from `config.json` (the fields this encoder uses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size (30522).
    pub vocab_size: usize,
    /// Hidden size (384).
    pub hidden_size: usize,
    /// Number of layers (6).
    pub num_hidden_layers: usize,
    /// Attention heads (12).
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer (1536).
    pub intermediate_size: usize,
    /// Activation; only `gelu` (the erf form) is supported.
    pub hidden_act: String,
    /// Rows of the position table, the longest sequence in tokens (512).
    pub max_position_embeddings: usize,
    /// Token type ids (2).
    pub type_vocab_size: usize,
    /// Epsilon of the layer norms (1e-12).
    pub layer_norm_eps: f64,
}

/// How to load the model.
///
/// Weight formats: every linear weight (`encoder.layer.N.….weight`) takes
/// `default_format` unless `plan` names it (the tensor names of the
/// safetensors file, so a `quant` plan can drive it). Embeddings, norms and
/// biases stay f32. The three attention projections of a layer run as one
/// fused matrix and so share one format: the most precise of the three.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadOptions {
    /// Format of linear weights the plan does not name. Default `F32`.
    pub default_format: Format,
    /// Per-tensor formats (tensor name → format). Default empty.
    pub plan: BTreeMap<String, Format>,
    /// Zero-pad the hidden activations (and the weights' input dimension)
    /// from 384 to 512 when a quantized format is used, so that K-quants fit
    /// and candle's repacked integer kernels (which need an input dimension
    /// that is a multiple of 256) serve Q8_0 too. Results are unchanged (the
    /// pad is zeros); it costs a third more multiply-adds in three of the
    /// four matrices. Without it, formats that do not fit fall back
    /// ([`Format::fit`]). Q8_0 alone asks for no pad where quant's int8
    /// kernel serves it ([`quant::int8_kernel_available`]), which takes
    /// 384 inputs at full speed. Default `true`.
    pub pad_inputs: bool,
    /// How the word-embedding table (vocabulary × hidden, the largest tensor)
    /// is stored: `F32`, or `Q8_0` rows dequantized on lookup (34 bytes per
    /// 32 values instead of 128). `None` (the default): Q8_0 when
    /// `default_format` is quantized, else f32. Other formats are refused.
    pub word_embeddings: Option<Format>,
    /// Longest input in tokens, including `[CLS]` and `[SEP]`; longer texts
    /// are truncated. Default 256 (sentence-transformers' limit for this
    /// model); at most the model's position table (512).
    pub max_tokens: usize,
    /// Device. Only the CPU is supported. Default CPU.
    #[serde(skip, default = "cpu")]
    pub device: Device,
}

fn cpu() -> Device {
    Device::Cpu
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            default_format: Format::F32,
            plan: BTreeMap::new(),
            pad_inputs: true,
            word_embeddings: None,
            max_tokens: 256,
            device: Device::Cpu,
        }
    }
}

impl LoadOptions {
    /// The format the word-embedding table is stored in (see
    /// [`LoadOptions::word_embeddings`]).
    pub fn word_embedding_format(&self) -> Format {
        match self.word_embeddings {
            Some(f) => f,
            None if self.default_format == Format::F32 || self.default_format == Format::F16 => {
                Format::F32
            }
            None => Format::Q8_0,
        }
    }

    /// Every linear weight in `format` (and the word table in Q8_0 when
    /// `format` is quantized).
    pub fn uniform(format: Format) -> Self {
        Self {
            default_format: format,
            ..Self::default()
        }
    }
}

/// One tokenised text: token ids and token type ids, with `[CLS]` / `[SEP]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tokens {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Token type ids (all 0 for single sentences).
    pub type_ids: Vec<u32>,
}

impl Tokens {
    /// Number of tokens (the cost weight of this text in a batch).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Where the time of forward passes went, summed over calls since the model
/// was loaded or [`MiniLm::reset_profile`] (nanoseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Tokenisation ([`MiniLm::tokenize`]).
    pub tokenize_ns: u64,
    /// Embedding lookup and its layer norm.
    pub embed_ns: u64,
    /// The linear layers (matrix multiplications).
    pub matmul_ns: u64,
    /// Attention (scores, softmax, weighted sum).
    pub attention_ns: u64,
    /// Bias + GELU.
    pub gelu_ns: u64,
    /// Bias + residual + layer norm.
    pub layer_norm_ns: u64,
    /// Mean pooling and normalisation.
    pub pool_ns: u64,
    /// Texts embedded.
    pub texts: u64,
    /// Tokens run through the model.
    pub tokens: u64,
}

struct Layer {
    qkv: QLinear,
    qkv_bias: Vec<f32>,
    attn_out: QLinear,
    attn_out_bias: Vec<f32>,
    attn_ln: (Vec<f32>, Vec<f32>),
    inter: QLinear,
    inter_bias: Vec<f32>,
    out: QLinear,
    out_bias: Vec<f32>,
    out_ln: (Vec<f32>, Vec<f32>),
}

/// all-MiniLM-L6-v2: a 6-layer BERT sentence encoder (384 dims) whose linear
/// layers are [`quant::QLinear`], so f32, Q8_0, Q4_K and mixed plans share one
/// code path.
///
/// A batch runs **packed**: the tokens of all its texts form one
/// `[tokens, hidden]` matrix, so the linear layers (nearly all the work) never
/// see padding, whatever the mix of lengths; attention runs per text. The
/// glue between matrices (bias, GELU, residual, layer norm, attention) is
/// fused CPU kernels, parallel over rows. Output: mean pooling over the
/// tokens, L2 normalised.
pub struct MiniLm {
    config: BertConfig,
    tokenizer: MiniLmTokenizer,
    word: WordTable,
    position: Vec<f32>,
    token_type: Vec<f32>,
    emb_ln: (Vec<f32>, Vec<f32>),
    layers: Vec<Layer>,
    stride: usize,
    max_tokens: usize,
    formats: BTreeMap<String, Format>,
    profile: parking_lot::Mutex<Profile>,
}

impl std::fmt::Debug for MiniLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniLm")
            .field("config", &self.config)
            .field("stride", &self.stride)
            .field("max_tokens", &self.max_tokens)
            .field("formats", &self.formats)
            .finish_non_exhaustive()
    }
}

/// The model's WordPiece tokenizer alone (`tokenizer.json`, no padding), to
/// count and prepare tokens without loading the weights.
#[derive(Clone)]
pub struct MiniLmTokenizer {
    tokenizer: Tokenizer,
    max_tokens: Option<usize>,
}

impl std::fmt::Debug for MiniLmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniLmTokenizer")
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

impl MiniLmTokenizer {
    /// Loads `tokenizer.json` from the model directory `dir`; texts are
    /// truncated to `max_tokens` when given, else kept whole.
    pub fn load(dir: impl AsRef<Path>, max_tokens: Option<usize>) -> Result<Self> {
        Self::from_file(&file(dir.as_ref(), "tokenizer.json")?, max_tokens)
    }

    fn from_file(path: &Path, max_tokens: Option<usize>) -> Result<Self> {
        let mut tokenizer = Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        // The shipped tokenizer.json pads every input to 128 tokens; the
        // encoder packs batches, so no padding at all.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(max_tokens.map(|max_length| TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Self {
            tokenizer,
            max_tokens,
        })
    }

    /// Tokenises texts, with `[CLS]` and `[SEP]`.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Tokens>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encodings
            .into_iter()
            .map(|e| Tokens {
                ids: e.get_ids().to_vec(),
                type_ids: e.get_type_ids().to_vec(),
            })
            .collect())
    }

    /// Tokens of each text, with `[CLS]` and `[SEP]`.
    pub fn count(&self, texts: &[&str]) -> Result<Vec<usize>> {
        Ok(self.tokenize(texts)?.iter().map(Tokens::len).collect())
    }

    /// The most heap [`tokenize`](Self::tokenize) holds at once for
    /// `texts`, whose untruncated token counts (with `[CLS]` and `[SEP]`)
    /// are `tokens`: each text's transient
    /// ([`TOKENIZE_BYTES_PER_TOKEN`] a token and
    /// [`TOKENIZE_BYTES_PER_TEXT_BYTE`] a byte), for as many texts at once
    /// as rayon's pool has threads (the costliest ones: `encode_batch`
    /// tokenizes the texts in parallel on it).
    ///
    /// The chunks are freed when tokenization ends, but they are small heap
    /// chunks whose pages stay resident beneath the forward's buffers, so a
    /// request's resident peak holds them as well.
    ///
    /// ```
    /// use models::{MiniLmTokenizer, TOKENIZE_BYTES_PER_TEXT_BYTE, TOKENIZE_BYTES_PER_TOKEN};
    ///
    /// let one = MiniLmTokenizer::transient_bytes(&["a short text"], &[5]);
    /// assert_eq!(one, 5 * TOKENIZE_BYTES_PER_TOKEN + 12 * TOKENIZE_BYTES_PER_TEXT_BYTE);
    /// assert_eq!(MiniLmTokenizer::transient_bytes(&[], &[]), 0);
    /// ```
    pub fn transient_bytes(texts: &[&str], tokens: &[usize]) -> u64 {
        let mut each: Vec<u64> = texts
            .iter()
            .zip(tokens)
            .map(|(t, &n)| {
                n as u64 * TOKENIZE_BYTES_PER_TOKEN + t.len() as u64 * TOKENIZE_BYTES_PER_TEXT_BYTE
            })
            .collect();
        let at_once = rayon::current_num_threads().max(1).min(each.len());
        each.sort_unstable_by(|a, b| b.cmp(a));
        each[..at_once].iter().sum()
    }
}

/// Heap bytes one text's tokenization holds at its peak, per token of the
/// text (untruncated, with `[CLS]` and `[SEP]`), at most — beside
/// [`TOKENIZE_BYTES_PER_TEXT_BYTE`]. The `tokenizers` crate builds, per
/// token, a `Token` (its `String` and offsets), the `Encoding`'s seven
/// per-token vectors (ids, type ids, tokens, words, offsets and two masks:
/// 64 bytes, grown by doubling) with the token's text, and a second
/// `Encoding` while the post-processor adds `[CLS]` and `[SEP]`; the
/// normalized string's alignments (16 bytes a byte, in every normalizing
/// pass) scale with the text's bytes, which come to a few per token.
///
/// Calibrated, not derived line by line: `tests/tokenize_bytes.rs` counts
/// every byte one `tokenize` allocates, with a counting allocator, over
/// seven kinds of text (plain English, accented, CJK, emoji, digits, code,
/// long words) from 5 to 1,000 words, and checks that this bound holds for
/// each. The costliest per token there (beside 2 bytes a byte): CJK 404
/// bytes a token, plain English 350–385, code 273–345, long words 160–205.
pub const TOKENIZE_BYTES_PER_TOKEN: u64 = 416;

/// Heap bytes one text's tokenization holds at its peak per byte of the
/// text, beside [`TOKENIZE_BYTES_PER_TOKEN`] (see there).
pub const TOKENIZE_BYTES_PER_TEXT_BYTE: u64 = 2;

fn file(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::ModelMissing { path: p })
    }
}

/// `config.json` parsed as a [`BertConfig`].
fn read_config(path: &Path) -> Result<BertConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn to_vec(t: Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::UnsupportedDevice(format!("{:?}", t.device())));
    };
    let data = cpu.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(f(&data[a..b])),
        None => {
            drop(storage);
            let c = t.contiguous()?;
            with_slice(&c, f)
        }
    }
}

/// Whether a linear weight in `f` gains from a 256-multiple input: block
/// formats do, except Q8_0 on quant's int8 kernel, which is fastest at 384.
fn wants_pad(f: Format) -> bool {
    match f {
        Format::F32 | Format::F16 => false,
        Format::Q8_0 => !quant::int8_kernel_available(),
        Format::Q6_K | Format::Q4_K | Format::Q4_0 => true,
    }
}

/// The width of the hidden activations: `hidden`, or padded up to a
/// multiple of 256 when `pad_inputs` is set and a weight reading the hidden
/// width wants it ([`LoadOptions::pad_inputs`]).
fn stride_for(config: &BertConfig, options: &LoadOptions) -> usize {
    let h = config.hidden_size;
    let fmt_of = |name: &str| {
        options
            .plan
            .get(name)
            .copied()
            .unwrap_or(options.default_format)
    };
    let any = (0..config.num_hidden_layers).any(|l| {
        [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
        ]
        .iter()
        .any(|r| wants_pad(fmt_of(&format!("encoder.layer.{l}.{r}.weight"))))
    });
    if options.pad_inputs && any {
        h.next_multiple_of(256)
    } else {
        h
    }
}

/// What all-MiniLM-L6-v2 takes in memory with given [`LoadOptions`],
/// computed from `config.json` and the size of `model.safetensors` alone (no
/// tensor is read): every term is a buffer the loader or the forward pass
/// allocates, sized as the code sizes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MiniLmMemory {
    /// Bytes of the weights once forwards have run: linear weights in their
    /// formats with the repacked copies the kernels keep
    /// ([`quant::resident_weight_bytes`]), the word table (f32 or Q8_0 rows),
    /// and the f32 position and type tables, biases and norms.
    pub weights: u64,
    /// Peak bytes while loading, the larger of two phases: the word table
    /// (its pages of the memory-mapped file, the f32 copy read from them and
    /// its Q8_0 rows when quantized), and the last layer (every page of the
    /// file, the weights, and the most f32 bytes one matrix has in flight:
    /// the fused projection's parts and concatenation, a padded copy beside
    /// the matrix and its zeros, or the quantizer's input beside the copy it
    /// builds) — less candle's repacked copies, which the first forwards
    /// build once the file is unmapped — or the weights with those copies.
    pub load_peak: u64,
    /// Bytes per token of a batch at its peak: the forward allocates its
    /// activations once per call and reuses them in every layer — the hidden
    /// state and the attention context (stride wide each) and one work
    /// buffer (the widest of the q/k/v, attention-output and intermediate
    /// projections' outputs), all f32 — plus what the linear layers take
    /// per row ([`quant::forward_into_bytes`]: the int8 kernel's scratch for
    /// the widest input it reads), or the token ids, type ids and positions
    /// (4 bytes each), live while the embeddings are looked up, if more;
    /// candle-path layers add [`Self::per_chunk_token`],
    /// [`Self::per_chunk_block`] and [`Self::per_chunk_call`].
    pub per_token: u64,
    /// Bytes per token, for at most [`Self::chunk_rows`] tokens, that a
    /// linear layer on candle's path allocates inside its call (its input
    /// copy, its output and its quantized input:
    /// [`quant::ForwardBytes::transient`]); 0 where every layer runs on the
    /// int8 kernel or in f32.
    pub per_chunk_token: u64,
    /// Bytes per block of [`quant::CANDLE_AMX_BLOCK_ROWS`] rows, for as many
    /// blocks as candle computes at once ([`quant::candle_blocks_in_flight`]
    /// of a chunk), that a Q4_K layer on candle's AMX-INT8 kernel allocates
    /// inside its call (each block's activations repacked:
    /// [`quant::ForwardBytes::per_block`]); 0 where no layer takes that
    /// kernel.
    #[serde(default)]
    pub per_chunk_block: u64,
    /// Bytes a call on candle's path allocates whatever its rows (the input
    /// tensor's bookkeeping and the output's shape:
    /// [`quant::ForwardBytes::per_call`]); 0 where no layer is on it.
    #[serde(default)]
    pub per_chunk_call: u64,
    /// Rows candle's path takes at a time ([`quant::CANDLE_CHUNK_ROWS`]).
    pub chunk_rows: u64,
    /// Bytes per text of a batch: its output vector (hidden f32, and the
    /// 24-byte `Vec` in the batch's list) and its (start, length) pair.
    pub per_text: u64,
    /// The hidden stride the forward pass uses.
    pub stride: usize,
    /// The embedding dimension (hidden size).
    pub hidden: usize,
    /// The longest input in tokens ([`LoadOptions::max_tokens`]).
    pub max_tokens: usize,
}

impl MiniLmMemory {
    /// How many of the forward's buffers are live at once at its peak, at
    /// most: in the layers, `hidden`, `ctx` and `work` with the int8
    /// kernel's scratch (its quantized rows and their scales), and, on
    /// candle's path, a call's input copy, output and quantized input;
    /// while the embeddings are looked up, the three activation buffers
    /// with the token ids, type ids and positions. Whoever maps large
    /// buffers whole pages (glibc, for chunks of at least its mmap
    /// threshold) pays up to a page more for each of them than
    /// [`Self::batch_bytes`] counts.
    pub fn buffers_at_peak(&self) -> u64 {
        let layers = 5 + if self.per_chunk_token > 0 { 3 } else { 0 };
        layers.max(6)
    }

    /// Bytes one batch of `tokens` tokens over `texts` texts adds at its
    /// peak: its activations, the most a candle-path call takes for a chunk
    /// of them (each of the three candle terms the largest over the layers),
    /// and the texts' outputs.
    pub fn batch_bytes(&self, tokens: u64, texts: u64) -> u64 {
        let candle = quant::ForwardBytes {
            scratch: 0,
            transient: self.per_chunk_token,
            per_block: self.per_chunk_block,
            per_call: self.per_chunk_call,
        };
        let chunk = usize::try_from(tokens.min(self.chunk_rows)).unwrap_or(usize::MAX);
        tokens * self.per_token + candle.transient_for(chunk) + texts * self.per_text
    }
}

impl MiniLm {
    /// What the model in `dir` will take with `options`, from its
    /// `config.json` and the size of `model.safetensors` (nothing else is
    /// read).
    pub fn memory(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<MiniLmMemory> {
        let dir = dir.as_ref();
        let config_path = file(dir, "config.json")?;
        let weights_path = file(dir, "model.safetensors")?;
        let c = read_config(&config_path)?;
        let file_bytes = std::fs::metadata(&weights_path)
            .map_err(|source| Error::Io {
                path: weights_path.clone(),
                source,
            })?
            .len();
        let (h, i, l) = (c.hidden_size, c.intermediate_size, c.num_hidden_layers);
        let stride = stride_for(&c, options);
        let fmt_of = |name: String| {
            options
                .plan
                .get(&name)
                .copied()
                .unwrap_or(options.default_format)
        };
        let f32b = |n: usize| 4 * n as u64;
        let mut linear = 0u64;
        // The f32 bytes in flight while one matrix is built, beside the
        // weights: what `load` allocates for it, step by step.
        let mut in_flight = 0u64;
        let mut copies = 0u64;
        // Per token of a batch: the largest int8 scratch row and the most
        // one candle-path matmul allocates inside its call (quant's
        // `forward_into_bytes`: per row, per AMX block and per call), each
        // over every linear layer.
        let (mut scratch, mut transient, mut per_block, mut per_call) = (0u64, 0u64, 0u64, 0u64);
        let mut wide = 0usize;
        for layer in 0..l {
            let n = |r: &str| format!("encoder.layer.{layer}.{r}.weight");
            let qkv = [
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
            ]
            .iter()
            .map(|r| fmt_of(n(r)))
            .min()
            .unwrap_or(Format::F32);
            // The fused projection: its three parts and their concatenation
            // live together.
            in_flight = in_flight.max(2 * f32b(3 * h * h));
            let parts = [
                (qkv, 3 * h, stride),
                (fmt_of(n("attention.output.dense")), h, stride),
                (fmt_of(n("intermediate.dense")), i, stride),
                (fmt_of(n("output.dense")), h, i),
            ];
            for (k, (f, out, inp)) in parts.into_iter().enumerate() {
                let fmt = f.fit(inp);
                let fwd = quant::forward_into_bytes(fmt, out, inp);
                scratch = scratch.max(fwd.scratch);
                transient = transient.max(fwd.transient);
                per_block = per_block.max(fwd.per_block);
                per_call = per_call.max(fwd.per_call);
                if k < 3 {
                    // The q/k/v, attention-output and intermediate
                    // projections write into the work buffer (the last one
                    // into the context buffer).
                    wide = wide.max(out);
                }
                let resident = quant::resident_weight_bytes(fmt, out, inp);
                // candle builds its repacked copies on the first forwards,
                // after the file is unmapped; the int8 kernel's packed copy
                // is built here.
                copies += resident.saturating_sub(
                    if fmt == Format::Q8_0 && quant::int8_kernel_available() {
                        resident
                    } else {
                        fmt.bytes_for(out * inp).min(resident)
                    },
                );
                if inp == stride && stride > h {
                    // Padding: the matrix, the zeros and the padded copy.
                    in_flight = in_flight
                        .max(f32b(out * h) + f32b(out * (stride - h)) + f32b(out * stride));
                }
                linear += resident;
                // Quantizing: the (padded) f32 input, and the format's copy
                // being built beside the one it is made from.
                in_flight = in_flight.max(f32b(out * inp) + resident);
            }
        }
        let word = match options.word_embedding_format() {
            Format::Q8_0 => (c.vocab_size * h / kernels::Q8_BLOCK * 34) as u64,
            _ => f32b(c.vocab_size * h),
        };
        let small = f32b(c.max_position_embeddings * h + c.type_vocab_size * h + 2 * h)
            + l as u64 * f32b(3 * h + h + 2 * h + i + h + 2 * h);
        let weights = linear + word + small;
        // Loading reads the file through a read-only mapping: its pages
        // become resident as tensors are read and stay so until the end.
        // First the word table: its pages, the f32 copy read from them and,
        // when quantized, its Q8_0 rows (the f32 copy goes before the layers
        // are read). Then the layers: by the last one every page of the file
        // is resident beside the weights and one matrix's bytes in flight.
        let word_f32 = f32b(c.vocab_size * h);
        let word_phase = 2 * word_f32 + if word == word_f32 { 0 } else { word };
        let layer_phase = file_bytes + weights - copies + in_flight;
        // The first forwards then add candle's copies; the mapping is gone.
        let load_peak = word_phase.max(layer_phase).max(weights);
        Ok(MiniLmMemory {
            weights,
            load_peak,
            // `embed_tokens`' buffers, live from the embedding lookup to the
            // pooling: `hidden` and `ctx` (stride wide each), `work` (the
            // widest output of the q/k/v, attention-output and intermediate
            // projections), f32; then the int8 scratch and the largest
            // candle-path transient, or, while the embedding is looked up,
            // the token ids, type ids and positions (u32 each).
            per_token: f32b(2 * stride + wide) + scratch.max(12),
            per_chunk_token: transient,
            per_chunk_block: per_block,
            per_chunk_call: per_call,
            chunk_rows: quant::CANDLE_CHUNK_ROWS as u64,
            // The output vector (hidden f32 and its `Vec` in the batch's),
            // and the sequence's (start, length).
            per_text: f32b(h) + 24 + 16,
            stride,
            hidden: h,
            max_tokens: options.max_tokens,
        })
    }
}

fn elapsed(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

impl MiniLm {
    /// Loads `model.safetensors`, `tokenizer.json` and `config.json` from
    /// `dir`, quantizing the linear weights as `options` says.
    pub fn load(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        if !options.device.is_cpu() {
            return Err(Error::UnsupportedDevice(format!("{:?}", options.device)));
        }
        let config_path = file(dir, "config.json")?;
        let weights_path = file(dir, "model.safetensors")?;
        let tokenizer_path = file(dir, "tokenizer.json")?;
        let config = read_config(&config_path)?;
        let bad = |reason: String| Error::BadConfig {
            path: config_path.clone(),
            reason,
        };
        if config.hidden_act != "gelu" {
            return Err(bad(format!(
                "hidden_act is `{}`; this encoder runs `gelu` (erf) only",
                config.hidden_act
            )));
        }
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        if options.max_tokens < 2 || options.max_tokens > config.max_position_embeddings {
            return Err(bad(format!(
                "LoadOptions::max_tokens is {}; it must lie in 2..={} (the position table)",
                options.max_tokens, config.max_position_embeddings
            )));
        }

        let tokenizer = MiniLmTokenizer::from_file(&tokenizer_path, Some(options.max_tokens))?;

        // SAFETY: the file is mapped read-only and only read while `vb` lives;
        // every tensor is copied out (to f32 vectors or quantized blocks)
        // before this function returns.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[&weights_path], DType::F32, &Device::Cpu)?
        };
        let h = config.hidden_size;
        let e = vb.pp("embeddings");
        let word_format = options.word_embedding_format();
        let word_tensor = e.get((config.vocab_size, h), "word_embeddings.weight")?;
        let word = match word_format {
            Format::F32 => WordTable::F32(to_vec(word_tensor)?),
            Format::Q8_0 if h.is_multiple_of(kernels::Q8_BLOCK) => {
                let rows = with_slice(&word_tensor, |w| Q8Rows::quantize(w, h))?;
                // The f32 copy goes before the layers are read.
                drop(word_tensor);
                WordTable::Q8_0(rows)
            }
            other => {
                return Err(bad(format!(
                    "word embeddings in {other} (hidden {h}): only f32, or q8_0 with a hidden size that is a multiple of 32"
                )))
            }
        };
        let position = to_vec(e.get(
            (config.max_position_embeddings, h),
            "position_embeddings.weight",
        )?)?;
        let token_type =
            to_vec(e.get((config.type_vocab_size, h), "token_type_embeddings.weight")?)?;
        let ln = |vb: VarBuilder<'_>| -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((to_vec(vb.get(h, "weight")?)?, to_vec(vb.get(h, "bias")?)?))
        };
        let emb_ln = ln(e.pp("LayerNorm"))?;

        let fmt_of = |name: &str| {
            options
                .plan
                .get(name)
                .copied()
                .unwrap_or(options.default_format)
        };
        let name = |l: usize, rest: &str| format!("encoder.layer.{l}.{rest}.weight");
        let stride = stride_for(&config, options);
        let pad = |w: Tensor| -> Result<Tensor> {
            let (o, i) = w.dims2()?;
            if i == h && stride > h {
                Ok(Tensor::cat(
                    &[
                        &w,
                        &Tensor::zeros((o, stride - h), DType::F32, &Device::Cpu)?,
                    ],
                    1,
                )?)
            } else {
                Ok(w)
            }
        };

        let mut formats = BTreeMap::new();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let lv = vb.pp(format!("encoder.layer.{l}"));
            let get_w = |rest: &str, o: usize, i: usize| lv.pp(rest).get((o, i), "weight");
            let get_b =
                |rest: &str, o: usize| -> Result<Vec<f32>> { to_vec(lv.pp(rest).get(o, "bias")?) };

            let qkv_names = [
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
            ];
            let qkv_format = qkv_names
                .iter()
                .map(|r| fmt_of(&name(l, r)))
                .min()
                .unwrap_or(Format::F32);
            let w = Tensor::cat(
                &qkv_names
                    .iter()
                    .map(|r| get_w(r, h, h))
                    .collect::<candle_core::Result<Vec<_>>>()?,
                0,
            )?;
            let qkv = QLinear::from_f32(pad(w)?, None, qkv_format)?;
            let mut qkv_bias = Vec::with_capacity(3 * h);
            for r in qkv_names {
                qkv_bias.extend(get_b(r, h)?);
                formats.insert(name(l, r), qkv.format());
            }

            let r = "attention.output.dense";
            let attn_out = QLinear::from_f32(pad(get_w(r, h, h)?)?, None, fmt_of(&name(l, r)))?;
            formats.insert(name(l, r), attn_out.format());
            let attn_out_bias = get_b(r, h)?;
            let attn_ln = ln(lv.pp("attention.output.LayerNorm"))?;

            let r = "intermediate.dense";
            let inter = QLinear::from_f32(
                pad(get_w(r, config.intermediate_size, h)?)?,
                None,
                fmt_of(&name(l, r)),
            )?;
            formats.insert(name(l, r), inter.format());
            let inter_bias = get_b(r, config.intermediate_size)?;

            let r = "output.dense";
            let out = QLinear::from_f32(
                get_w(r, h, config.intermediate_size)?,
                None,
                fmt_of(&name(l, r)),
            )?;
            formats.insert(name(l, r), out.format());
            let out_bias = get_b(r, h)?;
            let out_ln = ln(lv.pp("output.LayerNorm"))?;

            layers.push(Layer {
                qkv,
                qkv_bias,
                attn_out,
                attn_out_bias,
                attn_ln,
                inter,
                inter_bias,
                out,
                out_bias,
                out_ln,
            });
        }
        for n in options.plan.keys() {
            if !formats.contains_key(n) {
                tracing::warn!(tensor = %n, "plan names a tensor that is not a linear weight of this model; ignored");
            }
        }
        tracing::info!(dir = %dir.display(), stride, "MiniLM loaded");
        Ok(Self {
            config,
            tokenizer,
            word,
            position,
            token_type,
            emb_ln,
            layers,
            stride,
            max_tokens: options.max_tokens,
            formats,
            profile: parking_lot::Mutex::new(Profile::default()),
        })
    }

    /// The model's BERT settings.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Embedding dimension (384).
    pub fn dim(&self) -> usize {
        self.config.hidden_size
    }

    /// Longest input in tokens; longer texts are truncated.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The format each linear weight got (after fusing and any fallback).
    pub fn formats(&self) -> &BTreeMap<String, Format> {
        &self.formats
    }

    /// Bytes of the weights as stored: quantized linear weights, f32
    /// embeddings, biases and norms.
    pub fn weight_bytes(&self) -> u64 {
        self.float_bytes() + self.linear_bytes(QLinear::storage_bytes)
    }

    /// Bytes the weights occupy once forwards have run: [`Self::weight_bytes`]
    /// plus the repacked copies candle keeps of quantized weights.
    pub fn resident_bytes(&self) -> u64 {
        self.float_bytes() + self.linear_bytes(QLinear::resident_bytes)
    }

    /// `bytes` summed over the four linear layers of every encoder layer.
    fn linear_bytes(&self, bytes: impl Fn(&QLinear) -> u64) -> u64 {
        self.layers
            .iter()
            .map(|l| bytes(&l.qkv) + bytes(&l.attn_out) + bytes(&l.inter) + bytes(&l.out))
            .sum()
    }

    /// Bytes of the word-embedding table as stored (f32 or Q8_0 rows).
    pub fn word_embedding_bytes(&self) -> u64 {
        self.word.bytes()
    }

    fn float_bytes(&self) -> u64 {
        let floats = self.position.len()
            + self.token_type.len()
            + 2 * self.config.hidden_size
            + self
                .layers
                .iter()
                .map(|l| {
                    l.qkv_bias.len()
                        + l.attn_out_bias.len()
                        + 2 * l.attn_ln.0.len()
                        + l.inter_bias.len()
                        + l.out_bias.len()
                        + 2 * l.out_ln.0.len()
                })
                .sum::<usize>();
        self.word.bytes() + 4 * floats as u64
    }

    /// Tokenises texts (truncated to [`Self::max_tokens`], no padding).
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Tokens>> {
        let start = Instant::now();
        let out = self.tokenizer.tokenize(texts)?;
        self.profile.lock().tokenize_ns += elapsed(start);
        Ok(out)
    }

    /// Embeds tokenised texts as one batch: one unit vector per text.
    pub fn embed_tokens(&self, batch: &[Tokens]) -> Result<Vec<Vec<f32>>> {
        // The forward makes some forty parallel calls (every matmul, norm,
        // attention and GELU). From a thread outside rayon's pool, each of
        // them would be handed to the pool and waited for (the caller
        // parks, a worker wakes): on a one-sentence request that was a
        // tenth of the time. The whole forward runs on one of the pool's
        // threads instead, one hand-off per batch; the values are the same.
        if rayon::current_thread_index().is_some() {
            self.forward(batch)
        } else {
            rayon::scope(|_| self.forward(batch))
        }
    }

    fn forward(&self, batch: &[Tokens]) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let c = &self.config;
        let h = c.hidden_size;
        let mut seqs = Vec::with_capacity(batch.len());
        let total: usize = batch.iter().map(Tokens::len).sum();
        let mut ids = Vec::with_capacity(total);
        let mut type_ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        for (index, t) in batch.iter().enumerate() {
            let len = t.ids.len();
            if len == 0 {
                return Err(Error::EmptySequence { index });
            }
            if len > c.max_position_embeddings {
                return Err(Error::TooLong {
                    index,
                    len,
                    limit: c.max_position_embeddings,
                });
            }
            if t.type_ids.len() != len && !t.type_ids.is_empty() {
                return Err(Error::BadToken {
                    index,
                    what: "type id count",
                    id: t.type_ids.len() as u32,
                    limit: len,
                });
            }
            if let Some(&id) = t.ids.iter().find(|&&id| id as usize >= c.vocab_size) {
                return Err(Error::BadToken {
                    index,
                    what: "id",
                    id,
                    limit: c.vocab_size,
                });
            }
            if let Some(&id) = t
                .type_ids
                .iter()
                .find(|&&id| id as usize >= c.type_vocab_size)
            {
                return Err(Error::BadToken {
                    index,
                    what: "type id",
                    id,
                    limit: c.type_vocab_size,
                });
            }
            seqs.push((ids.len(), len));
            ids.extend_from_slice(&t.ids);
            if t.type_ids.is_empty() {
                type_ids.extend(std::iter::repeat_n(0, len));
            } else {
                type_ids.extend_from_slice(&t.type_ids);
            }
            positions.extend(0..len as u32);
        }
        let rows = ids.len();
        let s = self.stride;
        let mut p = Profile {
            texts: batch.len() as u64,
            tokens: rows as u64,
            ..Profile::default()
        };

        // The forward's activations, allocated once for the batch and reused
        // by every layer (what `MiniLmMemory::per_token` counts):
        // - `hidden`: the layer's input, the residual of both norms, and
        //   its output (each norm writes back over it);
        // - `ctx`: the attention's output, then the FFN's output projection;
        // - `work`: the fused q/k/v projection, then the attention's output
        //   projection, then the FFN's intermediate (GELU in place);
        // - `scratch`: the int8 kernel's quantized activations.
        // Columns past `h` of `hidden` stay zero (the pad of the weights'
        // input); the attention writes every column of `ctx`.
        let i_dim = c.intermediate_size;
        let wide = self
            .layers
            .iter()
            .map(|l| {
                l.qkv
                    .out_dim()
                    .max(l.attn_out.out_dim())
                    .max(l.inter.out_dim())
            })
            .max()
            .unwrap_or(0);
        let mut hidden = vec![0f32; rows * s];
        let mut ctx = vec![0f32; rows * s];
        let mut work = vec![0f32; rows * wide];
        let mut scratch = LinearScratch::new();
        for layer in &self.layers {
            // The widest input first, so that the scratch is allocated once.
            for linear in [&layer.out, &layer.qkv, &layer.attn_out, &layer.inter] {
                scratch.reserve(linear, rows);
            }
        }

        let t0 = Instant::now();
        let tables = EmbeddingTables {
            word: &self.word,
            position: &self.position,
            token_type: &self.token_type,
            gamma: &self.emb_ln.0,
            beta: &self.emb_ln.1,
            eps: c.layer_norm_eps as f32,
        };
        kernels::embed(&tables, &ids, &type_ids, &positions, &mut hidden, s);
        drop((ids, type_ids, positions));
        p.embed_ns += elapsed(t0);
        let shape = AttentionShape {
            heads: c.num_attention_heads,
            head_dim: h / c.num_attention_heads,
        };
        let eps = c.layer_norm_eps as f32;
        for layer in &self.layers {
            let t = Instant::now();
            let qkv = &mut work[..rows * layer.qkv.out_dim()];
            layer.qkv.forward_into(&hidden, rows, qkv, &mut scratch)?;
            p.matmul_ns += elapsed(t);
            let t = Instant::now();
            kernels::attention(qkv, &layer.qkv_bias, &seqs, shape, &mut ctx, s);
            p.attention_ns += elapsed(t);
            let t = Instant::now();
            let a = &mut work[..rows * h];
            layer.attn_out.forward_into(&ctx, rows, a, &mut scratch)?;
            p.matmul_ns += elapsed(t);
            let t = Instant::now();
            kernels::add_layer_norm(
                a,
                &layer.attn_out_bias,
                &mut hidden,
                s,
                &layer.attn_ln.0,
                &layer.attn_ln.1,
                eps,
            );
            p.layer_norm_ns += elapsed(t);
            let t = Instant::now();
            let inter = &mut work[..rows * i_dim];
            layer
                .inter
                .forward_into(&hidden, rows, inter, &mut scratch)?;
            p.matmul_ns += elapsed(t);
            let t = Instant::now();
            kernels::bias_gelu(inter, &layer.inter_bias, i_dim);
            p.gelu_ns += elapsed(t);
            let t = Instant::now();
            let o = &mut ctx[..rows * h];
            layer.out.forward_into(inter, rows, o, &mut scratch)?;
            p.matmul_ns += elapsed(t);
            let t = Instant::now();
            kernels::add_layer_norm(
                o,
                &layer.out_bias,
                &mut hidden,
                s,
                &layer.out_ln.0,
                &layer.out_ln.1,
                eps,
            );
            p.layer_norm_ns += elapsed(t);
        }
        drop((ctx, work, scratch));
        let t = Instant::now();
        let out = kernels::mean_pool_normalize(&hidden, s, h, &seqs);
        p.pool_ns += elapsed(t);
        let mut total = self.profile.lock();
        total.embed_ns += p.embed_ns;
        total.matmul_ns += p.matmul_ns;
        total.attention_ns += p.attention_ns;
        total.gelu_ns += p.gelu_ns;
        total.layer_norm_ns += p.layer_norm_ns;
        total.pool_ns += p.pool_ns;
        total.texts += p.texts;
        total.tokens += p.tokens;
        Ok(out)
    }

    /// Tokenises and embeds texts as one batch: one unit vector per text.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let tokens = self.tokenize(texts)?;
        self.embed_tokens(&tokens)
    }

    /// Time spent per stage since load or the last reset.
    pub fn profile(&self) -> Profile {
        self.profile.lock().clone()
    }

    /// Zeroes the stage timings.
    pub fn reset_profile(&self) {
        *self.profile.lock() = Profile::default();
    }
}

impl Embed for MiniLm {
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        MiniLm::embed(self, texts)
    }

    fn dim(&self) -> usize {
        MiniLm::dim(self)
    }
}

/// Total of a profile's stages.
impl Profile {
    /// Sum of all stages.
    pub fn total(&self) -> Duration {
        Duration::from_nanos(
            self.tokenize_ns
                + self.embed_ns
                + self.matmul_ns
                + self.attention_ns
                + self.gelu_ns
                + self.layer_norm_ns
                + self.pool_ns,
        )
    }
}
