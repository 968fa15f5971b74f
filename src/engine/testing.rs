//! Tiny random Llama models written as real GGUF files, for tests: the same loading path as a real
//! model, at a size where a test runs in milliseconds.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// GPT-2's reversible byte → printable character mapping, as byte-level BPE vocabularies use it.
pub fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in printable.iter().zip(chars) {
        out[*b as usize] = char::from_u32(c).unwrap_or('?');
    }
    out
}

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

/// Writes a 2-layer model (hidden 64, 4 heads over 2 kv heads, ffn 128) with a byte-level
/// tokenizer (256 byte tokens, a few merges, ChatML control tokens). Weights are `dtype`.
#[allow(clippy::unwrap_used)]
pub fn write_tiny_llama(path: &Path, dtype: GgmlDType, seed: u64) {
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
    let template = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("llama.block_count", u(layers as u32)),
        ("llama.embedding_length", u(hidden as u32)),
        ("llama.feed_forward_length", u(ffn as u32)),
        ("llama.attention.head_count", u(heads as u32)),
        ("llama.attention.head_count_kv", u(kv_heads as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.context_length", u(256)),
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
