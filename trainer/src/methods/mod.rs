//! Distillation methods: MEKD (deprivatization, then logit alignment through the frozen
//! generator) and its baselines, each behind [`DistillMethod`], sharing one student loop
//! ([`student`]) and one run driver ([`run`]); every loss is checked against hand-computed values.
//!
//! Adding a method: a file that implements [`DistillMethod`] (or [`baselines::Baseline`], for a
//! method on the real edge images), a [`Method`] variant and its line in [`Method::implementation`].

pub mod baselines;
pub mod config;
pub mod deprivatize;
pub mod losses;
pub mod mekd;
pub mod run;
pub mod student;

use std::fmt;

use mekd_contract::protocol::ResponseMode;

use run::Stage;
use student::{EpochLength, Objective, Transfer};

/// What a distillation method decides; the run driver ([`run::run_method`]) does the rest
/// (the run directory, the journal, the student loop, the export).
pub trait DistillMethod {
    /// Why this method cannot run on a teacher answering in `response` mode, if it cannot.
    fn unsupported(&self, _response: ResponseMode) -> Option<&'static str> {
        None
    }

    /// Why `config` cannot run with this method, if it cannot (checked with the settings every
    /// method shares, before anything runs).
    fn settings_error(&self, _config: &run::RunConfig) -> Option<&'static str> {
        None
    }

    /// Whether the student learns from the teacher's answers (false: from true labels).
    fn queries_teacher(&self) -> bool {
        true
    }

    /// How long a student epoch is when no step count is given: the reference's schedule.
    fn reference_epoch_length(&self) -> EpochLength {
        EpochLength::OnePass
    }

    /// Run the method's own stages, then say what the student learns from and what it
    /// minimises.
    fn prepare<'a>(&self, stage: &mut Stage<'a, '_>) -> anyhow::Result<Prepared<'a>>;
}

/// A method's student stage, ready to run.
pub struct Prepared<'a> {
    /// Where the student's batches come from.
    pub transfer: Transfer,
    /// What the student minimises.
    pub objective: Box<dyn Objective + 'a>,
}

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
    /// A step recorded as a device graph could not be recorded or replayed.
    #[error("a training step recorded as a device graph: {0}")]
    Graph(#[from] crate::graph_step::GraphStepError),
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
    /// The method's implementation (its registration).
    pub fn implementation(self) -> Box<dyn DistillMethod> {
        match self {
            Method::Mekd => Box::new(mekd::Mekd),
            Method::Kd => Box::new(baselines::kd::Kd),
            Method::Ml => Box::new(baselines::ml::Ml),
            Method::Dkd => Box::new(baselines::dkd::Dkd),
            Method::Kn => Box::new(baselines::kn::Kn),
            Method::Scratch => Box::new(baselines::scratch::Scratch),
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
