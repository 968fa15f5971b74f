//! Tiny random Llama models written as real GGUF files, for tests: the same loading path as a real
//! model, at a size where a test runs in milliseconds. Compiled for unit tests and, through the
//! `testing` feature, for the integration tests and benches; never into the shipped binary.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::tokenizer::byte_chars;

/// A deterministic pseudo-random tensor with values in (-scale, scale).
fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap_or_else(|_| {
        Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu)
            .unwrap_or_else(|_| unreachable_tensor())
    })
}

#[allow(clippy::panic)]
fn unreachable_tensor() -> Tensor {
    panic!("cannot allocate a test tensor")
}

/// ChatML, the tiny model's default template.
pub const TINY_CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A ChatML template that renders tools itself, compactly (a system line naming them) and writes
/// assistant tool calls as `<tool_call>` blocks: a model family with native tool syntax.
pub const TINY_TOOLS_TEMPLATE: &str = "{%- if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n{% endif -%}{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}{% for c in m.tool_calls or [] %}<tool_call>\n{\"name\":\"{{ c.function.name }}\",\"arguments\":{{ c.function.arguments | tojson(separators=(',', ':')) }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor -%}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Writes a 2-layer model (hidden 64, 4 heads over 2 kv heads, ffn 128) with a byte-level
/// tokenizer (256 byte tokens, a few merges, ChatML control tokens). Weights are `dtype`.
pub fn write_tiny_llama(path: &Path, dtype: GgmlDType, seed: u64) {
    write_tiny_llama_with_template(path, dtype, seed, TINY_CHATML);
}

/// [`write_tiny_llama`] with another chat template.
#[allow(clippy::unwrap_used)]
pub fn write_tiny_llama_with_template(path: &Path, dtype: GgmlDType, seed: u64, template: &str) {
    let (hidden, heads, kv_heads, ffn, layers) = (64usize, 4usize, 2usize, 128usize, 2usize);
    let head_dim = hidden / heads;
    let mut tokens: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    let merges = ["h e", "l l", "he ll", "Ġ w"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let mut types = vec![1i32; tokens.len()];
    for s in specials {
        tokens.push(s.to_string());
        types.push(3);
    }
    let vocab = tokens.len();
    let eos = (vocab - 1) as u32;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut k = seed;
    let mut add = |name: String, shape: &[usize], scale: f32, dtype: GgmlDType| {
        k += 1;
        // A negative scale asks for a norm weight: near one.
        let t = if scale < 0.0 {
            (random(shape, k, 0.1) + 1.0).unwrap()
        } else {
            random(shape, k, scale)
        };
        tensors.push((name, QTensor::quantize(&t, dtype).unwrap()));
    };
    add("token_embd.weight".into(), &[vocab, hidden], 0.5, dtype);
    for i in 0..layers {
        add(
            format!("blk.{i}.attn_q.weight"),
            &[hidden, hidden],
            0.2,
            dtype,
        );
        add(
            format!("blk.{i}.attn_k.weight"),
            &[kv_heads * head_dim, hidden],
            0.2,
            dtype,
        );
        add(
            format!("blk.{i}.attn_v.weight"),
            &[kv_heads * head_dim, hidden],
            0.2,
            dtype,
        );
        add(
            format!("blk.{i}.attn_output.weight"),
            &[hidden, hidden],
            0.2,
            dtype,
        );
        add(
            format!("blk.{i}.ffn_gate.weight"),
            &[ffn, hidden],
            0.2,
            dtype,
        );
        add(format!("blk.{i}.ffn_up.weight"), &[ffn, hidden], 0.2, dtype);
        add(
            format!("blk.{i}.ffn_down.weight"),
            &[hidden, ffn],
            0.2,
            dtype,
        );
        add(
            format!("blk.{i}.attn_norm.weight"),
            &[hidden],
            -1.0,
            GgmlDType::F32,
        );
        add(
            format!("blk.{i}.ffn_norm.weight"),
            &[hidden],
            -1.0,
            GgmlDType::F32,
        );
    }
    add("output_norm.weight".into(), &[hidden], -1.0, GgmlDType::F32);

    let s = |v: &str| Value::String(v.to_string());
    let u = Value::U32;
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("llama.block_count", u(layers as u32)),
        ("llama.embedding_length", u(hidden as u32)),
        ("llama.feed_forward_length", u(ffn as u32)),
        ("llama.attention.head_count", u(heads as u32)),
        ("llama.attention.head_count_kv", u(kv_heads as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.context_length", u(2048)),
        ("tokenizer.ggml.model", s("gpt2")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", u(eos - 1)),
        ("tokenizer.ggml.eos_token_id", u(eos)),
        ("tokenizer.chat_template", s(template)),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &ts).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{LlamaModel, WeightFormat};

    fn load(path: &Path, format: WeightFormat) -> LlamaModel {
        let mut f = std::fs::File::open(path).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        LlamaModel::from_gguf(&content, &mut f, format, 256, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn incremental_decoding_matches_one_full_prefill() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama(&path, GgmlDType::F32, 1);
        for format in [WeightFormat::F32, WeightFormat::Q8_0, WeightFormat::Native] {
            let m = load(&path, format);
            let toks = [5u32, 17, 99, 3, 250, 42, 7];
            let mut full = m.new_cache();
            let want = m
                .forward(&[&toks], &mut [&mut full])
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let mut inc = m.new_cache();
            m.forward(&[&toks[..3]], &mut [&mut inc]).unwrap();
            let mut got = Vec::new();
            for t in &toks[3..] {
                got = m
                    .forward(&[&[*t]], &mut [&mut inc])
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
            }
            assert_eq!(inc.len(), toks.len());
            let d = max_diff(&want[0], &got[0]);
            assert!(d < 1e-3, "{format:?}: prefill vs incremental differ by {d}");
        }
    }

    #[test]
    fn a_mixed_batch_equals_each_sequence_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama(&path, GgmlDType::Q8_0, 2);
        let m = load(&path, WeightFormat::Q8_0);
        let prompts: [&[u32]; 3] = [
            &[1, 2, 3, 4, 5],
            &[200, 201],
            &[9, 8, 7, 6, 5, 4, 3, 2, 1, 60],
        ];
        // Alone: prefill, then two decode steps each.
        let mut alone = Vec::new();
        for p in prompts {
            let mut c = m.new_cache();
            m.forward(&[p], &mut [&mut c]).unwrap();
            m.forward(&[&[11]], &mut [&mut c]).unwrap();
            alone.push(
                m.forward(&[&[12]], &mut [&mut c])
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap()
                    .remove(0),
            );
        }
        // Together: one batched prefill of different lengths, then batched decode steps.
        let mut caches: Vec<_> = prompts.iter().map(|_| m.new_cache()).collect();
        {
            let mut refs: Vec<&mut _> = caches.iter_mut().collect();
            m.forward(&prompts, &mut refs).unwrap();
            m.forward(&[&[11], &[11], &[11]], &mut refs).unwrap();
        }
        let mut refs: Vec<&mut _> = caches.iter_mut().collect();
        let together = m
            .forward(&[&[12], &[12], &[12]], &mut refs)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            let d = max_diff(a, b);
            assert!(d < 1e-3, "sequence {i}: batched and alone differ by {d}");
        }
    }

    #[test]
    fn the_context_limit_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama(&path, GgmlDType::F32, 3);
        let mut f = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        let m =
            LlamaModel::from_gguf(&content, &mut f, WeightFormat::F32, 8, &Device::Cpu).unwrap();
        let mut c = m.new_cache();
        let err = m
            .forward(&[&[1; 9]], &mut [&mut c])
            .unwrap_err()
            .to_string();
        assert!(err.contains("context length 8"), "{err}");
    }
}

/// Writes a PEFT adapter for the tiny model (hidden 64, 4 heads / 2 kv heads, ffn 128, 2 layers)
/// with random A and B for `targets`, in Hugging Face's (un-permuted) layout.
#[allow(clippy::unwrap_used)]
pub fn write_tiny_adapter(dir: &Path, rank: usize, alpha: f64, targets: &[&str], seed: u64) {
    let (hidden, kv, ffn) = (64usize, 32usize, 128usize);
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets,
        "base_model_name_or_path": "tiny", "bias": "none", "task_type": "CAUSAL_LM"
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut tensors = std::collections::HashMap::new();
    let mut k = seed * 1000;
    for layer in 0..2 {
        for t in targets {
            let (inp, out, block) = match *t {
                "q_proj" => (hidden, hidden, "self_attn"),
                "k_proj" | "v_proj" => (hidden, kv, "self_attn"),
                "o_proj" => (hidden, hidden, "self_attn"),
                "gate_proj" | "up_proj" => (hidden, ffn, "mlp"),
                _ => (ffn, hidden, "mlp"),
            };
            let prefix = format!("base_model.model.model.layers.{layer}.{block}.{t}");
            k += 2;
            tensors.insert(
                format!("{prefix}.lora_A.weight"),
                random(&[rank, inp], k, 0.3),
            );
            tensors.insert(
                format!("{prefix}.lora_B.weight"),
                random(&[out, rank], k + 1, 0.3),
            );
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
}

#[cfg(test)]
mod lora_tests {
    use super::*;
    use crate::engine::lora::{AdapterBits, LoraAdapter};
    use crate::engine::model::{LlamaModel, WeightFormat};

    use crate::engine::lora::MODULES as ALL;

    fn load(path: &Path) -> LlamaModel {
        let mut f = std::fs::File::open(path).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        LlamaModel::from_gguf(&content, &mut f, WeightFormat::F32, 256, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Writes a copy of the GGUF model at `src` with W + scale·B·A merged into every targeted weight
    /// (B's q/k rows permuted into GGUF's layout), straight from the adapter files.
    fn write_merged(src: &Path, adapter_dir: &Path, dst: &Path, scale: f64) {
        let mut f = std::fs::File::open(src).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        let lora = candle_core::safetensors::load(
            adapter_dir.join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let gguf_name = |m: &str| match m {
            "q_proj" => "attn_q",
            "k_proj" => "attn_k",
            "v_proj" => "attn_v",
            "o_proj" => "attn_output",
            "gate_proj" => "ffn_gate",
            "up_proj" => "ffn_up",
            _ => "ffn_down",
        };
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        for name in content.tensor_infos.keys() {
            let q = content.tensor(&mut f, name, &Device::Cpu).unwrap();
            let mut w = q.dequantize(&Device::Cpu).unwrap();
            for layer in 0..2 {
                for m in ALL {
                    if *name != format!("blk.{layer}.{}.weight", gguf_name(m)) {
                        continue;
                    }
                    let block = if m.ends_with("_proj")
                        && ["gate_proj", "up_proj", "down_proj"].contains(&m)
                    {
                        "mlp"
                    } else {
                        "self_attn"
                    };
                    let prefix = format!("base_model.model.model.layers.{layer}.{block}.{m}");
                    let (Some(a), Some(b)) = (
                        lora.get(&format!("{prefix}.lora_A.weight")),
                        lora.get(&format!("{prefix}.lora_B.weight")),
                    ) else {
                        continue;
                    };
                    let mut b = b.clone();
                    let heads = match m {
                        "q_proj" => Some(4),
                        "k_proj" => Some(2),
                        _ => None,
                    };
                    if let Some(h) = heads {
                        let (out, r) = b.dims2().unwrap();
                        b = b
                            .reshape((h, 2, out / h / 2, r))
                            .unwrap()
                            .transpose(1, 2)
                            .unwrap()
                            .contiguous()
                            .unwrap()
                            .reshape((out, r))
                            .unwrap();
                    }
                    w = (w + (b.matmul(a).unwrap() * scale).unwrap()).unwrap();
                }
            }
            tensors.push((name.clone(), QTensor::quantize(&w, GgmlDType::F32).unwrap()));
        }
        let md: Vec<(&str, &Value)> = content
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut std::fs::File::create(dst).unwrap(), &md, &ts).unwrap();
    }

    /// A tiny model loaded with Q8_0 weights, and a rank-`rank` adapter on all seven projections
    /// beside it.
    fn q8_base_and_adapter(
        dir: &Path,
        rank: usize,
        alpha: f64,
    ) -> (LlamaModel, std::path::PathBuf) {
        let base = dir.join("base.gguf");
        write_tiny_llama(&base, GgmlDType::F32, 11);
        let adir = dir.join("adapter");
        write_tiny_adapter(&adir, rank, alpha, &ALL, 1);
        let mut f = std::fs::File::open(&base).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        let m =
            LlamaModel::from_gguf(&content, &mut f, WeightFormat::Q8_0, 256, &Device::Cpu).unwrap();
        (m, adir)
    }

    /// The logits after a fixed six-token prompt, with `a` or no adapter.
    fn last_logits(m: &LlamaModel, a: Option<&LoraAdapter>) -> Vec<f32> {
        let toks = [3u32, 50, 100, 7, 9, 200];
        let mut c = m.new_cache();
        m.forward_with(&[&toks], &mut [&mut c], &[a])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .remove(0)
    }

    /// On a Q8_0 base the engine quantizes adapters too: the logits move by the adapter as much
    /// as with the f32 adapter, within int8 error of it.
    #[test]
    fn a_quantized_adapter_on_a_q8_base_tracks_the_f32_adapter() {
        let dir = tempfile::tempdir().unwrap();
        let (m, adir) = q8_base_and_adapter(dir.path(), 4, 8.0);
        let exact = LoraAdapter::load("t/a", "tiny", &adir, &m.cfg, true).unwrap();
        let mut quant = LoraAdapter::load("t/a", "tiny", &adir, &m.cfg, true).unwrap();
        quant.quantize_q8();
        assert!(
            quant.bytes() * 3 < exact.bytes(),
            "{} vs {}",
            quant.bytes(),
            exact.bytes()
        );
        let run = |a: Option<&LoraAdapter>| last_logits(&m, a);
        let (bare, want, got) = (run(None), run(Some(&exact)), run(Some(&quant)));
        // Quantized while loading (as the engine does): the same adapter, bit for bit.
        let direct = LoraAdapter::load_q8("t/a", "tiny", &adir, &m.cfg, true).unwrap();
        assert_eq!(direct.bytes(), quant.bytes());
        assert_eq!(run(Some(&direct)), got);
        let effect = max_diff(&bare, &want);
        assert!(effect > 1e-2, "the adapter changes the logits ({effect})");
        let err = max_diff(&got, &want);
        assert!(
            err < 0.05 * effect,
            "quantized {err} off, against an effect of {effect}"
        );
    }

    /// With `adapter_bits = 4` the adapter is held in about 55% of its int8 bytes and still
    /// moves the logits as the f32 adapter does, within 4-bit error (coarser than int8's).
    #[test]
    fn a_four_bit_adapter_tracks_the_f32_adapter_within_its_precision() {
        let dir = tempfile::tempdir().unwrap();
        let (m, adir) = q8_base_and_adapter(dir.path(), 8, 16.0);
        let load_as = |bits| LoraAdapter::load_as("t/a", "tiny", &adir, &m.cfg, true, bits);
        let exact = load_as(None).unwrap();
        let q8 = load_as(Some(AdapterBits::Eight)).unwrap();
        let q4 = load_as(Some(AdapterBits::Four)).unwrap();
        assert!(
            q4.bytes() * 10 < q8.bytes() * 7,
            "4-bit {} bytes against int8 {}",
            q4.bytes(),
            q8.bytes()
        );
        let run = |a: Option<&LoraAdapter>| last_logits(&m, a);
        let (bare, want) = (run(None), run(Some(&exact)));
        let (got8, got4) = (run(Some(&q8)), run(Some(&q4)));
        let effect = max_diff(&bare, &want);
        assert!(effect > 1e-2, "the adapter changes the logits ({effect})");
        let (err8, err4) = (max_diff(&got8, &want), max_diff(&got4, &want));
        assert!(
            err4 > err8,
            "4 bits ({err4}) are coarser than int8 ({err8})"
        );
        // Measured: int8 2% of the effect, 4 bits 21% (this tiny random model's two layers
        // compound the factors' error); a factor laid out wrongly would be off by the effect.
        assert!(
            err4 < 0.4 * effect,
            "4-bit {err4} off, against an effect of {effect}"
        );
    }

    #[test]
    fn the_lora_delta_equals_explicitly_merged_weights() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.gguf");
        write_tiny_llama(&base, GgmlDType::F32, 11);
        let adir = dir.path().join("adapter");
        write_tiny_adapter(&adir, 4, 8.0, &ALL, 1);
        let merged = dir.path().join("merged.gguf");
        write_merged(&base, &adir, &merged, 8.0 / 4.0);
        let m = load(&base);
        let adapter = LoraAdapter::load("t/a", "tiny", &adir, &m.cfg, true).unwrap();
        assert_eq!(adapter.scale, 2.0);
        let reference = load(&merged);
        let toks = [3u32, 50, 100, 7, 9, 200];
        let mut c1 = m.new_cache();
        let got = m
            .forward_with(&[&toks], &mut [&mut c1], &[Some(&adapter)])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut c2 = reference.new_cache();
        let want = reference
            .forward(&[&toks], &mut [&mut c2])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let d = max_diff(&got[0], &want[0]);
        assert!(d < 1e-3, "adapter vs merged differ by {d}");
        // And the adapter really changes the output.
        let mut c3 = m.new_cache();
        let bare = m
            .forward(&[&toks], &mut [&mut c3])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(max_diff(&bare[0], &want[0]) > 1e-2);
    }

    #[test]
    fn a_batch_mixing_adapters_and_the_bare_base_equals_each_alone() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.gguf");
        write_tiny_llama(&base, GgmlDType::F32, 12);
        let m = load(&base);
        let a1 = dir.path().join("a1");
        let a2 = dir.path().join("a2");
        write_tiny_adapter(&a1, 4, 16.0, &["q_proj", "v_proj", "down_proj"], 2);
        write_tiny_adapter(&a2, 8, 8.0, &ALL, 3);
        let a1 = LoraAdapter::load("t/a1", "tiny", &a1, &m.cfg, true).unwrap();
        let a2 = LoraAdapter::load("t/a2", "tiny", &a2, &m.cfg, true).unwrap();
        let prompts: [&[u32]; 4] = [&[1, 2, 3], &[4, 5], &[6, 7, 8, 9], &[10]];
        let which = [Some(&a1), None, Some(&a2), Some(&a1)];
        let mut alone = Vec::new();
        for (p, a) in prompts.iter().zip(which) {
            let mut c = m.new_cache();
            m.forward_with(&[p], &mut [&mut c], &[a]).unwrap();
            alone.push(
                m.forward_with(&[&[42]], &mut [&mut c], &[a])
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap()
                    .remove(0),
            );
        }
        let mut caches: Vec<_> = prompts.iter().map(|_| m.new_cache()).collect();
        let mut refs: Vec<&mut _> = caches.iter_mut().collect();
        m.forward_with(&prompts, &mut refs, &which).unwrap();
        let together = m
            .forward_with(&[&[42], &[42], &[42], &[42]], &mut refs, &which)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for i in 0..4 {
            let d = max_diff(&alone[i], &together[i]);
            assert!(d < 1e-3, "sequence {i} differs by {d}");
        }
    }

    #[test]
    fn an_adapter_for_another_base_is_refused_with_the_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.gguf");
        write_tiny_llama(&base, GgmlDType::F32, 13);
        let m = load(&base);
        let adir = dir.path().join("a");
        write_tiny_adapter(&adir, 4, 8.0, &["q_proj"], 4);
        let mut cfg = m.cfg.clone();
        cfg.hidden = 128;
        let err = LoraAdapter::load("t/a", "other", &adir, &cfg, true)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("hidden size 128") && err.contains("another base"),
            "{err}"
        );
        std::fs::write(adir.join("adapter_model.safetensors"), b"not safetensors").unwrap();
        let err = LoraAdapter::load("t/a", "tiny", &adir, &m.cfg, true)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("cannot read"), "{err}");
    }
}

/// Converts a tiny GGUF model into a Hugging Face directory (un-permuting q/k rows back to
/// Hugging Face's layout), so both loaders can be compared on the same weights.
#[allow(clippy::unwrap_used)]
pub fn write_hf_dir_from_gguf(gguf: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut f = std::fs::File::open(gguf).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let (heads, kv_heads) = (4usize, 2usize);
    let mut tensors = std::collections::HashMap::new();
    for name in content.tensor_infos.keys() {
        let mut t = content
            .tensor(&mut f, name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let h = if name.ends_with("attn_q.weight") {
            Some(heads)
        } else if name.ends_with("attn_k.weight") {
            Some(kv_heads)
        } else {
            None
        };
        if let Some(h) = h {
            let (out, inp) = t.dims2().unwrap();
            t = t
                .reshape((h, out / h / 2, 2, inp))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((out, inp))
                .unwrap();
        }
        let hf = name
            .replace("token_embd.weight", "model.embed_tokens.weight")
            .replace("output_norm.weight", "model.norm.weight")
            .replace("blk.", "model.layers.")
            .replace("attn_q", "self_attn.q_proj")
            .replace("attn_k", "self_attn.k_proj")
            .replace("attn_v", "self_attn.v_proj")
            .replace("attn_output", "self_attn.o_proj")
            .replace("ffn_gate", "mlp.gate_proj")
            .replace("ffn_up", "mlp.up_proj")
            .replace("ffn_down", "mlp.down_proj")
            .replace("attn_norm", "input_layernorm")
            .replace("ffn_norm", "post_attention_layernorm");
        tensors.insert(hf, t);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": true, "vocab_size": 263
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tok = crate::engine::tokenizer::from_gguf(&content).unwrap();
    tok.tokenizer
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    let template = content.metadata["tokenizer.chat_template"]
        .to_string()
        .unwrap()
        .clone();
    let tc = serde_json::json!({"chat_template": template, "eos_token": "<|im_end|>", "bos_token": {"content": "<|im_start|>"}});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

#[cfg(test)]
mod hf_tests {
    use super::*;
    use crate::engine::lora::{LoraAdapter, MODULES};
    use crate::engine::model::{LlamaModel, WeightFormat};

    #[test]
    fn a_hugging_face_directory_and_its_gguf_give_the_same_logits_with_and_without_an_adapter() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("m.gguf");
        write_tiny_llama(&gguf, GgmlDType::F32, 31);
        let hf = dir.path().join("hf");
        write_hf_dir_from_gguf(&gguf, &hf);
        let mut f = std::fs::File::open(&gguf).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        let a =
            LlamaModel::from_gguf(&content, &mut f, WeightFormat::F32, 256, &Device::Cpu).unwrap();
        let b = LlamaModel::from_hf_dir(&hf, WeightFormat::F32, 256, &Device::Cpu).unwrap();
        assert!(a.gguf_layout() && !b.gguf_layout());
        assert!((a.cfg.rms_eps - b.cfg.rms_eps).abs() < 1e-9);
        let mut same_eps = b.cfg.clone();
        same_eps.rms_eps = a.cfg.rms_eps;
        assert_eq!(a.cfg, same_eps);
        let adir = dir.path().join("adapter");
        write_tiny_adapter(&adir, 4, 8.0, &MODULES, 7);
        let la = LoraAdapter::load("t/a", "gguf", &adir, &a.cfg, true).unwrap();
        let lb = LoraAdapter::load("t/a", "hf", &adir, &b.cfg, false).unwrap();
        let toks = [3u32, 40, 7, 100, 22];
        for (ad_a, ad_b) in [(None, None), (Some(&la), Some(&lb))] {
            let (mut ca, mut cb) = (a.new_cache(), b.new_cache());
            let x = a
                .forward_with(&[&toks], &mut [&mut ca], &[ad_a])
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let y = b
                .forward_with(&[&toks], &mut [&mut cb], &[ad_b])
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let d = x[0]
                .iter()
                .zip(&y[0])
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(
                d < 1e-3,
                "adapter {}: GGUF and HF logits differ by {d}",
                ad_a.is_some()
            );
        }
    }
}
