//! The decoder's weight matrices in their stored GGUF types, behind one small
//! interface (`matmul` over raw f32 rows, `dequantize_row`), so that the
//! kernel behind it can change in this file alone.
//!
//! The kernels are `quant::blocks`: integer dot products on the stored
//! blocks (AVX-512 VNNI where the CPU has it, portable Rust elsewhere), run
//! on one process-wide [`ComputePool`] whose threads spin briefly between the
//! matmuls of a step and park when idle.

use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use quant::blocks::{ComputePool, PoolConfig, QMatrix};

use crate::error::Result;

/// The pool every decoder matmul runs on (the physical cores by default).
pub(crate) fn pool() -> &'static ComputePool {
    static POOL: OnceLock<ComputePool> = OnceLock::new();
    POOL.get_or_init(|| {
        ComputePool::new(&PoolConfig::default()).unwrap_or_else(|_| ComputePool::single())
    })
}

/// A `rows x cols` weight (`y = x W^T`), stored as in the GGUF file.
pub(crate) struct Matrix {
    name: String,
    dtype: GgmlDType,
    q: QMatrix,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matrix")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("kernel", &self.q.kernel())
            .finish()
    }
}

impl Matrix {
    /// A matrix already in the kernels' layout.
    pub(crate) fn from_qmatrix(name: &str, q: QMatrix) -> Matrix {
        Matrix {
            name: name.into(),
            dtype: q.dtype(),
            rows: q.rows(),
            cols: q.cols(),
            q,
        }
    }

    /// Bytes held by the weights as the kernels keep them.
    pub(crate) fn bytes(&self) -> usize {
        self.q.resident_bytes() as usize
    }

    /// `y[n x rows] = x[n x cols] W^T`.
    pub(crate) fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        debug_assert_eq!(x.len(), n * self.cols);
        debug_assert_eq!(y.len(), n * self.rows);
        self.q.matmul(x, n, y, pool())?;
        Ok(())
    }

    /// `ys[i] = x W_i^T` for matrices of one input width, as one job of the
    /// pool (the activations quantized once): a layer's Q, K and V, or its
    /// gate and up projections. The same values as separate `matmul`s.
    pub(crate) fn matmul_many(
        mats: &[&Matrix],
        x: &[f32],
        n: usize,
        ys: &mut [&mut [f32]],
    ) -> Result<()> {
        let qs: Vec<&QMatrix> = mats.iter().map(|m| &m.q).collect();
        QMatrix::matmul_many(&qs, x, n, ys, pool())?;
        Ok(())
    }

    /// Row `row` as f32 into `out` (`cols` values).
    pub(crate) fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        self.q.dequantize_row(row, out)?;
        Ok(())
    }
}
