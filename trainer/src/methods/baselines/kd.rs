//! KD (Hinton et al. 2015): the temperature KL between teacher and student on real edge images,
//! no labels: `KL(softmax(t / T) || softmax(s / T)) * T`, T = 5 (the reference's scaling). Hard
//! answers enter as one-hot vectors.

use burn::tensor::Tensor;

use super::Baseline;
use crate::methods::config::DistillConfig;
use crate::methods::losses::kd_kl;
use crate::methods::student::{BatchLoss, Objective};

/// The KD baseline.
pub struct Kd;

/// The temperature KL as an objective (also used by KN).
pub struct KdObjective {
    /// Temperature.
    pub tau: f64,
}

impl Objective for KdObjective {
    fn term_names(&self) -> &'static [&'static str] {
        &["kl"]
    }

    fn loss(&self, student_logits: Tensor<2>, targets: Tensor<2>) -> BatchLoss {
        let kl = kd_kl(student_logits, targets, self.tau);
        BatchLoss::new(kl.clone(), vec![kl])
    }
}

impl Baseline for Kd {
    fn objective(&self, config: &DistillConfig) -> Box<dyn Objective> {
        Box::new(KdObjective { tau: config.tau })
    }
}
