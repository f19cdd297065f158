//! Converting a safetensors model by a plan, and keeping the result as GGUF.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{resident_weight_bytes, Error, Format, QLinear, QuantPlan, Result};

/// Version of the artifact layout this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

const KEY_VERSION: &str = "snug.quant.format_version";
const KEY_SOURCE: &str = "snug.quant.source_sha256";
const KEY_PLAN: &str = "snug.quant.plan";
const KEY_DATA: &str = "snug.quant.tensors_sha256";

/// What an artifact records about how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactMeta {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// SHA-256 (hex) of the source file's bytes.
    pub source_sha256: String,
    /// The plan the tensors were converted by.
    pub plan: QuantPlan,
}

/// A model's tensors in their planned formats, with the record of how they
/// were made.
#[derive(Debug)]
pub struct QuantizedModel {
    tensors: BTreeMap<String, Arc<QTensor>>,
    meta: ArtifactMeta,
}

/// SHA-256 (hex) of a file.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = BufReader::new(File::open(path).map_err(io)?);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every tensor of a safetensors file, sorted by name, as f32 on the CPU.
pub fn load_safetensors(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    let path = path.as_ref();
    if let Err(source) = std::fs::metadata(path) {
        return Err(Error::Io {
            path: path.display().to_string(),
            source,
        });
    }
    let map = candle_core::safetensors::load(path, &Device::Cpu)?;
    let mut v: Vec<(String, Tensor)> = map
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// Converts the tensors of a safetensors file by `plan` (every tensor of
/// the file must be in the plan with the same shape).
pub fn quantize_safetensors(input: impl AsRef<Path>, plan: &QuantPlan) -> Result<QuantizedModel> {
    let input = input.as_ref();
    let source_sha256 = sha256_file(input)?;
    let tensors = load_safetensors(input)?;
    quantize_tensors(&tensors, plan, source_sha256, |_, _, _| {})
}

/// Converts named tensors by `plan`; `on_progress(done, total, name)` after
/// each tensor.
pub fn quantize_tensors(
    tensors: &[(String, Tensor)],
    plan: &QuantPlan,
    source_sha256: String,
    mut on_progress: impl FnMut(usize, usize, &str),
) -> Result<QuantizedModel> {
    let mut out = BTreeMap::new();
    for (i, (name, t)) in tensors.iter().enumerate() {
        let entry = plan.entry(name).ok_or_else(|| Error::PlanMismatch {
            name: name.clone(),
            reason: "is in the model but not in the plan; make the plan from this model".into(),
        })?;
        if entry.shape != t.dims() {
            return Err(Error::PlanMismatch {
                name: name.clone(),
                reason: format!(
                    "has shape {:?} but the plan says {:?}; make the plan from this model",
                    t.dims(),
                    entry.shape
                ),
            });
        }
        let in_dim = t.dims().last().copied().unwrap_or(1);
        let format = entry.format.fit(in_dim);
        let q = QTensor::quantize(&t.to_dtype(DType::F32)?, format.ggml_dtype())?;
        out.insert(name.clone(), Arc::new(q));
        on_progress(i + 1, tensors.len(), name);
    }
    if let Some(missing) = plan.entries.iter().find(|e| !out.contains_key(&e.name)) {
        return Err(Error::PlanMismatch {
            name: missing.name.clone(),
            reason: "is in the plan but not in the model; make the plan from this model".into(),
        });
    }
    Ok(QuantizedModel {
        tensors: out,
        meta: ArtifactMeta {
            format_version: FORMAT_VERSION,
            source_sha256,
            plan: plan.clone(),
        },
    })
}

fn data_digest<'a>(
    tensors: impl Iterator<Item = (&'a String, &'a Arc<QTensor>)>,
) -> Result<String> {
    let mut h = Sha256::new();
    for (name, t) in tensors {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(t.data()?.as_ref());
    }
    Ok(hex(&h.finalize()))
}

impl QuantizedModel {
    /// How the artifact was made.
    pub fn meta(&self) -> &ArtifactMeta {
        &self.meta
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&Arc<QTensor>> {
        self.tensors.get(name)
    }

    /// A tensor dequantized to f32.
    pub fn dequantize(&self, name: &str) -> Result<Tensor> {
        let t = self.tensor(name).ok_or_else(|| Error::PlanMismatch {
            name: name.into(),
            reason: "is not in the model".into(),
        })?;
        Ok(t.dequantize(&Device::Cpu)?)
    }

    /// A [`QLinear`] from a weight and an optional bias (dequantized to f32).
    pub fn linear(&self, weight: &str, bias: Option<&str>) -> Result<QLinear> {
        let w = self.tensor(weight).ok_or_else(|| Error::PlanMismatch {
            name: weight.into(),
            reason: "is not in the model".into(),
        })?;
        let b = bias.map(|b| self.dequantize(b)).transpose()?;
        QLinear::from_qtensor(w.clone(), b)
    }

    /// Bytes of all tensors as stored.
    pub fn storage_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| t.storage_size_in_bytes() as u64)
            .sum()
    }

    /// Bytes after the first forwards, counting candle's repacked copies of
    /// 2-D weights (see [`resident_weight_bytes`]).
    pub fn resident_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| {
                let format = Format::from_ggml_dtype(t.dtype());
                match (format, t.shape().dims()) {
                    (Some(f), &[o, i]) => resident_weight_bytes(f, o, i),
                    _ => t.storage_size_in_bytes() as u64,
                }
            })
            .sum()
    }

    /// Checks that this artifact was built from `source` by this format
    /// version; [`Error::Stale`] otherwise.
    pub fn check_current(&self, source: impl AsRef<Path>) -> Result<()> {
        if self.meta.format_version != FORMAT_VERSION {
            return Err(Error::Stale {
                reason: format!(
                    "format version {} but this build reads {FORMAT_VERSION}",
                    self.meta.format_version
                ),
            });
        }
        let now = sha256_file(source.as_ref())?;
        if now != self.meta.source_sha256 {
            return Err(Error::Stale {
                reason: format!(
                    "{} has sha256 {now}, the artifact was built from {}",
                    source.as_ref().display(),
                    self.meta.source_sha256
                ),
            });
        }
        Ok(())
    }

    /// Writes the tensors and the metadata (format version, source hash,
    /// plan JSON, tensor-data hash) as GGUF.
    pub fn save_gguf(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        let version = gguf_file::Value::U32(self.meta.format_version);
        let source = gguf_file::Value::String(self.meta.source_sha256.clone());
        let plan = gguf_file::Value::String(self.meta.plan.to_json()?);
        let data = gguf_file::Value::String(data_digest(self.tensors.iter())?);
        let meta = [
            (KEY_VERSION, &version),
            (KEY_SOURCE, &source),
            (KEY_PLAN, &plan),
            (KEY_DATA, &data),
        ];
        let tensors: Vec<(&str, &QTensor)> = self
            .tensors
            .iter()
            .map(|(k, t)| (k.as_str(), t.as_ref()))
            .collect();
        // Written beside the target and renamed over it once complete, so
        // a reader never sees half a file; dropped (and so removed) on error.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".quant-")
            .suffix(".gguf.partial")
            .tempfile_in(dir)
            .map_err(io)?;
        let mut w = BufWriter::new(tmp);
        gguf_file::write(&mut w, &meta, &tensors)?;
        let tmp = w.into_inner().map_err(|e| io(e.into_error()))?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        tracing::info!(path = %path.display(), tensors = tensors.len(), "saved GGUF");
        Ok(())
    }

    /// Reads a GGUF written by [`QuantizedModel::save_gguf`]. A file that is
    /// truncated, corrupted, or not written by this crate is a clear
    /// [`Error::BadGguf`]; a different format version is [`Error::Stale`].
    pub fn load_gguf(path: impl AsRef<Path>) -> Result<QuantizedModel> {
        let path = path.as_ref();
        let bad = |reason: String| Error::BadGguf {
            path: path.display().to_string(),
            reason,
        };
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut r = BufReader::new(file);
        // candle checks sizes itself; the guard catches what it may still
        // panic on (for example a zero `general.alignment`).
        let content = catch_unwind(AssertUnwindSafe(|| gguf_file::Content::read(&mut r)))
            .map_err(|_| bad("the header is malformed (reader panicked); rebuild the file".into()))?
            .map_err(|e| {
                bad(format!(
                    "{e}; the file is truncated or not GGUF, rebuild it"
                ))
            })?;
        let string = |key: &str| -> Result<String> {
            match content.metadata.get(key) {
                Some(gguf_file::Value::String(s)) => Ok(s.clone()),
                _ => Err(bad(format!(
                    "metadata `{key}` is missing; this file was not written by snug's quant"
                ))),
            }
        };
        let version = match content.metadata.get(KEY_VERSION) {
            Some(gguf_file::Value::U32(v)) => *v,
            _ => {
                return Err(bad(format!(
                "metadata `{KEY_VERSION}` is missing; this file was not written by snug's quant"
            )))
            }
        };
        if version != FORMAT_VERSION {
            return Err(Error::Stale {
                reason: format!(
                    "{} has format version {version}, this build reads {FORMAT_VERSION}",
                    path.display()
                ),
            });
        }
        let source_sha256 = string(KEY_SOURCE)?;
        let plan = QuantPlan::from_json(&string(KEY_PLAN)?).map_err(|e| {
            bad(format!(
                "the plan metadata does not parse ({e}); rebuild the file"
            ))
        })?;
        let want_digest = string(KEY_DATA)?;
        let mut tensors = BTreeMap::new();
        for (name, info) in &content.tensor_infos {
            let dims = info.shape.dims();
            let elements = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("tensor `{name}` has impossible dims {dims:?}")))?;
            if Format::from_ggml_dtype(info.ggml_dtype).is_none() || elements == 0 {
                return Err(bad(format!("tensor `{name}` has dtype {:?} and dims {dims:?}, which this crate never writes", info.ggml_dtype)));
            }
            let t = catch_unwind(AssertUnwindSafe(|| {
                content.tensor(&mut r, name, &Device::Cpu)
            }))
            .map_err(|_| {
                bad(format!(
                    "tensor `{name}` is malformed (reader panicked); rebuild the file"
                ))
            })?
            .map_err(|e| {
                bad(format!(
                    "tensor `{name}`: {e}; the file is truncated or corrupted, rebuild it"
                ))
            })?;
            tensors.insert(name.clone(), Arc::new(t));
        }
        if plan.entries.len() != tensors.len()
            || plan.entries.iter().any(|e| !tensors.contains_key(&e.name))
        {
            return Err(bad(
                "the tensors do not match the recorded plan; rebuild the file".into(),
            ));
        }
        let got_digest = data_digest(tensors.iter())?;
        if got_digest != want_digest {
            return Err(bad(format!(
                "tensor data hash {got_digest} differs from the recorded {want_digest}: the file is corrupted, rebuild it"
            )));
        }
        Ok(QuantizedModel {
            tensors,
            meta: ArtifactMeta {
                format_version: version,
                source_sha256,
                plan,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{plan, Calibration};
    use crate::testutil::gaussian;
    use candle_core::Module;

    fn write_model(dir: &Path) -> std::path::PathBuf {
        let tensors: std::collections::HashMap<String, Tensor> = [
            ("enc.dense.weight", gaussian(&[64, 256], 1)),
            ("enc.dense.bias", gaussian(&[64], 2)),
            ("enc.out.weight", gaussian(&[32, 96], 3)),
            ("enc.LayerNorm.weight", gaussian(&[64], 4)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let p = dir.join("m.safetensors");
        candle_core::safetensors::save(&tensors, &p).unwrap();
        p
    }

    fn build(dir: &Path) -> (std::path::PathBuf, QuantizedModel) {
        let src = write_model(dir);
        let tensors = load_safetensors(&src).unwrap();
        let c = Calibration {
            samples: 8,
            ..Calibration::default()
        };
        let smallest = plan(&tensors, &c, u64::MAX).unwrap().f32_bytes() / 4;
        let p = plan(&tensors, &c, smallest).unwrap();
        (src.clone(), quantize_safetensors(&src, &p).unwrap())
    }

    #[test]
    fn gguf_round_trip_is_bit_identical() {
        let dir = tempfile::tempdir().unwrap();
        let (src, m) = build(dir.path());
        let out = dir.path().join("m.gguf");
        m.save_gguf(&out).unwrap();
        let back = QuantizedModel::load_gguf(&out).unwrap();
        assert_eq!(back.meta(), m.meta());
        assert_eq!(
            back.names().collect::<Vec<_>>(),
            m.names().collect::<Vec<_>>()
        );
        for name in m.names() {
            let (a, b) = (m.tensor(name).unwrap(), back.tensor(name).unwrap());
            assert_eq!(a.dtype(), b.dtype(), "{name}");
            assert_eq!(a.shape(), b.shape(), "{name}");
            assert_eq!(a.data().unwrap(), b.data().unwrap(), "{name}");
        }
        back.check_current(&src).unwrap();
        assert_eq!(back.storage_bytes(), m.meta().plan.total_bytes());
        assert!(back.resident_bytes() >= back.storage_bytes());
        let l = back
            .linear("enc.dense.weight", Some("enc.dense.bias"))
            .unwrap();
        assert_eq!(l.forward(&gaussian(&[3, 256], 9)).unwrap().dims(), &[3, 64]);
        // A changed source makes the artifact stale.
        std::fs::write(&src, b"changed").unwrap();
        assert!(matches!(back.check_current(&src), Err(Error::Stale { .. })));
    }

    #[test]
    fn corrupted_or_truncated_gguf_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let (_, m) = build(dir.path());
        let good_path = dir.path().join("good.gguf");
        m.save_gguf(&good_path).unwrap();
        let good = std::fs::read(&good_path).unwrap();
        let bad_path = dir.path().join("bad.gguf");
        let check = |bytes: &[u8], must_fail: bool| {
            std::fs::write(&bad_path, bytes).unwrap();
            match QuantizedModel::load_gguf(&bad_path) {
                Err(Error::BadGguf { reason, .. }) => assert!(!reason.is_empty()),
                Err(Error::Stale { .. }) => {}
                Err(e) => panic!("unexpected error kind: {e}"),
                Ok(back) => {
                    assert!(!must_fail, "a damaged file loaded");
                    for name in m.names() {
                        assert_eq!(
                            m.tensor(name).unwrap().data().unwrap(),
                            back.tensor(name).unwrap().data().unwrap()
                        );
                    }
                }
            }
        };
        for len in [0, 3, 8, 24, 100, good.len() / 2, good.len() - 1] {
            check(&good[..len], true);
        }
        // The last byte is tensor data: a flip must be detected.
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        check(&flipped, true);
        // Flips anywhere either fail cleanly or leave the tensors intact.
        let mut state = 12345u64;
        for _ in 0..200 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut b = good.clone();
            let i = (state >> 33) as usize % b.len();
            b[i] ^= 1 << ((state >> 20) % 8);
            check(&b, false);
        }
        // A zero alignment in a foreign GGUF must not panic.
        let mut w = std::io::Cursor::new(Vec::new());
        let zero = gguf_file::Value::U32(0);
        let q =
            QTensor::quantize(&gaussian(&[32], 1), candle_core::quantized::GgmlDType::F32).unwrap();
        gguf_file::write(&mut w, &[("general.alignment", &zero)], &[("t", &q)]).unwrap();
        check(&w.into_inner(), true);
        check(b"not a gguf file at all", true);
    }
}
