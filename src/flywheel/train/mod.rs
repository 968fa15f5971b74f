//! LoRA supervised fine-tuning on the local base model.

pub mod model;
