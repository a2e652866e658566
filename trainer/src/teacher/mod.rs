//! The cloud side: training the teacher on its private labeled data.

pub mod train;
