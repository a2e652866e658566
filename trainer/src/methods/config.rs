//! The student-stage settings every method shares. Each default is written once, in
//! [`DistillConfig::default`] (the reference's values); `mekd distill`'s flags take theirs from it.

use serde::{Deserialize, Serialize};

use super::losses::ImageDistance;
use crate::schedule::{REFERENCE_BATCH, Sgd};

/// The reference's student epochs.
const REFERENCE_EPOCHS: usize = 240;

/// How many teacher queries the student stage may use.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", tag = "mode", content = "images")]
pub enum QueryMode {
    /// MEKD: a new synthetic batch and new queries every step (the reference). Baselines: every
    /// edge image of the method's transfer set, queried once.
    Fresh,
    /// MEKD: a fixed pool of this many synthetic images, each queried once, reused for every
    /// step. Baselines: at most this many edge images (a seeded random subset), queried once.
    Budget(usize),
}

/// Hyperparameters of the student stage of every method; [`DistillConfig::default`] holds the
/// reference's values.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DistillConfig {
    /// Epochs.
    pub epochs: usize,
    /// Steps per epoch; `None` is the method's reference schedule
    /// ([`super::DistillMethod::reference_epoch_length`]).
    pub steps_per_epoch: Option<usize>,
    /// Batch size.
    pub batch: usize,
    /// The optimiser and its schedule.
    #[serde(flatten)]
    pub sgd: Sgd,
    /// KL temperature.
    pub tau: f64,
    /// Temperature dividing logits before they enter the generator.
    pub tau_g: f64,
    /// Weight of the image alignment.
    pub w_f: f64,
    /// Weight of the KL term.
    pub w_kl: f64,
    /// L1 (reference) or L2 image distance.
    pub distance: ImageDistance,
    /// Fresh queries every step, or a fixed budgeted pool.
    pub queries: QueryMode,
    /// DKD: weight of the target-class term.
    pub dkd_alpha: f64,
    /// DKD: weight of the non-target term.
    pub dkd_beta: f64,
    /// KN: fraction of the edge set in the one-shot transfer set.
    pub kn_fraction: f64,
    /// Seed.
    pub seed: u64,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            epochs: REFERENCE_EPOCHS,
            steps_per_epoch: None,
            batch: REFERENCE_BATCH,
            sgd: Sgd::reference(REFERENCE_EPOCHS),
            tau: 5.0,
            tau_g: 5.0,
            w_f: 1.0,
            w_kl: 1.0,
            distance: ImageDistance::L1,
            queries: QueryMode::Fresh,
            dkd_alpha: 1.0,
            dkd_beta: 8.0,
            kn_fraction: 0.2,
            seed: 0,
        }
    }
}
