//! DKD (decoupled KD, Zhao et al. 2022) on real edge images, with the teacher's argmax as the
//! target class (no labels): `alpha * TCKD + beta * NCKD`, alpha 1, beta 8, T 5, each term
//! summed, times T, divided by the batch (the reference's scaling).

use burn::tensor::Tensor;

use super::Baseline;
use crate::methods::config::DistillConfig;
use crate::methods::losses::dkd_terms;
use crate::methods::student::{BatchLoss, Objective};

/// The DKD baseline.
pub struct Dkd;

struct DkdObjective {
    alpha: f64,
    beta: f64,
    tau: f64,
}

impl Objective for DkdObjective {
    fn term_names(&self) -> &'static [&'static str] {
        &["tckd", "nckd"]
    }

    fn loss(&self, student_logits: Tensor<2>, targets: Tensor<2>) -> BatchLoss {
        let [batch, _] = targets.dims();
        let target = targets.clone().argmax(1).reshape([batch]);
        let (tckd, nckd) = dkd_terms(student_logits, targets, target, self.tau);
        BatchLoss::new(tckd.clone().mul_scalar(self.alpha) + nckd.clone().mul_scalar(self.beta), vec![tckd, nckd])
    }
}

impl Baseline for Dkd {
    fn objective(&self, config: &DistillConfig) -> Box<dyn Objective> {
        Box::new(DkdObjective { alpha: config.dkd_alpha, beta: config.dkd_beta, tau: config.tau })
    }
}
