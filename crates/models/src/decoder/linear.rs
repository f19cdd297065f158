//! The decoder's weight matrices in their stored GGUF types, behind one small
//! interface (`matmul` over raw f32 rows, `dequantize_row`), so that the
//! kernel behind it can change in this file alone.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::error::{Error, Result};

/// A `rows x cols` weight (`y = x W^T`), stored as in the GGUF file.
pub(crate) struct Matrix {
    name: String,
    tensor: Arc<QTensor>,
    mm: QMatMul,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matrix")
            .field("name", &self.name)
            .field("dtype", &self.tensor.dtype())
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

impl Matrix {
    pub(crate) fn new(name: &str, tensor: QTensor) -> Result<Matrix> {
        let dims = tensor.shape().dims().to_vec();
        if dims.len() != 2 {
            return Err(Error::BadTensor {
                name: name.into(),
                reason: format!("expected a matrix, found shape {dims:?}"),
            });
        }
        let tensor = Arc::new(tensor);
        let mm = QMatMul::from_arc(tensor.clone())?;
        Ok(Matrix {
            name: name.into(),
            tensor,
            mm,
            rows: dims[0],
            cols: dims[1],
        })
    }

    /// Bytes held by the stored weights.
    pub(crate) fn bytes(&self) -> usize {
        self.tensor.storage_size_in_bytes()
    }

    /// `y[n x rows] = x[n x cols] W^T`.
    pub(crate) fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        debug_assert_eq!(x.len(), n * self.cols);
        debug_assert_eq!(y.len(), n * self.rows);
        let xt = Tensor::from_slice(x, (n, self.cols), &Device::Cpu)?;
        let out = self.mm.forward(&xt)?;
        let out = out.flatten_all()?;
        let v: Vec<f32> = out.to_vec1()?;
        y.copy_from_slice(&v);
        Ok(())
    }

    /// Row `row` as f32 into `out` (`cols` values).
    pub(crate) fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        let dtype = self.tensor.dtype();
        let row_bytes = self.cols / dtype.block_size() * dtype.type_size();
        let data = self.tensor.data()?;
        let bytes = &data[row * row_bytes..(row + 1) * row_bytes];
        let q = dtype.from_data(Cow::Borrowed(bytes));
        match q.dequantize(self.cols)? {
            candle_core::CpuStorage::F32(v) => out.copy_from_slice(&v),
            _ => {
                return Err(Error::BadTensor {
                    name: self.name.clone(),
                    reason: "dequantized row is not f32".into(),
                })
            }
        }
        Ok(())
    }
}
