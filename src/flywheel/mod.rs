//! The flywheel path: datasets, LoRA training, evaluation. Runs off the serving path and never
//! touches HTTP.

pub mod ast;
pub mod controller;
pub mod curate;
pub mod dataset;
pub mod eval;
pub mod jobs;
pub mod promote;
pub mod train;
