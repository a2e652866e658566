//! The one percentile rule of every benchmark in the project: nearest rank.

use serde::{Deserialize, Serialize};

/// p50/p90/p99 and mean of a set of durations, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
    /// Samples.
    pub samples: usize,
}

impl Percentiles {
    /// Percentiles of `ms` (nearest rank).
    pub fn of(mut ms: Vec<f64>) -> Self {
        if ms.is_empty() {
            return Self::default();
        }
        ms.sort_by(f64::total_cmp);
        Self {
            p50: nearest_rank(&ms, 0.5),
            p90: nearest_rank(&ms, 0.9),
            p99: nearest_rank(&ms, 0.99),
            mean: ms.iter().sum::<f64>() / ms.len() as f64,
            samples: ms.len(),
        }
    }
}

/// The `q`-quantile (0 < q <= 1) of `sorted` by nearest rank: the smallest value with at least
/// `q` of the samples at or below it; 0 for no samples.
pub fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of((1..=100).rev().map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99, p.samples), (50.0, 90.0, 99.0, 100));
        assert!((p.mean - 50.5).abs() < 1e-12);
        assert_eq!(Percentiles::of(vec![]).samples, 0);
        // Four samples: the median is the second (not the mean of the middle two), p10 the first.
        assert_eq!(nearest_rank(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert_eq!(nearest_rank(&[1.0, 2.0, 3.0, 4.0], 0.1), 1.0);
        assert_eq!(nearest_rank(&[7.0], 0.99), 7.0);
    }
}
