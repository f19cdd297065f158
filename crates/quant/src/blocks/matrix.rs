//! [`QMatrix`]: a GGUF weight matrix kept in its block format, repacked for
//! the kernels.

use std::ops::Range;

use candle_core::quantized::{GgmlDType, QTensor};

use super::act::{Acts, Layout, QK, QKK};
use super::pool::ComputePool;
use super::{portable, Kernel};
use crate::vnni::f16_to_f32;
use crate::{Error, Result};

/// The block types with a kernel, and their stored sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
    Q4K,
    Q6K,
}

impl Ty {
    pub(crate) fn of(dtype: GgmlDType) -> Result<Ty> {
        Ok(match dtype {
            GgmlDType::F32 => Ty::F32,
            GgmlDType::F16 => Ty::F16,
            GgmlDType::Q4_0 => Ty::Q4_0,
            GgmlDType::Q4_1 => Ty::Q4_1,
            GgmlDType::Q5_0 => Ty::Q5_0,
            GgmlDType::Q8_0 => Ty::Q8_0,
            GgmlDType::Q4K => Ty::Q4K,
            GgmlDType::Q6K => Ty::Q6K,
            other => {
                return Err(Error::UnsupportedBlockType {
                    dtype: format!("{other:?}"),
                })
            }
        })
    }

    pub(crate) fn dtype(self) -> GgmlDType {
        match self {
            Ty::F32 => GgmlDType::F32,
            Ty::F16 => GgmlDType::F16,
            Ty::Q4_0 => GgmlDType::Q4_0,
            Ty::Q4_1 => GgmlDType::Q4_1,
            Ty::Q5_0 => GgmlDType::Q5_0,
            Ty::Q8_0 => GgmlDType::Q8_0,
            Ty::Q4K => GgmlDType::Q4K,
            Ty::Q6K => GgmlDType::Q6K,
        }
    }

    /// Values per block.
    pub(crate) fn block(self) -> usize {
        match self {
            Ty::F32 | Ty::F16 => 1,
            Ty::Q4_0 | Ty::Q4_1 | Ty::Q5_0 | Ty::Q8_0 => QK,
            Ty::Q4K | Ty::Q6K => QKK,
        }
    }

    /// Bytes of one block as GGUF stores it.
    pub(crate) fn stored(self) -> usize {
        match self {
            Ty::F32 => 4,
            Ty::F16 => 2,
            Ty::Q4_0 => 18,
            Ty::Q4_1 => 20,
            Ty::Q5_0 => 22,
            Ty::Q8_0 => 34,
            Ty::Q4K => 144,
            Ty::Q6K => 210,
        }
    }

    /// Bytes of one block once repacked (Q4_K unpacks its 6-bit scales and
    /// minimums to bytes: 148 instead of 144).
    pub(crate) fn resident(self) -> usize {
        match self {
            Ty::Q4K => 148,
            t => t.stored(),
        }
    }

    /// Whether activations are quantized to super-blocks of 256.
    pub(crate) fn super_blocks(self) -> bool {
        matches!(self, Ty::Q4K | Ty::Q6K)
    }

    /// Layout of the quantized activations for the SIMD kernel.
    pub(crate) fn simd_layout(self) -> Layout {
        match self {
            Ty::Q4_0 | Ty::Q5_0 => Layout::Nibble4,
            Ty::Q4K => Layout::SwapQ4K,
            _ => Layout::Natural,
        }
    }
}

/// Bytes a [`QMatrix`] of this type and shape holds in memory, from the
/// header alone (no data needed): the weights as repacked, which is the
/// stored size for every type but Q4_K (148 bytes per 256 values instead of
/// 144, its 6-bit scales unpacked to bytes).
pub fn resident_bytes_for(dtype: GgmlDType, rows: usize, cols: usize) -> Result<u64> {
    let ty = Ty::of(dtype)?;
    check_shape(ty, rows, cols)?;
    Ok((rows * (cols / ty.block()) * ty.resident()) as u64)
}

fn check_shape(ty: Ty, rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 || !cols.is_multiple_of(ty.block()) {
        return Err(Error::BlockData {
            dtype: format!("{:?}", ty.dtype()),
            rows,
            cols,
            reason: format!(
                "both dims must be > 0 and the columns a multiple of the block length {}",
                ty.block()
            ),
        });
    }
    Ok(())
}

/// A weight matrix `W [rows = outputs, cols = inputs]` in a GGUF block type,
/// repacked for the kernels of this module (the values are never
/// dequantized to f32).
///
/// The quants, scales and minimums of each type are stored in separate
/// row-major arrays (so that the quants of consecutive blocks are contiguous
/// for wide loads); Q8_0 quants are stored offset by 128 (unsigned, the
/// operand `vpdpbusd` wants); Q5_0's high bits are regrouped per four blocks;
/// Q4_K's 6-bit scales are unpacked to bytes. See [`QMatrix::resident_bytes`].
pub struct QMatrix {
    pub(crate) ty: Ty,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Quants: Q4_0/Q4_1/Q5_0 16 B per block (GGUF nibble order), Q8_0 32 B
    /// per block (`q + 128`), Q4_K 128 B per super-block, Q6_K `ql` 128 B.
    pub(crate) qs: Vec<u8>,
    /// Q5_0: 4 B per block (regrouped, see [`QMatrix::q5_bits`]); Q6_K `qh` 64 B.
    pub(crate) qh: Vec<u8>,
    /// Q4_K: 8 scales then 8 minimums per super-block; Q6_K: 16 i8 scales.
    pub(crate) sc: Vec<u8>,
    /// f16 scale per block (super-block); F16 weights.
    pub(crate) d: Vec<u16>,
    /// f16 Q4_1 minimum / Q4_K `dmin` per block (super-block).
    pub(crate) m: Vec<u16>,
    /// F32 weights.
    pub(crate) f: Vec<f32>,
    pub(crate) kernel: Kernel,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMatrix")
            .field("dtype", &self.ty.dtype())
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("resident_bytes", &self.resident_bytes())
            .field("kernel", &self.kernel)
            .finish()
    }
}

impl QMatrix {
    /// Repacks a candle `QTensor` (what `gguf_file::Content::tensor` returns).
    /// Its shape is `[rows, cols]` (GGUF's `ne` reversed); a 1-D tensor is
    /// one row.
    pub fn from_qtensor(t: &QTensor) -> Result<QMatrix> {
        let dims = t.shape().dims();
        let (rows, cols) = match *dims {
            [c] => (1, c),
            [r, c] => (r, c),
            _ => {
                return Err(Error::BlockData {
                    dtype: format!("{:?}", t.dtype()),
                    rows: 0,
                    cols: 0,
                    reason: format!("shape {dims:?} is not a matrix"),
                })
            }
        };
        let data = t.data()?;
        QMatrix::from_raw(t.dtype(), rows, cols, &data)
    }

    /// Repacks raw GGUF block data: `rows` rows of `cols` values, each row
    /// `cols / block` blocks as GGUF stores them.
    pub fn from_raw(dtype: GgmlDType, rows: usize, cols: usize, data: &[u8]) -> Result<QMatrix> {
        let ty = Ty::of(dtype)?;
        check_shape(ty, rows, cols)?;
        let nb = cols / ty.block();
        let want = rows * nb * ty.stored();
        if data.len() != want {
            return Err(Error::BlockData {
                dtype: format!("{dtype:?}"),
                rows,
                cols,
                reason: format!("{} bytes of data, the shape needs {want}", data.len()),
            });
        }
        let mut m = QMatrix::empty(ty, rows, cols);
        m.append_rows(0, data);
        Ok(m)
    }

    /// Repacks raw GGUF block data read from `reader` (exactly the tensor's
    /// bytes, as [`from_raw`](Self::from_raw) takes them), a few MiB at a
    /// time: the stored copy is never held whole beside the repacked one, so
    /// loading a large matrix (a 262k-row embedding) peaks at its repacked
    /// size, not twice it.
    pub fn from_reader(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        reader: &mut impl std::io::Read,
    ) -> Result<QMatrix> {
        let ty = Ty::of(dtype)?;
        check_shape(ty, rows, cols)?;
        let row_bytes = cols / ty.block() * ty.stored();
        let chunk_rows = ((4 << 20) / row_bytes.max(1)).clamp(1, rows.max(1));
        let mut m = QMatrix::empty(ty, rows, cols);
        let mut buf = vec![0u8; chunk_rows * row_bytes];
        let mut row = 0;
        while row < rows {
            let r = chunk_rows.min(rows - row);
            let part = &mut buf[..r * row_bytes];
            reader.read_exact(part).map_err(|e| Error::BlockData {
                dtype: format!("{dtype:?}"),
                rows,
                cols,
                reason: format!("reading rows {row}..{}: {e}", row + r),
            })?;
            m.append_rows(row, part);
            row += r;
        }
        Ok(m)
    }

    /// A matrix with no rows stored yet, its buffers reserved for `rows`.
    fn empty(ty: Ty, rows: usize, cols: usize) -> QMatrix {
        let nb = cols / ty.block();
        let blocks = rows * nb;
        let mut m = QMatrix {
            ty,
            rows,
            cols,
            qs: Vec::new(),
            qh: Vec::new(),
            sc: Vec::new(),
            d: Vec::new(),
            m: Vec::new(),
            f: Vec::new(),
            kernel: Kernel::detect(),
        };
        match ty {
            Ty::F32 => m.f.reserve(blocks),
            Ty::F16 => m.d.reserve(blocks),
            Ty::Q4_0 | Ty::Q4_1 => {
                m.qs.reserve(blocks * 16);
                m.d.reserve(blocks);
                if ty == Ty::Q4_1 {
                    m.m.reserve(blocks);
                }
            }
            Ty::Q5_0 => {
                m.qs.reserve(blocks * 16);
                m.qh = vec![0; blocks * 4];
                m.d.reserve(blocks);
            }
            Ty::Q8_0 => {
                m.qs.reserve(blocks * 32);
                m.d.reserve(blocks);
            }
            Ty::Q4K => {
                m.qs.reserve(blocks * 128);
                m.sc.reserve(blocks * 16);
                m.d.reserve(blocks);
                m.m.reserve(blocks);
            }
            Ty::Q6K => {
                m.qs.reserve(blocks * 128);
                m.qh.reserve(blocks * 64);
                m.sc.reserve(blocks * 16);
                m.d.reserve(blocks);
            }
        }
        m
    }

    /// Appends whole stored rows starting at row `row0` (rows must come in
    /// order; `data` holds whole rows).
    fn append_rows(&mut self, row0: usize, data: &[u8]) {
        let h = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let (ty, nb) = (self.ty, self.cols / self.ty.block());
        let m = self;
        let blocks = data.chunks_exact(ty.stored());
        match ty {
            Ty::F32 => {
                m.f.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            }
            Ty::F16 => m.d.extend(blocks.map(|b| h(b, 0))),
            Ty::Q4_0 | Ty::Q4_1 => {
                let off = if ty == Ty::Q4_1 { 4 } else { 2 };
                for b in blocks {
                    m.d.push(h(b, 0));
                    if ty == Ty::Q4_1 {
                        m.m.push(h(b, 2));
                    }
                    m.qs.extend_from_slice(&b[off..off + 16]);
                }
            }
            Ty::Q5_0 => {
                for (i, b) in blocks.enumerate() {
                    m.d.push(h(b, 0));
                    m.qs.extend_from_slice(&b[6..22]);
                    let (row, blk) = (row0 + i / nb, i % nb);
                    let bits = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                    let qh = &mut m.qh[row * nb * 4..(row + 1) * nb * 4];
                    if blk < nb / 4 * 4 {
                        // Regrouped: per 4 blocks a u64 of the 16 low-half
                        // bits of each block, then a u64 of the high halves.
                        let (g, j) = (blk / 4, blk % 4);
                        let mut lo = u64::from_le_bytes(
                            qh[16 * g..16 * g + 8].try_into().unwrap_or_default(),
                        );
                        let mut hi = u64::from_le_bytes(
                            qh[16 * g + 8..16 * g + 16].try_into().unwrap_or_default(),
                        );
                        lo |= ((bits & 0xffff) as u64) << (16 * j);
                        hi |= ((bits >> 16) as u64) << (16 * j);
                        qh[16 * g..16 * g + 8].copy_from_slice(&lo.to_le_bytes());
                        qh[16 * g + 8..16 * g + 16].copy_from_slice(&hi.to_le_bytes());
                    } else {
                        qh[4 * blk..4 * blk + 4].copy_from_slice(&bits.to_le_bytes());
                    }
                }
            }
            Ty::Q8_0 => {
                for b in blocks {
                    m.d.push(h(b, 0));
                    m.qs.extend(b[2..34].iter().map(|&v| v ^ 0x80));
                }
            }
            Ty::Q4K => {
                for b in blocks {
                    m.d.push(h(b, 0));
                    m.m.push(h(b, 2));
                    let s = &b[4..16];
                    let (mut scales, mut mins) = ([0u8; 8], [0u8; 8]);
                    for j in 0..8 {
                        (scales[j], mins[j]) = scale_min_k4(j, s);
                    }
                    m.sc.extend_from_slice(&scales);
                    m.sc.extend_from_slice(&mins);
                    m.qs.extend_from_slice(&b[16..144]);
                }
            }
            Ty::Q6K => {
                for b in blocks {
                    m.qs.extend_from_slice(&b[0..128]);
                    m.qh.extend_from_slice(&b[128..192]);
                    m.sc.extend_from_slice(&b[192..208]);
                    m.d.push(h(b, 208));
                }
            }
        }
    }

    /// The GGUF type of the weights.
    pub fn dtype(&self) -> GgmlDType {
        self.ty.dtype()
    }

    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The kernel that [`matmul`](Self::matmul) runs.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Chooses the kernel (e.g. [`Kernel::Portable`] to compare). An error
    /// when this CPU cannot run it.
    pub fn with_kernel(mut self, kernel: Kernel) -> Result<QMatrix> {
        kernel.check()?;
        self.kernel = kernel;
        Ok(self)
    }

    /// Bytes this matrix holds: equal to
    /// [`resident_bytes_for`]`(dtype, rows, cols)` — the stored size, except
    /// Q4_K (148 bytes per 256 values instead of 144).
    pub fn resident_bytes(&self) -> u64 {
        (self.qs.len()
            + self.qh.len()
            + self.sc.len()
            + 2 * self.d.len()
            + 2 * self.m.len()
            + 4 * self.f.len()) as u64
    }

    /// Blocks per row.
    pub(crate) fn nb(&self) -> usize {
        self.cols / self.ty.block()
    }

    /// The 32 high bits of Q5_0 block `b` of row `row` in GGUF order (bit
    /// `t` belongs to value `t`).
    pub(crate) fn q5_bits(&self, row: usize, b: usize) -> u32 {
        let nb = self.nb();
        let qh = &self.qh[row * nb * 4..(row + 1) * nb * 4];
        let word = |at: usize| u64::from_le_bytes(qh[at..at + 8].try_into().unwrap_or_default());
        if b < nb / 4 * 4 {
            let (g, j) = (b / 4, b % 4);
            let lo = (word(16 * g) >> (16 * j)) & 0xffff;
            let hi = (word(16 * g + 8) >> (16 * j)) & 0xffff;
            (lo | hi << 16) as u32
        } else {
            u32::from_le_bytes(qh[4 * b..4 * b + 4].try_into().unwrap_or_default())
        }
    }

    /// Writes row `row` of the matrix as f32 into `out` (`cols` values),
    /// exactly as candle's dequantization does — e.g. one token's embedding
    /// without dequantizing the table.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        if row >= self.rows {
            return Err(Error::RowRange {
                start: row,
                end: row + 1,
                rows: self.rows,
            });
        }
        if out.len() != self.cols {
            return Err(Error::BufferLength {
                what: "row",
                got: out.len(),
                want: self.cols,
            });
        }
        let nb = self.nb();
        let h = |v: u16| f16_to_f32(v);
        match self.ty {
            Ty::F32 => out.copy_from_slice(&self.f[row * self.cols..(row + 1) * self.cols]),
            Ty::F16 => {
                for (o, &v) in out.iter_mut().zip(&self.d[row * self.cols..]) {
                    *o = h(v);
                }
            }
            Ty::Q4_0 | Ty::Q4_1 | Ty::Q5_0 => {
                for b in 0..nb {
                    let i = row * nb + b;
                    let d = h(self.d[i]);
                    let qs = &self.qs[i * 16..i * 16 + 16];
                    let o = &mut out[b * QK..(b + 1) * QK];
                    let bits = if self.ty == Ty::Q5_0 {
                        self.q5_bits(row, b)
                    } else {
                        0
                    };
                    for t in 0..16 {
                        let (lo, hi) = ((qs[t] & 0xf) as i32, (qs[t] >> 4) as i32);
                        match self.ty {
                            Ty::Q4_0 => {
                                o[t] = (lo - 8) as f32 * d;
                                o[t + 16] = (hi - 8) as f32 * d;
                            }
                            Ty::Q4_1 => {
                                let mn = h(self.m[i]);
                                o[t] = lo as f32 * d + mn;
                                o[t + 16] = hi as f32 * d + mn;
                            }
                            _ => {
                                let l = lo | (((bits >> t) & 1) << 4) as i32;
                                let u = hi | (((bits >> (t + 16)) & 1) << 4) as i32;
                                o[t] = (l - 16) as f32 * d;
                                o[t + 16] = (u - 16) as f32 * d;
                            }
                        }
                    }
                }
            }
            Ty::Q8_0 => {
                for b in 0..nb {
                    let i = row * nb + b;
                    let d = h(self.d[i]);
                    for (o, &q) in out[b * QK..(b + 1) * QK]
                        .iter_mut()
                        .zip(&self.qs[i * 32..i * 32 + 32])
                    {
                        *o = ((q ^ 0x80) as i8) as f32 * d;
                    }
                }
            }
            Ty::Q4K => {
                for b in 0..nb {
                    let i = row * nb + b;
                    let (d, dmin) = (h(self.d[i]), h(self.m[i]));
                    let sc = &self.sc[i * 16..i * 16 + 16];
                    let qs = &self.qs[i * 128..i * 128 + 128];
                    let o = &mut out[b * QKK..(b + 1) * QKK];
                    for j in 0..4 {
                        let (d1, m1) = (d * sc[2 * j] as f32, dmin * sc[8 + 2 * j] as f32);
                        let (d2, m2) = (d * sc[2 * j + 1] as f32, dmin * sc[8 + 2 * j + 1] as f32);
                        for l in 0..32 {
                            let q = qs[32 * j + l];
                            o[64 * j + l] = d1 * (q & 0xf) as f32 - m1;
                            o[64 * j + 32 + l] = d2 * (q >> 4) as f32 - m2;
                        }
                    }
                }
            }
            Ty::Q6K => {
                for b in 0..nb {
                    let i = row * nb + b;
                    let d = h(self.d[i]);
                    let o = &mut out[b * QKK..(b + 1) * QKK];
                    for half in 0..2 {
                        let ql = &self.qs[i * 128 + 64 * half..];
                        let qh = &self.qh[i * 64 + 32 * half..];
                        let sc = &self.sc[i * 16 + 8 * half..];
                        let o = &mut o[128 * half..];
                        for l in 0..32 {
                            let is = l / 16;
                            let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
                            let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                            o[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                            o[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                            o[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                            o[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// `y[n x rows] = x[n x cols] · Wᵀ` on `pool`'s threads.
    ///
    /// The activations are quantized once per call (Q8 blocks of 32 for the
    /// 32-block types, of 256 for the K-quants; F16/F32 weights take the f32
    /// activations as they are) into a scratch buffer of the calling thread
    /// that is reused between calls: nothing is allocated once it has grown
    /// to the largest `n x cols` seen.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32], pool: &ComputePool) -> Result<()> {
        self.matmul_rows(x, n, 0..self.rows, y, pool)
    }

    /// Only the outputs `rows` of [`matmul`](Self::matmul): `y[n x
    /// rows.len()]`, e.g. the logits of a few vocabulary entries.
    pub fn matmul_rows(
        &self,
        x: &[f32],
        n: usize,
        rows: Range<usize>,
        y: &mut [f32],
        pool: &ComputePool,
    ) -> Result<()> {
        if rows.start > rows.end || rows.end > self.rows {
            return Err(Error::RowRange {
                start: rows.start,
                end: rows.end,
                rows: self.rows,
            });
        }
        if x.len() != n * self.cols {
            return Err(Error::BufferLength {
                what: "input",
                got: x.len(),
                want: n * self.cols,
            });
        }
        let out = rows.len();
        if y.len() != n * out {
            return Err(Error::BufferLength {
                what: "output",
                got: y.len(),
                want: n * out,
            });
        }
        if n == 0 || out == 0 {
            return Ok(());
        }
        super::run_matmul(self, x, n, rows, y, pool);
        Ok(())
    }

    /// Several matmuls of one input as one job of the pool:
    /// `ys[i][n x mats[i].rows()] = x[n x cols] · mats[i]ᵀ`, e.g. a layer's
    /// query, key and value projections.
    ///
    /// The activations are quantized once for every matrix that takes the
    /// same form of them, and the threads meet once at the end instead of
    /// once per matrix; each value equals what [`matmul`](Self::matmul)
    /// gives for that matrix alone, to the bit.
    ///
    /// # Errors
    /// [`Error::BufferLength`] when `ys` and `mats` differ in number, when a
    /// matrix's width differs from the first's (`what` is `"matrix columns"`),
    /// or when `x` or an output has the wrong length.
    ///
    /// ```
    /// use candle_core::quantized::GgmlDType;
    /// use quant::blocks::{ComputePool, QMatrix};
    ///
    /// let zeros = vec![0u8; 34 * 2]; // two Q8_0 rows of 32 values
    /// let a = QMatrix::from_raw(GgmlDType::Q8_0, 2, 32, &zeros)?;
    /// let b = QMatrix::from_raw(GgmlDType::Q8_0, 2, 32, &zeros)?;
    /// let x = vec![1.0f32; 32];
    /// let (mut ya, mut yb) = (vec![9.0f32; 2], vec![9.0f32; 2]);
    /// let pool = ComputePool::single();
    /// QMatrix::matmul_many(&[&a, &b], &x, 1, &mut [&mut ya, &mut yb], &pool)?;
    /// assert_eq!((ya, yb), (vec![0.0; 2], vec![0.0; 2]));
    /// # Ok::<(), quant::Error>(())
    /// ```
    pub fn matmul_many(
        mats: &[&QMatrix],
        x: &[f32],
        n: usize,
        ys: &mut [&mut [f32]],
        pool: &ComputePool,
    ) -> Result<()> {
        if ys.len() != mats.len() {
            return Err(Error::BufferLength {
                what: "outputs",
                got: ys.len(),
                want: mats.len(),
            });
        }
        let Some(first) = mats.first() else {
            return Ok(());
        };
        for m in mats {
            if m.cols != first.cols {
                return Err(Error::BufferLength {
                    what: "matrix columns",
                    got: m.cols,
                    want: first.cols,
                });
            }
        }
        if x.len() != n * first.cols {
            return Err(Error::BufferLength {
                what: "input",
                got: x.len(),
                want: n * first.cols,
            });
        }
        for (m, y) in mats.iter().zip(ys.iter()) {
            if y.len() != n * m.rows {
                return Err(Error::BufferLength {
                    what: "output",
                    got: y.len(),
                    want: n * m.rows,
                });
            }
        }
        if n == 0 {
            return Ok(());
        }
        let mut parts: Vec<super::Part<'_>> = mats
            .iter()
            .zip(ys.iter_mut())
            .filter(|(m, _)| m.rows > 0)
            .map(|(m, y)| super::Part {
                m,
                rows: 0..m.rows,
                y,
            })
            .collect();
        super::run_parts(&mut parts, x, n, pool);
        Ok(())
    }

    /// Dot products of weight rows `j0..j0 + len` with activation rows
    /// `i0..i0 + r`, written to `y[i][j - col0]` with row stride `ystride`.
    pub(crate) fn portable_tile(
        &self,
        x: &[f32],
        acts: &Acts,
        i0: usize,
        r: usize,
        js: Range<usize>,
        y: YPtr,
    ) {
        for j in js.clone() {
            for i in i0..i0 + r {
                let v = portable::dot(self, j, x, acts, i);
                // SAFETY: tasks write disjoint (i, j) cells of `y`, inside it.
                unsafe { y.write(i, j, v) };
            }
        }
    }
}

/// Activation rows per micro-kernel call of the SIMD kernels: each weight
/// load (and nibble expansion) serves this many rows.
#[cfg(target_arch = "x86_64")]
pub(crate) const R: usize = 4;

/// The SIMD kernels' tile loop: for each weight row `j` of `js` and each
/// group of at most [`R`] activation rows `i..i + r` of `0..n`, calls
/// `kernel(j, i, r, out)` and writes `out[..r]` to `y`.
///
/// # Safety
/// `y` covers the cells `(0..n, js)` and no other task writes them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn for_row_groups(
    n: usize,
    js: Range<usize>,
    y: YPtr,
    mut kernel: impl FnMut(usize, usize, usize, &mut [f32; R]),
) {
    for j in js {
        let mut i = 0;
        while i < n {
            let r = R.min(n - i);
            let mut out = [0f32; R];
            kernel(j, i, r, &mut out);
            for (t, &v) in out[..r].iter().enumerate() {
                // SAFETY: forwarded from the caller.
                unsafe { y.write(i + t, j, v) };
            }
            i += r;
        }
    }
}

/// Weight rows per call of the SIMD kernels' one-activation-row variants.
#[cfg(target_arch = "x86_64")]
pub(crate) const COLS: usize = 4;

/// The one-activation-row tile loop (a decode step): `cols(j, out)` for
/// each whole group of [`COLS`] weight rows `j..j + COLS` of `js`, several
/// independent accumulator chains at once, then `one(j, out)` for each row
/// left; writes row 0 of `y`.
///
/// # Safety
/// `y` covers the cells `(0, js)` and no other task writes them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn for_col_groups(
    js: Range<usize>,
    y: YPtr,
    mut cols: impl FnMut(usize, &mut [f32; COLS]),
    one: impl FnMut(usize, usize, usize, &mut [f32; R]),
) {
    let mut j = js.start;
    while j + COLS <= js.end {
        let mut out = [0f32; COLS];
        cols(j, &mut out);
        for (c, &v) in out.iter().enumerate() {
            // SAFETY: forwarded from the caller.
            unsafe { y.write(0, j + c, v) };
        }
        j += COLS;
    }
    // SAFETY: forwarded from the caller.
    unsafe { for_row_groups(1, j..js.end, y, one) };
}

/// The output buffer shared by the pool's tasks: row `i`, weight row `j`
/// goes to `ptr[i * stride + j - col0]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct YPtr {
    pub(crate) ptr: *mut f32,
    pub(crate) stride: usize,
    pub(crate) col0: usize,
}
// SAFETY: tasks write disjoint cells of a buffer that outlives the pool run.
unsafe impl Send for YPtr {}
// SAFETY: as above.
unsafe impl Sync for YPtr {}

impl YPtr {
    /// # Safety
    /// `(i, j)` lies inside the output and no other task writes it.
    #[inline]
    pub(crate) unsafe fn write(self, i: usize, j: usize, v: f32) {
        // SAFETY: forwarded.
        unsafe { *self.ptr.add(i * self.stride + j - self.col0) = v }
    }
}

/// Q4_K's 6-bit scale and minimum of sub-block `j` (GGUF's packing).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}
