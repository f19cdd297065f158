//! The paged KV cache: fixed-size blocks leased from a [`buffer_pool`] under
//! a byte budget, one block table per layer group and sequence.
//!
//! Layers that share a window (Gemma 3's local layers; all layers of a llama)
//! form a group. A block of a group holds `block_tokens` consecutive
//! positions of keys and values for every layer of the group, in f16, laid
//! out `[layer][k|v][kv head][token][head dim]`, so that one head's keys in a
//! block are contiguous. A sliding-window group drops the blocks that fell out
//! of its window after each step; nothing grows by concatenation.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

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

#[derive(Debug, Default)]
struct BlockTable {
    /// Logical index of `blocks[0]`.
    first: usize,
    blocks: VecDeque<Lease>,
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
                table.blocks.push_back(lease);
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
            let block = as_f16_mut(&mut table.blocks[b]);
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
            let block = as_f16(&table.blocks[b - table.first]);
            let o = layout.offset(g, li, kv, head, t0);
            let n = (t1 - t0) * hd;
            let dst = &mut out[(p - lo) * hd..(p - lo) * hd + n];
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(&block[o..o + n], dst);
            p += t1 - t0;
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
