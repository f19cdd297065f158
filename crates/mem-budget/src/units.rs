//! Byte quantities and how they are shown to a person.

use std::fmt;

/// One MiB in bytes.
pub const MIB: u64 = 1 << 20;
/// One GiB in bytes.
pub const GIB: u64 = 1 << 30;

/// Shows a byte count the way a person reads it: `512 B`, `3.5 KiB`,
/// `100.0 MiB`, `2.30 GiB`.
///
/// ```
/// use mem_budget::Bytes;
/// assert_eq!(Bytes(3 << 29).to_string(), "1.50 GiB");
/// assert_eq!(Bytes(100 << 20).to_string(), "100.0 MiB");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= GIB {
            write!(f, "{:.2} GiB", b as f64 / GIB as f64)
        } else if b >= MIB {
            write!(f, "{:.1} MiB", b as f64 / MIB as f64)
        } else if b >= 1024 {
            write!(f, "{:.1} KiB", b as f64 / 1024.0)
        } else {
            write!(f, "{b} B")
        }
    }
}
