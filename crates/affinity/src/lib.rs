//! Which cores inference threads should run on, and pinning them where the
//! OS allows.
//!
//! `affinity` turns a [`hw_detect::HardwareProfile`] into a [`ThreadPlacement`]:
//! a [`PinStrategy`] resolved to a set of CPUs (performance cores only on
//! hybrid CPUs, one CPU per physical core on SMT machines, …), the number of
//! compute threads ([`recommended_threads`]: physical performance cores,
//! capped by the affinity mask, cgroup cpuset and CPU quota), and how those
//! threads sit on the CPUs ([`PinMode`]). It then pins the calling thread or
//! every thread of a rayon pool, the pool candle computes on.
//!
//! ```
//! use affinity::{AffinityConfig, ThreadPlacement, PinOutcome};
//!
//! let profile = hw_detect::HardwareProfile::detect()?;
//! let placement = ThreadPlacement::plan(&profile, &AffinityConfig::default())?;
//! let pinned = placement.build_pool()?;
//! assert_eq!(pinned.outcomes().len(), placement.threads);
//! // Pinned, or (macOS, a locked-down container) running unpinned: never an error.
//! for outcome in pinned.outcomes() {
//!     assert!(matches!(outcome, PinOutcome::Pinned { .. } | PinOutcome::Unsupported { .. }));
//! }
//! let sum: u64 = pinned.pool().install(|| {
//!     use rayon::prelude::*;
//!     (1..=1000u64).into_par_iter().sum()
//! });
//! assert_eq!(sum, 500_500);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Platforms
//!
//! - **Linux**: any CPU set, through `sched_setaffinity`; the current mask is
//!   read back with `sched_getaffinity` ([`current_affinity`]).
//! - **Windows, FreeBSD, …**: one CPU per thread through `core_affinity`
//!   ([`PinMode::OneCpuPerThread`]); a multi-CPU set is unsupported there.
//! - **macOS**: no thread placement exists (affinity tags are hints, and
//!   Apple silicon refuses them); every pin is [`PinOutcome::Unsupported`].
//!
//! Wherever the OS says no, the outcome is [`PinOutcome::Unsupported`] with
//! the reason, a warning is logged once per process (`tracing`), and the
//! threads run unpinned: pinning never stops a program.
//!
//! No feature flags.

mod cpuset;
mod error;
mod limits;
mod pin;
mod pool;
mod strategy;

pub use crate::cpuset::CpuSet;
pub use crate::error::{Error, Result};
pub use crate::limits::{recommended_threads, recommended_threads_within, CpuLimits};
pub use crate::pin::{current_affinity, pin_current_thread, process_affinity, PinOutcome};
pub use crate::pool::PinnedPool;
pub use crate::strategy::{AffinityConfig, PinMode, PinStrategy, ThreadPlacement};
