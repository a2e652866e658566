//! KN (Knockoff Nets, random strategy): a one-shot transfer set of a random 20% of the edge
//! images, each queried once and cached, then KD on the cached answers.

use super::kd::KdObjective;
use super::{Baseline, seeded_subset};
use crate::methods::config::{DistillConfig, QueryMode};
use crate::methods::student::Objective;

/// The KN baseline.
pub struct Kn;

impl Baseline for Kn {
    fn transfer_indices(&self, edge_len: usize, config: &DistillConfig) -> Vec<usize> {
        let mut k = ((edge_len as f64 * config.kn_fraction).round() as usize).max(1);
        if let QueryMode::Budget(n) = config.queries {
            k = k.min(n);
        }
        seeded_subset(edge_len, k, config.seed)
    }

    fn objective(&self, config: &DistillConfig) -> Box<dyn Objective> {
        Box::new(KdObjective { tau: config.tau })
    }
}
