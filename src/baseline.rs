//! The baseline a user would write without snug: candle-transformers'
//! `BertModel` on all-MiniLM-L6-v2 in f32, with mean pooling and L2
//! normalisation, as sentence-transformers does.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};

/// An error of the baseline (candle's, or reading the config).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// all-MiniLM-L6-v2 through candle-transformers' `BertModel`.
pub struct Bert {
    model: BertModel,
}

impl std::fmt::Debug for Bert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bert")
    }
}

impl Bert {
    /// Loads `model.safetensors` and `config.json` from `dir` (memory-mapped, f32).
    pub fn load(dir: &Path) -> Result<Bert, Error> {
        let config: Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        // SAFETY: the mapped file is not modified while the model lives.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )?
        };
        Ok(Bert {
            model: BertModel::load(vb, &config)?,
        })
    }

    /// Embeds token-id sequences (with `[CLS]`/`[SEP]`) as one padded batch:
    /// one unit vector per sequence.
    pub fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, Error> {
        let n = batch.len();
        let l = batch.iter().map(|t| t.len()).max().unwrap_or(0);
        if n == 0 || l == 0 {
            return Ok(Vec::new());
        }
        let mut ids = vec![0u32; n * l];
        let mut mask = vec![0u32; n * l];
        for (i, t) in batch.iter().enumerate() {
            ids[i * l..i * l + t.len()].copy_from_slice(t);
            mask[i * l..i * l + t.len()].iter_mut().for_each(|m| *m = 1);
        }
        let ids = Tensor::from_vec(ids, (n, l), &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, (n, l), &Device::Cpu)?;
        let out = self.model.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let pooled = out.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?)?;
        let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?;
        Ok(pooled.broadcast_div(&norm)?.to_vec2()?)
    }
}
