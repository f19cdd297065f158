//! The paged KV cache: fixed-size blocks leased from a [`buffer_pool`] under
//! a byte budget, one block table per layer group and sequence.
//!
//! Layers that share a window (Gemma 3's local layers; all layers of a llama)
//! form a group. A block of a group holds `block_tokens` consecutive
//! positions of keys and values for every layer of the group, in f16, laid
//! out `[layer][k|v][kv head][token][head dim]`, so that one head's keys in a
//! block are contiguous. A sliding-window group drops the blocks that fell out
//! of its window after each step; nothing grows by concatenation.
//!
//! Whole blocks of a prompt's prefix can be shared between sequences
//! ([`Sequence::share_prefix`], [`SharedPrefix`]): they are never written
//! again (a sequence writes only at its end), so the sharers hold them by
//! reference count and the last one to let go returns them to the pool.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use buffer_pool::{Lease, NamedPool};
use half::f16;
use serde::{Deserialize, Serialize};

use super::config::ModelConfig;
use crate::error::{Error, Result};

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub enum KvType {
    /// IEEE half precision (2 bytes per value).
    #[default]
    F16,
}

impl KvType {
    /// Bytes per stored value.
    pub fn bytes(self) -> usize {
        match self {
            KvType::F16 => 2,
        }
    }
}

/// One group of layers sharing a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvGroup {
    /// The layers (indices into the model).
    pub layers: Vec<usize>,
    /// Sliding window, `None` for full attention.
    pub window: Option<usize>,
    /// Positions per block: at least the configured `kv_block_tokens`,
    /// rounded up so that the block fills the pool's size class.
    pub block_tokens: usize,
    /// Bytes one block needs.
    pub block_bytes: usize,
    /// Bytes the pool holds for one block (its size class).
    pub class_bytes: usize,
}

impl KvGroup {
    /// Most blocks a sequence of `len` positions holds in this group when
    /// steps add up to `step` positions at a time.
    pub fn max_blocks(&self, len: usize, step: usize) -> usize {
        let held = match self.window {
            // The window before the oldest query of a step, plus the step.
            Some(w) => len.min(w.saturating_sub(1) + step.max(1)),
            None => len,
        };
        // A window that does not start on a block boundary straddles one
        // more block.
        let extra = usize::from(self.window.is_some() && held < len);
        held.div_ceil(self.block_tokens) + extra
    }
}

/// The KV layout of a model: its groups and where each layer lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvLayout {
    /// Element type.
    pub kv_type: KvType,
    /// The groups.
    pub groups: Vec<KvGroup>,
    /// `(group, index within group)` of each layer.
    pub slots: Vec<(usize, usize)>,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl KvLayout {
    /// The layout for `cfg` with blocks of at least `block_tokens` positions.
    pub fn new(cfg: &ModelConfig, kv_type: KvType, block_tokens: usize) -> Result<KvLayout> {
        if block_tokens == 0 {
            return Err(Error::invalid(
                "kv_block_tokens",
                0,
                "at least 1 (a block holds at least one position)",
            ));
        }
        let per_token_layer = 2 * cfg.kv_dim() * kv_type.bytes();
        let mut groups = Vec::new();
        let mut slots = vec![(0, 0); cfg.n_layers];
        for (gi, (kind, layers)) in cfg.layer_groups().into_iter().enumerate() {
            for (li, &l) in layers.iter().enumerate() {
                slots[l] = (gi, li);
            }
            let per_token = per_token_layer * layers.len();
            let want = per_token * block_tokens;
            let class = buffer_pool::size_class(want).ok_or_else(|| {
                Error::invalid(
                    "kv_block_tokens",
                    block_tokens,
                    format!("fewer positions: a block of {want} bytes is beyond the pool's size classes"),
                )
            })?;
            let tokens = class / per_token;
            groups.push(KvGroup {
                layers,
                window: kind.window,
                block_tokens: tokens,
                block_bytes: tokens * per_token,
                class_bytes: class,
            });
        }
        Ok(KvLayout {
            kv_type,
            groups,
            slots,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        })
    }

    /// KV bytes (as the pool holds them) of one sequence at `len` positions,
    /// stepping `step` positions at a time.
    pub fn sequence_bytes(&self, len: usize, step: usize) -> usize {
        self.groups
            .iter()
            .map(|g| g.max_blocks(len, step) * g.class_bytes)
            .sum()
    }

    /// Offset (in values) of `(layer in group, k=0|v=1, head, token in block)`.
    #[inline]
    fn offset(&self, g: &KvGroup, li: usize, kv: usize, head: usize, t: usize) -> usize {
        (((li * 2 + kv) * self.n_kv_heads + head) * g.block_tokens + t) * self.head_dim
    }
}

static NEXT_LAYOUT: AtomicU64 = AtomicU64::new(1);

pub(crate) fn next_layout_id() -> u64 {
    NEXT_LAYOUT.fetch_add(1, Ordering::Relaxed)
}

/// A block of a table: the sequence's own, or shared with others (a
/// prefix: full, never written again).
#[derive(Debug)]
enum Block {
    Own(Lease),
    Shared(Arc<Lease>),
}

impl Block {
    fn lease(&self) -> &Lease {
        match self {
            Block::Own(l) => l,
            Block::Shared(l) => l,
        }
    }
}

#[derive(Debug, Default)]
struct BlockTable {
    /// Logical index of `blocks[0]`.
    first: usize,
    blocks: VecDeque<Block>,
}

/// Whole KV blocks of a prefix of some sequence, shared: a new sequence
/// made from it ([`Decoder::sequence_from_prefix`](super::Decoder::sequence_from_prefix))
/// starts at position [`tokens`](SharedPrefix::tokens) without computing
/// them. Holding it keeps its blocks out of the pool.
///
/// A prefix can be cut into pieces of whole blocks ([`pieces`](Self::pieces):
/// positions `start..start + tokens`) and pieces that follow each other
/// from position 0 joined back ([`join`](Self::join)), so that a cache can
/// keep them one by one, keyed by a hash chain of their tokens.
#[derive(Debug, Clone)]
pub struct SharedPrefix {
    pub(crate) layout_id: u64,
    start: usize,
    tokens: usize,
    /// Per group, the blocks of positions `start..start + tokens`.
    tables: Vec<Vec<Arc<Lease>>>,
    bytes: usize,
}

impl SharedPrefix {
    /// Positions it covers.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Its first position (0 for a whole prefix).
    pub fn start(&self) -> usize {
        self.start
    }

    /// Cuts it into pieces of `unit` positions (a multiple of every
    /// group's block; see `Decoder::prefix_unit`); `None` when `unit` does
    /// not divide it into whole blocks.
    pub fn pieces(&self, layout: &KvLayout, unit: usize) -> Option<Vec<SharedPrefix>> {
        if unit == 0 || !self.tokens.is_multiple_of(unit) {
            return None;
        }
        if layout
            .groups
            .iter()
            .any(|g| !unit.is_multiple_of(g.block_tokens))
        {
            return None;
        }
        let n = self.tokens / unit;
        Some(
            (0..n)
                .map(|i| {
                    let tables: Vec<Vec<Arc<Lease>>> = layout
                        .groups
                        .iter()
                        .zip(&self.tables)
                        .map(|(g, t)| {
                            let per = unit / g.block_tokens;
                            t[i * per..(i + 1) * per].to_vec()
                        })
                        .collect();
                    let bytes = layout
                        .groups
                        .iter()
                        .map(|g| unit / g.block_tokens * g.class_bytes)
                        .sum();
                    SharedPrefix {
                        layout_id: self.layout_id,
                        start: self.start + i * unit,
                        tokens: unit,
                        tables,
                        bytes,
                    }
                })
                .collect(),
        )
    }

    /// Joins pieces that follow each other from position 0 into one
    /// prefix; `None` when they do not (or are of different decoders).
    pub fn join(pieces: &[SharedPrefix]) -> Option<SharedPrefix> {
        let first = pieces.first()?;
        if first.start != 0 {
            return None;
        }
        let mut out = SharedPrefix {
            layout_id: first.layout_id,
            start: 0,
            tokens: 0,
            tables: vec![Vec::new(); first.tables.len()],
            bytes: 0,
        };
        for p in pieces {
            if p.layout_id != out.layout_id
                || p.start != out.tokens
                || p.tables.len() != out.tables.len()
            {
                return None;
            }
            for (t, pt) in out.tables.iter_mut().zip(&p.tables) {
                t.extend(pt.iter().cloned());
            }
            out.tokens += p.tokens;
            out.bytes += p.bytes;
        }
        Some(out)
    }

    /// Bytes its blocks hold in the pool (size classes).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// One sequence's cached keys and values: a block table per layer group.
/// Dropping it returns its blocks to the pool.
#[derive(Debug)]
pub struct Sequence {
    pub(crate) layout_id: u64,
    len: usize,
    tables: Vec<BlockTable>,
}

impl Sequence {
    pub(crate) fn new(layout_id: u64, groups: usize) -> Sequence {
        Sequence {
            layout_id,
            len: 0,
            tables: (0..groups).map(|_| BlockTable::default()).collect(),
        }
    }

    /// Positions cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks held now, over all groups.
    pub fn blocks_held(&self) -> usize {
        self.tables.iter().map(|t| t.blocks.len()).sum()
    }

    /// Forgets every position and frees every block (the sequence can be
    /// reused from position 0).
    pub fn clear(&mut self) {
        self.len = 0;
        for t in &mut self.tables {
            t.blocks.clear();
            t.first = 0;
        }
    }

    /// Leases the blocks for positions `len..len + n` in every group.
    pub(crate) fn reserve(
        &mut self,
        layout: &KvLayout,
        pool: &NamedPool,
        n: usize,
        index: usize,
    ) -> Result<()> {
        let end = self.len + n;
        for (g, table) in layout.groups.iter().zip(&mut self.tables) {
            let need = end.div_ceil(g.block_tokens);
            if table.blocks.is_empty() {
                table.first = self.len / g.block_tokens;
            }
            while table.first + table.blocks.len() < need {
                let lease = pool.try_acquire(g.block_bytes).map_err(|source| {
                    let s = pool.stats();
                    Error::KvExhausted {
                        index,
                        block_bytes: g.class_bytes,
                        in_use: s.in_use_bytes,
                        budget: pool.budget_bytes(),
                        source,
                    }
                })?;
                table.blocks.push_back(Block::Own(lease));
            }
        }
        Ok(())
    }

    /// Writes keys and values of layer `layer` for positions
    /// `len..len + rows` (`k`, `v`: `rows x kv_dim`).
    pub(crate) fn write(&mut self, layout: &KvLayout, layer: usize, k: &[f32], v: &[f32]) {
        let (gi, li) = layout.slots[layer];
        let g = &layout.groups[gi];
        let table = &mut self.tables[gi];
        let hd = layout.head_dim;
        let kv_dim = layout.n_kv_heads * hd;
        let rows = k.len() / kv_dim;
        for r in 0..rows {
            let p = self.len + r;
            let b = p / g.block_tokens - table.first;
            let t = p % g.block_tokens;
            let Block::Own(lease) = &mut table.blocks[b] else {
                unreachable!("a sequence writes only past its shared prefix, into its own blocks")
            };
            let block = as_f16_mut(lease);
            for h in 0..layout.n_kv_heads {
                let src = &k[r * kv_dim + h * hd..r * kv_dim + (h + 1) * hd];
                let o = layout.offset(g, li, 0, h, t);
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut block[o..o + hd], src);
                let src = &v[r * kv_dim + h * hd..r * kv_dim + (h + 1) * hd];
                let o = layout.offset(g, li, 1, h, t);
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut block[o..o + hd], src);
            }
        }
    }

    /// Copies keys (`kv = 0`) or values (`kv = 1`) of `layer`, head `head`,
    /// positions `lo..hi`, as f32 into `out` (`(hi - lo) x head_dim`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gather(
        &self,
        layout: &KvLayout,
        layer: usize,
        kv: usize,
        head: usize,
        lo: usize,
        hi: usize,
        out: &mut [f32],
    ) {
        let (gi, li) = layout.slots[layer];
        let g = &layout.groups[gi];
        let table = &self.tables[gi];
        let hd = layout.head_dim;
        let mut p = lo;
        while p < hi {
            let b = p / g.block_tokens;
            let t0 = p % g.block_tokens;
            let t1 = (g.block_tokens).min(t0 + (hi - p));
            let block = as_f16(table.blocks[b - table.first].lease());
            let o = layout.offset(g, li, kv, head, t0);
            let n = (t1 - t0) * hd;
            let dst = &mut out[(p - lo) * hd..(p - lo) * hd + n];
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(&block[o..o + n], dst);
            p += t1 - t0;
        }
    }

    /// Shares the blocks of positions `0..tokens`: they become shared
    /// between this sequence and the returned prefix. `tokens` must be
    /// cached already, a whole number of blocks in every group, and held
    /// (no sliding window has dropped any of them); otherwise `None`.
    pub fn share_prefix(&mut self, layout: &KvLayout, tokens: usize) -> Option<SharedPrefix> {
        if tokens == 0 || tokens > self.len {
            return None;
        }
        let mut tables = Vec::with_capacity(self.tables.len());
        let mut bytes = 0;
        for (g, table) in layout.groups.iter().zip(&self.tables) {
            if !tokens.is_multiple_of(g.block_tokens) || table.first != 0 {
                return None;
            }
            if table.blocks.len() < tokens / g.block_tokens {
                return None;
            }
        }
        for (g, table) in layout.groups.iter().zip(&mut self.tables) {
            let n = tokens / g.block_tokens;
            table.blocks = std::mem::take(&mut table.blocks)
                .into_iter()
                .enumerate()
                .map(|(i, b)| match b {
                    Block::Own(l) if i < n => Block::Shared(Arc::new(l)),
                    other => other,
                })
                .collect();
            let shared: Vec<Arc<Lease>> = table
                .blocks
                .iter()
                .take(n)
                .filter_map(|b| match b {
                    Block::Shared(l) => Some(Arc::clone(l)),
                    Block::Own(_) => None,
                })
                .collect();
            bytes += n * g.class_bytes;
            tables.push(shared);
        }
        Some(SharedPrefix {
            layout_id: self.layout_id,
            start: 0,
            tokens,
            tables,
            bytes,
        })
    }

    /// A sequence at position `prefix.tokens()` whose first blocks are the
    /// prefix's (shared); `prefix` starts at 0.
    pub(crate) fn from_prefix(prefix: &SharedPrefix) -> Sequence {
        Sequence {
            layout_id: prefix.layout_id,
            len: prefix.tokens,
            tables: prefix
                .tables
                .iter()
                .map(|t| BlockTable {
                    first: 0,
                    blocks: t.iter().map(|l| Block::Shared(Arc::clone(l))).collect(),
                })
                .collect(),
        }
    }

    /// Moves the sequence `n` positions on and frees the blocks that fell
    /// out of every sliding window.
    pub(crate) fn advance(&mut self, layout: &KvLayout, n: usize) {
        self.len += n;
        for (g, table) in layout.groups.iter().zip(&mut self.tables) {
            if let Some(w) = g.window {
                // The next query (at `len`) sees positions >= len + 1 - w.
                let oldest = (self.len + 1).saturating_sub(w);
                while !table.blocks.is_empty() && (table.first + 1) * g.block_tokens <= oldest {
                    table.blocks.pop_front();
                    table.first += 1;
                }
            }
        }
    }
}

fn as_f16(lease: &Lease) -> &[f16] {
    let bytes = lease.as_slice();
    // SAFETY: leases are 64-byte aligned (buffer_pool's RawBuf), f16 has no
    // invalid bit patterns, and the length is rounded down to whole values.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f16>(), bytes.len() / 2) }
}

fn as_f16_mut(lease: &mut Lease) -> &mut [f16] {
    let bytes = lease.as_mut_slice();
    // SAFETY: as in `as_f16`, with the unique borrow of the lease.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<f16>(), bytes.len() / 2) }
}
