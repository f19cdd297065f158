//! Pinning the calling thread: `sched_setaffinity` on Linux, `core_affinity`
//! elsewhere, and [`PinOutcome::Unsupported`] wherever the OS says no.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::cpuset::CpuSet;

/// What happened when a thread asked to be pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
#[non_exhaustive]
pub enum PinOutcome {
    /// The thread now runs only on these CPUs.
    Pinned {
        /// The CPUs the thread may run on.
        cpus: CpuSet,
    },
    /// The OS gave no affinity (macOS, a container that forbids it, a CPU
    /// outside the cgroup's cpuset, …). The thread runs unpinned, as it did
    /// before; nothing else changes.
    Unsupported {
        /// Why, in words (the OS's error where there was one).
        reason: String,
    },
    /// A pool thread that had not started when its pool's report was taken;
    /// it pins itself when it starts.
    Pending,
}

impl PinOutcome {
    /// Whether the thread was pinned.
    pub fn is_pinned(&self) -> bool {
        matches!(self, PinOutcome::Pinned { .. })
    }
}

/// Set once the first "unsupported" warning has been logged.
static WARNED: AtomicBool = AtomicBool::new(false);

/// Builds an `Unsupported` outcome and logs it: a warning the first time in
/// this process, at debug level after that (a pool of 16 threads that cannot
/// be pinned says so once, not 16 times).
fn unsupported(reason: String) -> PinOutcome {
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(%reason, "CPU affinity unsupported; threads run unpinned");
    } else {
        tracing::debug!(%reason, "CPU affinity unsupported; thread runs unpinned");
    }
    PinOutcome::Unsupported { reason }
}

/// Pins the calling thread to `cpus` (any of them; the kernel places it).
///
/// Never fails: where the OS refuses, the outcome is
/// [`PinOutcome::Unsupported`] (logged once per process) and the thread keeps
/// the affinity it had.
///
/// On Linux any set is applied with `sched_setaffinity`. Elsewhere only a
/// single CPU can be set (through `core_affinity`); a multi-CPU set there is
/// `Unsupported`. On macOS, whose affinity tags are scheduling hints rather
/// than placement, every request is `Unsupported`.
pub fn pin_current_thread(cpus: &CpuSet) -> PinOutcome {
    if cpus.is_empty() {
        return unsupported("asked to pin to an empty CPU set".to_string());
    }
    match os::set_current(cpus) {
        Ok(()) => {
            tracing::trace!(%cpus, "thread pinned");
            PinOutcome::Pinned { cpus: cpus.clone() }
        }
        Err(reason) => unsupported(reason),
    }
}

/// The CPUs the calling thread may run on now; `None` where the OS cannot
/// say (everywhere but Linux).
pub fn current_affinity() -> Option<CpuSet> {
    os::get(0)
}

/// The CPUs the process may run on: its main thread's affinity mask (on
/// Linux the main thread's id is the process id). `None` where the OS
/// cannot say.
pub fn process_affinity() -> Option<CpuSet> {
    os::get(std::process::id())
}

#[cfg(target_os = "linux")]
mod os {
    use super::CpuSet;

    const BITS: usize = libc::c_ulong::BITS as usize;

    /// A kernel CPU mask: an array of `unsigned long`, bit `i` for CPU `i`.
    /// Built by hand so that masks of more than `CPU_SETSIZE` CPUs work.
    fn mask_of(cpus: &CpuSet) -> Vec<libc::c_ulong> {
        let words = cpus.max().map_or(1, |m| m / BITS + 1);
        // `cpu_set_t` is 1024 bits; never hand the kernel less than that.
        let mut mask = vec![0 as libc::c_ulong; words.max(1024 / BITS)];
        for cpu in cpus.iter() {
            mask[cpu / BITS] |= 1 << (cpu % BITS);
        }
        mask
    }

    pub(super) fn set_current(cpus: &CpuSet) -> Result<(), String> {
        let mask = mask_of(cpus);
        let bytes = std::mem::size_of_val(mask.as_slice());
        // SAFETY: `mask` is a live, initialised buffer of `bytes` bytes laid
        // out as the kernel's CPU mask (an array of unsigned long, which is
        // also `cpu_set_t`'s layout); the kernel only reads `bytes` bytes
        // from it. pid 0 means the calling thread.
        let rc =
            unsafe { libc::sched_setaffinity(0, bytes, mask.as_ptr().cast::<libc::cpu_set_t>()) };
        if rc == 0 {
            Ok(())
        } else {
            let err = std::io::Error::last_os_error();
            Err(format!("sched_setaffinity to CPUs {cpus} refused: {err}"))
        }
    }

    pub(super) fn get(pid: u32) -> Option<CpuSet> {
        let pid = libc::pid_t::try_from(pid).ok()?;
        let mut words = 1024 / BITS;
        // The kernel wants a buffer at least as large as its own mask;
        // grow until it fits (EINVAL means too small).
        while words <= 1 << 16 {
            let mut mask = vec![0 as libc::c_ulong; words];
            let bytes = std::mem::size_of_val(mask.as_slice());
            // SAFETY: `mask` is a live buffer of `bytes` writable bytes laid
            // out as a kernel CPU mask; the kernel writes at most `bytes`.
            let rc = unsafe {
                libc::sched_getaffinity(pid, bytes, mask.as_mut_ptr().cast::<libc::cpu_set_t>())
            };
            if rc == 0 {
                let cpus = mask.iter().enumerate().flat_map(|(w, &word)| {
                    (0..BITS)
                        .filter(move |b| word & (1 << b) != 0)
                        .map(move |b| w * BITS + b)
                });
                return Some(CpuSet::new(cpus));
            }
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                return None;
            }
            words *= 2;
        }
        None
    }
}

#[cfg(not(target_os = "linux"))]
mod os {
    use super::CpuSet;

    pub(super) fn set_current(cpus: &CpuSet) -> Result<(), String> {
        if cfg!(target_os = "macos") {
            return Err(
                "macOS offers no thread-to-CPU affinity (affinity tags are hints, and Apple \
                 silicon rejects them)"
                    .to_string(),
            );
        }
        let [cpu] = cpus.as_slice() else {
            return Err(format!(
                "this OS can pin a thread to one CPU only, not to the set {cpus}"
            ));
        };
        if core_affinity::set_for_current(core_affinity::CoreId { id: *cpu }) {
            Ok(())
        } else {
            Err(format!("the OS refused to pin the thread to CPU {cpu}"))
        }
    }

    pub(super) fn get(_pid: u32) -> Option<CpuSet> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_set_is_unsupported_not_a_panic() {
        let out = pin_current_thread(&CpuSet::default());
        assert!(matches!(out, PinOutcome::Unsupported { .. }), "{out:?}");
        assert!(!out.is_pinned());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_cpu_that_does_not_exist_is_unsupported_and_leaves_the_mask() {
        std::thread::spawn(|| {
            let before = current_affinity().expect("linux reports affinity");
            // CPU 4000 exists on no machine this runs on: the kernel answers EINVAL.
            let out = pin_current_thread(&CpuSet::new([4000]));
            match &out {
                PinOutcome::Unsupported { reason } => {
                    assert!(reason.contains("4000"), "{reason}")
                }
                other => panic!("expected Unsupported, got {other:?}"),
            }
            assert_eq!(current_affinity(), Some(before));
        })
        .join()
        .unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_affinity_is_reported() {
        let process = process_affinity().expect("linux reports affinity");
        assert!(!process.is_empty());
        assert!(process.len() <= 1 << 16);
    }
}
