//! Distillation methods: MEKD (deprivatization, then logit alignment through the frozen
//! generator) and the losses of its baselines, each loss checked against hand-computed values.

pub mod deprivatize;
pub mod losses;
pub mod mekd;
pub mod run;
