//! The decoder families the engine runs, and what sets them apart.
//!
//! Llama 3.x, Mistral, Qwen2/2.5 and Qwen3 are the same pre-norm decoder (RMSNorm, grouped-query
//! attention with RoPE, a SiLU-gated MLP), so they share one forward pass (`model.rs`) and one
//! training pass (`flywheel::train`). What differs is declared here, once: the names each file
//! format gives the family, the optional tensors a layer of it carries (q/k/v biases in Qwen2, a
//! per-head RMSNorm of queries and keys in Qwen3), how its GGUF files pair q/k dimensions for RoPE,
//! and how its Hugging Face config is read. Anything else is refused at load with the list below,
//! never run into a garbage answer.

use crate::ops::RopeStyle;

use super::model::ModelError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3.x, SmolLM, and Llama-shaped fine-tunes.
    Llama,
    /// Mistral 7B and Ministral: Llama's blocks, with a sliding attention window in some configs.
    Mistral,
    /// Qwen2 and Qwen2.5: biases on the q, k and v projections.
    Qwen2,
    /// Qwen3 dense: an RMSNorm over each head of the queries and keys, before RoPE; a head width
    /// of its own (`head_dim`), not hidden / heads.
    Qwen3,
}

/// Every supported family, as the start-up error lists them.
pub const SUPPORTED: &str = "llama (Llama 2/3.x, SmolLM), mistral (Mistral, Ministral), qwen2 (Qwen2, Qwen2.5), qwen3 (Qwen3 dense)";

impl Architecture {
    /// From GGUF's `general.architecture`.
    pub fn from_gguf(name: &str) -> Result<Self, ModelError> {
        match name {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            other => Err(unsupported(other)),
        }
    }

    /// From the first entry of `architectures` in a Hugging Face `config.json`.
    pub fn from_hf(name: &str) -> Result<Self, ModelError> {
        match name {
            "LlamaForCausalLM" => Ok(Self::Llama),
            "MistralForCausalLM" => Ok(Self::Mistral),
            "Qwen2ForCausalLM" => Ok(Self::Qwen2),
            "Qwen3ForCausalLM" => Ok(Self::Qwen3),
            other => Err(unsupported(other)),
        }
    }

    /// The name GGUF metadata keys are prefixed with.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    /// How a GGUF file of this family lays out q/k rows: llama.cpp's converter permutes Llama and
    /// Mistral rows for interleaved pairs and leaves Qwen's in Hugging Face's halves (NeoX style).
    pub fn gguf_rope(self) -> RopeStyle {
        match self {
            Self::Llama | Self::Mistral => RopeStyle::Interleaved,
            Self::Qwen2 | Self::Qwen3 => RopeStyle::Halves,
        }
    }

    /// Whether every layer must carry q/k/v biases (other families may have them when their
    /// config says `attention_bias`; the loader takes them wherever the file has them).
    pub fn requires_qkv_bias(self) -> bool {
        self == Self::Qwen2
    }

    /// Whether every layer normalizes each query and key head before RoPE.
    pub fn qk_norm(self) -> bool {
        self == Self::Qwen3
    }
}

fn unsupported(name: &str) -> ModelError {
    ModelError::Unsupported(format!("architecture '{name}'; supported: {SUPPORTED}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_name_every_family_and_refuse_others_with_the_list() {
        for a in [
            Architecture::Llama,
            Architecture::Mistral,
            Architecture::Qwen2,
            Architecture::Qwen3,
        ] {
            assert_eq!(Architecture::from_gguf(a.gguf_name()).unwrap(), a);
        }
        assert_eq!(
            Architecture::from_hf("Qwen2ForCausalLM").unwrap(),
            Architecture::Qwen2
        );
        let err = Architecture::from_gguf("gemma3").unwrap_err().to_string();
        assert!(err.contains("gemma3") && err.contains("qwen3"), "{err}");
        let err = Architecture::from_hf("Qwen3MoeForCausalLM")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Qwen3MoeForCausalLM") && err.contains("llama"),
            "{err}"
        );
    }
}
