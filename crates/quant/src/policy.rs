//! The default precision policy per hardware class, and overrides.

use hw_detect::{HardwareClass, HardwareProfile, GIB};
use serde::{Deserialize, Serialize};

use crate::Format;

/// What precision a machine's weights get, and how the plan is made.
///
/// [`QuantPolicy::for_profile`] gives the table's row for the machine; the
/// fields are public so that a caller can override any of them, or apply a
/// [`PolicyOverrides`] (for example read from a config file).
///
/// | class | quantization | layer-wise | weight-only | dynamic | calibration samples |
/// |---|---|---|---|---|---|
/// | AppleM1Air | INT8 (Q8_0) | yes | yes | yes | 32 |
/// | IntelHybridLaptop | INT8 | yes | yes | yes | 64 |
/// | AmdRyzenLaptop | INT8 | yes | yes | yes | 64 |
/// | HighEnd | INT8 | no | no | yes | 128 |
/// | under 6 GiB available | INT4 (Q4_K) | yes | yes | yes | 32 |
/// | AppleM1Pro, Generic (not in the promised table) | INT8 | yes | yes | yes | 64 |
///
/// "Under 6 GiB available" is the cgroup-aware `memory.effective_available`
/// (threshold [`PolicyConfig::int4_below_bytes`]) and wins over the class;
/// the `Constrained` class takes that row too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QuantPolicy {
    /// The format quantized weights get. Default Q8_0.
    pub format: Format,
    /// Plan per layer against a byte target (`true`) or give every weight
    /// `format` (`false`). Default true.
    pub layer_wise: bool,
    /// Quantize weights only, activations stay f32 (candle quantizes the
    /// activations of each matmul on the fly either way). Default true.
    pub weight_only: bool,
    /// Activation scales computed per call (candle's behaviour). Default true.
    pub dynamic: bool,
    /// Calibration rows per tensor when planning. Default 64.
    pub calibration_samples: usize,
    /// Whether the model will serve batches on CPU; Q4_0 is then replaced by
    /// Q4_K (Q4_0 is not repacked by candle and is ~7x slower at batch 32).
    /// Default true.
    pub batched_cpu: bool,
}

impl Default for QuantPolicy {
    fn default() -> Self {
        QuantPolicy {
            format: Format::Q8_0,
            layer_wise: true,
            weight_only: true,
            dynamic: true,
            calibration_samples: 64,
            batched_cpu: true,
        }
    }
}

/// Limits of the policy table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyConfig {
    /// Below this many effectively available bytes the policy is INT4.
    /// Default 6 GiB.
    pub int4_below_bytes: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            int4_below_bytes: 6 * GIB,
        }
    }
}

/// Optional replacements for a policy's fields; `None` keeps the default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyOverrides {
    /// Replaces [`QuantPolicy::format`].
    pub format: Option<Format>,
    /// Replaces [`QuantPolicy::layer_wise`].
    pub layer_wise: Option<bool>,
    /// Replaces [`QuantPolicy::weight_only`].
    pub weight_only: Option<bool>,
    /// Replaces [`QuantPolicy::dynamic`].
    pub dynamic: Option<bool>,
    /// Replaces [`QuantPolicy::calibration_samples`].
    pub calibration_samples: Option<usize>,
    /// Replaces [`QuantPolicy::batched_cpu`].
    pub batched_cpu: Option<bool>,
}

impl QuantPolicy {
    /// The table's row for this machine, with the default [`PolicyConfig`].
    pub fn for_profile(profile: &HardwareProfile) -> QuantPolicy {
        Self::for_profile_with(profile, &PolicyConfig::default())
    }

    /// The table's row for this machine.
    pub fn for_profile_with(profile: &HardwareProfile, config: &PolicyConfig) -> QuantPolicy {
        let row = |format, layer_wise, weight_only, samples| QuantPolicy {
            format,
            layer_wise,
            weight_only,
            dynamic: true,
            calibration_samples: samples,
            batched_cpu: true,
        };
        let policy = if profile.memory.effective_available < config.int4_below_bytes
            || profile.class == HardwareClass::Constrained
        {
            row(Format::Q4_K, true, true, 32)
        } else {
            match profile.class {
                HardwareClass::AppleM1Air => row(Format::Q8_0, true, true, 32),
                HardwareClass::IntelHybridLaptop | HardwareClass::AmdRyzenLaptop => {
                    row(Format::Q8_0, true, true, 64)
                }
                HardwareClass::HighEnd => row(Format::Q8_0, false, false, 128),
                _ => row(Format::Q8_0, true, true, 64),
            }
        };
        tracing::debug!(class = ?profile.class, available = profile.memory.effective_available,
            format = %policy.format, "quantization policy");
        policy
    }

    /// This policy with the overrides that are set applied.
    pub fn with_overrides(mut self, o: &PolicyOverrides) -> QuantPolicy {
        if let Some(v) = o.format {
            self.format = v;
        }
        if let Some(v) = o.layer_wise {
            self.layer_wise = v;
        }
        if let Some(v) = o.weight_only {
            self.weight_only = v;
        }
        if let Some(v) = o.dynamic {
            self.dynamic = v;
        }
        if let Some(v) = o.calibration_samples {
            self.calibration_samples = v;
        }
        if let Some(v) = o.batched_cpu {
            self.batched_cpu = v;
        }
        self
    }

    /// The format to use: [`QuantPolicy::format`], except that Q4_0 becomes
    /// Q4_K for batched CPU work.
    pub fn effective_format(&self) -> Format {
        if self.batched_cpu && self.format == Format::Q4_0 {
            Format::Q4_K
        } else {
            self.format
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hw_detect::MemoryInfo;

    fn profile(class: HardwareClass, avail_gib: u64) -> HardwareProfile {
        let mut p = HardwareProfile::detect().expect("profile of this machine");
        p.class = class;
        p.memory = MemoryInfo::new(64 * GIB, avail_gib * GIB, 0, 0, None);
        p
    }

    #[test]
    fn the_promised_table() {
        let cases = [
            (HardwareClass::AppleM1Air, 8, Format::Q8_0, true, true, 32),
            (
                HardwareClass::IntelHybridLaptop,
                10,
                Format::Q8_0,
                true,
                true,
                64,
            ),
            (
                HardwareClass::AmdRyzenLaptop,
                10,
                Format::Q8_0,
                true,
                true,
                64,
            ),
            (HardwareClass::HighEnd, 30, Format::Q8_0, false, false, 128),
            (HardwareClass::HighEnd, 5, Format::Q4_K, true, true, 32),
            (HardwareClass::AppleM1Air, 3, Format::Q4_K, true, true, 32),
            (HardwareClass::Constrained, 7, Format::Q4_K, true, true, 32),
        ];
        for (class, gib, format, lw, wo, n) in cases {
            let p = QuantPolicy::for_profile(&profile(class, gib));
            assert_eq!(
                (
                    p.format,
                    p.layer_wise,
                    p.weight_only,
                    p.dynamic,
                    p.calibration_samples
                ),
                (format, lw, wo, true, n),
                "{class:?} with {gib} GiB"
            );
        }
    }

    #[test]
    fn overrides_and_q4_0_guard() {
        let p = QuantPolicy::for_profile(&profile(HardwareClass::HighEnd, 40)).with_overrides(
            &PolicyOverrides {
                format: Some(Format::Q4_0),
                calibration_samples: Some(8),
                ..Default::default()
            },
        );
        assert_eq!(p.calibration_samples, 8);
        assert!(!p.layer_wise);
        assert_eq!(p.effective_format(), Format::Q4_K);
        let p = p.with_overrides(&PolicyOverrides {
            batched_cpu: Some(false),
            ..Default::default()
        });
        assert_eq!(p.effective_format(), Format::Q4_0);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<QuantPolicy>(&json).unwrap(), p);
        let partial: QuantPolicy = serde_json::from_str(r#"{"format":"Q4_K"}"#).unwrap();
        assert_eq!(partial.calibration_samples, 64);
    }
}
