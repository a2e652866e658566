//! A student trained from scratch on the edge images' true labels (cross-entropy): a reference
//! row, not a black-box method (it needs labels the edge does not have, and no teacher).

use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;

use super::Baseline;
use crate::methods::config::DistillConfig;
use crate::methods::student::{BatchLoss, Objective};

/// The from-scratch reference.
pub struct Scratch;

/// Cross-entropy against one-hot rows: `mean_i(-sum_c y_ic log softmax(s_i)_c)`.
pub fn soft_cross_entropy(student_logits: Tensor<2>, one_hot: Tensor<2>) -> Tensor<1> {
    let [batch, _] = student_logits.dims();
    (one_hot * log_softmax(student_logits, 1)).sum().neg().div_scalar(batch as f64)
}

struct CrossEntropy;

impl Objective for CrossEntropy {
    fn term_names(&self) -> &'static [&'static str] {
        &["ce"]
    }

    fn loss(&self, student_logits: Tensor<2>, targets: Tensor<2>) -> BatchLoss {
        let ce = soft_cross_entropy(student_logits, targets);
        BatchLoss::new(ce.clone(), vec![ce])
    }
}

impl Baseline for Scratch {
    fn queries_teacher(&self) -> bool {
        false
    }

    fn objective(&self, _config: &DistillConfig) -> Box<dyn Objective> {
        Box::new(CrossEntropy)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, TensorData};

    use super::*;

    #[test]
    fn cross_entropy_by_hand() {
        // logits [ln 3, 0] -> softmax [0.75, 0.25]; target class 1: -ln 0.25 = 1.3862944;
        // second row, logits equal, target class 0: ln 2 = 0.6931472. Mean 1.0397208.
        let d = Device::flex();
        let s = Tensor::<2>::from_data(TensorData::new(vec![3f32.ln(), 0.0, 0.0, 0.0], [2, 2]), &d);
        let y = Tensor::<2>::from_data(TensorData::new(vec![0f32, 1.0, 1.0, 0.0], [2, 2]), &d);
        let ce = soft_cross_entropy(s, y).into_scalar::<f32>() as f64;
        assert!((ce - 1.039_720_8).abs() < 1e-6, "{ce}");
    }
}
