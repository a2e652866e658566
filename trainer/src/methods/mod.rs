//! Distillation methods: MEKD (deprivatization, then logit alignment through the frozen
//! generator) and its baselines, sharing one student loop ([`student`]) and one run driver
//! ([`run`]); every loss is checked against hand-computed values.

pub mod baselines;
pub mod deprivatize;
pub mod losses;
pub mod mekd;
pub mod run;
pub mod student;

use std::fmt;

use baselines::Baseline;

/// Why a method stopped.
#[derive(Debug, thiserror::Error)]
pub enum MethodError {
    /// The teacher refused (e.g. the budget is exhausted).
    #[error(transparent)]
    Teacher(#[from] crate::blackbox::TeacherError),
    /// A network could not be built.
    #[error(transparent)]
    Model(#[from] mekd_models::ModelError),
    /// The schedule cannot run on this transfer set.
    #[error("{0}")]
    Schedule(&'static str),
    /// The student's loss stopped being a number: training diverged.
    #[error(
        "the student's mean loss was {loss} in epoch {epoch} (learning rate {lr}): training diverged; \
         try a lower --lr"
    )]
    Diverged {
        /// 1-based epoch.
        epoch: usize,
        /// The epoch's mean loss.
        loss: f64,
        /// Its learning rate.
        lr: f64,
    },
    /// The per-epoch work (checkpoints, metrics) failed.
    #[error("{0:#}")]
    Callback(anyhow::Error),
}

/// The methods `mekd distill --method` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// MEKD: deprivatization (DCGAN + IM on synthetic queries), then logits aligned through the
    /// frozen generator. Real edge images never reach the teacher.
    Mekd,
    /// Hinton KD on real edge images.
    Kd,
    /// Mimic learning (logit MSE) on real edge images; soft answers only.
    Ml,
    /// Decoupled KD on real edge images, target = teacher argmax.
    Dkd,
    /// Knockoff Nets: one-shot random 20% of the edge images, then KD.
    Kn,
    /// Reference row: the student trained on the edge images' true labels, no teacher.
    Scratch,
}

impl Method {
    /// The baseline behind this method (`None` for MEKD).
    pub fn baseline(self) -> Option<Box<dyn Baseline>> {
        match self {
            Method::Mekd => None,
            Method::Kd => Some(Box::new(baselines::kd::Kd)),
            Method::Ml => Some(Box::new(baselines::ml::Ml)),
            Method::Dkd => Some(Box::new(baselines::dkd::Dkd)),
            Method::Kn => Some(Box::new(baselines::kn::Kn)),
            Method::Scratch => Some(Box::new(baselines::scratch::Scratch)),
        }
    }

    /// The name used in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Method::Mekd => "mekd",
            Method::Kd => "kd",
            Method::Ml => "ml",
            Method::Dkd => "dkd",
            Method::Kn => "kn",
            Method::Scratch => "scratch",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
