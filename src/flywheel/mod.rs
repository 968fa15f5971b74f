//! The flywheel path: curation of the traffic log into datasets, customization jobs (LoRA
//! training), evaluation, the promotion policy and rollout state machine, and the controller that
//! schedules runs (cron, drift, on request) and carries each through. Runs off the serving path and
//! never touches HTTP.

pub mod ast;
pub mod controller;
pub mod curate;
pub mod dataset;
pub mod eval;
pub mod evaluation;
pub mod jobs;
pub mod promote;
pub mod sources;
pub mod train;
