//! The baselines MEKD is compared with, one module each. All but `scratch` send real edge
//! images to the teacher (each image once: the reference re-queries every epoch, but without
//! augmentation the answers are identical, so caching them changes nothing but the bill);
//! `scratch` trains on the edge images' true labels, as a reference row. Each baseline says
//! which edge images form its transfer set and what it minimises; the student loop is shared
//! ([`super::student::train_student`]).

pub mod dkd;
pub mod kd;
pub mod kn;
pub mod ml;
pub mod scratch;

use mekd_contract::protocol::ResponseMode;
use mekd_runtime::rng::SplitMix64;

use super::config::{DistillConfig, QueryMode};
use super::run::Stage;
use super::student::{Objective, Pool, Transfer};
use super::{DistillMethod, Prepared};

/// A baseline method on the real edge images: its transfer set is a subset of them, answered
/// once each by the teacher (or labelled), cached in the run directory.
pub trait Baseline {
    /// Which of the `edge_len` edge images form the transfer set (queried once each, or
    /// labelled for `scratch`). By default: all of them, or a seeded random subset of the
    /// budget's size.
    fn transfer_indices(&self, edge_len: usize, config: &DistillConfig) -> Vec<usize> {
        let cap = match config.queries {
            QueryMode::Fresh => edge_len,
            QueryMode::Budget(n) => n.min(edge_len),
        };
        seeded_subset(edge_len, cap, config.seed)
    }

    /// Whether the transfer set is answered by the teacher (false: true labels).
    fn queries_teacher(&self) -> bool {
        true
    }

    /// Why this baseline cannot run on a teacher answering in `response` mode, if it cannot.
    fn unsupported(&self, _response: ResponseMode) -> Option<&'static str> {
        None
    }

    /// What the student minimises.
    fn objective(&self, config: &DistillConfig) -> Box<dyn Objective>;
}

impl<B: Baseline> DistillMethod for B {
    fn unsupported(&self, response: ResponseMode) -> Option<&'static str> {
        Baseline::unsupported(self, response)
    }

    fn queries_teacher(&self) -> bool {
        Baseline::queries_teacher(self)
    }

    fn prepare<'a>(&self, stage: &mut Stage<'a, '_>) -> anyhow::Result<Prepared<'a>> {
        let (config, edge) = (&stage.config.distill, stage.edge);
        let picks = self.transfer_indices(edge.len(), config);
        let pool = if Baseline::queries_teacher(self) {
            stage.cached_pool(|| Ok(Pool::gather(edge, &picks)))?
        } else {
            Pool::labelled(edge, &picks, stage.info.num_classes)
        };
        Ok(Prepared { transfer: Transfer::Pool(pool), objective: self.objective(config) })
    }
}

/// `k` of `0..n`, drawn without replacement by a seeded shuffle (all of them, in order, when
/// `k >= n`).
pub fn seeded_subset(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    if k >= n {
        return all;
    }
    SplitMix64::new(seed ^ 0x5EED_7A2E_u64).shuffle(&mut all);
    all.truncate(k);
    all.sort_unstable();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsets_are_seeded_distinct_and_capped() {
        let a = seeded_subset(100, 20, 7);
        assert_eq!(a.len(), 20);
        assert_eq!(a, seeded_subset(100, 20, 7));
        assert_ne!(a, seeded_subset(100, 20, 8));
        let mut dedup = a.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), 20);
        assert_eq!(seeded_subset(5, 9, 1), vec![0, 1, 2, 3, 4]);
    }
}
