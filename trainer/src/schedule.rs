//! The reference optimiser and its learning-rate schedule, shared by teacher training and every
//! method's student; each of its settings is defined here once.

use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{ModuleOptimizer, SgdConfig};
use serde::{Deserialize, Serialize};

/// The reference's batch size.
pub const REFERENCE_BATCH: usize = 128;
/// The reference's initial SGD learning rate.
pub const REFERENCE_LR: f64 = 0.1;
/// The reference's SGD momentum.
pub const REFERENCE_MOMENTUM: f64 = 0.9;
/// The reference's L2 weight decay.
pub const REFERENCE_WEIGHT_DECAY: f64 = 5e-4;
/// The reference's learning-rate decay factor at each milestone.
pub const REFERENCE_GAMMA: f64 = 0.1;

/// How a classifier trains, the teacher and every method's student alike: SGD with momentum
/// and weight decay, its rate decayed by `gamma` at each milestone. Saved flattened into the
/// run's `config.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sgd {
    /// Initial learning rate.
    pub lr: f64,
    /// Momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Epochs (0-based) where the rate is multiplied by `gamma`.
    pub milestones: Vec<usize>,
    /// Decay factor at each milestone.
    pub gamma: f64,
}

impl Sgd {
    /// The reference's recipe for a run of `epochs` epochs.
    pub fn reference(epochs: usize) -> Self {
        Self {
            lr: REFERENCE_LR,
            momentum: REFERENCE_MOMENTUM,
            weight_decay: REFERENCE_WEIGHT_DECAY,
            milestones: default_milestones(epochs),
            gamma: REFERENCE_GAMMA,
        }
    }

    /// Refuse settings that cannot train.
    pub fn validate(&self) -> Result<(), String> {
        let lr_ok = self.lr > 0.0 && self.lr.is_finite();
        let weight_decay_ok = self.weight_decay >= 0.0 && self.weight_decay.is_finite();
        if !lr_ok || !(0.0..1.0).contains(&self.momentum) || !weight_decay_ok {
            return Err("SGD needs lr > 0, momentum in [0, 1) and weight decay >= 0".into());
        }
        if !(self.gamma > 0.0 && self.gamma <= 1.0) {
            return Err(format!("the decay factor must be in (0, 1], got {}", self.gamma));
        }
        if self.milestones.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("milestones must increase: {:?}", self.milestones));
        }
        Ok(())
    }

    /// The optimiser.
    pub fn optimizer(&self) -> ModuleOptimizer {
        reference_sgd(self.momentum, self.weight_decay)
    }

    /// The learning rate of 0-based `epoch`.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        multi_step(self.lr, self.gamma, &self.milestones, epoch)
    }
}

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

    #[test]
    fn settings_that_cannot_train_are_refused() {
        assert_eq!(Sgd::reference(240).validate(), Ok(()));
        assert_eq!(Sgd::reference(240).lr_at(160), 0.1 * 0.1 * 0.1);
        let bad = [
            Sgd { lr: 0.0, ..Sgd::reference(3) },
            Sgd { momentum: 1.0, ..Sgd::reference(3) },
            Sgd { weight_decay: -1.0, ..Sgd::reference(3) },
            Sgd { gamma: 0.0, ..Sgd::reference(3) },
            Sgd { milestones: vec![2, 2], ..Sgd::reference(3) },
        ];
        for sgd in bad {
            assert!(sgd.validate().is_err(), "{sgd:?}");
        }
    }
}
