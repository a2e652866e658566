//! Distillation methods: MEKD and its baselines. `losses` holds every loss of `METHOD.md`,
//! each checked against hand-computed values.

pub mod losses;
