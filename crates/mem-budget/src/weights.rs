//! Weight sizes from safetensors and GGUF headers, never reading tensor data.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::units::MIB;

/// A tensor's storage type: plain element types and GGML block quantizations.
///
/// Block types store `block_elements()` weights in `block_bytes()` bytes
/// (candle's and ggml's layouts): Q8_0 34 B per 32, Q4_K 144 B per 256, …
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[non_exhaustive]
pub enum WeightType {
    /// 64-bit float.
    F64,
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// 8-bit float, e4m3.
    F8_E4M3,
    /// 8-bit float, e5m2.
    F8_E5M2,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 16-bit signed integer.
    I16,
    /// 8-bit signed integer.
    I8,
    /// 64-bit unsigned integer.
    U64,
    /// 32-bit unsigned integer.
    U32,
    /// 16-bit unsigned integer.
    U16,
    /// 8-bit unsigned integer.
    U8,
    /// Boolean, one byte.
    Bool,
    /// GGML Q4_0: 18 bytes per 32 weights.
    Q4_0,
    /// GGML Q4_1: 20 bytes per 32.
    Q4_1,
    /// GGML Q5_0: 22 bytes per 32.
    Q5_0,
    /// GGML Q5_1: 24 bytes per 32.
    Q5_1,
    /// GGML Q8_0: 34 bytes per 32.
    Q8_0,
    /// GGML Q8_1: 36 bytes per 32.
    Q8_1,
    /// GGML Q2_K: 84 bytes per 256.
    Q2_K,
    /// GGML Q3_K: 110 bytes per 256.
    Q3_K,
    /// GGML Q4_K: 144 bytes per 256.
    Q4_K,
    /// GGML Q5_K: 176 bytes per 256.
    Q5_K,
    /// GGML Q6_K: 210 bytes per 256.
    Q6_K,
    /// GGML Q8_K: 292 bytes per 256.
    Q8_K,
    /// GGML IQ2_XXS: 66 bytes per 256.
    IQ2_XXS,
    /// GGML IQ2_XS: 74 bytes per 256.
    IQ2_XS,
    /// GGML IQ3_XXS: 98 bytes per 256.
    IQ3_XXS,
    /// GGML IQ1_S: 50 bytes per 256.
    IQ1_S,
    /// GGML IQ4_NL: 18 bytes per 32.
    IQ4_NL,
    /// GGML IQ3_S: 110 bytes per 256.
    IQ3_S,
    /// GGML IQ2_S: 82 bytes per 256.
    IQ2_S,
    /// GGML IQ4_XS: 136 bytes per 256.
    IQ4_XS,
    /// GGML IQ1_M: 56 bytes per 256.
    IQ1_M,
    /// GGML TQ1_0: 54 bytes per 256.
    TQ1_0,
    /// GGML TQ2_0: 66 bytes per 256.
    TQ2_0,
}

const ST_SUPPORTED: &str = "F64 F32 F16 BF16 F8_E4M3 F8_E5M2 I64 I32 I16 I8 U64 U32 U16 U8 BOOL";
const GGML_SUPPORTED: &str =
    "ggml type ids 0-3, 6-30, 34, 35 (F32 F16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q8_1 \
     Q2_K-Q8_K IQ* I8-I64 F64 BF16 TQ1_0 TQ2_0)";

impl WeightType {
    /// Candidate storage types an estimate reports, widest first: the float
    /// types and the quantizations candle implements.
    pub const CANDIDATES: [WeightType; 13] = [
        WeightType::F32,
        WeightType::F16,
        WeightType::BF16,
        WeightType::Q8_0,
        WeightType::Q6_K,
        WeightType::Q5_K,
        WeightType::Q5_1,
        WeightType::Q5_0,
        WeightType::Q4_K,
        WeightType::Q4_1,
        WeightType::Q4_0,
        WeightType::Q3_K,
        WeightType::Q2_K,
    ];

    /// `(weights per block, bytes per block)`; `(1, element size)` for
    /// plain types.
    pub fn block(self) -> (u64, u64) {
        use WeightType::*;
        match self {
            F64 | I64 | U64 => (1, 8),
            F32 | I32 | U32 => (1, 4),
            F16 | BF16 | I16 | U16 => (1, 2),
            F8_E4M3 | F8_E5M2 | I8 | U8 | Bool => (1, 1),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            IQ4_NL => (32, 18),
            Q2_K => (256, 84),
            Q3_K => (256, 110),
            Q4_K => (256, 144),
            Q5_K => (256, 176),
            Q6_K => (256, 210),
            Q8_K => (256, 292),
            IQ2_XXS => (256, 66),
            IQ2_XS => (256, 74),
            IQ3_XXS => (256, 98),
            IQ1_S => (256, 50),
            IQ3_S => (256, 110),
            IQ2_S => (256, 82),
            IQ4_XS => (256, 136),
            IQ1_M => (256, 56),
            TQ1_0 => (256, 54),
            TQ2_0 => (256, 66),
        }
    }

    /// Whether this is a block quantization.
    pub fn is_quantized(self) -> bool {
        self.block().0 > 1
    }

    /// Whether this is a float type (plain or quantized).
    pub fn is_float(self) -> bool {
        use WeightType::*;
        !matches!(self, I64 | I32 | I16 | I8 | U64 | U32 | U16 | U8 | Bool)
    }

    /// Bytes of `elements` weights of this type, or `None` when `elements`
    /// is not a whole number of blocks or the size overflows.
    pub fn bytes_for(self, elements: u64) -> Option<u64> {
        let (n, b) = self.block();
        if !elements.is_multiple_of(n) {
            return None;
        }
        (elements / n).checked_mul(b)
    }

    /// Bits per weight (4.25 for Q8_0's 34 bytes per 32 is 8.5, …).
    pub fn bits_per_weight(self) -> f64 {
        let (n, b) = self.block();
        b as f64 * 8.0 / n as f64
    }

    /// The type a safetensors `dtype` string names.
    pub fn from_safetensors(dtype: &str) -> Option<WeightType> {
        use WeightType::*;
        Some(match dtype {
            "F64" => F64,
            "F32" => F32,
            "F16" => F16,
            "BF16" => BF16,
            "F8_E4M3" => F8_E4M3,
            "F8_E5M2" => F8_E5M2,
            "I64" => I64,
            "I32" => I32,
            "I16" => I16,
            "I8" => I8,
            "U64" => U64,
            "U32" => U32,
            "U16" => U16,
            "U8" => U8,
            "BOOL" => Bool,
            _ => return None,
        })
    }

    /// The type a GGML type id names (ggml's `enum ggml_type`).
    pub fn from_ggml(id: u32) -> Option<WeightType> {
        use WeightType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            _ => return None,
        })
    }

    /// The GGML type id, where GGML has one.
    pub fn ggml_id(self) -> Option<u32> {
        (0..=35).find(|&id| WeightType::from_ggml(id) == Some(self))
    }

    /// The name as ggml and safetensors write it (`Q4_K`, `BF16`, `BOOL`).
    pub fn name(self) -> String {
        match self {
            WeightType::Bool => "BOOL".into(),
            other => format!("{other:?}"),
        }
    }
}

impl fmt::Display for WeightType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Hard limits on what a header may claim; a header over any of them is an
/// error before anything of that size is allocated.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct HeaderLimits {
    /// Largest header, bytes (safetensors JSON; GGUF metadata + tensor
    /// infos). Default 128 MiB (safetensors itself allows 100 MB).
    pub max_header_bytes: u64,
    /// Most tensors. Default 1,000,000.
    pub max_tensors: u64,
    /// Most GGUF metadata entries. Default 1,000,000.
    pub max_metadata: u64,
    /// Longest string (key, value, tensor name), bytes. Default 16 MiB.
    pub max_string: u64,
    /// Longest GGUF metadata array (a vocabulary), entries. Default 64 Mi.
    pub max_array_len: u64,
    /// Deepest nesting of GGUF arrays. Default 4.
    pub max_nesting: u32,
    /// Most dimensions of one tensor. Default 8.
    pub max_dims: u32,
}

impl Default for HeaderLimits {
    fn default() -> Self {
        HeaderLimits {
            max_header_bytes: 128 * MIB,
            max_tensors: 1_000_000,
            max_metadata: 1_000_000,
            max_string: 16 * MIB,
            max_array_len: 64 << 20,
            max_nesting: 4,
            max_dims: 8,
        }
    }
}

/// Which file format a header came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "format")]
pub enum WeightFormat {
    /// Hugging Face safetensors.
    Safetensors,
    /// GGUF (llama.cpp, candle's quantized models).
    Gguf {
        /// The GGUF version (2 or 3).
        version: u32,
    },
}

/// One tensor as its header describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    /// Its name.
    pub name: String,
    /// Its shape, outermost dimension first (row-major; GGUF's innermost-first
    /// dims are reversed to match).
    pub shape: Vec<u64>,
    /// Its stored type.
    pub dtype: WeightType,
    /// Its stored bytes.
    pub bytes: u64,
}

impl TensorInfo {
    /// Number of weights.
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Bytes this tensor would take stored as `target`.
    ///
    /// Float targets convert every float tensor. A block quantization applies
    /// to float tensors of rank 2 or more whose innermost dimension is a
    /// whole number of blocks (as candle quantizes); others (norms, biases)
    /// keep their stored size. Integer tensors always keep their size.
    pub fn bytes_as(&self, target: WeightType) -> u64 {
        let t = self.type_as(target);
        if t == self.dtype {
            self.bytes
        } else {
            t.bytes_for(self.elements()).unwrap_or(self.bytes)
        }
    }

    /// The type this tensor would have when a model is stored as `target`
    /// (its own type where the rule of [`TensorInfo::bytes_as`] keeps it).
    pub fn type_as(&self, target: WeightType) -> WeightType {
        if !self.dtype.is_float() || !target.is_float() {
            return self.dtype;
        }
        let inner = self.shape.last().copied().unwrap_or(1);
        if target.is_quantized()
            && (self.shape.len() < 2 || !inner.is_multiple_of(target.block().0))
        {
            return self.dtype;
        }
        if target.bytes_for(self.elements()).is_none() {
            return self.dtype;
        }
        target
    }
}

/// A metadata value of a GGUF (or safetensors `__metadata__`) header.
/// Arrays are summarised by element type and length, never held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetaValue {
    /// Any unsigned integer (u8–u64).
    Uint(u64),
    /// Any signed integer (i8–i64).
    Int(i64),
    /// f32 or f64.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    String(String),
    /// An array: its element type id and length.
    Array {
        /// GGUF value type id of the elements.
        element_type: u32,
        /// Number of elements.
        len: u64,
    },
}

impl MetaValue {
    /// The value as an unsigned integer, where it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::Uint(v) => Some(v),
            MetaValue::Int(v) => u64::try_from(v).ok(),
            MetaValue::String(ref s) => s.parse().ok(),
            _ => None,
        }
    }

    /// The value as a string, where it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }
}

/// What a model file's header says about its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsInfo {
    /// The file format.
    pub format: WeightFormat,
    /// Every tensor, in header order.
    pub tensors: Vec<TensorInfo>,
    /// Header metadata (GGUF key-values; safetensors `__metadata__`).
    pub metadata: BTreeMap<String, MetaValue>,
    /// Bytes of the header (length prefix included).
    pub header_bytes: u64,
}

impl WeightsInfo {
    /// Number of weights in all tensors.
    pub fn params(&self) -> u64 {
        self.tensors.iter().map(TensorInfo::elements).sum()
    }

    /// Bytes of all tensors as stored.
    pub fn stored_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }

    /// Bytes of all tensors stored as `target` (see [`TensorInfo::bytes_as`]).
    pub fn bytes_as(&self, target: WeightType) -> u64 {
        self.tensors.iter().map(|t| t.bytes_as(target)).sum()
    }

    /// Bytes per stored type.
    pub fn stored_by_type(&self) -> BTreeMap<WeightType, u64> {
        let mut out = BTreeMap::new();
        for t in &self.tensors {
            *out.entry(t.dtype).or_insert(0) += t.bytes;
        }
        out
    }

    /// Bytes under each of [`WeightType::CANDIDATES`].
    pub fn by_candidate(&self) -> Vec<(WeightType, u64)> {
        WeightType::CANDIDATES
            .iter()
            .map(|&q| (q, self.bytes_as(q)))
            .collect()
    }
}

/// Reads the header of a safetensors or GGUF file (told apart by content)
/// and reports its tensors; never reads tensor data.
///
/// ```no_run
/// let info = mem_budget::estimate_weights("models/all-MiniLM-L6-v2/model.safetensors")?;
/// println!("{} weights, {} bytes as stored", info.params(), info.stored_bytes());
/// # Ok::<(), mem_budget::Error>(())
/// ```
pub fn estimate_weights(path: impl AsRef<Path>) -> Result<WeightsInfo> {
    estimate_weights_with(path, &HeaderLimits::default())
}

/// [`estimate_weights`] with explicit limits.
pub fn estimate_weights_with(path: impl AsRef<Path>, limits: &HeaderLimits) -> Result<WeightsInfo> {
    let path = path.as_ref();
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut first = [0u8; 9];
    let got = (&file).take(9).read(&mut first).map_err(io)?;
    let file = File::open(path).map_err(io)?;
    let reader = BufReader::new(file);
    if got >= 4 && &first[..4] == b"GGUF" {
        read_gguf_header(reader, Some(len), limits)
    } else if got == 9 && first[8] == b'{' {
        read_safetensors_header(reader, Some(len), limits)
    } else {
        Err(Error::UnknownFormat {
            path: path.to_path_buf(),
            first: first[..got].to_vec(),
        })
    }
}

/// A reader that counts bytes and refuses to go past the header limit or
/// the end of the file.
struct Limited<R> {
    inner: R,
    pos: u64,
    end: u64,
    format: &'static str,
}

impl<R: Read> Limited<R> {
    fn new(inner: R, file_len: Option<u64>, max_header: u64, format: &'static str) -> Self {
        Limited {
            inner,
            pos: 0,
            end: file_len.unwrap_or(u64::MAX).min(max_header),
            format,
        }
    }

    fn room(&self, n: u64, what: &str) -> Result<()> {
        if self.pos.checked_add(n).is_none_or(|e| e > self.end) {
            return Err(Error::header(
                self.format,
                format!(
                    "{what} of {n} bytes at offset {} runs past the end of the header or file (limit {} bytes)",
                    self.pos, self.end
                ),
            ));
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        self.room(N as u64, what)?;
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(|e| {
            Error::header(
                self.format,
                format!("truncated at offset {} reading {what}: {e}", self.pos),
            )
        })?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// Reads `n` bytes, growing the buffer only as data arrives.
    fn vec(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        self.room(n, what)?;
        let mut buf = Vec::new();
        let got = (&mut self.inner)
            .take(n)
            .read_to_end(&mut buf)
            .map_err(|e| Error::header(self.format, format!("cannot read {what}: {e}")))?;
        if got as u64 != n {
            return Err(Error::header(
                self.format,
                format!(
                    "truncated: {what} claims {n} bytes at offset {}, only {got} follow",
                    self.pos
                ),
            ));
        }
        self.pos += n;
        Ok(buf)
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        self.room(n, what)?;
        let got = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|e| Error::header(self.format, format!("cannot read {what}: {e}")))?;
        if got != n {
            return Err(Error::header(
                self.format,
                format!("truncated inside {what}"),
            ));
        }
        self.pos += n;
        Ok(())
    }
}

fn elements(shape: &[u64], format: &'static str, name: &str) -> Result<u64> {
    shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            Error::header(
                format,
                format!("tensor {name:?} has shape {shape:?} whose size overflows 64 bits"),
            )
        })
}

const ST: &str = "safetensors";

/// Reads a safetensors header (8-byte little-endian length, then JSON) from
/// `reader`. `file_len`, when known, bounds the header and the tensors'
/// data offsets.
pub fn read_safetensors_header(
    reader: impl Read,
    file_len: Option<u64>,
    limits: &HeaderLimits,
) -> Result<WeightsInfo> {
    let mut r = Limited::new(
        reader,
        file_len,
        limits.max_header_bytes.saturating_add(8),
        ST,
    );
    let n = r.u64("header length")?;
    if n > limits.max_header_bytes {
        return Err(Error::header(
            ST,
            format!(
                "header claims {n} bytes, over the limit of {} bytes",
                limits.max_header_bytes
            ),
        ));
    }
    let json = r.vec(n, "JSON header")?;
    let data_len = file_len.map(|l| l.saturating_sub(8 + n));
    let map: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&json)
        .map_err(|e| Error::header(ST, format!("header is not a JSON object of tensors: {e}")))?;
    if map.len() as u64 > limits.max_tensors.saturating_add(1) {
        return Err(Error::header(
            ST,
            format!(
                "{} tensors, over the limit of {}",
                map.len(),
                limits.max_tensors
            ),
        ));
    }
    #[derive(Deserialize)]
    struct Entry {
        dtype: String,
        shape: Vec<u64>,
        data_offsets: (u64, u64),
    }
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
    for (name, value) in map {
        if name == "__metadata__" {
            let meta: BTreeMap<String, String> = serde_json::from_value(value).map_err(|e| {
                Error::header(ST, format!("__metadata__ is not a map of strings: {e}"))
            })?;
            metadata.extend(meta.into_iter().map(|(k, v)| (k, MetaValue::String(v))));
            continue;
        }
        let e: Entry = serde_json::from_value(value)
            .map_err(|e| Error::header(ST, format!("tensor {name:?}: {e}")))?;
        let dtype = WeightType::from_safetensors(&e.dtype).ok_or_else(|| Error::UnknownDtype {
            format: ST,
            name: e.dtype.clone(),
            tensor: name.clone(),
            supported: ST_SUPPORTED,
        })?;
        if e.shape.len() as u64 > u64::from(limits.max_dims) {
            return Err(Error::header(
                ST,
                format!(
                    "tensor {name:?} has {} dimensions, over the limit of {}",
                    e.shape.len(),
                    limits.max_dims
                ),
            ));
        }
        let count = elements(&e.shape, ST, &name)?;
        let bytes = dtype.bytes_for(count).ok_or_else(|| {
            Error::header(
                ST,
                format!("tensor {name:?}: {count} {dtype} weights overflow 64 bits"),
            )
        })?;
        let (begin, end) = e.data_offsets;
        if end < begin || end - begin != bytes {
            return Err(Error::header(
                ST,
                format!(
                    "tensor {name:?}: data_offsets [{begin}, {end}] hold {} bytes, its {dtype} shape {:?} needs {bytes}",
                    end.wrapping_sub(begin),
                    e.shape
                ),
            ));
        }
        if let Some(data_len) = data_len {
            if end > data_len {
                return Err(Error::header(
                    ST,
                    format!("tensor {name:?} ends at data offset {end}, past the {data_len} bytes of data in the file"),
                ));
            }
        }
        tensors.push((
            begin,
            TensorInfo {
                name,
                shape: e.shape,
                dtype,
                bytes,
            },
        ));
    }
    tensors.sort_by_key(|(begin, _)| *begin);
    Ok(WeightsInfo {
        format: WeightFormat::Safetensors,
        tensors: tensors.into_iter().map(|(_, t)| t).collect(),
        metadata,
        header_bytes: 8 + n,
    })
}

const GG: &str = "GGUF";

struct Gguf<'a, R> {
    r: Limited<R>,
    limits: &'a HeaderLimits,
}

impl<R: Read> Gguf<'_, R> {
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.r.u64(what)?;
        if n > self.limits.max_string {
            return Err(Error::header(
                GG,
                format!(
                    "{what} claims {n} bytes, over the limit of {} bytes",
                    self.limits.max_string
                ),
            ));
        }
        let bytes = self.r.vec(n, what)?;
        String::from_utf8(bytes).map_err(|_| Error::header(GG, format!("{what} is not UTF-8")))
    }

    fn skip_string(&mut self, what: &str) -> Result<()> {
        let n = self.r.u64(what)?;
        if n > self.limits.max_string {
            return Err(Error::header(
                GG,
                format!(
                    "{what} claims {n} bytes, over the limit of {} bytes",
                    self.limits.max_string
                ),
            ));
        }
        self.r.skip(n, what)
    }

    fn scalar_size(ty: u32) -> Option<u64> {
        Some(match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            _ => return None,
        })
    }

    /// Reads one value of type `ty`; arrays are skipped and summarised.
    fn value(&mut self, ty: u32, depth: u32, key: &str) -> Result<MetaValue> {
        let v = match ty {
            0 => MetaValue::Uint(u64::from(self.r.bytes::<1>(key)?[0])),
            1 => MetaValue::Int(i64::from(self.r.bytes::<1>(key)?[0] as i8)),
            2 => MetaValue::Uint(u64::from(u16::from_le_bytes(self.r.bytes(key)?))),
            3 => MetaValue::Int(i64::from(i16::from_le_bytes(self.r.bytes(key)?))),
            4 => MetaValue::Uint(u64::from(self.r.u32(key)?)),
            5 => MetaValue::Int(i64::from(i32::from_le_bytes(self.r.bytes(key)?))),
            6 => MetaValue::Float(f64::from(f32::from_le_bytes(self.r.bytes(key)?))),
            7 => match self.r.bytes::<1>(key)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => {
                    return Err(Error::header(
                        GG,
                        format!("{key:?}: bool byte {b}, expected 0 or 1"),
                    ))
                }
            },
            8 => MetaValue::String(self.string(key)?),
            9 => {
                if depth >= self.limits.max_nesting {
                    return Err(Error::header(
                        GG,
                        format!(
                            "{key:?}: arrays nested deeper than the limit of {}",
                            self.limits.max_nesting
                        ),
                    ));
                }
                let element_type = self.r.u32(key)?;
                let len = self.r.u64(key)?;
                if len > self.limits.max_array_len {
                    return Err(Error::header(
                        GG,
                        format!(
                            "{key:?}: array of {len} entries, over the limit of {}",
                            self.limits.max_array_len
                        ),
                    ));
                }
                if let Some(size) = Self::scalar_size(element_type) {
                    let total = len.checked_mul(size).ok_or_else(|| {
                        Error::header(GG, format!("{key:?}: array size overflows"))
                    })?;
                    self.r.skip(total, key)?;
                } else {
                    for _ in 0..len {
                        match element_type {
                            8 => self.skip_string(key)?,
                            9 => {
                                self.value(9, depth + 1, key)?;
                            }
                            t => {
                                return Err(Error::header(
                                    GG,
                                    format!("{key:?}: unknown array element type {t}"),
                                ));
                            }
                        }
                    }
                }
                MetaValue::Array { element_type, len }
            }
            10 => MetaValue::Uint(self.r.u64(key)?),
            11 => MetaValue::Int(i64::from_le_bytes(self.r.bytes(key)?)),
            12 => MetaValue::Float(f64::from_le_bytes(self.r.bytes(key)?)),
            t => {
                return Err(Error::header(
                    GG,
                    format!("{key:?}: unknown metadata value type {t} (known: 0-12)"),
                ))
            }
        };
        Ok(v)
    }
}

/// Reads a GGUF (v2 or v3) header from `reader`: magic, version, counts,
/// metadata key-values (arrays skipped, not held) and tensor infos.
/// `file_len`, when known, bounds the header and the tensors' data.
pub fn read_gguf_header(
    reader: impl Read,
    file_len: Option<u64>,
    limits: &HeaderLimits,
) -> Result<WeightsInfo> {
    let r = Limited::new(reader, file_len, limits.max_header_bytes, GG);
    let mut g = Gguf { r, limits };
    let magic = g.r.bytes::<4>("magic")?;
    if &magic != b"GGUF" {
        return Err(Error::header(
            GG,
            format!("magic is {magic:02x?}, expected \"GGUF\""),
        ));
    }
    let version = g.r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(Error::header(
            GG,
            format!("version {version} is not supported (2 or 3); convert the file with a recent llama.cpp"),
        ));
    }
    let n_tensors = g.r.u64("tensor count")?;
    let n_kv = g.r.u64("metadata count")?;
    if n_tensors > limits.max_tensors {
        return Err(Error::header(
            GG,
            format!(
                "claims {n_tensors} tensors, over the limit of {}",
                limits.max_tensors
            ),
        ));
    }
    if n_kv > limits.max_metadata {
        return Err(Error::header(
            GG,
            format!(
                "claims {n_kv} metadata entries, over the limit of {}",
                limits.max_metadata
            ),
        ));
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = g.string("metadata key")?;
        let ty = g.r.u32("metadata value type")?;
        let value = g.value(ty, 0, &key)?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
            _ => {
                return Err(Error::header(
                    GG,
                    format!("general.alignment {v:?} is not a power of two up to 1 MiB"),
                ))
            }
        },
    };
    let mut tensors = Vec::new();
    let mut extents = Vec::new();
    for _ in 0..n_tensors {
        let name = g.string("tensor name")?;
        let n_dims = g.r.u32("tensor dimension count")?;
        if n_dims > limits.max_dims {
            return Err(Error::header(
                GG,
                format!(
                    "tensor {name:?} has {n_dims} dimensions, over the limit of {}",
                    limits.max_dims
                ),
            ));
        }
        let mut shape = Vec::new();
        for _ in 0..n_dims {
            shape.push(g.r.u64("tensor dimension")?);
        }
        shape.reverse();
        let id = g.r.u32("tensor type")?;
        let offset = g.r.u64("tensor offset")?;
        let dtype = WeightType::from_ggml(id).ok_or_else(|| Error::UnknownDtype {
            format: GG,
            name: id.to_string(),
            tensor: name.clone(),
            supported: GGML_SUPPORTED,
        })?;
        let count = elements(&shape, GG, &name)?;
        let bytes = dtype.bytes_for(count).ok_or_else(|| {
            Error::header(
                GG,
                format!(
                    "tensor {name:?}: {count} weights is not a whole number of {dtype} blocks of {}, or overflows",
                    dtype.block().0
                ),
            )
        })?;
        if !offset.is_multiple_of(alignment) {
            return Err(Error::header(
                GG,
                format!("tensor {name:?}: offset {offset} is not a multiple of the alignment {alignment}"),
            ));
        }
        extents.push((name.clone(), offset, bytes));
        tensors.push(TensorInfo {
            name,
            shape,
            dtype,
            bytes,
        });
    }
    let header_bytes = g.r.pos;
    if let Some(len) = file_len {
        let data_start = header_bytes.div_ceil(alignment) * alignment;
        let data_len = len.saturating_sub(data_start);
        for (name, offset, bytes) in extents {
            if offset.checked_add(bytes).is_none_or(|end| end > data_len) {
                return Err(Error::header(
                    GG,
                    format!("tensor {name:?} at data offset {offset} with {bytes} bytes runs past the {data_len} bytes of data in the file"),
                ));
            }
        }
    }
    Ok(WeightsInfo {
        format: WeightFormat::Gguf { version },
        tensors,
        metadata,
        header_bytes,
    })
}
