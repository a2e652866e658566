//! ML (mimic learning, logit regression): mean squared error between student and teacher
//! logits on real edge images. Needs soft answers.

use burn::tensor::Tensor;
use mekd_contract::protocol::ResponseMode;

use super::Baseline;
use crate::methods::config::DistillConfig;
use crate::methods::losses::logit_mse;
use crate::methods::student::{BatchLoss, Objective};

/// The ML baseline.
pub struct Ml;

struct MlObjective;

impl Objective for MlObjective {
    fn term_names(&self) -> &'static [&'static str] {
        &["mse"]
    }

    fn loss(&self, student_logits: Tensor<2>, targets: Tensor<2>) -> BatchLoss {
        let mse = logit_mse(student_logits, targets);
        BatchLoss::new(mse.clone(), vec![mse])
    }
}

impl Baseline for Ml {
    fn unsupported(&self, response: ResponseMode) -> Option<&'static str> {
        (response == ResponseMode::Hard).then_some("ML regresses logits: it needs a teacher answering soft")
    }

    fn objective(&self, _config: &DistillConfig) -> Box<dyn Objective> {
        Box::new(MlObjective)
    }
}
