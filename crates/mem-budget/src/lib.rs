//! Memory budgets per hardware class, pre-flight estimates, a reservation
//! ledger and pressure levels: "no out-of-memory, and a clear answer before
//! work starts".
//!
//! - [`Budget`]: how much memory models, caches, buffers and activations may
//!   use, from a table keyed on `hw_detect::HardwareClass` (scaled by ratios
//!   for classes outside it), every field overridable through [`BudgetConfig`].
//! - [`MemoryLedger`]: [`Reservation`]s by [`Category`], admitted only when
//!   both the budget's caps and the machine's live free memory (less the
//!   safety margin) allow; released on drop.
//! - [`estimate_weights`]: weight bytes of a safetensors or GGUF file from
//!   its header alone, as stored and under each candidate quantization;
//!   [`Activations`] for encoder and decoder transformers;
//!   [`estimate_model`] and [`LinearModel`] give an [`Estimate`] a program
//!   can show a person ("input too long for this machine: at most N tokens fit").
//! - [`PressureMonitor`]: memory pressure levels with hysteresis, callbacks
//!   on change, CPU saturation and thermal hints (read by
//!   `hw_detect::CpuLoadReader` and `hw_detect::ThermalReader`).
//!
//! ```
//! use std::sync::Arc;
//! use mem_budget::{Budget, Category, LinearModel, MemoryLedger, GIB};
//! use hw_detect::{HardwareClass, MemoryInfo, MemoryProbe};
//!
//! // A probe that reports a fixed reading (the real one is `hw_detect::Detector`).
//! #[derive(Debug)]
//! struct Fixed(MemoryInfo);
//! impl MemoryProbe for Fixed {
//!     fn memory(&self) -> hw_detect::Result<MemoryInfo> { Ok(self.0) }
//! }
//!
//! let class = HardwareClass::IntelHybridLaptop;
//! let budget = Budget::for_class(class, 16 * GIB);
//! let ledger = MemoryLedger::new(budget, Fixed(MemoryInfo::new(16 * GIB, 10 * GIB, 0, 0, None)));
//!
//! // Loading a model: hold the reservation while it is loaded.
//! let model = ledger.try_reserve(Category::Model, 2 * GIB)?;
//! assert!(ledger.try_reserve(Category::Model, 2 * GIB).is_err()); // cap is 3 GiB
//!
//! // Before a request: does it fit what is left?
//! let room = ledger.available_for(Category::Activations)?;
//! let estimate = LinearModel::for_class(class).estimate(100_000, room);
//! assert!(!estimate.fits);
//! assert!(estimate.recommendation.starts_with("input too long for this machine: at most"));
//! drop(model);
//! # Ok::<(), mem_budget::Error>(())
//! ```
//!
//! This crate has no feature flags. It depends on `hw-detect` only (plus
//! serde, parking_lot and tracing); model headers are parsed here, with hard
//! limits ([`HeaderLimits`]) so a corrupt or hostile header is an error,
//! never a panic or a huge allocation.

mod activation;
mod budget;
mod error;
mod estimate;
mod ledger;
mod pressure;
mod repack;
mod units;
mod weights;

pub use crate::activation::{
    ActivationConfig, Activations, TransformerKind, TransformerShape, Workload,
};
pub use crate::budget::{Budget, BudgetConfig, BudgetOverrides, ScaleRatios};
pub use crate::error::{Error, Result};
pub use crate::estimate::{estimate_model, Estimate, LinearModel, Part, Room};
pub use crate::ledger::{
    Category, CategoryStats, LedgerConfig, LedgerStats, MemoryLedger, Reservation,
};
pub use crate::pressure::{
    MonitorThread, PressureChange, PressureConfig, PressureLevel, PressureMonitor, PressureReading,
};
pub use crate::repack::RepackRules;
pub use crate::units::{Bytes, GIB, MIB};
pub use crate::weights::{
    estimate_weights, estimate_weights_with, read_gguf_header, read_safetensors_header,
    HeaderLimits, MetaValue, TensorInfo, WeightFormat, WeightType, WeightsInfo,
};
