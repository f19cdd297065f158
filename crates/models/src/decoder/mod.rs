//! Decoder LLMs read from GGUF: the llama family and Gemma 3.
//!
//! - [`ModelConfig`]: the shape, from GGUF metadata alone.
//! - [`Decoder`]: the weights in their stored types and a ragged batched
//!   [`Decoder::step`]: every sequence of a step contributes one decode token
//!   or a prefill chunk at its own position; matmuls run over all tokens of
//!   the step at once, attention per sequence over its own KV blocks.
//! - [`Sequence`]: one sequence's paged KV cache (blocks leased from a
//!   [`buffer_pool::BufferPool`] under a byte budget); dropping it frees them.
//! - [`DecoderEstimate`]: memory known from the header, before loading.

mod config;
mod estimate;
mod forward;
mod kv;
mod linear;
mod numerics;
mod ops;

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use buffer_pool::{BufferPool, BufferPoolConfig, NamedPool, NamedPoolConfig};
use candle_core::quantized::gguf_file::Content;
use candle_core::Device;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

pub use self::config::{Architecture, LayerKind, ModelConfig, RopeStyle};
pub use self::estimate::DecoderEstimate;
pub use self::kv::{KvGroup, KvLayout, KvType, Sequence, SharedPrefix};

use self::forward::Scratch;
use self::linear::Matrix;
use crate::error::{Error, Result};

/// Settings of a loaded decoder. Every limit has a documented default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DecoderConfig {
    /// Positions per KV block, at least (default 16). A block is rounded up
    /// to fill the KV pool's size class, so it may hold a few more.
    pub kv_block_tokens: usize,
    /// KV element type (default f16).
    pub kv_type: KvType,
    /// Bytes all sequences' KV blocks may hold together (default 256 MiB).
    pub kv_budget_bytes: usize,
    /// Tokens one step may hold, over all its sequences (default 512).
    /// Bounds the step's scratch; [`Decoder::prefill`] chunks by it.
    pub max_step_tokens: usize,
    /// Positions a sequence may reach; `None` (the default) for the model's
    /// trained context.
    pub context: Option<usize>,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        DecoderConfig {
            kv_block_tokens: 16,
            kv_type: KvType::F16,
            kv_budget_bytes: 256 << 20,
            max_step_tokens: 512,
            context: None,
        }
    }
}

/// Which logits a sequence of a step wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogitsWanted {
    /// None (a prefill chunk that is not the last).
    None,
    /// The last token's (decode, or the last prefill chunk).
    #[default]
    Last,
    /// Every token's (perplexity, scoring).
    All,
}

/// One sequence's part of a step: `tokens` are appended at the sequence's
/// next position.
#[derive(Debug)]
pub struct SequenceStep<'a> {
    /// The sequence (its KV cache).
    pub seq: &'a mut Sequence,
    /// The tokens of this step (one to decode, or a prefill chunk).
    pub tokens: &'a [u32],
    /// Which logits to return.
    pub logits: LogitsWanted,
}

/// The logits of a step: for each sequence of the step, the rows it asked for.
#[derive(Debug, Clone, Default)]
pub struct Logits {
    vocab: usize,
    data: Vec<f32>,
    /// `(first row, rows)` of each sequence of the step.
    spans: Vec<(usize, usize)>,
}

impl Logits {
    /// Vocabulary size (row width).
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Sequences of the step.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether the step had no sequence.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The rows of sequence `i` of the step, `rows x vocab` (empty for
    /// [`LogitsWanted::None`]).
    pub fn rows(&self, i: usize) -> &[f32] {
        let (a, n) = self.spans[i];
        &self.data[a * self.vocab..(a + n) * self.vocab]
    }

    /// The last row of sequence `i`, if it asked for any.
    pub fn last(&self, i: usize) -> Option<&[f32]> {
        let (a, n) = self.spans[i];
        (n > 0).then(|| &self.data[(a + n - 1) * self.vocab..(a + n) * self.vocab])
    }
}

pub(crate) struct Layer {
    attn_norm: Vec<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate: Matrix,
    up: Matrix,
    down: Matrix,
    post_ffw_norm: Option<Vec<f32>>,
}

pub(crate) struct Weights {
    embd: Matrix,
    output: Option<Matrix>,
    out_norm: Vec<f32>,
    layers: Vec<Layer>,
}

/// A decoder LLM loaded from a GGUF file.
pub struct Decoder {
    path: PathBuf,
    cfg: ModelConfig,
    opts: DecoderConfig,
    context: usize,
    weights: Weights,
    layout: KvLayout,
    layout_id: u64,
    _pool: BufferPool,
    kv: NamedPool,
    scratch: Mutex<Scratch>,
    /// Tokens the step scratch is kept for between steps (see
    /// [`Decoder::set_scratch_tokens`]).
    scratch_tokens: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("path", &self.path)
            .field("arch", &self.cfg.arch)
            .field("layers", &self.cfg.n_layers)
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

/// Reads the GGUF header (metadata and tensor infos, no tensor data).
pub fn read_header(path: impl AsRef<Path>) -> Result<Content> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut r = BufReader::new(file);
    Content::read(&mut r).map_err(|source| Error::Gguf {
        path: path.to_path_buf(),
        source,
    })
}

fn check_config(opts: &DecoderConfig, cfg: &ModelConfig) -> Result<usize> {
    if opts.max_step_tokens == 0 {
        return Err(Error::invalid(
            "max_step_tokens",
            0,
            "at least 1 (a step holds at least one token)",
        ));
    }
    let context = opts.context.unwrap_or(cfg.context);
    if context == 0 {
        return Err(Error::invalid(
            "context",
            0,
            "at least 1 (a sequence holds at least one position)",
        ));
    }
    Ok(context)
}

impl Decoder {
    /// Loads a GGUF decoder with the weights in their stored types.
    pub fn load(path: impl AsRef<Path>, opts: DecoderConfig) -> Result<Decoder> {
        let path = path.as_ref().to_path_buf();
        let content = read_header(&path)?;
        let cfg = ModelConfig::from_gguf(&content)?;
        let context = check_config(&opts, &cfg)?;
        let layout = KvLayout::new(&cfg, opts.kv_type, opts.kv_block_tokens)?;
        let largest = layout
            .groups
            .iter()
            .map(|g| g.class_bytes)
            .max()
            .unwrap_or(0);
        if largest > opts.kv_budget_bytes {
            let g = layout
                .groups
                .iter()
                .max_by_key(|g| g.class_bytes)
                .expect("a model has layers");
            return Err(Error::KvBudgetTooSmall {
                budget: opts.kv_budget_bytes,
                block_bytes: g.class_bytes,
                block_tokens: g.block_tokens,
            });
        }
        let pool = BufferPool::new(
            BufferPoolConfig::with_budget(opts.kv_budget_bytes)
                .pool(NamedPoolConfig::new("kv", opts.kv_budget_bytes)),
        )?;
        let kv = pool.pool("kv")?;

        let file = File::open(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let weights = load_weights(&content, &cfg, &mut reader, &path)?;
        Ok(Decoder {
            path,
            cfg,
            context,
            layout,
            layout_id: kv::next_layout_id(),
            _pool: pool,
            kv,
            scratch: Mutex::new(Scratch::default()),
            scratch_tokens: std::sync::atomic::AtomicUsize::new(opts.max_step_tokens),
            weights,
            opts,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The settings it was loaded with.
    pub fn options(&self) -> &DecoderConfig {
        &self.opts
    }

    /// Positions a sequence may reach.
    pub fn context(&self) -> usize {
        self.context
    }

    /// The KV layout (groups, block sizes).
    pub fn kv_layout(&self) -> &KvLayout {
        &self.layout
    }

    /// KV bytes held by all live sequences (as the pool counts them).
    pub fn kv_bytes_in_use(&self) -> usize {
        self.kv.stats().in_use_bytes
    }

    /// KV bytes the pool holds idle (blocks of sequences that ended, kept
    /// for the next ones to lease): resident, but reserved by no one.
    pub fn kv_bytes_cached(&self) -> usize {
        self.kv.stats().cached_bytes
    }

    /// Bytes held by the weights as stored.
    pub fn weight_bytes(&self) -> usize {
        let w = &self.weights;
        let mut n =
            w.embd.bytes() + w.output.as_ref().map_or(0, |m| m.bytes()) + 4 * w.out_norm.len();
        for l in &w.layers {
            n += l.wq.bytes() + l.wk.bytes() + l.wv.bytes() + l.wo.bytes();
            n += l.gate.bytes() + l.up.bytes() + l.down.bytes();
            let norms = [&l.q_norm, &l.k_norm, &l.post_attn_norm, &l.post_ffw_norm];
            n += 4 * (l.attn_norm.len() + l.ffn_norm.len());
            n += norms
                .iter()
                .map(|v| v.as_ref().map_or(0, |v| 4 * v.len()))
                .sum::<usize>();
        }
        n
    }

    /// A new, empty sequence whose blocks come from this decoder's KV pool.
    pub fn new_sequence(&self) -> Sequence {
        Sequence::new(self.layout_id, self.layout.groups.len())
    }

    /// Positions a shared prefix is made of: the least common multiple of
    /// every layer group's block, or `None` where a group has a sliding
    /// window (its blocks leave the window as the sequence goes on, so a
    /// prefix cannot be kept for later sequences) or the multiple is over
    /// 4,096 positions.
    pub fn prefix_unit(&self) -> Option<usize> {
        let mut unit = 1usize;
        for g in &self.layout.groups {
            if g.window.is_some() {
                return None;
            }
            let (mut a, mut b) = (unit, g.block_tokens);
            while b != 0 {
                (a, b) = (b, a % b);
            }
            unit = unit / a * g.block_tokens;
            if unit > 4096 {
                return None;
            }
        }
        Some(unit)
    }

    /// Shares the KV of `seq`'s first `tokens` positions (a multiple of
    /// [`prefix_unit`](Self::prefix_unit), cached already): `None` when
    /// they cannot be shared or `seq` is another decoder's.
    pub fn share_prefix(&self, seq: &mut Sequence, tokens: usize) -> Option<SharedPrefix> {
        if seq.layout_id != self.layout_id {
            return None;
        }
        seq.share_prefix(&self.layout, tokens)
    }

    /// A new sequence that starts after `prefix`, its KV shared, not
    /// recomputed. Refused when the prefix is another decoder's or does not
    /// start at position 0 (a piece; see [`SharedPrefix::join`]).
    pub fn sequence_from_prefix(&self, prefix: &SharedPrefix) -> Result<Sequence> {
        if prefix.layout_id != self.layout_id || prefix.start() != 0 {
            return Err(Error::ForeignSequence { index: 0 });
        }
        Ok(Sequence::from_prefix(prefix))
    }

    /// Runs `tokens` through `seq` in chunks of at most `max_step_tokens`,
    /// returning the logits asked for (`Last`: the last token's; `All`: every
    /// token's, in order).
    pub fn prefill(
        &self,
        seq: &mut Sequence,
        tokens: &[u32],
        logits: LogitsWanted,
    ) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        let chunk = self.opts.max_step_tokens;
        let n_chunks = tokens.len().div_ceil(chunk);
        for (i, c) in tokens.chunks(chunk).enumerate() {
            let want = match logits {
                LogitsWanted::Last if i + 1 == n_chunks => LogitsWanted::Last,
                LogitsWanted::All => LogitsWanted::All,
                _ => LogitsWanted::None,
            };
            let mut steps = [SequenceStep {
                seq: &mut *seq,
                tokens: c,
                logits: want,
            }];
            let l = self.step(&mut steps)?;
            out.extend_from_slice(l.rows(0));
        }
        Ok(out)
    }

    /// One ragged batched step: appends each sequence's tokens at its own
    /// position and returns the logits asked for. Validates everything
    /// (token ids, context, step budget, KV blocks) before computing; on an
    /// error no sequence has moved on.
    pub fn step(&self, steps: &mut [SequenceStep<'_>]) -> Result<Logits> {
        let total: usize = steps.iter().map(|s| s.tokens.len()).sum();
        if total > self.opts.max_step_tokens {
            return Err(Error::StepTooLarge {
                tokens: total,
                limit: self.opts.max_step_tokens,
            });
        }
        for (i, s) in steps.iter().enumerate() {
            if s.seq.layout_id != self.layout_id {
                return Err(Error::ForeignSequence { index: i });
            }
            if s.tokens.is_empty() {
                return Err(Error::EmptyTokens { index: i });
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab) {
                return Err(Error::BadToken {
                    index: i,
                    what: "id",
                    id: bad,
                    limit: self.cfg.vocab,
                });
            }
            let needed = s.seq.len() + s.tokens.len();
            if needed > self.context {
                return Err(Error::ContextOverflow {
                    index: i,
                    needed,
                    limit: self.context,
                    trained: self.cfg.context,
                });
            }
        }
        for (i, s) in steps.iter_mut().enumerate() {
            s.seq.reserve(&self.layout, &self.kv, s.tokens.len(), i)?;
        }
        let mut scratch = self.scratch.lock();
        let logits = forward::run(self, &mut scratch, steps);
        scratch.trim(&self.cfg, self.scratch_tokens());
        let logits = logits?;
        for s in steps.iter_mut() {
            s.seq.advance(&self.layout, s.tokens.len());
        }
        Ok(logits)
    }

    /// Tokens the step scratch is kept for between steps: the configured
    /// [`max_step_tokens`](DecoderConfig::max_step_tokens) unless
    /// [`set_scratch_tokens`](Self::set_scratch_tokens) lowered it.
    pub fn scratch_tokens(&self) -> usize {
        self.scratch_tokens
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes the step's activation buffers hold between steps.
    pub fn scratch_bytes_held(&self) -> usize {
        self.scratch.lock().floats_held() * std::mem::size_of::<f32>()
    }

    /// Keeps the step scratch (activations of one step, the bulk of
    /// [`DecoderEstimate::scratch_bytes`]) only for steps of at most
    /// `tokens` (clamped to 1..=`max_step_tokens`) between steps: it is
    /// freed now if it holds more, and after any step that grew it past
    /// that. A larger step still runs (it allocates what it needs and frees
    /// it after). For a caller that lowers its step budget to give memory
    /// back (the runtime's `reoptimize`). Waits for a step in progress.
    pub fn set_scratch_tokens(&self, tokens: usize) {
        let tokens = tokens.clamp(1, self.opts.max_step_tokens);
        self.scratch_tokens
            .store(tokens, std::sync::atomic::Ordering::Relaxed);
        self.scratch.lock().trim(&self.cfg, tokens);
    }

    /// The memory this file needs with `opts`, from the header alone.
    pub fn estimate(
        path: impl AsRef<Path>,
        opts: &DecoderConfig,
        sequences: usize,
        context: usize,
    ) -> Result<DecoderEstimate> {
        let content = read_header(path)?;
        DecoderEstimate::from_header(&content, opts, sequences, context)
    }
}

fn read_tensor(
    content: &Content,
    reader: &mut BufReader<File>,
    path: &Path,
    name: &str,
) -> Result<candle_core::quantized::QTensor> {
    if !content.tensor_infos.contains_key(name) {
        return Err(Error::BadTensor {
            name: name.into(),
            reason: "missing".into(),
        });
    }
    content
        .tensor(reader, name, &Device::Cpu)
        .map_err(|source| Error::Gguf {
            path: path.to_path_buf(),
            source,
        })
}

fn load_matrix(
    content: &Content,
    reader: &mut BufReader<File>,
    path: &Path,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Matrix> {
    let info = content
        .tensor_infos
        .get(name)
        .ok_or_else(|| Error::BadTensor {
            name: name.into(),
            reason: "missing".into(),
        })?;
    if info.shape.dims() != [rows, cols] {
        return Err(Error::BadTensor {
            name: name.into(),
            reason: format!("shape {:?}, expected [{rows}, {cols}]", info.shape.dims()),
        });
    }
    config::check_matmul_dtype(name, info.ggml_dtype, cols)?;
    // Straight from the file into the kernels' layout, a few MiB at a time:
    // the stored copy of a large matrix (Gemma's 262k-row embedding) is never
    // held whole beside the repacked one.
    let bad = |reason: String| Error::Gguf {
        path: path.to_path_buf(),
        source: candle_core::Error::Msg(reason),
    };
    let start = content.tensor_data_offset + info.offset;
    let bytes = (rows * cols / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64;
    let len = reader
        .get_ref()
        .metadata()
        .map_err(|e| bad(format!("cannot read the file's size: {e}")))?
        .len();
    if start + bytes > len {
        return Err(bad(format!(
            "tensor {name} needs bytes {start}..{}, but the file is {len} bytes (truncated?)",
            start + bytes
        )));
    }
    reader
        .seek(SeekFrom::Start(start))
        .map_err(|e| bad(format!("seeking to tensor {name} at byte {start}: {e}")))?;
    let q = quant::blocks::QMatrix::from_reader(info.ggml_dtype, rows, cols, reader)?;
    Ok(Matrix::from_qmatrix(name, q))
}

fn load_vector(
    content: &Content,
    reader: &mut BufReader<File>,
    path: &Path,
    name: &str,
    len: usize,
) -> Result<Vec<f32>> {
    let t = read_tensor(content, reader, path, name)?;
    if t.shape().elem_count() != len {
        return Err(Error::BadTensor {
            name: name.into(),
            reason: format!("shape {:?}, expected [{len}]", t.shape().dims()),
        });
    }
    let v = t
        .dequantize(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(v)
}

fn load_weights(
    content: &Content,
    cfg: &ModelConfig,
    r: &mut BufReader<File>,
    path: &Path,
) -> Result<Weights> {
    let h = cfg.hidden;
    let embd = load_matrix(content, r, path, "token_embd.weight", cfg.vocab, h)?;
    let output = if cfg.tied_output {
        None
    } else {
        Some(load_matrix(
            content,
            r,
            path,
            "output.weight",
            cfg.vocab,
            h,
        )?)
    };
    let out_norm = load_vector(content, r, path, "output_norm.weight", h)?;
    let gemma = cfg.arch == Architecture::Gemma3;
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for il in 0..cfg.n_layers {
        let n = |s: &str| format!("blk.{il}.{s}.weight");
        let opt = |r: &mut BufReader<File>, s: &str, len: usize| -> Result<Option<Vec<f32>>> {
            if gemma {
                load_vector(content, r, path, &n(s), len).map(Some)
            } else {
                Ok(None)
            }
        };
        let layer = Layer {
            attn_norm: load_vector(content, r, path, &n("attn_norm"), h)?,
            wq: load_matrix(content, r, path, &n("attn_q"), cfg.q_dim(), h)?,
            wk: load_matrix(content, r, path, &n("attn_k"), cfg.kv_dim(), h)?,
            wv: load_matrix(content, r, path, &n("attn_v"), cfg.kv_dim(), h)?,
            wo: load_matrix(content, r, path, &n("attn_output"), h, cfg.q_dim())?,
            q_norm: opt(r, "attn_q_norm", cfg.head_dim)?,
            k_norm: opt(r, "attn_k_norm", cfg.head_dim)?,
            post_attn_norm: opt(r, "post_attention_norm", h)?,
            ffn_norm: load_vector(content, r, path, &n("ffn_norm"), h)?,
            gate: load_matrix(content, r, path, &n("ffn_gate"), cfg.ffn, h)?,
            up: load_matrix(content, r, path, &n("ffn_up"), cfg.ffn, h)?,
            down: load_matrix(content, r, path, &n("ffn_down"), h, cfg.ffn)?,
            post_ffw_norm: opt(r, "post_ffw_norm", h)?,
        };
        layers.push(layer);
    }
    Ok(Weights {
        embd,
        output,
        out_norm,
        layers,
    })
}
