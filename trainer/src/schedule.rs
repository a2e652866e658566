//! The reference optimiser and its learning-rate schedule.

use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{ModuleOptimizer, SgdConfig};

/// SGD as PyTorch's `optim.SGD(momentum, weight_decay)`: burn's momentum defaults to dampening
/// 0.1, PyTorch's to 0, so it is set explicitly.
pub fn reference_sgd(momentum: f64, weight_decay: f64) -> ModuleOptimizer {
    SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_momentum(momentum).with_dampening(0.0)))
        .with_weight_decay(Some(WeightDecayConfig::new(weight_decay as f32)))
        .init()
}

/// Step decay: `base * gamma^k` where `k` counts the milestones (0-based epoch indices at which
/// the rate drops) that `epoch` has reached, as PyTorch's `MultiStepLR` stepped per epoch.
pub fn multi_step(base: f64, gamma: f64, milestones: &[usize], epoch: usize) -> f64 {
    let k = milestones.iter().filter(|&&m| epoch >= m).count();
    base * gamma.powi(k as i32)
}

/// The reference's milestones for `epochs`: one third and two thirds (80 and 160 of 240).
pub fn default_milestones(epochs: usize) -> Vec<usize> {
    let third = (epochs as f64 / 3.0).round() as usize;
    let two_thirds = (2.0 * epochs as f64 / 3.0).round() as usize;
    let mut m: Vec<usize> = [third, two_thirds].into_iter().filter(|&m| m > 0 && m < epochs).collect();
    m.dedup();
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_schedule() {
        assert_eq!(default_milestones(240), vec![80, 160]);
        assert!((multi_step(0.1, 0.1, &[80, 160], 79) - 0.1).abs() < 1e-12);
        assert!((multi_step(0.1, 0.1, &[80, 160], 80) - 0.01).abs() < 1e-12);
        assert!((multi_step(0.1, 0.1, &[80, 160], 239) - 0.001).abs() < 1e-12);
        assert_eq!(default_milestones(1), Vec::<usize>::new());
    }
}
