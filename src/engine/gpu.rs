//! The model's forward pass on an accelerator, composed from the kernels of `kernels/*.cu` through
//! `ops::device::Kernels`: weights stay in their GGML blocks (Q8_0 or Q4_1; other formats are
//! re-quantized to Q8_0 at load), activations are f16 or bf16 with f32 accumulation, keys and
//! values live in a paged cache, and each row's LoRA delta is applied by the gather kernels from
//! adapter slots (never merged into the shared base).
//!
//! One pass takes any mix of sequences, prefills and decode steps alike, as `LlamaModel::forward_with`
//! does on the CPU: rows are the batch's tokens in order, and every row attends to its own
//! sequence's cache up to its own position (a prefill row is a query over a shorter length).

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device as CandleDevice, Tensor};

use super::lora::{LoraAdapter, ModuleLora};
use super::model::{scaled_frequencies, LlamaConfig, ModelError, ModelSource};
use crate::ops::device::{
    Buffer, Device, DeviceError, Dtype, Elem, Heads, Indices, Kernels, LoraShape, Pages, QFormat,
    QMatrix, MAX_RANK,
};
use crate::ops::RopeStyle;

/// Positions per KV cache page.
pub const BLOCK_SIZE: usize = 16;

/// How much the device holds.
#[derive(Debug, Clone, Copy)]
pub struct GpuOptions {
    pub dtype: Dtype,
    /// KV cache pages (of `BLOCK_SIZE` positions) shared by all sequences.
    pub pages: usize,
    /// Adapters resident on the device at once.
    pub lora_slots: usize,
    /// The highest adapter rank served; adapters of a higher rank are refused. Slots are padded
    /// to the smallest power of two (at least 8) that holds every adapter loaded so far.
    pub lora_rank: usize,
}

impl GpuOptions {
    /// Enough pages for `max_batch` sequences of the whole context, and one slot per batch row
    /// (at most 16).
    pub fn for_serving(cfg: &LlamaConfig, max_batch: usize) -> Self {
        Self {
            dtype: Dtype::F16,
            pages: max_batch.max(1) * cfg.context_length.div_ceil(BLOCK_SIZE),
            lora_slots: max_batch.clamp(1, 16),
            lora_rank: MAX_RANK,
        }
    }
}

struct Layer<D: Device> {
    attn_norm: Buffer<D, u16>,
    /// q, k and v rows stacked.
    qkv: QMatrix<D>,
    o: QMatrix<D>,
    ffn_norm: Buffer<D, u16>,
    /// gate and up rows stacked.
    gate_up: QMatrix<D>,
    down: QMatrix<D>,
    k_cache: Buffer<D, u16>,
    v_cache: Buffer<D, u16>,
}

/// The seven projections an adapter may target, in the order slots store them.
#[derive(Clone, Copy)]
enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

const TARGETS: [Target; 7] = [
    Target::Q,
    Target::K,
    Target::V,
    Target::O,
    Target::Gate,
    Target::Up,
    Target::Down,
];

impl Target {
    /// (input, output, first column in the fused projection's output).
    fn geometry(self, c: &LlamaConfig) -> (usize, usize, usize) {
        let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        match self {
            Target::Q => (c.hidden, q, 0),
            Target::K => (c.hidden, kv, q),
            Target::V => (c.hidden, kv, q + kv),
            Target::O => (q, c.hidden, 0),
            Target::Gate => (c.hidden, c.ffn, 0),
            Target::Up => (c.hidden, c.ffn, c.ffn),
            Target::Down => (c.ffn, c.hidden, 0),
        }
    }

    fn module(self, a: &LoraAdapter, layer: usize) -> Option<&ModuleLora> {
        let l = a.layers.get(layer)?;
        match self {
            Target::Q => l.qkv[0].as_ref(),
            Target::K => l.qkv[1].as_ref(),
            Target::V => l.qkv[2].as_ref(),
            Target::O => l.o.as_ref(),
            Target::Gate => l.gate_up[0].as_ref(),
            Target::Up => l.gate_up[1].as_ref(),
            Target::Down => l.down.as_ref(),
        }
    }
}

/// Adapter weights by slot: per layer and target, A (slots, rank, input) and B (slots, output,
/// rank), zero-padded to the slots' rank.
struct LoraSlots<D: Device> {
    rank: usize,
    a: Vec<[Buffer<D, u16>; 7]>,
    b: Vec<[Buffer<D, u16>; 7]>,
    scale: Buffer<D, f32>,
    scale_host: Vec<f32>,
    /// (adapter id, generation) per slot, and when each was last used.
    resident: Vec<Option<(String, u64)>>,
    used: Vec<u64>,
    clock: u64,
}

/// A sequence's pages in the shared cache; dropping it gives them back.
pub struct GpuSeq {
    pages: Vec<i32>,
    len: usize,
    pool: Arc<Mutex<Vec<i32>>>,
}

impl GpuSeq {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for GpuSeq {
    fn drop(&mut self) {
        lock(&self.pool).append(&mut self.pages);
    }
}

fn lock(pool: &Mutex<Vec<i32>>) -> MutexGuard<'_, Vec<i32>> {
    pool.lock().unwrap_or_else(|e| e.into_inner())
}

/// Activation buffers, grown to the largest batch seen.
/// The residual stream between sublayers: the running sum, a second buffer for the next sum, the
/// last sublayer's output, and the normed input of the next.
struct Stream<D: Device> {
    res: Buffer<D, u16>,
    res2: Buffer<D, u16>,
    delta: Buffer<D, u16>,
    h: Buffer<D, u16>,
}

/// What a layer reads and writes, per row.
struct Activations<D: Device> {
    stream: Stream<D>,
    qkv: Buffer<D, u16>,
    q: Buffer<D, u16>,
    attn: Buffer<D, u16>,
    gu: Buffer<D, u16>,
    act: Buffer<D, u16>,
    /// The adapters' rank-wide intermediate.
    v: Buffer<D, f32>,
}

struct Workspace<D: Device> {
    rows: usize,
    acts: Activations<D>,
    /// Each pass's index arrays (token ids, positions, cache rows, attention lengths, block table,
    /// row slots, segment starts and slots, last rows), and the head's inputs and output: grown
    /// as needed and rewritten every pass, never allocated per pass.
    idx: [Option<Buffer<D, i32>>; 9],
    last: [Option<Buffer<D, u16>>; 4],
    logits: Option<Buffer<D, f32>>,
}

impl<D: Device> Stream<D> {
    /// The residual stream takes the last sublayer's output (`res += delta`), and `h` becomes
    /// its norm with weight `w`.
    fn add_and_norm(
        &mut self,
        k: &Kernels<'_, D>,
        n: usize,
        dim: usize,
        eps: f32,
        w: &Buffer<D, u16>,
    ) -> Result<(), DeviceError> {
        k.rms_norm(
            n,
            dim,
            eps,
            &self.delta,
            Some((&self.res, &mut self.res2)),
            w,
            &mut self.h,
        )?;
        std::mem::swap(&mut self.res, &mut self.res2);
        Ok(())
    }
}

/// `buf`, grown (to a power of two) when it holds fewer than `need` elements; contents are
/// whatever was there.
fn grown<'b, D: Device, T: Elem>(
    dev: &D,
    buf: &'b mut Option<Buffer<D, T>>,
    need: usize,
) -> Result<&'b mut Buffer<D, T>, DeviceError> {
    if buf.as_ref().is_none_or(|b| b.len() < need) {
        *buf = None; // free the old one first
        *buf = Some(Buffer::zeros(dev, need.next_power_of_two())?);
    }
    buf.as_mut()
        .ok_or_else(|| DeviceError::Invalid("scratch buffer".into()))
}

/// `host` written into `buf` (grown as needed).
fn staged<'b, D: Device>(
    dev: &D,
    buf: &'b mut Option<Buffer<D, i32>>,
    host: &[i32],
) -> Result<&'b Buffer<D, i32>, DeviceError> {
    let b = grown(dev, buf, host.len())?;
    b.write(dev, host)?;
    Ok(b)
}

impl<D: Device> Workspace<D> {
    fn new(dev: &D, c: &LlamaConfig, rank: usize, rows: usize) -> Result<Self, DeviceError> {
        let q = c.heads * c.head_dim;
        let qkv = q + 2 * c.kv_heads * c.head_dim;
        Ok(Self {
            rows,
            acts: Activations {
                stream: Stream {
                    res: Buffer::zeros(dev, rows * c.hidden)?,
                    res2: Buffer::zeros(dev, rows * c.hidden)?,
                    delta: Buffer::zeros(dev, rows * c.hidden)?,
                    h: Buffer::zeros(dev, rows * c.hidden)?,
                },
                qkv: Buffer::zeros(dev, rows * qkv)?,
                q: Buffer::zeros(dev, rows * q)?,
                attn: Buffer::zeros(dev, rows * q)?,
                gu: Buffer::zeros(dev, rows * 2 * c.ffn)?,
                act: Buffer::zeros(dev, rows * c.ffn)?,
                v: Buffer::zeros(dev, rows * rank)?,
            },
            idx: Default::default(),
            last: Default::default(),
            logits: None,
        })
    }
}

/// A Llama-family model resident on a device.
pub struct GpuModel<D: Device> {
    dev: D,
    pub cfg: LlamaConfig,
    opts: GpuOptions,
    neox: bool,
    embed: QMatrix<D>,
    /// `None`: the embedding doubles as the head.
    head: Option<QMatrix<D>>,
    layers: Vec<Layer<D>>,
    norm: Buffer<D, u16>,
    inv_freq: Buffer<D, f32>,
    pool: Arc<Mutex<Vec<i32>>>,
    lora: Option<LoraSlots<D>>,
    ws: Option<Workspace<D>>,
}

fn unsupported(m: impl Into<String>) -> ModelError {
    ModelError::Unsupported(m.into())
}

/// Rows of 2-D tensors stacked into one matrix on the device, in the file's Q8_0/Q4_1 blocks
/// when every part has them, otherwise re-quantized to Q8_0.
fn qmatrix<D: Device>(dev: &D, parts: &[QTensor]) -> Result<QMatrix<D>, ModelError> {
    let first = parts
        .first()
        .ok_or_else(|| unsupported("an empty projection"))?;
    let (_, cols) = first.shape().dims2()?;
    if cols % 32 != 0 {
        return Err(unsupported(format!(
            "a projection of {cols} columns (the device kernels need whole blocks of 32)"
        )));
    }
    let format = match first.dtype() {
        GgmlDType::Q8_0 => Some(QFormat::Q8_0),
        GgmlDType::Q4_1 => Some(QFormat::Q4_1),
        _ => None,
    };
    let mut rows = 0;
    for p in parts {
        let (r, c) = p.shape().dims2()?;
        if c != cols {
            return Err(unsupported("stacked projections of different widths"));
        }
        rows += r;
    }
    let same = parts.iter().all(|p| p.dtype() == first.dtype());
    let (format, bytes) = match format {
        Some(f) if same => {
            let mut bytes = Vec::new();
            for p in parts {
                bytes.extend_from_slice(&p.data()?);
            }
            (f, bytes)
        }
        _ => {
            let dense: Vec<Tensor> = parts
                .iter()
                .map(|p| p.dequantize(&CandleDevice::Cpu))
                .collect::<Result<_, _>>()?;
            let q = QTensor::quantize(&Tensor::cat(&dense, 0)?, GgmlDType::Q8_0)?;
            (QFormat::Q8_0, q.data()?.to_vec())
        }
    };
    Ok(QMatrix::upload(dev, format, rows, cols, &bytes)?)
}

fn vector<D: Device>(dev: &D, dtype: Dtype, t: &QTensor) -> Result<Buffer<D, u16>, ModelError> {
    let v: Vec<f32> = t.dequantize(&CandleDevice::Cpu)?.flatten_all()?.to_vec1()?;
    let bits: Vec<u16> = v.iter().map(|x| dtype.encode(*x)).collect();
    Ok(Buffer::from_host(dev, &bits)?)
}

impl<D: Device> GpuModel<D> {
    /// Loads a model's weights (named as in GGUF) onto `dev`.
    pub fn load(dev: D, mut src: ModelSource<'_>, opts: GpuOptions) -> Result<Self, ModelError> {
        if opts.lora_rank == 0 || opts.lora_rank > MAX_RANK {
            return Err(unsupported(format!(
                "LoRA slots of rank {} (1..={MAX_RANK})",
                opts.lora_rank
            )));
        }
        let embed_q = src.require("token_embd.weight")?;
        let cfg = src.config(embed_q.shape().dims2()?.0);
        if cfg.arch.requires_qkv_bias()
            || cfg.arch.qk_norm()
            || src.tensor("blk.0.attn_q.bias")?.is_some()
        {
            return Err(unsupported(format!(
                "the {:?} family on the device: its q/k/v biases or q/k norms run only in the CPU forward pass (set device = \"cpu\" for this model)",
                cfg.arch
            )));
        }
        if cfg.q_width() != cfg.hidden {
            return Err(unsupported(format!(
                "heads {} wide over hidden size {} on the device",
                cfg.head_dim, cfg.hidden
            )));
        }
        Heads {
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
        }
        .validate(true)
        .map_err(|e| unsupported(format!("on the device: {e}")))?;
        let embed = qmatrix(&dev, std::slice::from_ref(&embed_q))?;
        let cache = opts.pages * BLOCK_SIZE * cfg.kv_heads * cfg.head_dim;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let mut t = |s: &str| src.require(&format!("blk.{i}.{s}.weight"));
            let (q, k, v) = (t("attn_q")?, t("attn_k")?, t("attn_v")?);
            let (gate, up) = (t("ffn_gate")?, t("ffn_up")?);
            layers.push(Layer {
                attn_norm: vector(&dev, opts.dtype, &t("attn_norm")?)?,
                qkv: qmatrix(&dev, &[q, k, v])?,
                o: qmatrix(&dev, &[t("attn_output")?])?,
                ffn_norm: vector(&dev, opts.dtype, &t("ffn_norm")?)?,
                gate_up: qmatrix(&dev, &[gate, up])?,
                down: qmatrix(&dev, &[t("ffn_down")?])?,
                k_cache: Buffer::zeros(&dev, cache)?,
                v_cache: Buffer::zeros(&dev, cache)?,
            });
        }
        let norm = vector(&dev, opts.dtype, &src.require("output_norm.weight")?)?;
        let head = match src.tensor("output.weight")? {
            Some(t) => Some(qmatrix(&dev, &[t])?),
            None => None,
        };
        let inv = scaled_frequencies(cfg.rope_theta, cfg.head_dim, &cfg.rope_scaling)?;
        let inv_freq = Buffer::from_host(&dev, &inv)?;
        let pool = (0..opts.pages as i32).rev().collect();
        Ok(Self {
            neox: src.rope_style == RopeStyle::Halves,
            dev,
            cfg,
            opts,
            embed,
            head,
            layers,
            norm,
            inv_freq,
            pool: Arc::new(Mutex::new(pool)),
            lora: None,
            ws: None,
        })
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    /// True when q/k rows are in GGUF's interleaved layout (adapters are permuted to match).
    pub fn gguf_layout(&self) -> bool {
        !self.neox
    }

    /// An empty sequence.
    pub fn new_seq(&self) -> GpuSeq {
        GpuSeq {
            pages: Vec::new(),
            len: 0,
            pool: self.pool.clone(),
        }
    }

    /// Cache pages not held by any sequence.
    pub fn free_pages(&self) -> usize {
        lock(&self.pool).len()
    }

    /// Makes the adapter slots hold adapters of rank `rank`. Slots padded to a lower rank are
    /// rebuilt empty (their adapters load again on next use), so slot numbers handed out before
    /// are void: a batch ensures its highest rank before it takes slots.
    pub fn ensure_rank(&mut self, rank: usize) -> Result<(), ModelError> {
        let max = self.opts.lora_rank;
        if rank > max {
            return Err(unsupported(format!(
                "an adapter of rank {rank} (this device serves ranks up to {max})"
            )));
        }
        if self.lora.as_ref().is_none_or(|l| l.rank < rank) {
            let padded = rank.next_power_of_two().clamp(8, max).max(rank);
            self.lora = None; // free the old slots first
            self.lora = Some(self.new_slots(padded)?);
        }
        Ok(())
    }

    /// The slot holding `adapter` (this generation of it), loading it into the least recently
    /// used slot that `busy` does not list when it is not resident. With slots already taken
    /// (`busy`), the slots must hold the adapter's rank already (see `ensure_rank`).
    pub fn adapter_slot(&mut self, adapter: &LoraAdapter, busy: &[i32]) -> Result<i32, ModelError> {
        let held = self.lora.as_ref().map_or(0, |l| l.rank);
        if adapter.rank > held && !busy.is_empty() {
            return Err(unsupported(format!(
                "adapter '{}' of rank {} joins a batch whose slots hold rank {held}",
                adapter.id, adapter.rank
            )));
        }
        self.ensure_rank(adapter.rank.max(1))?;
        let Some(slots) = self.lora.as_mut() else {
            return Err(unsupported("adapter slots"));
        };
        slots.clock += 1;
        let key = (adapter.id.clone(), adapter.generation);
        if let Some(i) = slots.resident.iter().position(|r| r.as_ref() == Some(&key)) {
            slots.used[i] = slots.clock;
            return Ok(i as i32);
        }
        let free = (0..slots.resident.len())
            .filter(|i| !busy.contains(&(*i as i32)))
            .min_by_key(|&i| (slots.resident[i].is_some(), slots.used[i]))
            .ok_or_else(|| {
                unsupported(format!(
                    "more than {} distinct adapters in one batch",
                    slots.resident.len()
                ))
            })?;
        self.write_slot(free, adapter)?;
        let Some(slots) = self.lora.as_mut() else {
            return Err(unsupported("adapter slots"));
        };
        slots.resident[free] = Some(key);
        slots.used[free] = slots.clock;
        Ok(free as i32)
    }

    fn new_slots(&self, r: usize) -> Result<LoraSlots<D>, ModelError> {
        let s = self.opts.lora_slots.max(1);
        let mut a = Vec::with_capacity(self.cfg.n_layers);
        let mut b = Vec::with_capacity(self.cfg.n_layers);
        for _ in 0..self.cfg.n_layers {
            let mut la = Vec::with_capacity(7);
            let mut lb = Vec::with_capacity(7);
            for t in TARGETS {
                let (input, output, _) = t.geometry(&self.cfg);
                la.push(Buffer::zeros(&self.dev, s * r * input)?);
                lb.push(Buffer::zeros(&self.dev, s * output * r)?);
            }
            a.push(one_per_module(la)?);
            b.push(one_per_module(lb)?);
        }
        Ok(LoraSlots {
            rank: r,
            a,
            b,
            scale: Buffer::zeros(&self.dev, s)?,
            scale_host: vec![0.0; s],
            resident: vec![None; s],
            used: vec![0; s],
            clock: 0,
        })
    }

    /// Writes an adapter's modules into slot `slot` (zeros where it targets nothing).
    fn write_slot(&mut self, slot: usize, adapter: &LoraAdapter) -> Result<(), ModelError> {
        let r = self.lora.as_ref().map_or(0, |l| l.rank);
        let dtype = self.opts.dtype;
        if adapter.layers.len() != self.cfg.n_layers {
            return Err(unsupported(format!(
                "adapter '{}' has {} layers, the model {}",
                adapter.id,
                adapter.layers.len(),
                self.cfg.n_layers
            )));
        }
        let Some(slots) = self.lora.as_mut() else {
            return Err(unsupported("adapter slots"));
        };
        for (l, (la, lb)) in slots.a.iter_mut().zip(slots.b.iter_mut()).enumerate() {
            for (ti, t) in TARGETS.iter().enumerate() {
                let (input, output, _) = t.geometry(&self.cfg);
                let mut a = vec![0u16; r * input];
                let mut b = vec![0u16; output * r];
                match t.module(adapter, l) {
                    None => {}
                    Some(ModuleLora::F32(m)) => {
                        if m.rank > r || m.input != input || m.output != output {
                            return Err(unsupported(format!(
                                "adapter '{}': a rank-{} {}x{} module where the device holds rank \
                                 {r} {input}x{output}",
                                adapter.id, m.rank, m.input, m.output
                            )));
                        }
                        // a_t is (input, rank) and b_t (rank, output): A is (r, input) and
                        // B (output, r), rows past the module's rank left zero.
                        for i in 0..input {
                            for j in 0..m.rank {
                                a[j * input + i] = dtype.encode(m.a_t[i * m.rank + j]);
                            }
                        }
                        for j in 0..m.rank {
                            for o in 0..output {
                                b[o * r + j] = dtype.encode(m.b_t[j * output + o]);
                            }
                        }
                    }
                    Some(ModuleLora::Q8(_) | ModuleLora::Q4(_)) => {
                        return Err(unsupported(format!(
                            "adapter '{}' is quantized; the device path takes f32 adapters",
                            adapter.id
                        )))
                    }
                }
                la[ti].write_at(&self.dev, slot * r * input, &a)?;
                lb[ti].write_at(&self.dev, slot * output * r, &b)?;
            }
        }
        slots.scale_host[slot] = adapter.scale as f32;
        slots.scale.write(&self.dev, &slots.scale_host)?;
        Ok(())
    }

    /// Runs `tokens[i]` through the model on top of `seqs[i]` with adapter slot `slots[i]` (-1:
    /// none), appends them to the sequences' caches, and returns each sequence's logits for its
    /// last token.
    pub fn forward(
        &mut self,
        tokens: &[&[u32]],
        seqs: &mut [&mut GpuSeq],
        slots: &[i32],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let context = self.cfg.context_length;
        if tokens.len() != seqs.len() || tokens.len() != slots.len() || tokens.is_empty() {
            return Err(unsupported(
                "forward needs one token list, cache and adapter slot per sequence",
            ));
        }
        if tokens.iter().any(|t| t.is_empty()) {
            return Err(unsupported("forward needs non-empty token lists"));
        }
        for (t, s) in tokens.iter().zip(seqs.iter()) {
            if s.len + t.len() > context {
                return Err(unsupported(format!(
                    "sequence of {} tokens exceeds the context length {context}",
                    s.len + t.len(),
                )));
            }
        }
        let lora_slots = self.lora.as_ref().map_or(0, |l| l.resident.len());
        if let Some(s) = slots.iter().find(|&&s| s < -1 || s >= lora_slots as i32) {
            return Err(unsupported(format!("adapter slot {s} is not loaded")));
        }
        // Pages for the new positions, all or nothing.
        let need: usize = tokens
            .iter()
            .zip(seqs.iter())
            .map(|(t, s)| (s.len + t.len()).div_ceil(BLOCK_SIZE) - s.pages.len())
            .sum();
        {
            let mut pool = lock(&self.pool);
            if pool.len() < need {
                return Err(unsupported(format!(
                    "the device KV cache is full ({} free pages, {need} needed)",
                    pool.len()
                )));
            }
            for (t, s) in tokens.iter().zip(seqs.iter_mut()) {
                while s.pages.len() * BLOCK_SIZE < s.len + t.len() {
                    match pool.pop() {
                        Some(p) => s.pages.push(p),
                        None => return Err(unsupported("the device KV cache is full")),
                    }
                }
            }
        }
        let n: usize = tokens.iter().map(|t| t.len()).sum();
        let max_blocks = seqs.iter().map(|s| s.pages.len()).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(n);
        let mut pos = Vec::with_capacity(n);
        let mut cache_row = Vec::with_capacity(n);
        let mut lens = Vec::with_capacity(n);
        let mut table = Vec::with_capacity(n * max_blocks);
        let mut row_slot = Vec::with_capacity(n);
        let mut seg_start = vec![0i32];
        let mut last = Vec::with_capacity(tokens.len());
        for ((t, s), &slot) in tokens.iter().zip(seqs.iter()).zip(slots) {
            for (i, &tok) in t.iter().enumerate() {
                let p = s.len + i;
                ids.push(i32::try_from(tok).unwrap_or(-1));
                pos.push(p as i32);
                cache_row
                    .push(s.pages[p / BLOCK_SIZE] * BLOCK_SIZE as i32 + (p % BLOCK_SIZE) as i32);
                lens.push(p as i32 + 1);
                table.extend_from_slice(&s.pages);
                table.resize(table.len() + max_blocks - s.pages.len(), 0);
                row_slot.push(slot);
            }
            seg_start.push(ids.len() as i32);
            last.push(ids.len() as i32 - 1);
        }
        let result = self.run(&HostBatch {
            n,
            ids: &ids,
            pos: &pos,
            cache_row: &cache_row,
            lens: &lens,
            table: &table,
            max_blocks,
            row_slot: &row_slot,
            seg_start: &seg_start,
            seg_slot: slots,
            last: &last,
        });
        match result {
            Ok(logits) => {
                for (t, s) in tokens.iter().zip(seqs.iter_mut()) {
                    s.len += t.len();
                }
                Ok(logits)
            }
            // Pages taken for positions that were never written go back with the sequence's
            // length unchanged; it holds the pages for its existing positions only.
            Err(e) => {
                let mut pool = lock(&self.pool);
                for s in seqs.iter_mut() {
                    let keep = s.len.div_ceil(BLOCK_SIZE);
                    pool.extend(s.pages.drain(keep..));
                }
                Err(e)
            }
        }
    }

    /// One batched pass over the rows `batch` lays out; the logits of each sequence's last row.
    fn run(&mut self, batch: &HostBatch<'_>) -> Result<Vec<Vec<f32>>, ModelError> {
        let c = &self.cfg;
        let dev = &self.dev;
        let k = Kernels::new(dev, self.opts.dtype);
        if self.ws.as_ref().is_none_or(|w| w.rows < batch.n) {
            self.ws = None; // free the old buffers first
            let most = self.opts.lora_rank;
            self.ws = Some(Workspace::new(dev, c, most, batch.n.next_power_of_two())?);
        }
        let Some(ws) = self.ws.as_mut() else {
            return Err(unsupported("workspace"));
        };
        let rows = DeviceBatch::stage(dev, &mut ws.idx, batch)?;
        let adapters = batch.seg_slot.iter().any(|&s| s >= 0);
        let pass = Pass {
            k: &k,
            c,
            rows: &rows,
            lora: if adapters { self.lora.as_ref() } else { None },
            rank: self.lora.as_ref().map_or(1, |l| l.rank),
            heads: Heads {
                heads: c.heads,
                kv_heads: c.kv_heads,
                head_dim: c.head_dim,
            },
            pages: Pages {
                pages: self.opts.pages,
                block_size: BLOCK_SIZE,
            },
            neox: self.neox,
            inv_freq: &self.inv_freq,
        };
        let acts = &mut ws.acts;
        k.get_rows(&self.embed, rows.ids, &mut acts.stream.res)?;
        for (l, layer) in self.layers.iter_mut().enumerate() {
            pass.layer(l, layer, acts)?;
        }
        // The last row of each sequence: residual + the last sublayer's output, normed, then the
        // head in f32.
        let (hd, eps, s) = (c.hidden, c.rms_eps as f32, batch.last.len());
        let [gd, gr, sum, hf] = &mut ws.last;
        let (gd, gr) = (grown(dev, gd, s * hd)?, grown(dev, gr, s * hd)?);
        let (sum, hf) = (grown(dev, sum, s * hd)?, grown(dev, hf, s * hd)?);
        k.gather_rows(batch.n, hd, &acts.stream.delta, rows.last, gd)?;
        k.gather_rows(batch.n, hd, &acts.stream.res, rows.last, gr)?;
        k.rms_norm(s, hd, eps, gd, Some((gr, sum)), &self.norm, hf)?;
        let head = self.head.as_ref().unwrap_or(&self.embed);
        let logits = grown(dev, &mut ws.logits, s * head.rows)?;
        k.logits(head, s, hf, logits)?;
        let flat = logits.read(dev, s * head.rows)?;
        Ok(flat.chunks(head.rows).map(<[f32]>::to_vec).collect())
    }
}

/// A pass's index arrays on the device, each beside the host copy the kernels' checks read.
struct DeviceBatch<'a, D: Device> {
    n: usize,
    max_blocks: usize,
    ids: Indices<'a, D>,
    pos: &'a Buffer<D, i32>,
    cache_row: Indices<'a, D>,
    lens: Indices<'a, D>,
    table: Indices<'a, D>,
    row_slot: Indices<'a, D>,
    seg_start: Indices<'a, D>,
    seg_slot: Indices<'a, D>,
    last: Indices<'a, D>,
}

impl<'a, D: Device> DeviceBatch<'a, D> {
    /// Uploads `batch` into the workspace's index buffers (grown as needed).
    fn stage(
        dev: &D,
        idx: &'a mut [Option<Buffer<D, i32>>; 9],
        batch: &HostBatch<'a>,
    ) -> Result<Self, DeviceError> {
        let [ids, pos, row, lens, table, slot, seg, seg_slot, last] = idx;
        Ok(Self {
            n: batch.n,
            max_blocks: batch.max_blocks,
            ids: indices(staged(dev, ids, batch.ids)?, batch.ids),
            pos: staged(dev, pos, batch.pos)?,
            cache_row: indices(staged(dev, row, batch.cache_row)?, batch.cache_row),
            lens: indices(staged(dev, lens, batch.lens)?, batch.lens),
            table: indices(staged(dev, table, batch.table)?, batch.table),
            row_slot: indices(staged(dev, slot, batch.row_slot)?, batch.row_slot),
            seg_start: indices(staged(dev, seg, batch.seg_start)?, batch.seg_start),
            seg_slot: indices(staged(dev, seg_slot, batch.seg_slot)?, batch.seg_slot),
            last: indices(staged(dev, last, batch.last)?, batch.last),
        })
    }
}

/// What every layer of one pass shares: the kernels, the rows, and the adapters in use (none when
/// no sequence of the batch has one).
struct Pass<'a, D: Device> {
    k: &'a Kernels<'a, D>,
    c: &'a LlamaConfig,
    rows: &'a DeviceBatch<'a, D>,
    lora: Option<&'a LoraSlots<D>>,
    rank: usize,
    heads: Heads,
    pages: Pages,
    neox: bool,
    inv_freq: &'a Buffer<D, f32>,
}

impl<D: Device> Pass<'_, D> {
    /// One decoder layer over every row: attention (fused QKV, RoPE and the cache append, paged
    /// attention, output projection) and the gated MLP, each with its adapters' deltas.
    fn layer(
        &self,
        l: usize,
        layer: &mut Layer<D>,
        a: &mut Activations<D>,
    ) -> Result<(), DeviceError> {
        let (k, c, rows) = (self.k, self.c, self.rows);
        let (n, hd, eps) = (rows.n, c.hidden, c.rms_eps as f32);
        let qkv_w = c.heads * c.head_dim + 2 * c.kv_heads * c.head_dim;
        if l == 0 {
            let s = &mut a.stream;
            k.rms_norm(n, hd, eps, &s.res, None, &layer.attn_norm, &mut s.h)?;
        } else {
            a.stream.add_and_norm(k, n, hd, eps, &layer.attn_norm)?;
        }
        k.matvec(&layer.qkv, n, &a.stream.h, &mut a.qkv)?;
        let qkv = [Target::Q, Target::K, Target::V];
        self.adapt(l, &qkv, &a.stream.h, qkv_w, &mut a.v, &mut a.qkv)?;
        k.qkv_rope_cache(
            n,
            self.heads,
            self.pages,
            self.neox,
            &a.qkv,
            rows.pos,
            self.inv_freq,
            rows.cache_row,
            &mut a.q,
            &mut layer.k_cache,
            &mut layer.v_cache,
        )?;
        k.paged_decode_attention(
            self.heads,
            self.pages,
            rows.max_blocks,
            &a.q,
            &layer.k_cache,
            &layer.v_cache,
            rows.table,
            rows.lens,
            &mut a.attn,
        )?;
        k.matvec(&layer.o, n, &a.attn, &mut a.stream.delta)?;
        self.adapt(l, &[Target::O], &a.attn, hd, &mut a.v, &mut a.stream.delta)?;
        a.stream.add_and_norm(k, n, hd, eps, &layer.ffn_norm)?;
        k.matvec(&layer.gate_up, n, &a.stream.h, &mut a.gu)?;
        let gate_up = [Target::Gate, Target::Up];
        self.adapt(l, &gate_up, &a.stream.h, 2 * c.ffn, &mut a.v, &mut a.gu)?;
        k.silu_mul(n, c.ffn, &a.gu, &mut a.act)?;
        k.matvec(&layer.down, n, &a.act, &mut a.stream.delta)?;
        self.adapt(
            l,
            &[Target::Down],
            &a.act,
            hd,
            &mut a.v,
            &mut a.stream.delta,
        )
    }

    /// Adds each row's adapter delta for the targets `ts` of layer `l` to `y` (row stride
    /// `stride`), through the rank-wide `v`.
    fn adapt(
        &self,
        l: usize,
        ts: &[Target],
        x: &Buffer<D, u16>,
        stride: usize,
        v: &mut Buffer<D, f32>,
        y: &mut Buffer<D, u16>,
    ) -> Result<(), DeviceError> {
        let Some(lora) = self.lora else {
            return Ok(());
        };
        let rows = self.rows;
        for &t in ts {
            let (input, output, offset) = t.geometry(self.c);
            let shape = LoraShape {
                rows: rows.n,
                input,
                rank: self.rank,
                output,
                y_stride: stride,
                y_offset: offset,
                slots: lora.resident.len(),
            };
            let ti = t as usize;
            let (a, b) = (&lora.a[l][ti], &lora.b[l][ti]);
            self.k
                .lora_shrink_sgmv(shape, x, a, rows.seg_start, rows.seg_slot, v)?;
            self.k
                .lora_expand_add(shape, v, b, rows.row_slot, &lora.scale, y)?;
        }
        Ok(())
    }
}

/// A batch as the host lays it out for one pass: per row its token, position, cache slot, length
/// attended over, page table and adapter slot; per sequence where its rows start, its adapter
/// slot, and its last row.
#[derive(Clone, Copy)]
struct HostBatch<'a> {
    /// Rows (tokens) in the batch.
    n: usize,
    ids: &'a [i32],
    pos: &'a [i32],
    /// Where each row's key and value go in the paged cache.
    cache_row: &'a [i32],
    /// Positions each row attends over (its own included).
    lens: &'a [i32],
    /// Each row's page table, padded to `max_blocks`.
    table: &'a [i32],
    max_blocks: usize,
    /// Each row's adapter slot (-1: none).
    row_slot: &'a [i32],
    /// The first row of each sequence, and one past the last.
    seg_start: &'a [i32],
    /// Each sequence's adapter slot.
    seg_slot: &'a [i32],
    /// Each sequence's last row.
    last: &'a [i32],
}

/// A model on some device, as the engine's scheduler drives it.
pub trait DeviceForward: Send {
    fn cfg(&self) -> &LlamaConfig;
    fn new_seq(&self) -> GpuSeq;
    /// `GpuModel::forward` with each sequence's adapter (or none), loaded into a slot as needed.
    fn forward(
        &mut self,
        tokens: &[&[u32]],
        seqs: &mut [&mut GpuSeq],
        adapters: &[Option<&LoraAdapter>],
    ) -> Result<Vec<Vec<f32>>, ModelError>;
}

impl<D: Device + 'static> DeviceForward for GpuModel<D> {
    fn cfg(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn new_seq(&self) -> GpuSeq {
        GpuModel::new_seq(self)
    }

    fn forward(
        &mut self,
        tokens: &[&[u32]],
        seqs: &mut [&mut GpuSeq],
        adapters: &[Option<&LoraAdapter>],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let rank = adapters.iter().flatten().map(|a| a.rank).max();
        if let Some(rank) = rank {
            self.ensure_rank(rank.max(1))?;
        }
        let mut slots = Vec::with_capacity(adapters.len());
        for a in adapters {
            let slot = match a {
                Some(a) => self.adapter_slot(a, &slots)?,
                None => -1,
            };
            slots.push(slot);
        }
        GpuModel::forward(self, tokens, seqs, &slots)
    }
}

fn indices<'a, D: Device>(dev: &'a Buffer<D, i32>, host: &'a [i32]) -> Indices<'a, D> {
    Indices { dev, host }
}

fn one_per_module<T>(v: Vec<T>) -> Result<[T; 7], ModelError> {
    v.try_into()
        .map_err(|_| unsupported("seven adapter targets per layer"))
}
