//! The forward pass of one ragged step over raw f32 buffers.

use std::cell::RefCell;

use super::config::RopeStyle;
use super::linear::Matrix;
use super::numerics::{self, AttnScratch};
use super::ops::{self, RopeTable};
use super::KvType;
use super::{Decoder, Logits, LogitsWanted, SequenceStep};
use crate::error::Result;

/// Query rows per attention task.
const Q_TILE: usize = 16;

/// Buffers reused from step to step; each grows to the largest step seen
/// (at most `max_step_tokens` rows).
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    a: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    positions: Vec<usize>,
    ropes: Vec<(f32, RopeTable)>,
}

impl Scratch {
    /// f32 values the scratch holds for a step of `tokens` tokens (what
    /// [`run`] resizes its buffers to).
    pub(crate) fn floats_for(cfg: &super::ModelConfig, tokens: usize) -> usize {
        let per_token = 2 * cfg.hidden // x, h
            + cfg.q_dim() * 2 // q, o
            + cfg.kv_dim() * 2 // k, v
            + cfg.hidden.max(cfg.q_dim()) // a
            + cfg.ffn * 2 // g, u
            + cfg.rope_dims * cfg.layer_groups().len(); // cos + sin per base
        per_token * tokens
    }

    /// f32 values the activation buffers have room for.
    pub(crate) fn floats_held(&self) -> usize {
        [
            &self.x, &self.h, &self.q, &self.k, &self.v, &self.o, &self.a, &self.g, &self.u,
        ]
        .iter()
        .map(|v| v.capacity())
        .sum()
    }

    /// Frees the buffers when they hold more than a step of `tokens` needs
    /// (the next step allocates what it uses). True if it freed them.
    pub(crate) fn trim(&mut self, cfg: &super::ModelConfig, tokens: usize) -> bool {
        if self.floats_held() <= Self::floats_for(cfg, tokens) {
            return false;
        }
        *self = Scratch::default();
        true
    }
}

/// [`grow`] for the step scratch: no more capacity than asked, so that
/// [`Scratch::trim`] compares what the buffers hold with what a step needs.
fn grow_exact(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.reserve_exact(n - v.len());
    }
    grow(v, n)
}

fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

struct SyncPtr(*mut f32);
// SAFETY: attention tasks write disjoint (row, head) ranges of the output.
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

/// Per-thread attention buffers: gathered keys, values, scores, and the
/// f16 path's scratch.
type AttnBufs = (Vec<f32>, Vec<f32>, Vec<f32>, AttnScratch);

thread_local! {
    static ATT: RefCell<AttnBufs> = RefCell::new(Default::default());
}

pub(crate) fn run(
    dec: &Decoder,
    s: &mut Scratch,
    steps: &mut [SequenceStep<'_>],
) -> Result<Logits> {
    let cfg = &dec.cfg;
    let w = &dec.weights;
    let hsz = cfg.hidden;
    let qd = cfg.q_dim();
    let kvd = cfg.kv_dim();
    let hd = cfg.head_dim;

    // Rows of each sequence in the step, and the rows that want logits.
    let mut spans = Vec::with_capacity(steps.len());
    let mut out_rows = Vec::new();
    let mut out_spans = Vec::with_capacity(steps.len());
    let mut row = 0;
    s.positions.clear();
    for st in steps.iter() {
        let n = st.tokens.len();
        spans.push((row, n));
        let first_out = out_rows.len();
        match st.logits {
            LogitsWanted::None => {}
            LogitsWanted::Last => out_rows.push(row + n - 1),
            LogitsWanted::All => out_rows.extend(row..row + n),
        }
        out_spans.push((first_out, out_rows.len() - first_out));
        let base = st.seq.len();
        s.positions.extend(base..base + n);
        row += n;
    }
    let t_all = row;

    // Embeddings: only the rows used are dequantized.
    let x = grow_exact(&mut s.x, t_all * hsz);
    for (r, tok) in steps.iter().flat_map(|st| st.tokens.iter()).enumerate() {
        let xr = &mut x[r * hsz..(r + 1) * hsz];
        w.embd.dequantize_row(*tok as usize, xr)?;
        if cfg.embed_scale != 1.0 {
            for v in xr.iter_mut() {
                *v *= cfg.embed_scale;
            }
        }
    }

    // RoPE angles for this step's positions, once per distinct base.
    s.ropes.clear();
    for kind in &cfg.layers {
        if !s.ropes.iter().any(|(b, _)| *b == kind.rope_base) {
            let mut t = RopeTable::default();
            t.fill(&s.positions, cfg.rope_dims, kind.rope_base);
            s.ropes.push((kind.rope_base, t));
        }
    }
    let adjacent = cfg.rope_style == RopeStyle::Adjacent;
    // llama.cpp's flash attention takes batches of fewer than 64 rows
    // through its f16 path (f16 Q, f16 V accumulation), larger ones through
    // its f32 tiles. With f16 KV, each sequence does as it would alone: the
    // choice is by its own rows in this step, never by what else the step
    // holds, so a batched step gives every sequence what it gets alone.
    let f16_attn = dec.layout.kv_type == KvType::F16;

    let mut t = t_all;
    let n_layers = cfg.n_layers;
    for (il, layer) in w.layers.iter().enumerate() {
        let x = &mut s.x[..t * hsz];
        let h = grow_exact(&mut s.h, t * hsz);
        ops::rms_norm(x, &layer.attn_norm, cfg.rms_eps, h);
        let q = grow_exact(&mut s.q, t * qd);
        let k = grow_exact(&mut s.k, t * kvd);
        let v = grow_exact(&mut s.v, t * kvd);
        Matrix::matmul_many(
            &[&layer.wq, &layer.wk, &layer.wv],
            h,
            t,
            &mut [&mut *q, &mut *k, &mut *v],
        )?;
        if let Some(qn) = &layer.q_norm {
            ops::rms_norm_inplace(q, qn, cfg.rms_eps);
        }
        if let Some(kn) = &layer.k_norm {
            ops::rms_norm_inplace(k, kn, cfg.rms_eps);
        }
        let kind = cfg.layers[il];
        let rope = &s
            .ropes
            .iter()
            .find(|(b, _)| *b == kind.rope_base)
            .expect("a table per base")
            .1;
        rope.apply(q, hd, adjacent);
        rope.apply(k, hd, adjacent);
        for (st, &(r0, n)) in steps.iter_mut().zip(&spans) {
            st.seq.write(
                &dec.layout,
                il,
                &k[r0 * kvd..(r0 + n) * kvd],
                &v[r0 * kvd..(r0 + n) * kvd],
            );
        }
        let o = grow_exact(&mut s.o, t * qd);
        attention(dec, il, kind.window, steps, &spans, f16_attn, q, o);

        if il + 1 == n_layers {
            // Only the rows that want logits go on.
            if out_rows.is_empty() {
                return Ok(Logits {
                    vocab: cfg.vocab,
                    data: Vec::new(),
                    spans: out_spans,
                });
            }
            if out_rows.len() < t {
                for (dst, &src) in out_rows.iter().enumerate() {
                    s.o.copy_within(src * qd..(src + 1) * qd, dst * qd);
                    s.x.copy_within(src * hsz..(src + 1) * hsz, dst * hsz);
                }
                t = out_rows.len();
            }
        }
        let o = &s.o[..t * qd];
        let a = grow_exact(&mut s.a, t * hsz);
        layer.wo.matmul(o, t, a)?;
        if let Some(pn) = &layer.post_attn_norm {
            ops::rms_norm_inplace(a, pn, cfg.rms_eps);
        }
        let x = &mut s.x[..t * hsz];
        ops::add_inplace(x, a);
        let h = grow_exact(&mut s.h, t * hsz);
        ops::rms_norm(x, &layer.ffn_norm, cfg.rms_eps, h);
        let g = grow_exact(&mut s.g, t * cfg.ffn);
        let u = grow_exact(&mut s.u, t * cfg.ffn);
        Matrix::matmul_many(&[&layer.gate, &layer.up], h, t, &mut [&mut *g, &mut *u])?;
        match cfg.arch {
            super::Architecture::Llama => ops::silu_mul(g, u),
            super::Architecture::Gemma3 => ops::gelu_mul(g, u),
        }
        let a = grow_exact(&mut s.a, t * hsz);
        layer.down.matmul(g, t, a)?;
        if let Some(pn) = &layer.post_ffw_norm {
            ops::rms_norm_inplace(a, pn, cfg.rms_eps);
        }
        ops::add_inplace(&mut s.x[..t * hsz], a);
    }

    let h = grow_exact(&mut s.h, t * hsz);
    ops::rms_norm(&s.x[..t * hsz], &w.out_norm, cfg.rms_eps, h);
    let out = w.output.as_ref().unwrap_or(&w.embd);
    let mut data = vec![0f32; t * cfg.vocab];
    out.matmul(h, t, &mut data)?;
    if let Some(cap) = cfg.final_softcap {
        for v in data.iter_mut() {
            *v = cap * (*v / cap).tanh();
        }
    }
    Ok(Logits {
        vocab: cfg.vocab,
        data,
        spans: out_spans,
    })
}

/// Causal (and windowed) attention of every sequence's queries over its own
/// blocks; parallel over sequences x KV heads x query tiles. With `f16`
/// (f16 KV), a sequence of fewer than `FA_TILE_Q` rows in the step gets
/// llama.cpp's f16 flash-attention numerics ([`numerics::attend_f16`]);
/// others an f32 softmax.
#[allow(clippy::too_many_arguments)]
fn attention(
    dec: &Decoder,
    layer: usize,
    window: Option<usize>,
    steps: &[SequenceStep<'_>],
    spans: &[(usize, usize)],
    f16: bool,
    q: &[f32],
    o: &mut [f32],
) {
    let cfg = &dec.cfg;
    let hd = cfg.head_dim;
    let qd = cfg.q_dim();
    let rep = cfg.n_heads / cfg.n_kv_heads;
    let scale = cfg.attn_scale;
    // Gemma's graph in llama.cpp scales Q before the attention op, llama's
    // passes the scale to it.
    let (q_scale, kq_scale) = match cfg.arch {
        super::Architecture::Gemma3 => (scale, 1.0),
        super::Architecture::Llama => (1.0, scale),
    };
    let mut tasks = Vec::new();
    for (i, &(_, n)) in spans.iter().enumerate() {
        for g in 0..cfg.n_kv_heads {
            for a in (0..n).step_by(Q_TILE) {
                tasks.push((i, g, a, (a + Q_TILE).min(n)));
            }
        }
    }
    let out = SyncPtr(o.as_mut_ptr());
    let out = &out;
    let run_task = |&(i, g, a, b): &(usize, usize, usize, usize)| {
        let seq = &*steps[i].seq;
        let (r0, rows) = spans[i];
        let f16 = f16 && rows < numerics::FA_TILE_Q;
        let base = seq.len();
        let p_first = base + a;
        let p_last = base + b - 1;
        let lo = window.map_or(0, |w| (p_first + 1).saturating_sub(w));
        let hi = p_last + 1;
        let nk = hi - lo;
        ATT.with(|cell| {
            let (kbuf, vbuf, sc, fa) = &mut *cell.borrow_mut();
            grow(kbuf, nk * hd);
            grow(vbuf, nk * hd);
            grow(sc, nk);
            seq.gather(&dec.layout, layer, 0, g, lo, hi, &mut kbuf[..nk * hd]);
            seq.gather(&dec.layout, layer, 1, g, lo, hi, &mut vbuf[..nk * hd]);
            for hq in g * rep..(g + 1) * rep {
                for r in a..b {
                    let p = base + r;
                    let klo = window.map_or(0, |w| (p + 1).saturating_sub(w)).max(lo);
                    let qrow = &q[(r0 + r) * qd + hq * hd..(r0 + r) * qd + (hq + 1) * hd];
                    if f16 {
                        // SAFETY: this task alone writes row r0 + r, head hq.
                        let orow = unsafe {
                            std::slice::from_raw_parts_mut(out.0.add((r0 + r) * qd + hq * hd), hd)
                        };
                        let (k0, k1) = ((klo - lo) * hd, (p + 1 - lo) * hd);
                        numerics::attend_f16(
                            qrow,
                            &kbuf[k0..k1],
                            &vbuf[k0..k1],
                            hd,
                            q_scale,
                            kq_scale,
                            fa,
                            orow,
                        );
                        continue;
                    }
                    let scores = &mut sc[..p + 1 - klo];
                    let mut mx = f32::NEG_INFINITY;
                    for (j, s) in scores.iter_mut().enumerate() {
                        let kj = klo + j - lo;
                        *s = ops::dot(qrow, &kbuf[kj * hd..(kj + 1) * hd]) * scale;
                        mx = mx.max(*s);
                    }
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - mx).exp();
                        sum += *s;
                    }
                    let inv = 1.0 / sum;
                    // SAFETY: this task alone writes row r0 + r, head hq.
                    let orow = unsafe {
                        std::slice::from_raw_parts_mut(out.0.add((r0 + r) * qd + hq * hd), hd)
                    };
                    orow.fill(0.0);
                    for (j, s) in scores.iter().enumerate() {
                        let kj = klo + j - lo;
                        ops::axpy(orow, s * inv, &vbuf[kj * hd..(kj + 1) * hd]);
                    }
                }
            }
        });
    };
    // On the matmuls' pool (its threads are spinning for the next matmul),
    // inline when there is one task.
    super::linear::pool().run(tasks.len(), |t| run_task(&tasks[t]));
}
