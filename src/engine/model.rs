//! The decoder every supported family shares (Llama, Mistral, Qwen2, Qwen3; `arch.rs` says what
//! sets each apart) over candle tensors, with a per-sequence KV cache and a forward pass over any
//! mix of sequences: one prefill of many tokens and many one-token decode steps go through the same
//! batched matmuls.

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::arch::Architecture;
use super::lora::{LoraAdapter, ModuleLora};
use crate::ops::attention::{attention, SeqAttention};
use crate::ops::lora::{lora_add, ModuleSlot};
use crate::ops::qgemm::{Q8Matrix, QuantRows};
use crate::ops::{self, rows, RopeStyle};
use half::f16;

/// The shape of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub arch: Architecture,
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub rms_eps: f64,
    pub context_length: usize,
}

impl LlamaConfig {
    /// Width of the queries of all heads together (the o projection's input): hidden size in
    /// most families, not in Qwen3's.
    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of the keys (and of the values) of all kv heads together.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Refuses head counts and widths the attention kernels cannot run.
    pub fn validate(&self) -> Result<(), ModelError> {
        let (heads, kv_heads, hd) = (self.heads, self.kv_heads, self.head_dim);
        if heads == 0
            || kv_heads == 0
            || hd == 0
            || !hd.is_multiple_of(2)
            || !heads.is_multiple_of(kv_heads)
            || heads / kv_heads > crate::ops::attention::MAX_GROUP
        {
            return Err(ModelError::Unsupported(format!(
                "{heads} heads / {kv_heads} kv heads of width {hd} over hidden size {}",
                self.hidden
            )));
        }
        Ok(())
    }
}

/// The per-layer tensors only some families have, read with the checks that keep a file of the
/// wrong shape from loading.
pub struct LayerExtras {
    /// q, k and v biases stacked, ((heads + 2 kv_heads) * head_dim,).
    pub qkv_bias: Option<Tensor>,
    /// The query and key heads' RMSNorm weights, (head_dim,) each.
    pub qk_norm: Option<(Tensor, Tensor)>,
}

impl LayerExtras {
    pub fn read(
        src: &mut ModelSource<'_>,
        cfg: &LlamaConfig,
        layer: usize,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let name = |s: &str| format!("blk.{layer}.{s}");
        let qkv_bias = match src.tensor(&name("attn_q.bias"))? {
            None if cfg.arch.requires_qkv_bias() => {
                return Err(ModelError::Missing(format!(
                    "tensor {} ({:?} layers carry q/k/v biases)",
                    name("attn_q.bias"),
                    cfg.arch
                )))
            }
            None => None,
            Some(q) => {
                let k = src.require(&name("attn_k.bias"))?;
                let v = src.require(&name("attn_v.bias"))?;
                let parts = [q, k, v]
                    .iter()
                    .map(|t| t.dequantize(device)?.flatten_all())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let bias = Tensor::cat(&parts, 0)?;
                let want = cfg.q_width() + 2 * cfg.kv_width();
                if bias.dim(0)? != want {
                    return Err(ModelError::Unsupported(format!(
                        "layer {layer}'s q/k/v biases hold {} values for {want} outputs",
                        bias.dim(0)?
                    )));
                }
                Some(bias)
            }
        };
        let qk_norm = if cfg.arch.qk_norm() {
            let q = src.require(&name("attn_q_norm.weight"))?;
            let k = src.require(&name("attn_k_norm.weight"))?;
            let (q, k) = (
                q.dequantize(device)?.flatten_all()?,
                k.dequantize(device)?.flatten_all()?,
            );
            if q.dim(0)? != cfg.head_dim || k.dim(0)? != cfg.head_dim {
                return Err(ModelError::Unsupported(format!(
                    "layer {layer}'s q/k norms are not {} wide",
                    cfg.head_dim
                )));
            }
            Some((q, k))
        } else {
            None
        };
        Ok(Self { qkv_bias, qk_norm })
    }
}

/// How RoPE frequencies are stretched for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by the factor.
    Linear(f32),
    /// Llama 3's scheme: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: f32,
    },
    /// Per-frequency divisors, as GGUF files store Llama 3's scaling (`rope_freqs.weight`).
    Factors(Vec<f32>),
}

/// How projection weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// As stored in the file.
    Native,
    /// Re-quantized to Q8_0 at load: ~1.5x faster than Q4_1 on AVX2 at one row (shared/PERF-FACTS.md).
    #[default]
    Q8_0,
    /// Dequantized to f32: fastest once a batch has ~8+ rows, 4x the memory of Q8_0.
    F32,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("model file lacks '{0}'")]
    Missing(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Device(#[from] crate::ops::device::DeviceError),
    #[error("{0}")]
    Shape(#[from] crate::ops::sgemm::ShapeError),
}

/// A projection matrix in one of the in-memory formats.
enum Proj {
    /// candle's kernels: the file's own quantization, or f32.
    Candle(QMatMul),
    /// The batched Q8_0 kernel in `ops::qgemm`.
    Q8(Q8Matrix),
}

struct Layer {
    attn_norm: Vec<f32>,
    /// q, k and v rows stacked: (heads + 2 kv_heads) * head_dim outputs.
    qkv: Proj,
    /// The q, k and v biases in the same order (Qwen2), added after the projection and its
    /// adapters.
    qkv_bias: Option<Vec<f32>>,
    /// RMSNorm weights over each query head and each key head (Qwen3): (head_dim,) each.
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    o: Proj,
    ffn_norm: Vec<f32>,
    /// gate and up rows stacked: 2 * ffn outputs.
    gate_up: Proj,
    down: Proj,
}

pub struct LlamaModel {
    pub cfg: LlamaConfig,
    embed: Arc<QTensor>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    head: Proj,
    rope_style: RopeStyle,
    /// (context_length, head_dim / 2)
    cos: Vec<f32>,
    sin: Vec<f32>,
    device: Device,
}

/// One layer's cached keys and values for one sequence, in f16 (as llama.cpp keeps them): decode
/// attention streams the whole cache every step, so its bytes are what a long batch waits on.
#[derive(Default)]
struct LayerCache {
    /// Token-major: (positions, kv_heads, head_dim).
    k: Vec<f16>,
    v: Vec<f16>,
}

/// A sequence's KV cache.
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| LayerCache::default()).collect(),
            len: 0,
        }
    }

    /// Tokens already in the cache (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// A copy of the first `n` positions (all of them if the cache holds fewer).
    pub fn prefix(&self, n: usize) -> Self {
        let n = n.min(self.len);
        Self {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    let width = l.k.len().checked_div(self.len).unwrap_or(0);
                    LayerCache {
                        k: l.k[..n * width].to_vec(),
                        v: l.v[..n * width].to_vec(),
                    }
                })
                .collect(),
            len: n,
        }
    }

    /// A cache of `len` positions of `width` values per layer, position p holding the value p.
    #[cfg(test)]
    pub(crate) fn filled(n_layers: usize, len: usize, width: usize) -> Self {
        let data: Vec<f16> = (0..len)
            .flat_map(|p| std::iter::repeat_n(f16::from_f32(p as f32), width))
            .collect();
        Self {
            layers: (0..n_layers)
                .map(|_| LayerCache {
                    k: data.clone(),
                    v: data.clone(),
                })
                .collect(),
            len,
        }
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len()) * std::mem::size_of::<f16>())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Stacks 2-D quantized or float tensors along their rows into one matrix of the chosen format.
fn stack_rows(
    parts: &[QTensor],
    format: WeightFormat,
    device: &Device,
) -> Result<Proj, ModelError> {
    let same_dtype = parts.windows(2).all(|w| w[0].dtype() == w[1].dtype());
    let native_quantized = !matches!(
        parts[0].dtype(),
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
    );
    if format == WeightFormat::Native && same_dtype && native_quantized {
        // Quantized blocks run along a row, so rows stack by concatenating their bytes.
        let mut bytes = Vec::new();
        let mut rows = 0;
        let cols = parts[0].shape().dims2()?.1;
        for p in parts {
            bytes.extend_from_slice(&p.data()?);
            rows += p.shape().dims2()?.0;
        }
        let storage = candle_core::quantized::QStorage::from_data(
            std::borrow::Cow::Owned(bytes),
            device,
            parts[0].dtype(),
        )?;
        return Ok(Proj::Candle(QMatMul::from_qtensor(QTensor::new(
            storage,
            (rows, cols),
        )?)?));
    }
    let dense: Vec<Tensor> = parts
        .iter()
        .map(|p| p.dequantize(device))
        .collect::<Result<_, _>>()?;
    let w = Tensor::cat(&dense, 0)?;
    quantized_matrix(w, format)
}

fn quantized_matrix(w: Tensor, format: WeightFormat) -> Result<Proj, ModelError> {
    let cols = w.dim(1)?;
    match format {
        WeightFormat::F32 => Ok(Proj::Candle(QMatMul::Tensor(w))),
        _ if cols % GgmlDType::Q8_0.block_size() != 0 => Ok(Proj::Candle(QMatMul::Tensor(w))),
        WeightFormat::Q8_0 => Ok(Proj::Q8(Q8Matrix::from_tensor(&w)?)),
        WeightFormat::Native => Ok(Proj::Candle(QMatMul::from_qtensor(QTensor::quantize(
            &w,
            GgmlDType::Q8_0,
        )?)?)),
    }
}

fn metadata<'a>(
    content: &'a gguf_file::Content,
    key: &str,
) -> Result<&'a gguf_file::Value, ModelError> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| ModelError::Missing(format!("metadata {key}")))
}

impl LlamaModel {
    /// Loads a Llama-architecture GGUF file's weights.
    pub fn from_gguf<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        format: WeightFormat,
        max_context: usize,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::from_source(
            ModelSource::gguf(content, reader, max_context, device)?,
            format,
            device,
        )
    }

    /// Loads a Hugging Face Llama directory (`config.json` and `*.safetensors`; bf16/f16 weights
    /// are widened to f32 at load). Its q/k rows are in Hugging Face's layout: RoPE pairs halves.
    pub fn from_hf_dir(
        dir: &Path,
        format: WeightFormat,
        max_context: usize,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::from_source(
            ModelSource::hf_dir(dir, max_context, device)?,
            format,
            device,
        )
    }

    /// True when q/k rows are in GGUF's interleaved layout (adapters trained on Hugging Face
    /// weights must be permuted to match).
    pub fn gguf_layout(&self) -> bool {
        self.rope_style == RopeStyle::Interleaved
    }

    /// Assembles the model from tensors named as in GGUF.
    pub fn from_source(
        mut src: ModelSource<'_>,
        format: WeightFormat,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let embed = Arc::new(src.require("token_embd.weight")?);
        let cfg = src.config(embed.shape().dims2()?.0);
        let rope_style = src.rope_style;
        cfg.validate()?;
        let n_layers = cfg.n_layers;
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let extras = LayerExtras::read(&mut src, &cfg, i, device)?;
            let mut tensor = |name: &str| src.require(name);
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            let q = tensor(&p("attn_q"))?;
            let k = tensor(&p("attn_k"))?;
            let v = tensor(&p("attn_v"))?;
            let o = tensor(&p("attn_output"))?;
            let gate = tensor(&p("ffn_gate"))?;
            let up = tensor(&p("ffn_up"))?;
            let down = tensor(&p("ffn_down"))?;
            layers.push(Layer {
                attn_norm: values(&tensor(&p("attn_norm"))?.dequantize(device)?)?,
                qkv: stack_rows(&[q, k, v], format, device)?,
                qkv_bias: extras.qkv_bias.as_ref().map(values).transpose()?,
                qk_norm: match &extras.qk_norm {
                    Some((q, k)) => Some((values(q)?, values(k)?)),
                    None => None,
                },
                o: stack_rows(&[o], format, device)?,
                ffn_norm: values(&tensor(&p("ffn_norm"))?.dequantize(device)?)?,
                gate_up: stack_rows(&[gate, up], format, device)?,
                down: stack_rows(&[down], format, device)?,
            });
        }
        let norm = values(&src.require("output_norm.weight")?.dequantize(device)?)?;
        // Tied embeddings: without an output matrix the embedding table doubles as the head.
        let head_q = match src.tensor("output.weight")? {
            Some(t) => Arc::new(t),
            None => embed.clone(),
        };
        let head = match format {
            WeightFormat::Q8_0 => quantized_matrix(head_q.dequantize(device)?, format)?,
            // f32 all the way: a quantized head would quantize the activations it multiplies.
            WeightFormat::F32 => Proj::Candle(QMatMul::Tensor(head_q.dequantize(device)?)),
            WeightFormat::Native => Proj::Candle(QMatMul::from_arc(head_q)?),
        };
        let (cos, sin) = rope_values(&cfg)?;
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            head,
            rope_style,
            cos,
            sin,
            device: device.clone(),
        })
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.n_layers)
    }

    /// Runs `tokens[i]` through the model on top of `caches[i]` for every sequence i, appends them
    /// to the caches, and returns the logits of each sequence's last token: (sequences, vocab).
    pub fn forward(
        &self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor, ModelError> {
        let none: Vec<Option<&LoraAdapter>> = vec![None; tokens.len()];
        self.forward_with(tokens, caches, &none)
    }

    /// `forward` where sequence i runs with `adapters[i]` (or the bare base). Rows are grouped by
    /// adapter and each group's low-rank delta is added to the shared base projections.
    pub fn forward_with(
        &self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
        adapters: &[Option<&LoraAdapter>],
    ) -> Result<Tensor, ModelError> {
        let cfg = &self.cfg;
        if adapters.len() != tokens.len() {
            return Err(ModelError::Unsupported(
                "forward needs one adapter slot per sequence".into(),
            ));
        }
        if tokens.len() != caches.len() || tokens.iter().any(|t| t.is_empty()) {
            return Err(ModelError::Unsupported(
                "forward needs one non-empty token list per cache".into(),
            ));
        }
        for (t, c) in tokens.iter().zip(caches.iter()) {
            if c.len + t.len() > cfg.context_length {
                return Err(ModelError::Unsupported(format!(
                    "sequence of {} tokens exceeds the context length {}",
                    c.len + t.len(),
                    cfg.context_length
                )));
            }
        }
        let flat: Vec<u32> = tokens.iter().flat_map(|t| t.iter().copied()).collect();
        let positions: Vec<u32> = tokens
            .iter()
            .zip(caches.iter())
            .flat_map(|(t, c)| (c.len..c.len + t.len()).map(|p| p as u32))
            .collect();
        let n = flat.len();
        let ids = Tensor::from_vec(flat, n, &self.device)?;
        let batch = Batch {
            tokens,
            n,
            positions,
            lora_rows: row_adapters(tokens, adapters),
        };
        // The residual stream and its normed copy, (n, hidden) each, as plain rows: every step
        // between the products is a row-wise pass on the worker pool (`ops::rows`).
        let mut x = values(&self.embed.embedding(&ids)?)?;
        let mut xn = vec![0f32; x.len()];
        let eps = cfg.rms_eps as f32;
        let mut scratch = Scratch {
            q: vec![0f32; n * cfg.q_width()],
            attn: vec![0f32; n * cfg.q_width()],
            act: vec![0f32; n * cfg.ffn],
        };
        // Each sequence's last row of a (rows, hidden) buffer: only these rows reach the head.
        let hidden = cfg.hidden;
        let last_rows = |v: &[f32]| {
            let mut out = Vec::with_capacity(tokens.len() * hidden);
            let mut end = 0;
            for seq in tokens {
                end += seq.len();
                out.extend_from_slice(&v[(end - 1) * hidden..end * hidden]);
            }
            out
        };
        let mut delta: Option<Vec<f32>> = None;
        // The last layer's MLP output, for the last rows only.
        let mut last_delta: Option<Vec<f32>> = None;
        let top = self.layers.len().saturating_sub(1);
        for (li, layer) in self.layers.iter().enumerate() {
            rows::add_rms_norm(&mut x, delta.as_deref(), &layer.attn_norm, eps, &mut xn);
            let a = self.attention_block(&batch, li, layer, &xn, caches, &mut scratch)?;
            rows::add_rms_norm(&mut x, Some(&a), &layer.ffn_norm, eps, &mut xn);
            if li == top {
                // Nothing reads the other rows' last MLP (their keys and values are cached
                // already), so a prompt runs it for its last row alone.
                let last = Batch {
                    tokens,
                    n: tokens.len(),
                    positions: Vec::new(),
                    lora_rows: batch.lora_rows.as_ref().map(|_| adapters.to_vec()),
                };
                let xn = last_rows(&xn);
                let act = &mut scratch.act[..tokens.len() * cfg.ffn];
                last_delta = Some(self.mlp_block(&last, li, layer, &xn, act)?);
            } else {
                delta = Some(self.mlp_block(&batch, li, layer, &xn, &mut scratch.act)?);
            }
        }
        for (seq, cache) in tokens.iter().zip(caches.iter_mut()) {
            cache.len += seq.len();
        }
        // Each sequence's last row, with the last layer's MLP added, normed, through the head.
        let mut last = last_rows(&x);
        let mut normed = vec![0f32; last.len()];
        rows::add_rms_norm(
            &mut last,
            last_delta.as_deref(),
            &self.norm,
            eps,
            &mut normed,
        );
        let logits = project(&self.head, &normed, tokens.len(), None, &[])?;
        let vocab = logits.len() / tokens.len();
        Ok(Tensor::from_vec(
            logits,
            (tokens.len(), vocab),
            &self.device,
        )?)
    }
}

impl LlamaModel {
    /// Self-attention of one layer: the normed input projected to queries, keys and values (with
    /// each row's adapter), rotary positions applied, this call's keys and values appended to
    /// each sequence's cache, attention over each whole cache, and the output projection.
    fn attention_block(
        &self,
        batch: &Batch<'_>,
        li: usize,
        layer: &Layer,
        xn: &[f32],
        caches: &mut [&mut KvCache],
        scratch: &mut Scratch,
    ) -> Result<Vec<f32>, ModelError> {
        let cfg = &self.cfg;
        let (n, h, kvh, hd) = (batch.n, cfg.heads, cfg.kv_heads, cfg.head_dim);
        // (n, (h + 2 kvh) * hd)
        let mut qkv = project(
            &layer.qkv,
            xn,
            n,
            batch.lora(li, Projection::Qkv),
            &[h * hd, kvh * hd, kvh * hd],
        )?;
        let Scratch { q, attn, .. } = scratch;
        let shape = rows::QkvShape {
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
            bias: layer.qkv_bias.as_deref(),
            head_norm: layer.qk_norm.as_ref().map(|(q, k)| (&q[..], &k[..])),
            eps: cfg.rms_eps as f32,
            rope: self.rope_style,
            cos: &self.cos,
            sin: &self.sin,
            positions: &batch.positions,
        };
        rows::prepare_qkv(&mut qkv, q, &shape);
        append_kv(batch.tokens, caches, li, &qkv, h * hd, kvh * hd);
        let mut row = 0;
        let seqs: Vec<SeqAttention<'_, f16>> = batch
            .tokens
            .iter()
            .zip(caches.iter())
            .map(|(seq, cache)| {
                let s = SeqAttention {
                    k: &cache.layers[li].k,
                    v: &cache.layers[li].v,
                    row,
                    tokens: seq.len(),
                };
                row += seq.len();
                s
            })
            .collect();
        attention(q, attn, &seqs, h, kvh, hd);
        project(
            &layer.o,
            attn,
            n,
            batch.lora(li, Projection::O),
            &[cfg.hidden],
        )
    }

    /// The gated MLP of one layer: `down(silu(gate · x) * (up · x))`, with each row's adapter.
    fn mlp_block(
        &self,
        batch: &Batch<'_>,
        li: usize,
        layer: &Layer,
        xn: &[f32],
        act: &mut [f32],
    ) -> Result<Vec<f32>, ModelError> {
        let cfg = &self.cfg;
        let gu = project(
            &layer.gate_up,
            xn,
            batch.n,
            batch.lora(li, Projection::GateUp),
            &[cfg.ffn, cfg.ffn],
        )?;
        ops::silu_mul_rows(&gu, cfg.ffn, act);
        project(
            &layer.down,
            act,
            batch.n,
            batch.lora(li, Projection::Down),
            &[cfg.hidden],
        )
    }
}

/// Buffers every layer of one forward call reuses: the queries as attention reads them, its
/// output, and the gated MLP's activations.
struct Scratch {
    q: Vec<f32>,
    attn: Vec<f32>,
    act: Vec<f32>,
}

/// What every layer of one forward call shares: the sequences' tokens, the rows in all, each
/// row's position, and each row's adapter (none when no row has one).
struct Batch<'a> {
    tokens: &'a [&'a [u32]],
    n: usize,
    positions: Vec<u32>,
    lora_rows: Option<Vec<Option<&'a LoraAdapter>>>,
}

impl Batch<'_> {
    /// The adapters' part in one projection of layer `li`.
    fn lora(
        &self,
        li: usize,
        p: Projection,
    ) -> Option<(&[Option<&LoraAdapter>], usize, Projection)> {
        self.lora_rows.as_deref().map(|rows| (rows, li, p))
    }
}

/// Appends this call's keys and values of layer `li` to each sequence's cache, in f16: rows of
/// `qkv` hold `q_width` query values, then the keys and the values (`kv_width` each), sequence
/// after sequence.
fn append_kv(
    tokens: &[&[u32]],
    caches: &mut [&mut KvCache],
    li: usize,
    qkv: &[f32],
    q_width: usize,
    kv_width: usize,
) {
    use half::slice::HalfFloatSliceExt;
    let width = q_width + 2 * kv_width;
    let mut rows = qkv.chunks_exact(width);
    for (seq, cache) in tokens.iter().zip(caches.iter_mut()) {
        let c = &mut cache.layers[li];
        let (k0, v0) = (c.k.len(), c.v.len());
        c.k.resize(k0 + seq.len() * kv_width, f16::ZERO);
        c.v.resize(v0 + seq.len() * kv_width, f16::ZERO);
        for ((row, k), v) in (&mut rows)
            .take(seq.len())
            .zip(c.k[k0..].chunks_exact_mut(kv_width))
            .zip(c.v[v0..].chunks_exact_mut(kv_width))
        {
            k.convert_from_f32_slice(&row[q_width..q_width + kv_width]);
            v.convert_from_f32_slice(&row[q_width + kv_width..]);
        }
    }
}

/// Each row's adapter, for the flattened batch (one entry per token).
fn row_adapters<'a>(
    tokens: &[&[u32]],
    adapters: &[Option<&'a LoraAdapter>],
) -> Option<Vec<Option<&'a LoraAdapter>>> {
    if adapters.iter().all(Option::is_none) {
        return None;
    }
    Some(
        tokens
            .iter()
            .zip(adapters)
            .flat_map(|(t, a)| std::iter::repeat_n(*a, t.len()))
            .collect(),
    )
}

/// The fused base matrices an adapter's modules add to.
#[derive(Clone, Copy)]
enum Projection {
    Qkv,
    O,
    GateUp,
    Down,
}

/// An adapter's modules for one fused projection of one layer, in column order.
fn modules(a: &LoraAdapter, layer: usize, p: Projection) -> Vec<Option<&ModuleLora>> {
    let l = &a.layers[layer];
    match p {
        Projection::Qkv => l.qkv.iter().map(Option::as_ref).collect(),
        Projection::O => vec![l.o.as_ref()],
        Projection::GateUp => l.gate_up.iter().map(Option::as_ref).collect(),
        Projection::Down => vec![l.down.as_ref()],
    }
}

/// `x · Wᵀ` for `n` rows of `x` and a (possibly fused) projection, plus each row's adapter delta
/// when `lora` names the rows' adapters, the layer and the projection; module i of the
/// projection covers the next `widths[i]` output columns. On Q8 weights the activations are
/// quantized once for the base product and the adapters' shrink.
fn project(
    proj: &Proj,
    x: &[f32],
    n: usize,
    lora: Option<(&[Option<&LoraAdapter>], usize, Projection)>,
    widths: &[usize],
) -> Result<Vec<f32>, ModelError> {
    let slots: Vec<Vec<ModuleSlot<'_>>> = match lora {
        None => Vec::new(),
        Some((rows, layer, projection)) => rows
            .iter()
            .map(|a| match a {
                None => Vec::new(),
                Some(a) => {
                    let mut offset = 0;
                    let mut v = Vec::new();
                    for (m, w) in modules(a, layer, projection).into_iter().zip(widths) {
                        if let Some(m) = m {
                            v.push(ModuleSlot {
                                module: m,
                                scale: a.scale as f32,
                                offset,
                            });
                        }
                        offset += w;
                    }
                    v
                }
            })
            .collect(),
    };
    let input = x.len() / n.max(1);
    let (mut y, out, xq) = match proj {
        Proj::Q8(m) => {
            let xq = QuantRows::parallel(x, n, input)?;
            (m.product(&xq)?, m.rows, Some(xq))
        }
        Proj::Candle(m) => {
            let t = Tensor::from_slice(x, (n, input), &Device::Cpu)?;
            let y = values(&m.forward(&t)?)?;
            let out = y.len() / n.max(1);
            (y, out, None)
        }
    };
    if !slots.iter().all(Vec::is_empty) {
        lora_add(&mut y, out, x, xq.as_ref(), input, &slots)?;
    }
    Ok(y)
}

/// A tensor's values as one f32 vector.
fn values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Reads one tensor by GGUF name, `None` when the file lacks it.
type TensorGetter<'a> = Box<dyn FnMut(&str) -> Result<Option<QTensor>, ModelError> + 'a>;

/// A model file opened for loading: its shape and its tensors by GGUF name, whichever format it is
/// in. Serving (`LlamaModel`) and training (`flywheel::train`) load through the same source.
pub struct ModelSource<'a> {
    shape: Shape,
    get: TensorGetter<'a>,
    /// How the file's q/k rows pair dimensions for RoPE.
    pub rope_style: RopeStyle,
}

impl<'a> ModelSource<'a> {
    /// A GGUF file (Llama architecture).
    pub fn gguf<R: Read + Seek>(
        content: &'a gguf_file::Content,
        reader: &'a mut R,
        max_context: usize,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let arch =
            Architecture::from_gguf(metadata(content, "general.architecture")?.to_string()?)?;
        let key = |k: &str| format!("{}.{k}", arch.gguf_name());
        let n_layers = metadata(content, &key("block_count"))?.to_u32()? as usize;
        let hidden = metadata(content, &key("embedding_length"))?.to_u32()? as usize;
        let ffn = metadata(content, &key("feed_forward_length"))?.to_u32()? as usize;
        let heads = metadata(content, &key("attention.head_count"))?.to_u32()? as usize;
        let kv_heads = match content.metadata.get(&key("attention.head_count_kv")) {
            Some(v) => v.to_u32()? as usize,
            None => heads,
        };
        let head_dim = match content.metadata.get(&key("attention.key_length")) {
            Some(v) => v.to_u32()? as usize,
            None => hidden / heads.max(1),
        };
        let sliding_window = match content.metadata.get(&key("attention.sliding_window")) {
            Some(v) => Some(v.to_u32()? as usize),
            None => None,
        };
        let rms_eps = metadata(content, &key("attention.layer_norm_rms_epsilon"))?.to_f32()? as f64;
        let rope_theta = match content.metadata.get(&key("rope.freq_base")) {
            Some(v) => v.to_f32()?,
            None => 10_000.0,
        };
        let file_context = match content.metadata.get(&key("context_length")) {
            Some(v) => v.to_u32()? as usize,
            None => 2048,
        };
        let rope_scaling = match content.metadata.get(&key("rope.scaling.type")) {
            Some(v) => match v.to_string()?.as_str() {
                "none" => RopeScaling::None,
                "linear" => {
                    RopeScaling::Linear(metadata(content, &key("rope.scaling.factor"))?.to_f32()?)
                }
                other => {
                    return Err(ModelError::Unsupported(format!(
                        "rope scaling '{other}' (supported: none, linear, llama3)"
                    )))
                }
            },
            None => RopeScaling::None,
        };
        // Llama 3 GGUF files carry their frequency divisors as a tensor.
        let rope_scaling = match content.tensor_infos.contains_key("rope_freqs.weight") {
            true => RopeScaling::Factors(
                content
                    .tensor(reader, "rope_freqs.weight", device)?
                    .dequantize(device)?
                    .to_vec1::<f32>()?,
            ),
            false => rope_scaling,
        };
        let shape = Shape {
            arch,
            n_layers,
            hidden,
            ffn,
            heads,
            kv_heads,
            head_dim,
            rope_theta,
            rope_scaling,
            rms_eps,
            context_length: windowed_context(file_context.min(max_context), sliding_window),
        };
        let device = device.clone();
        Ok(Self {
            shape,
            get: Box::new(move |name: &str| {
                if !content.tensor_infos.contains_key(name) {
                    return Ok(None);
                }
                Ok(Some(content.tensor(reader, name, &device)?))
            }),
            rope_style: arch.gguf_rope(),
        })
    }

    /// A Hugging Face directory: `config.json` and `*.safetensors`.
    pub fn hf_dir(dir: &Path, max_context: usize, device: &Device) -> Result<Self, ModelError> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| ModelError::Missing(format!("{}: {e}", cfg_path.display())))?;
        let c: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            ModelError::Unsupported(format!("{} is not JSON: {e}", cfg_path.display()))
        })?;
        let arch =
            Architecture::from_hf(c["architectures"][0].as_str().unwrap_or("LlamaForCausalLM"))?;
        let num = |k: &str| {
            c[k].as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::Missing(format!("config.json {k}")))
        };
        let heads = num("num_attention_heads")?;
        let hidden = num("hidden_size")?;
        // Qwen2 configs name a window but attend in full unless `use_sliding_window` is set.
        let sliding_window = match c["use_sliding_window"].as_bool() {
            Some(false) => None,
            _ => c["sliding_window"].as_u64().map(|w| w as usize),
        };
        let shape = Shape {
            arch,
            n_layers: num("num_hidden_layers")?,
            hidden,
            ffn: num("intermediate_size")?,
            heads,
            kv_heads: c["num_key_value_heads"]
                .as_u64()
                .map_or(heads, |v| v as usize),
            head_dim: c["head_dim"]
                .as_u64()
                .map_or(hidden / heads.max(1), |v| v as usize),
            rope_theta: c["rope_theta"]
                .as_f64()
                .or(c["rope_parameters"]["rope_theta"].as_f64())
                .unwrap_or(10_000.0) as f32,
            rope_scaling: hf_rope_scaling(match &c["rope_scaling"] {
                // transformers 5 writes `rope_parameters` (theta included) in its place.
                serde_json::Value::Null => &c["rope_parameters"],
                v => v,
            })?,
            rms_eps: c["rms_norm_eps"].as_f64().unwrap_or(1e-5),
            context_length: windowed_context(
                c["max_position_embeddings"]
                    .as_u64()
                    .map_or(2048, |v| v as usize)
                    .min(max_context),
                sliding_window,
            ),
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::Missing(format!("{}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ModelError::Missing(format!(
                "*.safetensors in {}",
                dir.display()
            )));
        }
        let mut all = std::collections::HashMap::new();
        for f in &files {
            all.extend(candle_core::safetensors::load(f, device)?);
        }
        let tied = c["tie_word_embeddings"].as_bool().unwrap_or(false);
        Ok(Self {
            shape,
            get: Box::new(move |gguf_name: &str| {
                let Some(hf) = hf_name(gguf_name) else {
                    return Ok(None);
                };
                if hf == "lm_head.weight" && tied {
                    return Ok(None);
                }
                match all.remove(&hf) {
                    Some(t) => Ok(Some(QTensor::quantize(
                        &t.to_dtype(DType::F32)?,
                        GgmlDType::F32,
                    )?)),
                    None => Ok(None),
                }
            }),
            rope_style: RopeStyle::Halves,
        })
    }

    /// The tensor named `name` (GGUF naming), if the file has it.
    pub fn tensor(&mut self, name: &str) -> Result<Option<QTensor>, ModelError> {
        (self.get)(name)
    }

    /// The tensor named `name`, or a clear error.
    pub fn require(&mut self, name: &str) -> Result<QTensor, ModelError> {
        self.tensor(name)?
            .ok_or_else(|| ModelError::Missing(format!("tensor {name}")))
    }

    /// The model's shape, once the vocabulary size is known (from the embedding table).
    pub fn config(&self, vocab: usize) -> LlamaConfig {
        let s = &self.shape;
        LlamaConfig {
            arch: s.arch,
            n_layers: s.n_layers,
            hidden: s.hidden,
            ffn: s.ffn,
            heads: s.heads,
            kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            vocab,
            rope_theta: s.rope_theta,
            rope_scaling: s.rope_scaling.clone(),
            rms_eps: s.rms_eps,
            context_length: s.context_length,
        }
    }
}

/// The shape read from a model's metadata, before its tensors.
struct Shape {
    arch: Architecture,
    n_layers: usize,
    hidden: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope_theta: f32,
    rope_scaling: RopeScaling,
    rms_eps: f64,
    context_length: usize,
}

/// The context a model runs with. Inside its sliding attention window, windowed attention is full
/// attention; the engine attends in full, so a model with a window runs with a context no longer
/// than it (and says so), rather than answer wrongly past it.
fn windowed_context(context: usize, window: Option<usize>) -> usize {
    match window {
        Some(w) if w > 0 && w < context => {
            tracing::info!(
                window = w,
                context,
                "the model attends within a sliding window; its context is capped at the window"
            );
            w
        }
        _ => context.max(1),
    }
}

/// The Hugging Face name of a GGUF-named tensor.
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (i, rest) = rest.split_once('.')?;
    let (rest, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let part = match rest {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        _ => return None,
    };
    Some(format!("model.layers.{i}.{part}.{kind}"))
}

/// RoPE's inverse frequencies (one per rotated pair), after the model's scaling.
pub(crate) fn scaled_frequencies(
    theta: f32,
    head_dim: usize,
    scaling: &RopeScaling,
) -> Result<Vec<f32>, ModelError> {
    let half = head_dim / 2;
    let mut inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32))
        .collect();
    match scaling {
        RopeScaling::None => {}
        RopeScaling::Linear(f) => inv.iter_mut().for_each(|x| *x /= f),
        RopeScaling::Factors(v) => {
            if v.len() != half {
                return Err(ModelError::Unsupported(format!(
                    "rope_freqs has {} factors for {half} frequencies",
                    v.len()
                )));
            }
            inv.iter_mut().zip(v).for_each(|(x, f)| *x /= f);
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } => {
            let low_wavelen = original_context / low_freq_factor;
            let high_wavelen = original_context / high_freq_factor;
            for x in inv.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *x;
                if wavelen > low_wavelen {
                    *x /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (original_context / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    *x = (1.0 - smooth) * *x / factor + smooth * *x;
                }
            }
        }
    }
    Ok(inv)
}

/// Hugging Face's `rope_scaling` object.
fn hf_rope_scaling(v: &serde_json::Value) -> Result<RopeScaling, ModelError> {
    if v.is_null() {
        return Ok(RopeScaling::None);
    }
    let kind = v["rope_type"]
        .as_str()
        .or(v["type"].as_str())
        .unwrap_or("default");
    let f = |k: &str| {
        v[k].as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| ModelError::Missing(format!("rope_scaling.{k}")))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear(f("factor")?)),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_context: f("original_max_position_embeddings")?,
        }),
        other => Err(ModelError::Unsupported(format!(
            "rope scaling '{other}' (supported: linear, llama3)"
        ))),
    }
}

pub(crate) fn rope_tables(
    cfg: &LlamaConfig,
    device: &Device,
) -> Result<(Tensor, Tensor), ModelError> {
    let half = cfg.head_dim / 2;
    let (cos, sin) = rope_values(cfg)?;
    Ok((
        Tensor::from_vec(cos, (cfg.context_length, half), device)?,
        Tensor::from_vec(sin, (cfg.context_length, half), device)?,
    ))
}

/// The rotary angles' cosines and sines of every position, (context_length, head_dim / 2) each.
fn rope_values(cfg: &LlamaConfig) -> Result<(Vec<f32>, Vec<f32>), ModelError> {
    let half = cfg.head_dim / 2;
    let inv = scaled_frequencies(cfg.rope_theta, cfg.head_dim, &cfg.rope_scaling)?;
    let mut cos = Vec::with_capacity(cfg.context_length * half);
    let mut sin = Vec::with_capacity(cfg.context_length * half);
    for p in 0..cfg.context_length {
        for f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((cos, sin))
}

#[cfg(test)]
mod rope_tests {
    use super::*;

    #[test]
    fn linear_and_llama3_scaling_move_the_right_frequencies() {
        let base = scaled_frequencies(500_000.0, 128, &RopeScaling::None).unwrap();
        let lin = scaled_frequencies(500_000.0, 128, &RopeScaling::Linear(2.0)).unwrap();
        assert!(base
            .iter()
            .zip(&lin)
            .all(|(b, l)| (b / l - 2.0).abs() < 1e-5));
        let l3 = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 8192.0,
        };
        let s = scaled_frequencies(500_000.0, 128, &l3).unwrap();
        // The highest frequency (short wavelength) is kept; the lowest is divided by the factor.
        assert_eq!(s[0], base[0]);
        assert!((base[63] / s[63] - 8.0).abs() < 1e-4);
        // In between, the divisor lies between 1 and the factor.
        assert!(base
            .iter()
            .zip(&s)
            .all(|(b, x)| b / x >= 1.0 - 1e-6 && b / x <= 8.0 + 1e-4));
        assert!(hf_rope_scaling(&serde_json::json!({"rope_type": "yarn", "factor": 4.0})).is_err());
    }
}
