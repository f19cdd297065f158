//! Estimates of the memory a quantized weight really occupies once used:
//! the stored blocks plus the repacked copy candle keeps for computing,
//! sized by [`mem_budget::RepackRules`] (the one model of those copies).

use mem_budget::RepackRules;

use crate::Format;

/// Bytes an `[out, in]` weight stored in `format` occupies after its first
/// forwards on this CPU: the stored blocks plus the repacked copy kept for
/// computing. For Q8_0 where [`crate::int8_kernel_available`], that is the
/// int8 kernel's packed copy alone (1.25 bytes per weight, output columns
/// padded to 16): the stored blocks are dropped once packed, and candle's
/// copy is never built; otherwise candle's (see
/// [`mem_budget::RepackRules`]). `format` should already be fitted ([`Format::fit`]). A bias is not
/// included ([`crate::QLinear::resident_bytes`] adds it, and its copy).
pub fn resident_weight_bytes(format: Format, out: usize, inp: usize) -> u64 {
    if format == Format::Q8_0 && crate::int8_kernel_available() {
        return crate::vnni::packed_bytes(out, inp);
    }
    candle_resident_bytes(format, out, inp)
}

/// Storage plus candle's repacked copy on this CPU.
pub(crate) fn candle_resident_bytes(format: Format, out: usize, inp: usize) -> u64 {
    format.bytes_for(out * inp)
        + RepackRules::this_cpu().copy_bytes(format.weight_type(), out as u64, inp as u64)
}
