//! The crate's error type.

/// Everything that can go wrong in `quant`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A weight had a shape a linear layer cannot take.
    #[error("weight `{name}` has shape {shape:?}; a linear layer needs a 2-D [out, in] weight with both dims > 0; reshape it or keep it out of the plan")]
    BadShape {
        /// Tensor name (or `weight` when unnamed).
        name: String,
        /// The shape that was given.
        shape: Vec<usize>,
    },
    /// An input did not match the layer.
    #[error("input has shape {input:?} but the layer takes [.., {in_dim}]; pass activations whose last dim is {in_dim}")]
    InputMismatch {
        /// Shape of the input.
        input: Vec<usize>,
        /// The layer's input dimension.
        in_dim: usize,
    },
    /// An output buffer did not match the layer and the rows asked for.
    #[error("output buffer holds {len} values but {rows} rows of the layer's {out_dim} outputs need {}; pass a buffer of rows × out_dim values", rows * out_dim)]
    OutputMismatch {
        /// Values in the buffer.
        len: usize,
        /// Rows asked for.
        rows: usize,
        /// The layer's output dimension.
        out_dim: usize,
    },
    /// A bias did not match the weight.
    #[error("bias has shape {bias:?} but the weight has {out_dim} outputs; pass a 1-D bias of length {out_dim}")]
    BiasMismatch {
        /// Shape of the bias.
        bias: Vec<usize>,
        /// The weight's output dimension.
        out_dim: usize,
    },
    /// Even the smallest plan is bigger than the target.
    #[error("the smallest plan takes {smallest} bytes, over the target of {target} bytes; raise the target to at least {smallest} bytes, allow more tensors to be quantized, or pick a smaller model")]
    TargetTooSmall {
        /// The target that was asked for.
        target: u64,
        /// The smallest size any plan can reach.
        smallest: u64,
    },
    /// A plan names a tensor the model does not have, or the reverse.
    #[error("tensor `{name}`: {reason}")]
    PlanMismatch {
        /// Tensor name.
        name: String,
        /// What does not match.
        reason: String,
    },
    /// A GGUF file could not be read or is not one this crate wrote.
    #[error("GGUF file {path}: {reason}")]
    BadGguf {
        /// The file.
        path: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A GGUF artifact was built from another source or format version.
    #[error("GGUF artifact is stale: {reason}; rebuild it with `quantize_safetensors` and save it again")]
    Stale {
        /// What differs.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("reading or writing {path}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Serialising or parsing plan JSON failed.
    #[error("reading or writing a quantization plan as JSON")]
    Json(#[from] serde_json::Error),
    /// A GGUF tensor type that [`QMatrix`](crate::blocks::QMatrix) has no kernel for.
    #[error("tensor type {dtype} has no block kernel; supported: Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K, F16, F32 (dequantize it to F32 or requantize the file)")]
    UnsupportedBlockType {
        /// The type's name, e.g. `Q5_1`.
        dtype: String,
    },
    /// Raw block data did not fit the declared type and shape.
    #[error("{dtype} matrix of {rows} x {cols}: {reason}")]
    BlockData {
        /// The type's name.
        dtype: String,
        /// Rows (outputs).
        rows: usize,
        /// Columns (inputs).
        cols: usize,
        /// What does not fit, with the sizes.
        reason: String,
    },
    /// A buffer passed to a block kernel had the wrong length.
    #[error("{what} has {got} values but the call needs {want}")]
    BufferLength {
        /// Which buffer (`input`, `output`, `row`).
        what: &'static str,
        /// Its length.
        got: usize,
        /// The length the call needs.
        want: usize,
    },
    /// A row index or range lay outside the matrix.
    #[error("rows {start}..{end} asked of a matrix with {rows} rows; ask for rows below {rows}")]
    RowRange {
        /// First row asked for.
        start: usize,
        /// One past the last row asked for.
        end: usize,
        /// Rows the matrix has.
        rows: usize,
    },
    /// The kernel asked for cannot run on this CPU.
    #[error("kernel {kernel} cannot run on this CPU (it needs {needs}); use Kernel::detect()")]
    KernelUnavailable {
        /// The kernel's name.
        kernel: &'static str,
        /// The CPU features it needs.
        needs: &'static str,
    },
    /// The compute pool could not start its threads.
    #[error("starting compute pool thread {index} of {threads}")]
    PoolSpawn {
        /// Index of the thread that failed.
        index: usize,
        /// Threads asked for.
        threads: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// candle reported an error.
    #[error("a candle tensor operation failed")]
    Candle(#[from] candle_core::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod chain_tests {
    use super::*;

    /// Every cause's message appears once in the report an error-chain
    /// printer makes (each layer, then `: `, then its cause): no layer pastes
    /// its cause into its own message.
    fn assert_each_cause_once(e: &(dyn std::error::Error + 'static), depth: usize) {
        let layers: Vec<String> = std::iter::successors(Some(e), |e| e.source())
            .map(|e| e.to_string())
            .collect();
        assert_eq!(layers.len(), depth, "{layers:?}");
        let report = layers.join(": ");
        let once = |cause: &String| report.matches(cause.as_str()).count() == 1;
        assert!(layers[1..].iter().all(once), "{report}");
    }

    #[test]
    fn error_chain_prints_each_cause_once() {
        let e = Error::Candle(candle_core::Error::Msg("shape mismatch in matmul".into()));
        assert_each_cause_once(&e, 2);
        let io = Error::Io {
            path: "plan.gguf".into(),
            source: std::io::Error::other("disk on fire"),
        };
        assert_each_cause_once(&io, 2);
    }
}
