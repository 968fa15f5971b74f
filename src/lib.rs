//! Flywheel: an OpenAI-compatible inference gateway with the data flywheel inside it.
//! `ARCHITECTURE.md` at the repository's root maps these modules and the contracts between them.

pub mod api;
pub mod backend;
pub mod background;
pub mod cli;
pub mod config;
pub mod engine;
pub mod flywheel;
pub mod gateway;
pub mod names;
pub mod ops;
pub mod rails;
pub mod store;
pub mod wire;

/// mimalloc keeps freed pages for reuse: training and batched inference allocate and free
/// many-megabyte activations every step, which glibc returns to the kernel and faults back in
/// zeroed (measured: ~15% of a LoRA training step went to page clearing). The unit-test build
/// links this library a second time (the dev-dependency that turns on `testing`), whose allocator
/// it then uses; two would clash.
#[cfg(not(test))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
