//! The base model for LoRA training: frozen f32 weights (quantized files are dequantized once, as
//! QLoRA does), LoRA factors in one flat parameter vector, and an explicit forward and backward
//! pass. The backward computes gradients for the LoRA factors and the activations only; the base
//! weights never get one, so each projection costs two matmuls backwards instead of three.
//!
//! GGUF files store q/k rows permuted for interleaved RoPE; they are put back into Hugging Face's
//! layout here, so the trained factors are a plain PEFT adapter that serves on any base format.

use std::path::Path;
use std::rc::Rc;

use candle_core::quantized::gguf_file;
use candle_core::{CpuStorage, Device, Storage, Tensor};

use super::Precision;
use crate::engine::model::{rope_tables, LayerExtras, LlamaConfig, ModelError, ModelSource};
use crate::ops::sgemm::{self, View};
use crate::ops::RopeStyle;
use crate::ops::{amx, grad};

type Result<T> = std::result::Result<T, ModelError>;

/// The seven projections PEFT can target, in the order they are stored.
pub const MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Projection matrices that share an input run as one matmul: (first module, module count).
const GROUPS: [(usize, usize); 4] = [(0, 3), (3, 1), (4, 2), (6, 1)];

struct BaseLayer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// q, k and v biases, stacked as the qkv group's outputs (Qwen2); frozen like the weights.
    qkv_bias: Option<Vec<f32>>,
    /// RMSNorm weights over each query head and each key head (Qwen3).
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// One (outputs, inputs) matrix per group in `GROUPS`: qkv, o, gate_up, down.
    groups: [Frozen; 4],
}

/// A frozen (outputs, inputs) weight and the two products training takes of it: `x · Wᵀ` forward
/// and `dy · W` backward, on row-major rows. In f32 it is the matrix itself (the products run on
/// gemm's kernels); in bf16 it is held in AMX tile order once per product (together the bytes of
/// the f32 copy they replace).
enum Frozen {
    F32 {
        w: Vec<f32>,
        outputs: usize,
        inputs: usize,
    },
    Bf16 {
        /// Wᵀ, for `x · Wᵀ`.
        forward: amx::PackedB,
        /// W, for `dy · W`.
        backward: amx::PackedB,
    },
}

impl Frozen {
    fn new(w: Tensor, precision: Precision) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let v = to_vec(&w)?;
        if precision != Precision::Bf16 {
            return Ok(Self::F32 {
                w: v,
                outputs: rows,
                inputs: cols,
            });
        }
        Ok(Self::Bf16 {
            forward: amx::PackedB::transposed(&v, rows, cols),
            backward: amx::PackedB::plain(&v, rows, cols),
        })
    }

    /// `x · Wᵀ` for row-major x of `rows` rows: (rows, outputs).
    fn forward_rows(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        match self {
            Self::F32 { w, outputs, inputs } => Ok(sgemm::product(
                1.0,
                View::rows(x, rows, *inputs),
                View::rows(w, *outputs, *inputs).t(),
            )?),
            Self::Bf16 { forward, .. } => amx_rows(x, rows, forward),
        }
    }

    /// `dy · W` for row-major dy of `rows` rows: (rows, inputs).
    fn backward_rows(&self, dy: &[f32], rows: usize) -> Result<Vec<f32>> {
        match self {
            Self::F32 { w, outputs, inputs } => Ok(sgemm::product(
                1.0,
                View::rows(dy, rows, *outputs),
                View::rows(w, *outputs, *inputs),
            )?),
            Self::Bf16 { backward, .. } => amx_rows(dy, rows, backward),
        }
    }
}

fn amx_rows(x: &[f32], rows: usize, b: &amx::PackedB) -> Result<Vec<f32>> {
    amx::matmul(x, rows, b).ok_or_else(|| {
        ModelError::Unsupported(
            "bf16 products need AMX tiles, which this host does not grant".into(),
        )
    })
}

/// The frozen base.
pub struct TrainBase {
    pub cfg: LlamaConfig,
    /// What the frozen products run in (`F32` or `Bf16`, resolved for this host).
    pub precision: Precision,
    embed: Tensor,
    head: Frozen,
    norm: Vec<f32>,
    layers: Vec<BaseLayer>,
    /// (context, head_dim / 2)
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// Where one module's factors live in the flat parameter vector.
#[derive(Debug, Clone, Copy)]
pub struct FactorSlot {
    /// A: (rank, inputs) at `a`; B: (outputs, rank) at `b`.
    pub a: usize,
    pub b: usize,
    pub inputs: usize,
    pub outputs: usize,
}

/// The trainable LoRA factors of every targeted module, in one vector.
#[derive(Debug, Clone)]
pub struct LoraFactors {
    pub rank: usize,
    pub alpha: f64,
    /// Indices into `MODULES`.
    pub targets: Vec<usize>,
    /// layers × 7: the slot of each targeted module.
    pub slots: Vec<[Option<FactorSlot>; 7]>,
    pub len: usize,
}

impl LoraFactors {
    pub fn new(cfg: &LlamaConfig, rank: usize, alpha: f64, targets: &[usize]) -> Self {
        let mut slots = Vec::with_capacity(cfg.n_layers);
        let mut len = 0;
        for _ in 0..cfg.n_layers {
            let mut layer = [None; 7];
            for &m in targets {
                let (inputs, outputs) = module_dims(cfg, m);
                layer[m] = Some(FactorSlot {
                    a: len,
                    b: len + rank * inputs,
                    inputs,
                    outputs,
                });
                len += rank * (inputs + outputs);
            }
            slots.push(layer);
        }
        Self {
            rank,
            alpha,
            targets: targets.to_vec(),
            slots,
            len,
        }
    }

    pub fn scale(&self) -> f32 {
        (self.alpha / self.rank as f64) as f32
    }

    /// PEFT's initialisation: A uniform in ±1/√inputs (Kaiming with a = √5), B zero, so training
    /// starts from the base model exactly.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix(seed);
        let mut theta = vec![0f32; self.len];
        for layer in &self.slots {
            for s in layer.iter().flatten() {
                let bound = 1.0 / (s.inputs as f32).sqrt();
                for v in &mut theta[s.a..s.a + self.rank * s.inputs] {
                    *v = (rng.unit() * 2.0 - 1.0) * bound;
                }
            }
        }
        theta
    }
}

impl LoraFactors {
    /// Writes `theta` as a PEFT adapter directory (`adapter_config.json` and
    /// `adapter_model.safetensors`). Files go to a sibling temporary directory first, which is then
    /// renamed into place, so a reader never sees a half-written adapter.
    pub fn save_peft(
        &self,
        theta: &[f32],
        dir: &Path,
        base_model: &str,
        dropout: f32,
    ) -> std::io::Result<()> {
        let io = |e: candle_core::Error| std::io::Error::other(e.to_string());
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)?;
        let tmp = parent.join(format!(
            ".{}.partial-{}",
            dir.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("adapter"),
            std::process::id()
        ));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let mut tensors = std::collections::HashMap::new();
        for (li, layer) in self.slots.iter().enumerate() {
            for (m, slot) in layer.iter().enumerate() {
                let Some(s) = slot else { continue };
                let block = if m < 4 { "self_attn" } else { "mlp" };
                let prefix = format!("base_model.model.model.layers.{li}.{block}.{}", MODULES[m]);
                let (a, b) = factors(theta, s, self.rank).map_err(io)?;
                tensors.insert(format!("{prefix}.lora_A.weight"), a);
                tensors.insert(format!("{prefix}.lora_B.weight"), b);
            }
        }
        candle_core::safetensors::save(&tensors, tmp.join("adapter_model.safetensors"))
            .map_err(io)?;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": dropout,
            "bias": "none",
            "target_modules": self.targets.iter().map(|m| MODULES[*m]).collect::<Vec<_>>(),
        });
        std::fs::write(tmp.join("adapter_config.json"), config.to_string())?;
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::rename(&tmp, dir)
    }
}

/// (inputs, outputs) of module `m`.
fn module_dims(cfg: &LlamaConfig, m: usize) -> (usize, usize) {
    let (h, kv) = (cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
    match m {
        0 => (cfg.hidden, h),
        1 | 2 => (cfg.hidden, kv),
        3 => (h, cfg.hidden),
        4 | 5 => (cfg.hidden, cfg.ffn),
        _ => (cfg.ffn, cfg.hidden),
    }
}

/// A small deterministic generator (SplitMix64) for initialisation, dropout and shuffling.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Reorders GGUF's interleaved q/k rows back to Hugging Face's half-split layout.
fn unpermute_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inputs) = w.dims2()?;
    let half = out / heads / 2;
    w.reshape((heads, half, 2, inputs))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inputs))
}

fn to_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Runs `f` on a tensor's values in row-major order: borrowed from its storage when they lie
/// there contiguously in f32 (most of the step's tensors), copied otherwise. A step's copies of
/// whole activations between tensors and vectors were a sixth of its time.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&v[start..end]));
        }
    }
    Ok(f(&to_vec(t)?))
}

/// Columns `start..start + width` of row-major rows `cols` wide, in one copy.
fn columns(v: &[f32], cols: usize, start: usize, width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(v.len() / cols.max(1) * width);
    for row in v.chunks_exact(cols) {
        out.extend_from_slice(&row[start..start + width]);
    }
    out
}

/// Row-major matrices of the same rows side by side: each part is (its values, its width).
fn side_by_side(parts: &[(&[f32], usize)]) -> Vec<f32> {
    let total: usize = parts.iter().map(|(_, w)| w).sum();
    let rows = parts.first().map_or(0, |(v, w)| v.len() / (*w).max(1));
    let mut out = Vec::with_capacity(rows * total);
    for r in 0..rows {
        for (v, w) in parts {
            out.extend_from_slice(&v[r * w..(r + 1) * w]);
        }
    }
    out
}

/// A training batch: `rows` sequences padded to `t` tokens; `targets[i]` is the token position i
/// must predict, for positions that carry loss.
pub struct Batch {
    pub tokens: Vec<u32>,
    pub rows: usize,
    pub t: usize,
    /// (flat position, target token)
    pub targets: Vec<(usize, u32)>,
}

/// What the backward pass needs from one module's LoRA branch.
struct LoraSaved {
    /// The branch's input after dropout: (n, inputs); without dropout, the group's input itself.
    x: Rc<Vec<f32>>,
    /// `x · Aᵀ`: (n, rank).
    u: Vec<f32>,
    /// The dropout mask (0 or 1/(1-p) per input), when dropout is on.
    mask: Option<Vec<f32>>,
}

/// Queries and keys before their per-head RMSNorm (Qwen3), and each head's inverse RMS.
struct QkNormed {
    q: Vec<f32>,
    q_rstd: Vec<f32>,
    k: Vec<f32>,
    k_rstd: Vec<f32>,
}

struct LayerSaved {
    x: Vec<f32>,
    rstd1: Vec<f32>,
    /// With per-head q/k norms: q and k before them.
    qk_normed: Option<QkNormed>,
    /// (batch, kv_heads, group · t, head_dim), after RoPE.
    q: Tensor,
    /// (batch, kv_heads, t, head_dim), after RoPE.
    k: Tensor,
    v: Tensor,
    /// Attention probabilities: (batch, kv_heads, group · t, t).
    p: Tensor,
    x2: Vec<f32>,
    rstd2: Vec<f32>,
    /// The gate and up projections' output, rows of `[gate | up]`.
    gu: Vec<f32>,
    lora: [Option<LoraSaved>; 7],
}

/// Loss and gradient of one batch.
pub struct StepResult {
    /// Summed cross-entropy over the batch's targets.
    pub loss_sum: f64,
    pub targets: usize,
}

impl TrainBase {
    /// Loads a GGUF file or a Hugging Face directory, dequantized to f32.
    pub fn load(path: &Path, max_context: usize) -> Result<Self> {
        Self::load_with(path, max_context, Precision::F32)
    }

    /// The same, with the frozen products in `precision` (resolved for this host: `auto` is
    /// bf16 where AMX tiles run).
    pub fn load_with(path: &Path, max_context: usize, precision: Precision) -> Result<Self> {
        let device = Device::Cpu;
        let precision = precision.resolve();
        tracing::info!(
            precision = precision.as_str(),
            cpu = %crate::ops::cpu::features().describe(),
            "training base loaded"
        );
        if path.is_dir() {
            let src = ModelSource::hf_dir(path, max_context, &device)?;
            Self::from_source(src, precision)
        } else {
            let mut file = std::fs::File::open(path)
                .map_err(|e| ModelError::Missing(format!("{}: {e}", path.display())))?;
            let content = gguf_file::Content::read(&mut file)?;
            let src = ModelSource::gguf(&content, &mut file, max_context, &device)?;
            Self::from_source(src, precision)
        }
    }

    fn from_source(mut src: ModelSource<'_>, precision: Precision) -> Result<Self> {
        let frozen = |w: Tensor| Frozen::new(w, precision);
        let device = Device::Cpu;
        let embed = src.require("token_embd.weight")?.dequantize(&device)?;
        let cfg = src.config(embed.dims2()?.0);
        cfg.validate()?;
        let gguf = src.rope_style == RopeStyle::Interleaved;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let extras = LayerExtras::read(&mut src, &cfg, i, &device)?;
            let qkv_bias = match extras.qkv_bias {
                // GGUF's Llama layout permutes q/k bias rows with their weights.
                Some(b) if gguf => {
                    let (q, kv) = (cfg.q_width(), cfg.kv_width());
                    let col = |t: Tensor| t.reshape(((), 1));
                    let qb = unpermute_rows(&col(b.narrow(0, 0, q)?)?, cfg.heads)?;
                    let kb = unpermute_rows(&col(b.narrow(0, q, kv)?)?, cfg.kv_heads)?;
                    let vb = col(b.narrow(0, q + kv, kv)?)?;
                    Some(to_vec(&Tensor::cat(&[qb, kb, vb], 0)?)?)
                }
                Some(b) => Some(to_vec(&b)?),
                None => None,
            };
            let qk_norm = match extras.qk_norm {
                Some((q, k)) => Some((to_vec(&q)?, to_vec(&k)?)),
                None => None,
            };
            let mut w = |s: &str| -> Result<Tensor> {
                Ok(src
                    .require(&format!("blk.{i}.{s}.weight"))?
                    .dequantize(&device)?)
            };
            let mut q = w("attn_q")?;
            let mut k = w("attn_k")?;
            if gguf {
                q = unpermute_rows(&q, cfg.heads)?;
                k = unpermute_rows(&k, cfg.kv_heads)?;
            }
            let v = w("attn_v")?;
            let o = w("attn_output")?;
            let gate = w("ffn_gate")?;
            let up = w("ffn_up")?;
            let down = w("ffn_down")?;
            layers.push(BaseLayer {
                attn_norm: to_vec(&w("attn_norm")?)?,
                ffn_norm: to_vec(&w("ffn_norm")?)?,
                qkv_bias,
                qk_norm,
                groups: [
                    frozen(Tensor::cat(&[q, k, v], 0)?)?,
                    frozen(o)?,
                    frozen(Tensor::cat(&[gate, up], 0)?)?,
                    frozen(down)?,
                ],
            });
        }
        let norm = to_vec(&src.require("output_norm.weight")?.dequantize(&device)?)?;
        let head = frozen(match src.tensor("output.weight")? {
            Some(t) => t.dequantize(&device)?,
            None => embed.clone(),
        })?;
        let (cos, sin) = rope_tables(&cfg, &device)?;
        Ok(Self {
            cos: to_vec(&cos)?,
            sin: to_vec(&sin)?,
            cfg,
            precision,
            embed,
            head,
            norm,
            layers,
        })
    }

    /// Output widths of group `g`'s modules.
    fn group_widths(&self, g: usize) -> Vec<usize> {
        let (first, count) = GROUPS[g];
        (first..first + count)
            .map(|m| module_dims(&self.cfg, m).1)
            .collect()
    }

    /// `x · Wᵀ` for group `g` of `layer` on the n rows of x, plus each targeted module's
    /// `scale · dropout(x) Aᵀ Bᵀ`, added into its band of the output's columns in place.
    #[allow(clippy::too_many_arguments)]
    fn group_forward(
        &self,
        layer: usize,
        g: usize,
        x: &Rc<Vec<f32>>,
        n: usize,
        lora: &LoraFactors,
        theta: &[f32],
        dropout: f32,
        rng: &mut SplitMix,
        saved: &mut [Option<LoraSaved>; 7],
    ) -> Result<Vec<f32>> {
        let mut out = self.layers[layer].groups[g].forward_rows(x, n)?;
        let (first, count) = GROUPS[g];
        let widths = self.group_widths(g);
        let total: usize = widths.iter().sum();
        let (scale, rank) = (lora.scale(), lora.rank);
        let mut offset = 0;
        for (j, m) in (first..first + count).enumerate() {
            if let Some(s) = lora.slots[layer][m] {
                let (xd, mask) = dropout_input(x, dropout, rng);
                let (a, b) = factor_values(theta, &s, rank);
                let u = sgemm::product(
                    1.0,
                    View::rows(&xd, n, s.inputs),
                    View::rows(a, rank, s.inputs).t(),
                )?; // (n, rank)
                sgemm::matmul(
                    &mut out[offset..],
                    total,
                    true,
                    scale,
                    View::rows(&u, n, rank),
                    View::rows(b, s.outputs, rank).t(),
                )?;
                saved[m] = Some(LoraSaved { x: xd, u, mask });
            }
            offset += widths[j];
        }
        Ok(out)
    }

    /// The input gradient of a group given its output gradient `dy` (n rows); LoRA factor
    /// gradients are added into `grad` in place.
    #[allow(clippy::too_many_arguments)]
    fn group_backward(
        &self,
        layer: usize,
        g: usize,
        dy: &[f32],
        n: usize,
        lora: &LoraFactors,
        theta: &[f32],
        saved: &[Option<LoraSaved>; 7],
        grad: &mut [f32],
    ) -> Result<Vec<f32>> {
        let mut dx = self.layers[layer].groups[g].backward_rows(dy, n)?;
        let (first, count) = GROUPS[g];
        let widths = self.group_widths(g);
        let total: usize = widths.iter().sum();
        let (scale, rank) = (lora.scale(), lora.rank);
        let mut offset = 0;
        for (j, m) in (first..first + count).enumerate() {
            if let (Some(s), Some(sv)) = (lora.slots[layer][m], &saved[m]) {
                let dym = View::rows(dy, n, total).columns(offset, widths[j]);
                let (a, b) = factor_values(theta, &s, rank);
                let a = View::rows(a, rank, s.inputs);
                let u = View::rows(&sv.u, n, rank);
                // dB += scale · dyᵀ u: (outputs, rank)
                let db = &mut grad[s.b..s.b + s.outputs * rank];
                sgemm::matmul(db, rank, true, scale, dym.t(), u)?;
                // du = scale · dy B: (n, rank)
                let du = sgemm::product(scale, dym, View::rows(b, s.outputs, rank))?;
                let du = View::rows(&du, n, rank);
                // dA += duᵀ x: (rank, inputs)
                let x = View::rows(&sv.x, n, s.inputs);
                let da = &mut grad[s.a..s.a + rank * s.inputs];
                sgemm::matmul(da, s.inputs, true, 1.0, du.t(), x)?;
                // dx += du A, through the dropout mask when there is one.
                match &sv.mask {
                    None => sgemm::matmul(&mut dx, s.inputs, true, 1.0, du, a)?,
                    Some(mask) => {
                        let dxl = sgemm::product(1.0, du, a)?;
                        for ((d, l), k) in dx.iter_mut().zip(&dxl).zip(mask) {
                            *d += l * k;
                        }
                    }
                }
            }
            offset += widths[j];
        }
        Ok(dx)
    }

    /// Loss and (accumulated into `grad`) LoRA gradient of one batch; each target's loss is
    /// weighted by `weight` in the gradient (1 / targets of the whole optimizer step).
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grad(
        &self,
        batch: &Batch,
        lora: &LoraFactors,
        theta: &[f32],
        dropout: f32,
        rng: &mut SplitMix,
        weight: f32,
        grad: &mut [f32],
    ) -> Result<StepResult> {
        let (xl, saved) = self.forward_layers(batch, lora, theta, dropout, rng)?;
        let (loss_sum, mut dx) = self.head_loss(&xl, batch, weight, true)?;
        let rope = self.rope_rows(batch.rows, batch.t);
        for li in (0..self.cfg.n_layers).rev() {
            dx = self.layer_backward(li, dx, &saved[li], batch, &rope, lora, theta, grad)?;
        }
        Ok(StepResult {
            loss_sum,
            targets: batch.targets.len(),
        })
    }

    /// The summed loss of a batch, without gradients.
    pub fn loss(&self, batch: &Batch, lora: &LoraFactors, theta: &[f32]) -> Result<StepResult> {
        let mut rng = SplitMix(0);
        let (xl, _) = self.forward_layers(batch, lora, theta, 0.0, &mut rng)?;
        let (loss_sum, _) = self.head_loss(&xl, batch, 1.0, false)?;
        Ok(StepResult {
            loss_sum,
            targets: batch.targets.len(),
        })
    }

    /// Logits of every position: (rows · t, vocab). For tests against the serving engine.
    pub fn logits(&self, batch: &Batch, lora: &LoraFactors, theta: &[f32]) -> Result<Tensor> {
        let mut rng = SplitMix(0);
        let (xl, _) = self.forward_layers(batch, lora, theta, 0.0, &mut rng)?;
        let n = batch.rows * batch.t;
        let (h, _) = grad::rms_norm_fwd(&xl, &self.norm, self.cfg.rms_eps as f32);
        let logits = self.head.forward_rows(&h, n)?;
        Ok(Tensor::from_vec(logits, (n, self.cfg.vocab), &Device::Cpu)?)
    }

    /// cos and sin for every row of a (rows, t) batch: row i of a sequence sits at position i.
    fn rope_rows(&self, rows: usize, t: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.cfg.head_dim / 2;
        (
            self.cos[..t * half].repeat(rows),
            self.sin[..t * half].repeat(rows),
        )
    }

    fn forward_layers(
        &self,
        batch: &Batch,
        lora: &LoraFactors,
        theta: &[f32],
        dropout: f32,
        rng: &mut SplitMix,
    ) -> Result<(Vec<f32>, Vec<LayerSaved>)> {
        let cfg = &self.cfg;
        let (bsz, t) = (batch.rows, batch.t);
        let n = bsz * t;
        if t > cfg.context_length {
            return Err(ModelError::Unsupported(format!(
                "a training sequence of {t} tokens exceeds the context length {}",
                cfg.context_length
            )));
        }
        let (h, kvh, hd) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let group = h / kvh;
        let ids = Tensor::from_slice(&batch.tokens, n, &Device::Cpu)?;
        let mut x = to_vec(&self.embed.index_select(&ids, 0)?)?;
        // Each row's position is its index within its sequence.
        let (cos, sin) = self.rope_rows(bsz, t);
        let scale = 1.0 / (hd as f32).sqrt();
        let eps = cfg.rms_eps as f32;
        let mut saved = Vec::with_capacity(cfg.n_layers);
        for (li, layer) in self.layers.iter().enumerate() {
            let mut lsaved: [Option<LoraSaved>; 7] = Default::default();
            let (h1, rstd1) = grad::rms_norm_fwd(&x, &layer.attn_norm, eps);
            let h1 = Rc::new(h1);
            let mut qkv =
                self.group_forward(li, 0, &h1, n, lora, theta, dropout, rng, &mut lsaved)?;
            let width = (h + 2 * kvh) * hd;
            if let Some(b) = &layer.qkv_bias {
                for row in qkv.chunks_exact_mut(width) {
                    row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
                }
            }
            let mut q = columns(&qkv, width, 0, h * hd);
            let mut k = columns(&qkv, width, h * hd, kvh * hd);
            let v = columns(&qkv, width, (h + kvh) * hd, kvh * hd);
            // Qwen3: each head of q and k RMS-normed before RoPE.
            let qk_normed = match &layer.qk_norm {
                Some((qn, kn)) => {
                    let (nq, rq) = grad::rms_norm_fwd(&q, qn, eps);
                    let (nk, rk) = grad::rms_norm_fwd(&k, kn, eps);
                    Some(QkNormed {
                        q: std::mem::replace(&mut q, nq),
                        q_rstd: rq,
                        k: std::mem::replace(&mut k, nk),
                        k_rstd: rk,
                    })
                }
                None => None,
            };
            grad::rope_halves(&mut q, h, hd, &cos, &sin, false);
            grad::rope_halves(&mut k, kvh, hd, &cos, &sin, false);
            // (b, t, heads, hd) → (b, kv, group·t, hd): query head kv·group + g reads kv head kv.
            let q = heads_major(Tensor::from_vec(q, (bsz, t, h, hd), &Device::Cpu)?)?.reshape((
                bsz,
                kvh,
                group * t,
                hd,
            ))?;
            let k = heads_major(Tensor::from_vec(k, (bsz, t, kvh, hd), &Device::Cpu)?)?;
            let v = heads_major(Tensor::from_vec(v, (bsz, t, kvh, hd), &Device::Cpu)?)?;
            let mut s = self.bmm_values(&q, &k, true)?;
            grad::causal_softmax_fwd(&mut s, t, scale);
            let p = Tensor::from_vec(s, (bsz, kvh, group * t, t), &Device::Cpu)?;
            let o = self.bmm(&p, &v, false)?.reshape((bsz, h, t, hd))?;
            let attn = Rc::new(swap_middle_values(&o)?); // (n, heads · head_dim)
            let out =
                self.group_forward(li, 1, &attn, n, lora, theta, dropout, rng, &mut lsaved)?;
            let mut x2 = x.clone();
            x2.iter_mut().zip(&out).for_each(|(a, b)| *a += b);
            let (h2, rstd2) = grad::rms_norm_fwd(&x2, &layer.ffn_norm, eps);
            let h2 = Rc::new(h2);
            let gu = self.group_forward(li, 2, &h2, n, lora, theta, dropout, rng, &mut lsaved)?;
            let act = Rc::new(grad::silu_mul_fwd(&gu, cfg.ffn));
            let down =
                self.group_forward(li, 3, &act, n, lora, theta, dropout, rng, &mut lsaved)?;
            let mut x3 = x2.clone();
            x3.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
            saved.push(LayerSaved {
                x,
                rstd1,
                qk_normed,
                q,
                k,
                v,
                p,
                x2,
                rstd2,
                gu,
                lora: lsaved,
            });
            x = x3;
        }
        Ok((x, saved))
    }

    /// Cross-entropy over the batch's target positions only (the head is the largest matmul, and
    /// most positions carry no loss). Returns the summed loss and, when asked, dL/dx of the last
    /// layer's output.
    fn head_loss(
        &self,
        xl: &[f32],
        batch: &Batch,
        weight: f32,
        want_grad: bool,
    ) -> Result<(f64, Vec<f32>)> {
        let d = self.cfg.hidden;
        let vocab = self.cfg.vocab;
        let eps = self.cfg.rms_eps as f32;
        let mut dx = if want_grad {
            vec![0f32; xl.len()]
        } else {
            Vec::new()
        };
        let mut loss = 0f64;
        // Chunks bound the logits buffer (rows × vocab floats).
        for chunk in batch.targets.chunks(256) {
            let mut rows = Vec::with_capacity(chunk.len() * d);
            for (pos, _) in chunk {
                rows.extend_from_slice(&xl[pos * d..(pos + 1) * d]);
            }
            let (hn, rstd) = grad::rms_norm_fwd(&rows, &self.norm, eps);
            let m = chunk.len();
            let mut logits = self.head.forward_rows(&hn, m)?;
            let targets: Vec<u32> = chunk.iter().map(|(_, t)| *t).collect();
            loss += grad::cross_entropy(&mut logits, vocab, &targets, weight);
            if want_grad {
                let dh = self.head.backward_rows(&logits, m)?;
                let drows = grad::rms_norm_bwd(&dh, &rows, &self.norm, &rstd);
                for (i, (pos, _)) in chunk.iter().enumerate() {
                    dx[pos * d..(pos + 1) * d]
                        .iter_mut()
                        .zip(&drows[i * d..(i + 1) * d])
                        .for_each(|(a, b)| *a += b);
                }
            }
        }
        Ok((loss, dx))
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        li: usize,
        dx3: Vec<f32>,
        s: &LayerSaved,
        batch: &Batch,
        rope: &(Vec<f32>, Vec<f32>),
        lora: &LoraFactors,
        theta: &[f32],
        grad: &mut [f32],
    ) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let layer = &self.layers[li];
        let (bsz, t) = (batch.rows, batch.t);
        let n = bsz * t;
        let (h, kvh, hd) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let group = h / kvh;
        let scale = 1.0 / (hd as f32).sqrt();
        let dev = Device::Cpu;
        // MLP: x3 = x2 + down(silu(gate) ⊙ up).
        let dact = self.group_backward(li, 3, &dx3, n, lora, theta, &s.lora, grad)?;
        let dgu = grad::silu_mul_bwd(&dact, &s.gu, cfg.ffn);
        let dh2 = self.group_backward(li, 2, &dgu, n, lora, theta, &s.lora, grad)?;
        let mut dx2 = grad::rms_norm_bwd(&dh2, &s.x2, &layer.ffn_norm, &s.rstd2);
        dx2.iter_mut().zip(&dx3).for_each(|(a, b)| *a += b);
        // Attention: x2 = x + o(softmax(q kᵀ) v).
        let dattn = self.group_backward(li, 1, &dx2, n, lora, theta, &s.lora, grad)?;
        let do_ = heads_major(Tensor::from_vec(dattn, (bsz, t, h, hd), &dev)?)?.reshape((
            bsz,
            kvh,
            group * t,
            hd,
        ))?;
        let mut dp = self.bmm_values(&do_, &s.v, true)?;
        let dv = self.bmm_of(&s.p, true, &do_, false)?; // (b, kv, t, hd)
        with_values(&s.p, |p| grad::causal_softmax_bwd(p, &mut dp, t, scale))?;
        let ds = Tensor::from_vec(dp, (bsz, kvh, group * t, t), &dev)?;
        let dq = self.bmm(&ds, &s.k, false)?.reshape((bsz, h, t, hd))?;
        let dk = self.bmm_of(&ds, true, &s.q, false)?; // (b, kv, t, hd)
        let mut dq = swap_middle_values(&dq)?;
        let mut dk = swap_middle_values(&dk)?;
        let dv = swap_middle_values(&dv)?;
        grad::rope_halves(&mut dq, h, hd, &rope.0, &rope.1, true);
        grad::rope_halves(&mut dk, kvh, hd, &rope.0, &rope.1, true);
        if let (Some(raw), Some((qn, kn))) = (&s.qk_normed, &layer.qk_norm) {
            dq = grad::rms_norm_bwd(&dq, &raw.q, qn, &raw.q_rstd);
            dk = grad::rms_norm_bwd(&dk, &raw.k, kn, &raw.k_rstd);
        }
        let dqkv = side_by_side(&[(&dq, h * hd), (&dk, kvh * hd), (&dv, kvh * hd)]);
        let dh1 = self.group_backward(li, 0, &dqkv, n, lora, theta, &s.lora, grad)?;
        let mut dx = grad::rms_norm_bwd(&dh1, &s.x, &layer.attn_norm, &s.rstd1);
        dx.iter_mut().zip(&dx2).for_each(|(a, b)| *a += b);
        Ok(dx)
    }
}

impl TrainBase {
    /// Attention's batched product over the leading (sequence, head) dimensions of 4-D tensors:
    /// `a · bᵀ` when `transposed`, else `a · b`; on AMX tiles in bf16 training.
    fn bmm(&self, a: &Tensor, b: &Tensor, transposed: bool) -> Result<Tensor> {
        self.bmm_of(a, false, b, transposed)
    }

    /// `bmm` of `aᵀ` (its last two dimensions swapped) when `a_transposed`.
    fn bmm_of(
        &self,
        a: &Tensor,
        a_transposed: bool,
        b: &Tensor,
        transposed: bool,
    ) -> Result<Tensor> {
        if self.precision != Precision::Bf16 {
            let a = if a_transposed { a.t()? } else { a.clone() };
            return Ok(match transposed {
                true => a.matmul(&b.t()?)?,
                false => a.matmul(b)?,
            });
        }
        let (d0, d1, r, c) = a.dims4()?;
        let m = if a_transposed { c } else { r };
        let (_, _, zr, zc) = b.dims4()?;
        let n = if transposed { zr } else { zc };
        let y = self.bmm_values_of(a, a_transposed, b, transposed)?;
        Ok(Tensor::from_vec(y, (d0, d1, m, n), &Device::Cpu)?)
    }

    /// `bmm` as a row-major vector.
    fn bmm_values(&self, a: &Tensor, b: &Tensor, transposed: bool) -> Result<Vec<f32>> {
        self.bmm_values_of(a, false, b, transposed)
    }

    /// `bmm_of` as a row-major vector.
    fn bmm_values_of(
        &self,
        a: &Tensor,
        a_transposed: bool,
        b: &Tensor,
        transposed: bool,
    ) -> Result<Vec<f32>> {
        if self.precision != Precision::Bf16 {
            return Ok(to_vec(&self.bmm_of(a, a_transposed, b, transposed)?)?);
        }
        let (d0, d1, r, c) = a.dims4()?;
        let (m, k) = if a_transposed { (c, r) } else { (r, c) };
        let (_, _, zr, zc) = b.dims4()?;
        let (a, b) = (a.contiguous()?, b.contiguous()?);
        let y = with_values(&a, |x| {
            with_values(&b, |z| {
                amx::batched(x, m, k, a_transposed, z, zr, zc, transposed, d0 * d1)
            })
        })??;
        y.ok_or_else(|| {
            ModelError::Unsupported(
                "bf16 products need AMX tiles, which this host does not grant".into(),
            )
        })
    }
}

/// (b, t, heads, hd) → (b, heads, t, hd), contiguous.
fn heads_major(x: Tensor) -> candle_core::Result<Tensor> {
    swap_middle(&x)
}

/// (a, b, c, d) → (a, c, b, d), contiguous: rows of d are copied whole (candle's strided copy
/// walks the elements one at a time).
fn swap_middle(x: &Tensor) -> candle_core::Result<Tensor> {
    let (a, b, c, d) = x.dims4()?;
    Tensor::from_vec(swap_middle_values(x)?, (a, c, b, d), &Device::Cpu)
}

/// `swap_middle` as a row-major vector.
fn swap_middle_values(x: &Tensor) -> candle_core::Result<Vec<f32>> {
    let (a, b, c, d) = x.dims4()?;
    with_values(&x.contiguous()?, |v| {
        let mut out = Vec::with_capacity(v.len());
        for i in 0..a {
            for k in 0..c {
                for j in 0..b {
                    let at = ((i * b + j) * c + k) * d;
                    out.extend_from_slice(&v[at..at + d]);
                }
            }
        }
        out
    })
}

/// A module's A (rank, inputs) and B (outputs, rank) as tensors.
fn factors(theta: &[f32], s: &FactorSlot, rank: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let a = Tensor::from_slice(
        &theta[s.a..s.a + rank * s.inputs],
        (rank, s.inputs),
        &Device::Cpu,
    )?;
    let b = Tensor::from_slice(
        &theta[s.b..s.b + s.outputs * rank],
        (s.outputs, rank),
        &Device::Cpu,
    )?;
    Ok((a, b))
}

/// A module's A (rank, inputs) and B (outputs, rank) as row-major slices of `theta`.
fn factor_values<'a>(theta: &'a [f32], s: &FactorSlot, rank: usize) -> (&'a [f32], &'a [f32]) {
    (
        &theta[s.a..s.a + rank * s.inputs],
        &theta[s.b..s.b + s.outputs * rank],
    )
}

/// Inverted dropout on a LoRA branch's input: each value is zeroed with probability `p` and the
/// rest scaled by 1/(1-p). Returns the branch input (x itself when `p` is 0) and its mask.
fn dropout_input(x: &Rc<Vec<f32>>, p: f32, rng: &mut SplitMix) -> (Rc<Vec<f32>>, Option<Vec<f32>>) {
    if p <= 0.0 {
        return (Rc::clone(x), None);
    }
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.len())
        .map(|_| if rng.unit() < p { 0.0 } else { keep })
        .collect();
    let xd = x.iter().zip(&mask).map(|(v, k)| v * k).collect();
    (Rc::new(xd), Some(mask))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::lora::LoraAdapter;
    use crate::engine::model::{LlamaModel, WeightFormat};
    use crate::engine::testing::{write_hf_dir_from_gguf, write_tiny_llama};
    use candle_core::quantized::GgmlDType;

    fn batch(rows: &[Vec<u32>]) -> Batch {
        let t = rows.iter().map(Vec::len).max().unwrap();
        let mut tokens = Vec::new();
        let mut targets = Vec::new();
        for (r, seq) in rows.iter().enumerate() {
            for i in 0..t {
                tokens.push(*seq.get(i).unwrap_or(&0));
                if i + 1 < seq.len() && i >= 2 {
                    targets.push((r * t + i, seq[i + 1]));
                }
            }
        }
        Batch {
            tokens,
            rows: rows.len(),
            t,
            targets,
        }
    }

    fn random_theta(lora: &LoraFactors, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix(seed);
        (0..lora.len).map(|_| (rng.unit() - 0.5) * 0.4).collect()
    }

    /// The training forward (f32, its own attention and RoPE) gives the serving engine's logits,
    /// with and without a LoRA adapter, for a GGUF base (permuted q/k) and a Hugging Face one.
    #[test]
    fn training_forward_matches_the_serving_engine_with_and_without_lora() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        write_tiny_llama(&gguf, GgmlDType::F32, 3);
        let hf = dir.path().join("hf");
        write_hf_dir_from_gguf(&gguf, &hf);
        let seqs = vec![vec![5u32, 70, 71, 72, 9, 33], vec![100u32, 101, 102, 8]];
        let mut models = vec![(gguf.clone(), true), (hf.clone(), false)];
        models.extend(family_models());
        for (path, serving) in &models {
            let (path, serving) = (path, *serving);
            let base = TrainBase::load(path, 64).unwrap();
            let lora = LoraFactors::new(&base.cfg, 4, 8.0, &[0, 1, 2, 3, 4, 5, 6]);
            let theta = random_theta(&lora, 7);
            let adir = dir.path().join(format!("adapter-{serving}"));
            lora.save_peft(&theta, &adir, "tiny", 0.0).unwrap();
            let engine = if serving {
                let mut f = std::fs::File::open(path).unwrap();
                let c = gguf_file::Content::read(&mut f).unwrap();
                LlamaModel::from_gguf(&c, &mut f, WeightFormat::F32, 64, &Device::Cpu).unwrap()
            } else {
                LlamaModel::from_hf_dir(path, WeightFormat::F32, 64, &Device::Cpu).unwrap()
            };
            let adapter =
                LoraAdapter::load("t/a", "tiny", &adir, &engine.cfg, engine.gguf_layout()).unwrap();
            let b = batch(&seqs);
            let zero = vec![0f32; lora.len];
            for (theta, with) in [(&zero, None), (&theta, Some(&adapter))] {
                let logits: Vec<Vec<f32>> =
                    base.logits(&b, &lora, theta).unwrap().to_vec2().unwrap();
                for (r, seq) in seqs.iter().enumerate() {
                    let mut cache = engine.new_cache();
                    let want: Vec<Vec<f32>> = engine
                        .forward_with(&[seq], &mut [&mut cache], &[with])
                        .unwrap()
                        .to_vec2()
                        .unwrap();
                    let got = &logits[r * b.t + seq.len() - 1];
                    let diff = got
                        .iter()
                        .zip(&want[0])
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    // The engine keeps its KV cache in f16; the training forward stays f32.
                    assert!(
                        diff < 5e-3,
                        "row {r} (lora {}): max diff {diff}",
                        with.is_some()
                    );
                }
            }
        }
    }

    /// The tiny Llama 3, Qwen2.5, Qwen3 and Mistral models of the families oracle, each as its
    /// GGUF file (true) and its Hugging Face directory (false).
    fn family_models() -> Vec<(std::path::PathBuf, bool)> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/families");
        ["llama3", "qwen2", "qwen3", "mistral"]
            .iter()
            .flat_map(|f| {
                [
                    (root.join(f).join("model.gguf"), true),
                    (root.join(f).join("hf"), false),
                ]
            })
            .collect()
    }

    /// Every LoRA factor's gradient, on a sample of coordinates in every module, matches central
    /// finite differences of the loss through the whole model, with and without dropout: on a
    /// Llama-shaped model and on Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms, wide heads).
    #[test]
    fn lora_gradients_match_finite_differences_through_the_whole_model() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        write_tiny_llama(&gguf, GgmlDType::F32, 5);
        let families = family_models();
        let qwen = families
            .iter()
            .filter(|(p, gguf)| *gguf && p.to_string_lossy().contains("qwen"))
            .map(|(p, _)| p.clone());
        for path in std::iter::once(gguf.clone()).chain(qwen) {
            gradients_match_finite_differences(&path);
        }
    }

    fn gradients_match_finite_differences(path: &std::path::Path) {
        let base = TrainBase::load(path, 64).unwrap();
        let lora = LoraFactors::new(&base.cfg, 2, 4.0, &[0, 1, 2, 3, 4, 5, 6]);
        let theta = random_theta(&lora, 11);
        let b = batch(&[
            vec![5u32, 70, 71, 72, 9, 33, 40],
            vec![100u32, 101, 102, 8, 7],
        ]);
        for dropout in [0.0f32, 0.3] {
            let mut g = vec![0f32; lora.len];
            base.loss_and_grad(&b, &lora, &theta, dropout, &mut SplitMix(1), 1.0, &mut g)
                .unwrap();
            let loss_at = |th: &[f32]| {
                let mut scratch = vec![0f32; lora.len];
                base.loss_and_grad(&b, &lora, th, dropout, &mut SplitMix(1), 1.0, &mut scratch)
                    .unwrap()
                    .loss_sum
            };
            let mut rng = SplitMix(3);
            let mut checked = 0;
            for layer in &lora.slots {
                for s in layer.iter().flatten() {
                    let a_len = lora.rank * s.inputs;
                    let b_len = s.outputs * lora.rank;
                    for _ in 0..2 {
                        for i in [
                            s.a + (rng.next_u64() as usize) % a_len,
                            s.b + (rng.next_u64() as usize) % b_len,
                        ] {
                            let h = 1e-2f32;
                            let mut p = theta.clone();
                            p[i] += h;
                            let mut m = theta.clone();
                            m[i] -= h;
                            let fd = (loss_at(&p) - loss_at(&m)) / (2.0 * f64::from(h));
                            let an = f64::from(g[i]);
                            assert!(
                                (fd - an).abs() <= 2e-3 + 3e-2 * fd.abs().max(an.abs()),
                                "{}: dropout {dropout}, parameter {i}: analytic {an}, finite difference {fd}",
                                path.display()
                            );
                            checked += 1;
                        }
                    }
                }
            }
            assert_eq!(checked, 2 * 7 * 2 * 2);
            assert!(g.iter().any(|v| v.abs() > 1e-3));
        }
    }

    #[test]
    fn bf16_products_give_the_f32_loss_and_gradient_within_bf16_tolerance() {
        if !crate::ops::amx::available() {
            println!(
                "SKIPPED: bf16 training needs AMX tiles, which this host does not offer ({}); the f32 gradients are checked against finite differences above",
                crate::ops::cpu::features().describe()
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        write_tiny_llama(&gguf, GgmlDType::F32, 5);
        let exact = TrainBase::load_with(&gguf, 64, Precision::F32).unwrap();
        let tiles = TrainBase::load_with(&gguf, 64, Precision::Bf16).unwrap();
        assert_eq!(tiles.precision, Precision::Bf16);
        let lora = LoraFactors::new(&exact.cfg, 2, 4.0, &[0, 1, 2, 3, 4, 5, 6]);
        let theta = random_theta(&lora, 11);
        let b = batch(&[
            vec![5u32, 70, 71, 72, 9, 33, 40],
            vec![100u32, 101, 102, 8, 7],
        ]);
        let run = |base: &TrainBase| {
            let mut g = vec![0f32; lora.len];
            let r = base
                .loss_and_grad(&b, &lora, &theta, 0.0, &mut SplitMix(1), 1.0, &mut g)
                .unwrap();
            (r.loss_sum, g)
        };
        let (loss32, g32) = run(&exact);
        let (loss16, g16) = run(&tiles);
        let norm = |g: &[f32]| g.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        let dot: f64 = g32
            .iter()
            .zip(&g16)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        let cosine = dot / (norm(&g32) * norm(&g16));
        let diff: Vec<f32> = g32.iter().zip(&g16).map(|(a, b)| a - b).collect();
        let relative = norm(&diff) / norm(&g32);
        println!("bf16 against f32: loss {loss16} vs {loss32}, gradient cosine {cosine:.5}, relative difference {relative:.4}");
        assert!(
            (loss32 - loss16).abs() <= 5e-3 * loss32.abs(),
            "loss {loss16} vs {loss32}"
        );
        assert!(cosine > 0.999, "gradient cosine {cosine}");
        assert!(relative < 0.05, "gradient relative difference {relative}");
    }
}
