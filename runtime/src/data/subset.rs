//! The edge subset: a seeded, reproducible fraction of the training split that the edge side
//! holds without labels (the reference's `lamda = 0.1`).

use crate::rng::SplitMix64;

/// Sorted indices of `round(fraction * n)` samples out of `n`, drawn without replacement with
/// `seed`. The same `(n, fraction, seed)` always gives the same subset, on every platform.
pub fn edge_subset(n: usize, fraction: f64, seed: u64) -> Result<Vec<usize>, String> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(format!("edge fraction must be in (0, 1], got {fraction}"));
    }
    let k = ((fraction * n as f64).round() as usize).clamp(1, n.max(1));
    if n == 0 {
        return Err("cannot draw an edge subset from an empty dataset".into());
    }
    let mut indices: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed).shuffle(&mut indices);
    indices.truncate(k);
    indices.sort_unstable();
    Ok(indices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_is_seeded_sized_and_distinct() {
        let a = edge_subset(60_000, 0.1, 42).unwrap();
        assert_eq!(a.len(), 6_000);
        assert_eq!(a, edge_subset(60_000, 0.1, 42).unwrap());
        assert_ne!(a, edge_subset(60_000, 0.1, 43).unwrap());
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!(*a.last().unwrap() < 60_000);
    }

    #[test]
    fn rejects_bad_fractions() {
        assert!(edge_subset(10, 0.0, 1).is_err());
        assert!(edge_subset(10, 1.5, 1).is_err());
        assert!(edge_subset(0, 0.5, 1).is_err());
    }
}
