//! Flywheel: an OpenAI-compatible inference gateway with the data flywheel inside it.
//! See ARCHITECTURE.md in the shared folder for the map of these modules.

pub mod api;
pub mod backend;
pub mod cli;
pub mod config;
pub mod engine;
pub mod flywheel;
pub mod gateway;
pub mod ops;
pub mod store;
