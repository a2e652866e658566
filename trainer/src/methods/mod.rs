//! Distillation methods: MEKD (deprivatization, then logit alignment through the frozen
//! generator) and the losses of its baselines, each loss checked against hand-computed values.

pub mod deprivatize;
pub mod losses;
pub mod mekd;
pub mod run;

/// Why a method stopped.
#[derive(Debug, thiserror::Error)]
pub enum MethodError {
    /// The teacher refused (e.g. the budget is exhausted).
    #[error(transparent)]
    Teacher(#[from] crate::blackbox::TeacherError),
    /// A network could not be built.
    #[error(transparent)]
    Model(#[from] mekd_models::ModelError),
    /// The per-epoch callback failed (e.g. writing a checkpoint).
    #[error("after an epoch: {0:#}")]
    Callback(anyhow::Error),
}
