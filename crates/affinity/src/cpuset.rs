//! A set of logical CPU ids.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A set of logical CPU ids, kept sorted and without duplicates.
///
/// It prints as a kernel CPU list (`0-3,8`), the form `taskset`,
/// `/proc/self/status` and cgroup files use.
///
/// ```
/// use affinity::CpuSet;
///
/// let set = CpuSet::new([3, 0, 1, 2, 8, 1]);
/// assert_eq!(set.to_string(), "0-3,8");
/// assert_eq!(CpuSet::parse("0-3,8"), Some(set));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "Vec<usize>", into = "Vec<usize>")]
pub struct CpuSet(Vec<usize>);

impl CpuSet {
    /// The set of the given CPU ids (sorted, duplicates dropped).
    pub fn new(cpus: impl IntoIterator<Item = usize>) -> Self {
        let mut v: Vec<usize> = cpus.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        CpuSet(v)
    }

    /// Parses a kernel CPU list such as `0-3,8,10-11`; `None` when malformed.
    pub fn parse(list: &str) -> Option<Self> {
        hw_detect::parse_cpu_list(list).map(CpuSet::new)
    }

    /// Number of CPUs in the set.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set holds no CPU.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `cpu` is in the set.
    pub fn contains(&self, cpu: usize) -> bool {
        self.0.binary_search(&cpu).is_ok()
    }

    /// The CPU ids, ascending.
    pub fn as_slice(&self) -> &[usize] {
        &self.0
    }

    /// The CPU ids, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().copied()
    }

    /// CPUs in both sets.
    pub fn intersection(&self, other: &CpuSet) -> CpuSet {
        CpuSet(self.iter().filter(|&c| other.contains(c)).collect())
    }

    /// The highest CPU id, if any.
    pub fn max(&self) -> Option<usize> {
        self.0.last().copied()
    }
}

impl From<Vec<usize>> for CpuSet {
    fn from(v: Vec<usize>) -> Self {
        CpuSet::new(v)
    }
}

impl From<CpuSet> for Vec<usize> {
    fn from(s: CpuSet) -> Self {
        s.0
    }
}

impl FromIterator<usize> for CpuSet {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        CpuSet::new(iter)
    }
}

impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(none)");
        }
        let mut first = true;
        let mut i = 0;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if end == start {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn display_parses_back(cpus in proptest::collection::vec(0usize..300, 0..40)) {
            let set = CpuSet::new(cpus.clone());
            if set.is_empty() {
                prop_assert_eq!(set.to_string(), "(none)");
            } else {
                prop_assert_eq!(CpuSet::parse(&set.to_string()), Some(set.clone()));
            }
            for c in cpus {
                prop_assert!(set.contains(c));
            }
        }
    }

    #[test]
    fn intersection_and_serde() {
        let a = CpuSet::new([0, 1, 2, 5]);
        let b = CpuSet::new([1, 5, 7]);
        assert_eq!(a.intersection(&b), CpuSet::new([1, 5]));
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, "[0,1,2,5]");
        let back: CpuSet = serde_json::from_str("[5,0,2,1,1]").unwrap();
        assert_eq!(back, a);
    }
}
