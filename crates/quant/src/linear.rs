//! [`QLinear`]: a linear layer whose weight is a candle quantized tensor.

use std::sync::{Arc, OnceLock};

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Module, Storage, Tensor};

use crate::resident::candle_resident_bytes;
#[cfg(doc)]
use crate::resident_weight_bytes;
use crate::vnni::{self, Int8Scratch, PackedQ8};
use crate::{Error, Format, Result};

/// Whether [`QLinear`] computes Q8_0 layers with this crate's int8 kernel on
/// this machine: the CPU has AVX-512 VNNI (with AVX-512 F/BW) and the
/// environment does not set `SNUG_INT8_KERNEL=0`. Decided once per process.
///
/// The kernel computes exactly candle's Q8_0 arithmetic (activations
/// quantized per block of 32 with an f16 scale, integer dot products, the
/// two scales applied per block), so its results equal candle's to float
/// rounding. Its packed copy is the only copy of the weight such a layer
/// keeps: candle's blocks are dropped once packed, and rebuilt from the
/// packed copy, bit for bit, only if asked for ([`QLinear::weight`],
/// [`QLinear::dequantize`]); see [`QLinear::resident_bytes`].
pub fn int8_kernel_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        vnni::cpu_supports() && std::env::var("SNUG_INT8_KERNEL").as_deref() != Ok("0")
    })
}

/// Working memory of [`QLinear::forward_into`]: the int8 kernel's quantized
/// activations. One scratch serves any number of layers and calls; it grows
/// to the largest call it served (see [`forward_into_bytes`]) and keeps that
/// memory until dropped, so a forward pass that makes one and passes it to
/// every layer allocates it once.
#[derive(Debug, Default)]
pub struct LinearScratch {
    int8: Int8Scratch,
}

impl LinearScratch {
    /// An empty scratch (it allocates on first use).
    pub fn new() -> LinearScratch {
        LinearScratch::default()
    }

    /// Grows the scratch at once to what [`QLinear::forward_into`] of `rows`
    /// rows through `layer` takes (nothing where that layer needs none), so
    /// that a pass through layers of several widths allocates it once,
    /// sized for the widest, instead of growing it layer by layer.
    pub fn reserve(&mut self, layer: &QLinear, rows: usize) {
        if layer.int8.is_some() {
            self.int8.reserve(rows, layer.in_dim);
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.int8.bytes()
    }
}

/// What one [`QLinear::forward_into`] call allocates, besides the caller's
/// input and output buffers (from [`forward_into_bytes`]): per input row,
/// per block of rows candle's AMX kernel takes, and per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardBytes {
    /// Bytes per row the [`LinearScratch`] grows to: the int8 kernel's
    /// quantized activations (`in` bytes and an f32 scale per 32 values),
    /// 0 on the other paths.
    pub scratch: u64,
    /// Bytes per row allocated and freed inside the call, for at most
    /// [`CANDLE_CHUNK_ROWS`] rows at a time ([`ForwardBytes::transient_for`]):
    /// on candle's path
    /// (formats other than F32, and Q8_0 where the int8 kernel does not
    /// serve) the f32 input copy candle reads, candle's f32 output, and its
    /// quantized copy of the input (Q8_K blocks, 292 bytes per 256 values,
    /// the largest of its activation formats; 2 bytes a value for F16).
    /// 0 on the int8 kernel and for F32 (matrix multiplication straight
    /// from the caller's buffers into theirs).
    pub transient: u64,
    /// Bytes each block of [`CANDLE_AMX_BLOCK_ROWS`] rows of a chunk adds
    /// inside the call where candle runs it on its AMX-INT8 kernel (Q4_K,
    /// chunks of at least [`CANDLE_AMX_BLOCK_ROWS`] rows, output columns a
    /// multiple of 16, on a CPU with AMX-INT8): each of candle's threads
    /// repacks the quantized activations of the block it computes into a
    /// buffer of its own, `in` bytes a row, and lists the block's rows (a
    /// 16-byte slice reference each); as many such buffers are live at once
    /// as blocks run at once ([`candle_blocks_in_flight`]). 0 elsewhere.
    pub per_block: u64,
    /// Bytes per call on candle's path whatever its rows, live beside its
    /// buffers: the bookkeeping of the tensor a chunk's input is copied into
    /// ([`CANDLE_TENSOR_BYTES`]) and the shape candle sizes its output by
    /// (two `usize`; the output tensor itself is made once candle's
    /// buffers are freed). 0 on the int8 kernel and for F32.
    pub per_call: u64,
}

impl ForwardBytes {
    /// Bytes allocated and freed inside a call of `rows` rows: candle's
    /// path runs [`CANDLE_CHUNK_ROWS`] rows at a time, with
    /// [`candle_blocks_in_flight`] AMX blocks of its chunk at once.
    ///
    /// ```
    /// use quant::{candle_blocks_in_flight, forward_into_bytes, Format};
    ///
    /// let q4 = forward_into_bytes(Format::Q4_K, 384, 1536);
    /// assert_eq!(
    ///     q4.transient_for(40),
    ///     40 * q4.transient + candle_blocks_in_flight(40) * q4.per_block + q4.per_call
    /// );
    /// // No rows, nothing allocated.
    /// assert_eq!(q4.transient_for(0), 0);
    /// ```
    pub fn transient_for(&self, rows: usize) -> u64 {
        let m = rows.min(CANDLE_CHUNK_ROWS);
        if m == 0 {
            return 0;
        }
        self.transient * m as u64 + self.per_block * candle_blocks_in_flight(m) + self.per_call
    }
}

/// Rows [`QLinear::forward_into`] hands candle at a time on its path, so
/// that candle's copies (the input, its output, its quantized input) stay
/// the size of this many rows whatever the batch, instead of growing with
/// it; enough rows that candle's tiled kernels run at full width.
pub const CANDLE_CHUNK_ROWS: usize = 64;

/// Rows of one block of candle's AMX-INT8 kernel (and the fewest rows a
/// call must have for candle to take that kernel).
pub const CANDLE_AMX_BLOCK_ROWS: usize = 32;

/// Bytes of one candle tensor's bookkeeping beside its data, for the 2-D
/// tensor [`QLinear::forward_into`] copies a chunk's input into on candle's
/// path: its shared headers (the `Arc` of the tensor and the `Arc` of its
/// storage's lock) and its shape and strides (two `usize` each), with
/// candle 0.11.1 on a 64-bit target. Candle's types are private, so this is
/// measured, not computed: the test `forward_bytes` in this crate counts
/// the bytes `Tensor::from_slice` allocates beside the data and fails if
/// they change.
pub const CANDLE_TENSOR_BYTES: u64 = 256;

/// How many blocks of [`CANDLE_AMX_BLOCK_ROWS`] rows candle's AMX-INT8
/// kernel computes at once for a call of `rows` rows (at most
/// [`CANDLE_CHUNK_ROWS`]): one per block, each on one of candle's threads,
/// so the fewer of the blocks and the threads candle runs
/// (`CANDLE_NUM_THREADS`, else `RAYON_NUM_THREADS`, else candle's default);
/// 0 under [`CANDLE_AMX_BLOCK_ROWS`] rows, where candle takes other kernels.
///
/// ```
/// use quant::candle_blocks_in_flight;
///
/// assert_eq!(candle_blocks_in_flight(31), 0);
/// assert_eq!(candle_blocks_in_flight(32), 1);
/// assert!((1..=2).contains(&candle_blocks_in_flight(64)));
/// ```
pub fn candle_blocks_in_flight(rows: usize) -> u64 {
    if rows < CANDLE_AMX_BLOCK_ROWS {
        return 0;
    }
    rows.div_ceil(CANDLE_AMX_BLOCK_ROWS).min(candle_threads()) as u64
}

/// The threads candle's CPU kernels run on: candle's own rule (its barrier
/// pool's workers and the calling thread).
fn candle_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| {
        std::env::var("CANDLE_NUM_THREADS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(candle_core::utils::get_num_threads)
            .max(1)
    })
}

/// Whether candle computes batched Q4_K on its AMX-INT8 kernel on this CPU
/// (see [`mem_budget::RepackRules`]).
fn candle_amx() -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(|| mem_budget::RepackRules::this_cpu().x86_amx)
}

/// The bytes [`QLinear::forward_into`] allocates for an `[out_dim, in_dim]`
/// weight requested in `format` (fitted to `in_dim` as [`QLinear::from_f32`]
/// fits it), on this machine, per row, per AMX block and per call
/// ([`ForwardBytes`]): a memory estimate can size a forward pass from it
/// without building the layer.
///
/// ```
/// use quant::{forward_into_bytes, Format};
///
/// // F32 layers multiply straight into the caller's buffer.
/// let f = forward_into_bytes(Format::F32, 1536, 384);
/// assert_eq!((f.scratch, f.transient, f.per_block, f.per_call), (0, 0, 0, 0));
/// // Other paths allocate something per row, in the scratch or inside the call.
/// let q = forward_into_bytes(Format::Q8_0, 1536, 384);
/// assert!(q.scratch + q.transient > 0);
/// // Q4_K on candle: its copies per row, and on a CPU with AMX-INT8 each
/// // 32-row block's activations repacked (1536 bytes a row and a slice
/// // reference of 16).
/// let q4 = forward_into_bytes(Format::Q4_K, 384, 1536);
/// assert_eq!(q4.transient, 4 * 1536 + 4 * 384 + 292 * 1536 / 256);
/// assert!(q4.per_block == 0 || q4.per_block == 32 * (1536 + 16));
/// ```
pub fn forward_into_bytes(format: Format, out_dim: usize, in_dim: usize) -> ForwardBytes {
    let format = format.fit(in_dim);
    let (o, i) = (out_dim as u64, in_dim as u64);
    let candle = |transient: u64, per_block: u64| ForwardBytes {
        scratch: 0,
        transient,
        per_block,
        per_call: CANDLE_TENSOR_BYTES + 2 * std::mem::size_of::<usize>() as u64,
    };
    match format {
        Format::F32 => ForwardBytes {
            scratch: 0,
            transient: 0,
            per_block: 0,
            per_call: 0,
        },
        Format::Q8_0 if int8_kernel_available() && in_dim.is_multiple_of(32) => ForwardBytes {
            scratch: vnni::scratch_bytes_per_row(in_dim),
            transient: 0,
            per_block: 0,
            per_call: 0,
        },
        Format::F16 => candle(4 * i + 4 * o + 2 * i, 0),
        _ => {
            // Candle's AMX kernel: a block's activations as i8 (`in` bytes
            // a row) and its list of row slices (16 bytes a row).
            let amx = format == Format::Q4_K && candle_amx() && out_dim.is_multiple_of(16);
            let per_block = if amx {
                CANDLE_AMX_BLOCK_ROWS as u64 * (i + 16)
            } else {
                0
            };
            candle(4 * i + 4 * o + (292 * i).div_ceil(256), per_block)
        }
    }
}

/// The int8 kernel's copy of a Q8_0 weight and of its bias.
#[derive(Debug)]
struct Int8Weight {
    packed: PackedQ8,
    bias: Option<Vec<f32>>,
}

/// A linear layer `y = x·Wᵀ + b` with `W` (`[out, in]`) stored as a candle
/// [`QMatMul`] and the bias kept in f32.
///
/// The requested format is fitted to the input dimension with
/// [`Format::fit`] (K-quants need `in % 256 == 0`, Q8_0 / Q4_0 `in % 32 == 0`;
/// otherwise Q4_K / Q6_K → Q8_0 → F16), so any 2-D weight is accepted.
/// [`QLinear::format`] tells what was used.
///
/// Forward takes any leading dims, `[.., in] → [.., out]`, computes in f32
/// and returns the input's dtype.
///
/// Q8_0 layers on a CPU with AVX-512 VNNI run on this crate's int8 kernel
/// (see [`int8_kernel_available`]; [`QLinear::with_int8_kernel`] turns it off
/// per layer); other formats, and other CPUs, use candle's `QMatMul`.
#[derive(Debug, Clone)]
pub struct QLinear {
    /// candle's copy of the weight. Empty while the int8 kernel holds the
    /// only copy; filled from it on demand.
    weight: OnceLock<QMatMul>,
    bias: Option<Tensor>,
    format: Format,
    out_dim: usize,
    in_dim: usize,
    /// Present when Q8_0 forwards run on the int8 kernel (shared by clones).
    int8: Option<Arc<Int8Weight>>,
}

fn dims2(name: &str, t: &[usize]) -> Result<(usize, usize)> {
    match *t {
        [o, i] if o > 0 && i > 0 => Ok((o, i)),
        _ => Err(Error::BadShape {
            name: name.to_string(),
            shape: t.to_vec(),
        }),
    }
}

impl QLinear {
    /// Quantizes an `[out, in]` weight (any float dtype) to `format` (fitted
    /// to `in`, see the type's docs) and keeps `bias` (`[out]`) as f32.
    pub fn from_f32(weight: Tensor, bias: Option<Tensor>, format: Format) -> Result<QLinear> {
        let (out_dim, in_dim) = dims2("weight", weight.dims())?;
        let format = format.fit(in_dim);
        let weight = weight.to_dtype(DType::F32)?.contiguous()?;
        let qmatmul = match format {
            Format::F32 => QMatMul::Tensor(weight),
            // Kept as f16 blocks (candle's `QMatMul::from_qtensor` would widen
            // F16 back to f32, doubling the memory).
            _ => QMatMul::QTensor(Arc::new(QTensor::quantize(&weight, format.ggml_dtype())?)),
        };
        Self::assemble(qmatmul, bias, format, out_dim, in_dim)
    }

    /// Wraps a stored quantized `[out, in]` tensor (for example one loaded
    /// from GGUF). F32 tensors are dequantized to a plain tensor; every
    /// other format is used as stored.
    pub fn from_qtensor(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<QLinear> {
        let (out_dim, in_dim) = dims2("weight", weight.shape().dims())?;
        let format = Format::from_ggml_dtype(weight.dtype()).ok_or_else(|| Error::PlanMismatch {
            name: "weight".into(),
            reason: format!(
                "stored as {:?}, which this crate does not offer; use f32, f16, q8_0, q6_k, q4_k or q4_0",
                weight.dtype()
            ),
        })?;
        let qmatmul = match format {
            Format::F32 => QMatMul::Tensor(weight.dequantize(&weight.device())?),
            _ => QMatMul::QTensor(weight),
        };
        Self::assemble(qmatmul, bias, format, out_dim, in_dim)
    }

    fn assemble(
        weight: QMatMul,
        bias: Option<Tensor>,
        format: Format,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<QLinear> {
        let bias = match bias {
            None => None,
            Some(b) => {
                if b.dims() != [out_dim] {
                    return Err(Error::BiasMismatch {
                        bias: b.dims().to_vec(),
                        out_dim,
                    });
                }
                Some(b.to_dtype(DType::F32)?.contiguous()?)
            }
        };
        let layer = QLinear {
            weight: OnceLock::from(weight),
            bias,
            format,
            out_dim,
            in_dim,
            int8: None,
        };
        Ok(if format == Format::Q8_0 && int8_kernel_available() {
            layer.packed_int8()
        } else {
            layer
        })
    }

    /// Packs the Q8_0 weight for the int8 kernel and drops candle's copy;
    /// unchanged where packing is not possible (the layer stays on candle).
    fn packed_int8(mut self) -> QLinear {
        let Some(QMatMul::QTensor(q)) = self.weight.get() else {
            return self;
        };
        let Ok(data) = q.data() else {
            return self;
        };
        let Some(packed) = PackedQ8::from_q8_0(&data, self.out_dim, self.in_dim) else {
            return self;
        };
        drop(data);
        let bias = match &self.bias {
            Some(b) => match b.to_vec1::<f32>() {
                Ok(v) => Some(v),
                Err(_) => return self,
            },
            None => None,
        };
        self.int8 = Some(Arc::new(Int8Weight { packed, bias }));
        self.weight = OnceLock::new();
        self
    }

    /// candle's copy of the weight, rebuilt from the int8 kernel's packed
    /// copy when that is the only one (exactly: the packed copy holds the
    /// same int8 values and f16 scales).
    fn candle_weight(&self) -> &QMatMul {
        self.weight.get_or_init(|| {
            let int8 = self
                .int8
                .as_ref()
                .expect("a QLinear holds candle's copy of its weight or the int8 kernel's");
            let bytes = int8.packed.to_q8_0();
            let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                candle_core::quantized::GgmlDType::Q8_0,
                &bytes,
                vec![self.out_dim, self.in_dim],
                &candle_core::Device::Cpu,
            )
            .expect("Q8_0 blocks rebuilt from a packed weight have the weight's shape");
            QMatMul::QTensor(Arc::new(q))
        })
    }

    /// Turns the int8 kernel on or off for this layer. On only takes effect
    /// for Q8_0 weights where [`int8_kernel_available`]; off makes forwards
    /// use candle's `QMatMul` (which then builds its own repacked copy where
    /// it does so).
    pub fn with_int8_kernel(mut self, on: bool) -> QLinear {
        if on && self.format == Format::Q8_0 && int8_kernel_available() {
            if self.int8.is_none() {
                return self.packed_int8();
            }
        } else if self.int8.is_some() {
            self.candle_weight();
            self.int8 = None;
        }
        self
    }

    /// Whether forwards run on the int8 kernel (see [`int8_kernel_available`]).
    pub fn int8_kernel(&self) -> bool {
        self.int8.is_some()
    }

    /// `x2` (`[rows, in]`, contiguous f32) times the weight on the int8
    /// kernel, bias included; `None` where it does not serve.
    fn int8_forward(&self, x2: &Tensor, rows: usize) -> Result<Option<Tensor>> {
        let Some(Int8Weight { packed, bias }) = self.int8.as_deref() else {
            return Ok(None);
        };
        let y = {
            let (storage, layout) = x2.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(v)) = &*storage else {
                return Ok(None);
            };
            let start = layout.start_offset();
            match v.get(start..start + rows * self.in_dim) {
                Some(x) => {
                    let mut y = vec![0f32; rows * self.out_dim];
                    let mut scratch = Int8Scratch::default();
                    packed
                        .matmul_into(x, rows, bias.as_deref(), &mut y, &mut scratch)
                        .then_some(y)
                }
                None => None,
            }
        };
        Ok(match y {
            Some(y) => Some(Tensor::from_vec(y, (rows, self.out_dim), x2.device())?),
            None => None,
        })
    }

    /// The format the weight is stored in (after fitting).
    pub fn format(&self) -> Format {
        self.format
    }

    /// Input dimension.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Output dimension.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// The weight as candle holds it. For a layer on the int8 kernel this
    /// rebuilds candle's copy from the packed one on first call (and keeps
    /// it: [`Self::resident_bytes`] then counts both).
    pub fn weight(&self) -> &QMatMul {
        self.candle_weight()
    }

    /// The f32 bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Bytes of the stored weight and bias.
    pub fn storage_bytes(&self) -> u64 {
        self.format.bytes_for(self.out_dim * self.in_dim) + self.bias_bytes()
    }

    fn bias_bytes(&self) -> u64 {
        if self.bias.is_some() {
            4 * self.out_dim as u64
        } else {
            0
        }
    }

    /// Bytes the layer occupies after its first forwards. On the int8
    /// kernel: its packed copy only (1.25 bytes per weight, columns padded to
    /// 16) and the bias twice (the tensor and the kernel's copy), plus
    /// candle's blocks if [`Self::weight`] rebuilt them. Otherwise: storage
    /// plus the copy candle keeps on this CPU (see [`resident_weight_bytes`]).
    pub fn resident_bytes(&self) -> u64 {
        if self.int8.is_some() {
            let rebuilt = if self.weight.get().is_some() {
                self.format.bytes_for(self.out_dim * self.in_dim)
            } else {
                0
            };
            vnni::packed_bytes(self.out_dim, self.in_dim) + 2 * self.bias_bytes() + rebuilt
        } else {
            candle_resident_bytes(self.format, self.out_dim, self.in_dim) + self.bias_bytes()
        }
    }

    /// The weight dequantized to an f32 `[out, in]` tensor.
    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(match self.candle_weight() {
            QMatMul::QTensor(q) => q.dequantize(&q.device())?,
            QMatMul::Tensor(t) => t.clone(),
            QMatMul::TensorF16(t) => t.to_dtype(DType::F32)?,
        })
    }

    /// [`Module::forward`] with this crate's error type: `[.., in] → [.., out]`.
    pub fn try_forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims();
        if dims.last() != Some(&self.in_dim) {
            return Err(Error::InputMismatch {
                input: dims.to_vec(),
                in_dim: self.in_dim,
            });
        }
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let in_dtype = xs.dtype();
        let x2 = xs
            .to_dtype(DType::F32)?
            .reshape((rows, self.in_dim))?
            .contiguous()?;
        let y = match self.int8_forward(&x2, rows)? {
            Some(y) => y,
            None => {
                let mut y = self.candle_weight().forward(&x2)?;
                if let Some(b) = &self.bias {
                    y = y.broadcast_add(b)?;
                }
                y
            }
        };
        let mut out_dims = dims.to_vec();
        *out_dims
            .last_mut()
            .expect("dims is non-empty: checked above") = self.out_dim;
        Ok(y.reshape(out_dims)?.to_dtype(in_dtype)?)
    }
}

impl QLinear {
    /// `out = x·Wᵀ + b` on row-major slices: `x` holds `rows × in_dim`
    /// values, `out` `rows × out_dim`, and nothing else is allocated but
    /// what [`forward_into_bytes`] lists: Q8_0 on the int8 kernel quantizes
    /// the input into `scratch` (which grows once and is reused by every
    /// later call), F32 multiplies straight from `x` into `out`, and
    /// candle's path (the other formats) copies [`CANDLE_CHUNK_ROWS`] rows of
    /// `x` at a time into a tensor and candle's answer into `out`. The results equal [`Self::try_forward`]'s.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use quant::{Format, LinearScratch, QLinear};
    ///
    /// let w = Tensor::randn(0f32, 1.0, (48, 64), &Device::Cpu)?;
    /// let b = Tensor::randn(0f32, 1.0, 48, &Device::Cpu)?;
    /// let x: Vec<f32> = (0..3 * 64).map(|i| (i % 7) as f32 - 3.0).collect();
    /// let mut scratch = LinearScratch::new();
    /// for format in [Format::F32, Format::Q8_0] {
    ///     let layer = QLinear::from_f32(w.clone(), Some(b.clone()), format)?;
    ///     let mut out = vec![0f32; 3 * 48];
    ///     layer.forward_into(&x, 3, &mut out, &mut scratch)?;
    ///     let want = layer.try_forward(&Tensor::from_slice(&x, (3, 64), &Device::Cpu)?)?;
    ///     let want: Vec<f32> = want.flatten_all()?.to_vec1()?;
    ///     assert!(out.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-4 * (1.0 + b.abs())));
    /// }
    /// // A buffer of the wrong size is an error, not a panic.
    /// let layer = QLinear::from_f32(w, None, Format::F32)?;
    /// assert!(layer.forward_into(&x, 3, &mut vec![0f32; 47], &mut scratch).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_into(
        &self,
        x: &[f32],
        rows: usize,
        out: &mut [f32],
        scratch: &mut LinearScratch,
    ) -> Result<()> {
        if x.len() != rows * self.in_dim {
            let input = if rows > 0 && x.len().is_multiple_of(rows) {
                vec![rows, x.len() / rows]
            } else {
                vec![x.len()]
            };
            return Err(Error::InputMismatch {
                input,
                in_dim: self.in_dim,
            });
        }
        if out.len() != rows * self.out_dim {
            return Err(Error::OutputMismatch {
                len: out.len(),
                rows,
                out_dim: self.out_dim,
            });
        }
        if rows == 0 {
            return Ok(());
        }
        if let Some(Int8Weight { packed, bias }) = self.int8.as_deref() {
            if packed.matmul_into(x, rows, bias.as_deref(), out, &mut scratch.int8) {
                return Ok(());
            }
        }
        match self.candle_weight() {
            QMatMul::Tensor(w) => {
                with_f32(w, |w| self.gemm_f32(x, rows, w, out))??;
            }
            weight => {
                let (k, n) = (self.in_dim, self.out_dim);
                for (x, out) in x
                    .chunks(CANDLE_CHUNK_ROWS * k)
                    .zip(out.chunks_mut(CANDLE_CHUNK_ROWS * n))
                {
                    let xt = Tensor::from_slice(x, (x.len() / k, k), &candle_core::Device::Cpu)?;
                    let y = weight.forward(&xt)?;
                    drop(xt);
                    with_f32(&y, |y| out.copy_from_slice(y))?;
                }
            }
        }
        if let Some(b) = &self.bias {
            with_f32(b, |b| {
                for row in out.chunks_exact_mut(self.out_dim) {
                    row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
                }
            })?;
        }
        Ok(())
    }

    /// `out = x·wᵀ` with gemm (candle's f32 matmul) on the slices.
    fn gemm_f32(&self, x: &[f32], rows: usize, w: &[f32], out: &mut [f32]) -> Result<()> {
        let (n, k) = (self.out_dim, self.in_dim);
        if w.len() != n * k || x.len() != rows * k || out.len() != rows * n {
            return Err(Error::InputMismatch {
                input: vec![rows, k],
                in_dim: k,
            });
        }
        let threads = rayon::current_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: `x` is `rows × k` (row stride k), `w` is `n × k` read as
        // its transpose `k × n` (row stride 1, column stride k), `out` is
        // `rows × n` (row stride n): every index gemm forms lies inside the
        // slice it reads or writes (lengths checked above); `out` does not
        // overlap the inputs (it is borrowed mutably).
        unsafe {
            gemm::gemm(
                rows,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        Ok(())
    }
}

/// Runs `f` on the contiguous f32 values of a CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let values = match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => v.get(a..b),
        _ => None,
    };
    match values {
        Some(v) => Ok(f(v)),
        None => {
            drop(storage);
            let c = t.to_dtype(DType::F32)?.contiguous()?;
            let v = c.flatten_all()?.to_vec1::<f32>()?;
            Ok(f(&v))
        }
    }
}

impl Module for QLinear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.try_forward(xs).map_err(|e| match e {
            Error::Candle(c) => c,
            other => candle_core::Error::Msg(other.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{gaussian, rel_rms};
    use candle_core::Device;

    fn reference(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        x.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap()
    }

    #[test]
    fn matches_f32_linear_within_bounds() {
        let (out, inp) = (256, 512);
        let w = gaussian(&[out, inp], 1);
        let b = gaussian(&[out], 2);
        let x = gaussian(&[4, inp], 3);
        let want = reference(&x, &w, &b);
        for (format, bound) in [
            (Format::F32, 1e-6),
            (Format::F16, 1e-3),
            (Format::Q8_0, 1e-2),
            (Format::Q6_K, 3e-2),
            (Format::Q4_K, 1e-1),
            (Format::Q4_0, 1.5e-1),
        ] {
            let l = QLinear::from_f32(w.clone(), Some(b.clone()), format).unwrap();
            assert_eq!(l.format(), format);
            let got = l.forward(&x).unwrap();
            let e = rel_rms(&got, &want);
            assert!(e < bound, "{format}: relative RMS error {e} >= {bound}");
        }
    }

    #[test]
    fn weight_round_trip_error_per_format() {
        let w = gaussian(&[128, 512], 12);
        for (format, bound) in [
            (Format::F16, 1e-3),
            (Format::Q8_0, 1e-2),
            (Format::Q6_K, 3e-2),
            (Format::Q4_K, 1e-1),
            (Format::Q4_0, 1.5e-1),
        ] {
            let l = QLinear::from_f32(w.clone(), None, format).unwrap();
            let e = rel_rms(&l.dequantize().unwrap(), &w);
            assert!(
                e > 0.0 && e < bound,
                "{format}: weight RMS relative error {e}"
            );
        }
    }

    #[test]
    fn leading_dims_and_batch() {
        let w = gaussian(&[64, 256], 4);
        let l = QLinear::from_f32(w.clone(), None, Format::Q8_0).unwrap();
        let x = gaussian(&[2, 3, 256], 5);
        let y = l.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 3, 64]);
        let x1 = gaussian(&[256], 6);
        assert_eq!(l.forward(&x1).unwrap().dims(), &[64]);
        // Row 1 of the batched answer equals the answer for that row alone.
        let row = x.get(0).unwrap().get(1).unwrap();
        let alone = l.forward(&row.unsqueeze(0).unwrap()).unwrap();
        let in_batch = y.get(0).unwrap().get(1).unwrap().unsqueeze(0).unwrap();
        assert!(rel_rms(&alone, &in_batch) < 1e-5);
    }

    #[test]
    fn shapes_that_do_not_fit_fall_back_never_panic() {
        let w = gaussian(&[32, 384], 7);
        let l = QLinear::from_f32(w.clone(), None, Format::Q4_K).unwrap();
        assert_eq!(l.format(), Format::Q8_0);
        let w = gaussian(&[8, 100], 8);
        let l = QLinear::from_f32(w.clone(), None, Format::Q4_K).unwrap();
        assert_eq!(l.format(), Format::F16);
        let x = gaussian(&[3, 100], 9);
        let want = x.matmul(&w.t().unwrap()).unwrap();
        assert!(rel_rms(&l.forward(&x).unwrap(), &want) < 1e-3);
        // Bad inputs are errors.
        assert!(matches!(
            l.try_forward(&gaussian(&[3, 99], 1)),
            Err(Error::InputMismatch { in_dim: 100, .. })
        ));
        assert!(l.forward(&gaussian(&[3, 99], 1)).is_err());
        assert!(matches!(
            QLinear::from_f32(gaussian(&[4], 1), None, Format::Q8_0),
            Err(Error::BadShape { .. })
        ));
        assert!(matches!(
            QLinear::from_f32(gaussian(&[4, 32], 1), Some(gaussian(&[5], 1)), Format::Q8_0),
            Err(Error::BiasMismatch { out_dim: 4, .. })
        ));
    }

    #[test]
    fn int8_kernel_serves_q8_0_with_candles_arithmetic() {
        // 384 inputs: candle takes its `vec_dot` path, the same arithmetic.
        let w = gaussian(&[96, 384], 13);
        let b = gaussian(&[96], 14);
        let x = gaussian(&[3, 37, 384], 15);
        let fast = QLinear::from_f32(w.clone(), Some(b.clone()), Format::Q8_0).unwrap();
        assert_eq!(fast.int8_kernel(), int8_kernel_available());
        let slow = fast.clone().with_int8_kernel(false);
        assert!(!slow.int8_kernel());
        let (yf, ys) = (fast.forward(&x).unwrap(), slow.forward(&x).unwrap());
        assert_eq!(yf.dims(), &[3, 37, 96]);
        let e = rel_rms(&yf, &ys);
        assert!(e < 1e-6, "int8 kernel vs candle: relative RMS {e}");
        let want = reference(&x.reshape((3 * 37, 384)).unwrap(), &w, &b);
        assert!(rel_rms(&yf.reshape((3 * 37, 96)).unwrap(), &want) < 1e-2);
        // Clones share the packed copy; other formats never take the kernel.
        let again = fast.clone();
        assert!(rel_rms(&again.forward(&x).unwrap(), &yf) == 0.0);
        let f16 = QLinear::from_f32(w.clone(), None, Format::F16)
            .unwrap()
            .with_int8_kernel(true);
        assert!(!f16.int8_kernel());
        // The packed copy is the only copy of the weight kept: 1.25 bytes per
        // weight, and the bias twice (tensor and kernel copy).
        if fast.int8_kernel() {
            let fresh = QLinear::from_f32(w.clone(), Some(b.clone()), Format::Q8_0).unwrap();
            assert_eq!(fresh.resident_bytes(), 96 * 384 * 5 / 4 + 2 * 4 * 96);
            assert_eq!(
                crate::resident_weight_bytes(Format::Q8_0, 96, 384),
                96 * 384 * 5 / 4
            );
            // Asking for candle's weight rebuilds its blocks, bit for bit,
            // and they are counted from then on.
            let candle = QLinear::from_f32(w.clone(), Some(b.clone()), Format::Q8_0)
                .unwrap()
                .with_int8_kernel(false);
            assert_eq!(
                fresh.dequantize().unwrap().to_vec2::<f32>().unwrap(),
                candle.dequantize().unwrap().to_vec2::<f32>().unwrap()
            );
            assert_eq!(
                fresh.resident_bytes(),
                96 * 384 * 5 / 4 + 2 * 4 * 96 + Format::Q8_0.bytes_for(96 * 384)
            );
        }
    }

    #[test]
    fn first_forwards_from_many_threads_agree() {
        // 288 inputs: candle's `vec_dot` path, the kernel's arithmetic.
        let w = gaussian(&[80, 288], 16);
        let x = gaussian(&[9, 288], 17);
        let layer = QLinear::from_f32(w, None, Format::Q8_0).unwrap();
        let want = layer.clone().with_int8_kernel(false).forward(&x).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            for _ in 0..4 {
                let (tx, layer, x) = (tx.clone(), &layer, &x);
                s.spawn(move || tx.send(layer.forward(x).unwrap()).unwrap());
            }
            drop(tx);
            for _ in 0..4 {
                let got = rx
                    .recv_timeout(std::time::Duration::from_secs(30))
                    .expect("a forward finished within 30 s");
                let e = rel_rms(&got, &want);
                assert!(e < 1e-6, "relative RMS {e}");
            }
        });
    }

    #[test]
    fn forward_into_equals_try_forward_and_reuses_its_scratch() {
        let mut scratch = LinearScratch::new();
        assert_eq!(scratch.bytes(), 0);
        // Two shapes in turn through one scratch, as a model's layers use it:
        // 70 rows cross the int8 kernel's row blocks of 64.
        for (out, inp, rows) in [(96, 256, 70), (40, 512, 1), (96, 256, 3), (40, 512, 70)] {
            let w = gaussian(&[out, inp], 20 + out as u64);
            let b = gaussian(&[out], 21);
            let x = gaussian(&[rows, inp], 22 + rows as u64);
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            for format in [
                Format::F32,
                Format::F16,
                Format::Q8_0,
                Format::Q6_K,
                Format::Q4_K,
                Format::Q4_0,
            ] {
                for layer in [
                    QLinear::from_f32(w.clone(), Some(b.clone()), format).unwrap(),
                    QLinear::from_f32(w.clone(), None, format)
                        .unwrap()
                        .with_int8_kernel(false),
                ] {
                    let want: Vec<f32> = layer
                        .try_forward(&x)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let mut got = vec![f32::NAN; rows * out];
                    layer
                        .forward_into(&xs, rows, &mut got, &mut scratch)
                        .unwrap();
                    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                    let e = got
                        .iter()
                        .zip(&want)
                        .map(|(g, w)| (g - w).abs() / scale)
                        .fold(0f32, f32::max);
                    assert!(e < 1e-5, "{format} {out}x{inp}, {rows} rows: max error {e}");
                }
            }
        }
        // The scratch grew to the largest int8 call (70 rows of 512) and no
        // further: exactly what `forward_into_bytes` says per row.
        let per_row = forward_into_bytes(Format::Q8_0, 40, 512);
        if int8_kernel_available() {
            assert_eq!(per_row.scratch, 512 + 4 * 16);
            assert_eq!(scratch.bytes(), 70 * per_row.scratch);
            // Reserved up front, it takes that size at once, and a call
            // within it does not grow it.
            let layer = QLinear::from_f32(gaussian(&[40, 512], 31), None, Format::Q8_0).unwrap();
            let mut fresh = LinearScratch::new();
            fresh.reserve(&layer, 70);
            assert_eq!(fresh.bytes(), 70 * per_row.scratch);
            let mut out = vec![0f32; 5 * 40];
            layer
                .forward_into(&vec![0.5; 5 * 512], 5, &mut out, &mut fresh)
                .unwrap();
            assert_eq!(fresh.bytes(), 70 * per_row.scratch);
        } else {
            assert_eq!(scratch.bytes(), 0);
            assert!(per_row.transient >= 4 * (512 + 40));
        }
        // Candle's path holds one chunk of rows at a time, with its AMX
        // blocks where it takes that kernel (Q4_K on a CPU with AMX-INT8,
        // 32 rows or more, output columns a multiple of 16: 40 is not).
        let q4 = forward_into_bytes(Format::Q4_K, 40, 512);
        assert!(q4.transient >= 4 * (512 + 40));
        assert_eq!(q4.per_call, CANDLE_TENSOR_BYTES + 16);
        assert_eq!(q4.per_block, 0);
        assert_eq!(q4.transient_for(3), 3 * q4.transient + q4.per_call);
        assert_eq!(
            q4.transient_for(70),
            CANDLE_CHUNK_ROWS as u64 * q4.transient + q4.per_call
        );
        let amx = mem_budget::RepackRules::this_cpu().x86_amx;
        let q4 = forward_into_bytes(Format::Q4_K, 48, 512);
        assert_eq!(q4.per_block, if amx { 32 * (512 + 16) } else { 0 });
        assert_eq!(q4.transient_for(31), 31 * q4.transient + q4.per_call);
        assert_eq!(
            q4.transient_for(70),
            64 * q4.transient + candle_blocks_in_flight(64) * q4.per_block + q4.per_call
        );
        // Q6_K takes candle's other kernels.
        assert_eq!(forward_into_bytes(Format::Q6_K, 48, 512).per_block, 0);
        let f32 = forward_into_bytes(Format::F32, 40, 512);
        assert_eq!((f32.transient, f32.transient_for(70)), (0, 0));
        // 100 inputs do not fit Q4_K: F16's path (fitted as the layer is).
        assert_eq!(
            forward_into_bytes(Format::Q4_K, 8, 100),
            forward_into_bytes(Format::F16, 8, 100)
        );
    }

    #[test]
    fn forward_into_refuses_buffers_of_the_wrong_size() {
        let l = QLinear::from_f32(gaussian(&[8, 64], 30), None, Format::Q8_0).unwrap();
        let mut s = LinearScratch::new();
        let x = vec![1f32; 2 * 64];
        assert!(matches!(
            l.forward_into(&x[..127], 2, &mut [0.0; 16], &mut s),
            Err(Error::InputMismatch { in_dim: 64, .. })
        ));
        assert!(matches!(
            l.forward_into(&x, 2, &mut [0.0; 15], &mut s),
            Err(Error::OutputMismatch {
                len: 15,
                rows: 2,
                out_dim: 8
            })
        ));
        let mut out = [f32::NAN; 16];
        l.forward_into(&x, 2, &mut out, &mut s).unwrap();
        assert!(out.iter().all(|v| v.is_finite()));
        l.forward_into(&[], 0, &mut [], &mut s).unwrap();
    }

    #[test]
    fn from_stored_qtensor_equals_from_f32() {
        let w = gaussian(&[64, 256], 10);
        let q = QTensor::quantize(&w, Format::Q4_K.ggml_dtype()).unwrap();
        let a = QLinear::from_qtensor(Arc::new(q), None).unwrap();
        let b = QLinear::from_f32(w, None, Format::Q4_K).unwrap();
        let x = gaussian(&[2, 256], 11);
        let (ya, yb) = (a.forward(&x).unwrap(), b.forward(&x).unwrap());
        let diff = (ya - yb).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(a.format(), Format::Q4_K);
        assert_eq!(a.storage_bytes(), 64 * 256 / 256 * 144);
        assert!(a.resident_bytes() >= a.storage_bytes());
        let _ = Device::Cpu;
    }
}
