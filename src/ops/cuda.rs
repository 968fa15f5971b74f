//! The CUDA path of the ops (feature `cuda`): the kernels of `kernels/*.cu`, compiled by build.rs
//! into fat binaries embedded here, loaded through cudarc with libcuda opened at run time. Every
//! launch is checked on the host first (shapes, ranks, head sizes, adapter slots), so bad input is
//! an error before launch, never an out-of-bounds access on the device.
//!
//! `CudaKernels::open` answers `NoDriver` on a machine without libcuda (cudarc would panic if asked
//! without the guard), and the caller falls back to the CPU with one log line.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};

/// The embedded fat binaries, one per kernel family.
const MODULES: &[(&str, &[u8], &[&str])] = &[
    (
        "lora",
        include_bytes!(concat!(env!("OUT_DIR"), "/lora.fatbin")),
        &["lora_shrink_bgmv", "lora_shrink_sgmv", "lora_expand_add"],
    ),
    (
        "norm",
        include_bytes!(concat!(env!("OUT_DIR"), "/norm.fatbin")),
        &["rms_norm"],
    ),
    (
        "rope",
        include_bytes!(concat!(env!("OUT_DIR"), "/rope.fatbin")),
        &["rope"],
    ),
    (
        "act",
        include_bytes!(concat!(env!("OUT_DIR"), "/act.fatbin")),
        &["silu_mul"],
    ),
    (
        "attention",
        include_bytes!(concat!(env!("OUT_DIR"), "/attention.fatbin")),
        &["paged_decode_attention"],
    ),
    (
        "qmatvec",
        include_bytes!(concat!(env!("OUT_DIR"), "/qmatvec.fatbin")),
        &["q8_0_matvec", "q4_1_matvec"],
    ),
];

/// The most a LoRA rank may be (the expand kernel stages a row's rank vector in shared memory).
pub const MAX_RANK: usize = 64;
/// The largest attention head the decode kernel handles.
pub const MAX_HEAD_DIM: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver (libcuda) on this machine")]
    NoDriver,
    #[error("CUDA device {0} is not present ({1} found)")]
    NoDevice(usize, i32),
    #[error("CUDA: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, CudaError>;

/// Storage type of a kernel's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F16,
    Bf16,
}

impl Dtype {
    fn suffix(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// The loaded kernels on one device.
pub struct CudaKernels {
    pub ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<String, CudaFunction>,
}

fn invalid(m: impl Into<String>) -> CudaError {
    CudaError::Invalid(m.into())
}

/// `[value, ...]` must each be in `0..slots` or -1.
fn check_slots(slots_of_rows: &[i32], slots: usize) -> Result<()> {
    match slots_of_rows.iter().find(|&&a| a < -1 || a >= slots as i32) {
        Some(a) => Err(invalid(format!(
            "adapter slot {a} is out of range (0..{slots}, or -1 for none)"
        ))),
        None => Ok(()),
    }
}

fn check_len<T>(what: &str, s: &CudaSlice<T>, want: usize) -> Result<()> {
    if s.len() < want {
        return Err(invalid(format!(
            "{what} holds {} elements, the shape needs {want}",
            s.len()
        )));
    }
    Ok(())
}

fn grid(x: usize, y: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x as u32, y as u32, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Shapes of one LoRA module applied to a batch.
#[derive(Debug, Clone, Copy)]
pub struct LoraShape {
    pub rows: usize,
    pub input: usize,
    pub rank: usize,
    /// Output columns of the module.
    pub output: usize,
    /// Row stride of the output tensor, and the first column the module writes.
    pub y_stride: usize,
    pub y_offset: usize,
    /// Adapter slots stacked in A and B.
    pub slots: usize,
}

impl LoraShape {
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.rank > MAX_RANK {
            return Err(invalid(format!(
                "LoRA rank {} is not supported (1..={MAX_RANK})",
                self.rank
            )));
        }
        if self.y_offset + self.output > self.y_stride {
            return Err(invalid(format!(
                "output columns {}..{} exceed the row width {}",
                self.y_offset,
                self.y_offset + self.output,
                self.y_stride
            )));
        }
        if self.rows == 0 || self.input == 0 || self.slots == 0 {
            return Err(invalid("empty LoRA shape"));
        }
        Ok(())
    }
}

impl CudaKernels {
    /// Opens device `ordinal` and loads every kernel.
    pub fn open(ordinal: usize) -> Result<Self> {
        // SAFETY: only probes whether libcuda can be opened; loads nothing else.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        let count = CudaContext::device_count()?;
        if ordinal as i32 >= count {
            return Err(CudaError::NoDevice(ordinal, count));
        }
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.default_stream();
        let mut functions = HashMap::new();
        for (_, image, names) in MODULES {
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))?;
            for name in *names {
                for dtype in [Dtype::F16, Dtype::Bf16] {
                    let full = format!("{name}_{}", dtype.suffix());
                    functions.insert(full.clone(), module.load_function(&full)?);
                }
            }
        }
        Ok(Self {
            ordinal,
            ctx,
            stream,
            functions,
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn function(&self, name: &str, dtype: Dtype) -> Result<&CudaFunction> {
        let full = format!("{name}_{}", dtype.suffix());
        self.functions
            .get(&full)
            .ok_or_else(|| invalid(format!("kernel {full} is not loaded")))
    }

    /// v (rows, rank) = x (rows, input) · A[slot]ᵀ, one slot per row (`slot_host` is the same
    /// array as `slot`, read on the host to check the range).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_shrink_bgmv(
        &self,
        dtype: Dtype,
        shape: LoraShape,
        x: &CudaSlice<u16>,
        a: &CudaSlice<u16>,
        slot: &CudaSlice<i32>,
        slot_host: &[i32],
        v: &mut CudaSlice<f32>,
    ) -> Result<()> {
        shape.validate()?;
        check_slots(slot_host, shape.slots)?;
        check_len("x", x, shape.rows * shape.input)?;
        check_len("A", a, shape.slots * shape.rank * shape.input)?;
        check_len("slot", slot, shape.rows)?;
        check_len("v", v, shape.rows * shape.rank)?;
        let f = self.function("lora_shrink_bgmv", dtype)?;
        let (rows, input, rank, slots) = (
            shape.rows as i32,
            shape.input as i32,
            shape.rank as i32,
            shape.slots as i32,
        );
        let mut b = self.stream.launch_builder(f);
        b.arg(x).arg(a).arg(slot).arg(v);
        b.arg(&rows).arg(&input).arg(&rank).arg(&slots);
        // SAFETY: argument types and order match the kernel's signature; sizes were checked.
        unsafe { b.launch(grid(shape.rows, shape.rank.div_ceil(4), 128)) }?;
        Ok(())
    }

    /// The shrink over segments of consecutive rows sharing a slot (prefill): `seg_start` holds
    /// S + 1 row offsets and `seg_slot` S slots, given on the host as well for the checks.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_shrink_sgmv(
        &self,
        dtype: Dtype,
        shape: LoraShape,
        x: &CudaSlice<u16>,
        a: &CudaSlice<u16>,
        seg_start: &CudaSlice<i32>,
        seg_slot: &CudaSlice<i32>,
        host: (&[i32], &[i32]),
        v: &mut CudaSlice<f32>,
    ) -> Result<()> {
        shape.validate()?;
        let (starts, slots_host) = host;
        let segments = slots_host.len();
        if starts.len() != segments + 1
            || starts.first() != Some(&0)
            || starts.windows(2).any(|w| w[1] < w[0])
            || starts.last().copied() != Some(shape.rows as i32)
        {
            return Err(invalid(format!(
                "segment starts must rise from 0 to {} in {} steps",
                shape.rows,
                segments + 1
            )));
        }
        check_slots(slots_host, shape.slots)?;
        check_len("x", x, shape.rows * shape.input)?;
        check_len("A", a, shape.slots * shape.rank * shape.input)?;
        check_len("seg_start", seg_start, segments + 1)?;
        check_len("seg_slot", seg_slot, segments)?;
        check_len("v", v, shape.rows * shape.rank)?;
        let f = self.function("lora_shrink_sgmv", dtype)?;
        let ints = [
            segments as i32,
            shape.input as i32,
            shape.rank as i32,
            shape.slots as i32,
        ];
        let mut b = self.stream.launch_builder(f);
        b.arg(x).arg(a).arg(seg_start).arg(seg_slot).arg(v);
        for i in &ints {
            b.arg(i);
        }
        // SAFETY: argument types and order match the kernel's signature; sizes were checked.
        unsafe { b.launch(grid(segments, shape.rank.div_ceil(4), 128)) }?;
        Ok(())
    }

    /// RoPE in place on x (n, heads, head_dim) at positions `pos` (n).
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        dtype: Dtype,
        n: usize,
        heads: usize,
        head_dim: usize,
        theta: f32,
        neox: bool,
        x: &mut CudaSlice<u16>,
        pos: &CudaSlice<i32>,
    ) -> Result<()> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) || head_dim > MAX_HEAD_DIM {
            return Err(invalid(format!(
                "head size {head_dim} is not supported (even, at most {MAX_HEAD_DIM})"
            )));
        }
        check_len("x", x, n * heads * head_dim)?;
        check_len("pos", pos, n)?;
        let f = self.function("rope", dtype)?;
        let ints = [n as i32, heads as i32, head_dim as i32];
        let neox = i32::from(neox);
        let mut b = self.stream.launch_builder(f);
        b.arg(x).arg(pos);
        for i in &ints {
            b.arg(i);
        }
        b.arg(&theta).arg(&neox);
        // SAFETY: as above.
        unsafe { b.launch(grid(n, heads, (head_dim / 2).next_multiple_of(32) as u32)) }?;
        Ok(())
    }

    /// SwiGLU: out (rows, ffn) from the fused gate/up projection gu (rows, 2 ffn).
    pub fn silu_mul(
        &self,
        dtype: Dtype,
        rows: usize,
        ffn: usize,
        gu: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
    ) -> Result<()> {
        check_len("gu", gu, rows * 2 * ffn)?;
        check_len("out", out, rows * ffn)?;
        let f = self.function("silu_mul", dtype)?;
        let (r, n) = (rows as i32, ffn as i32);
        let mut b = self.stream.launch_builder(f);
        b.arg(gu).arg(out).arg(&r).arg(&n);
        // SAFETY: as above.
        unsafe { b.launch(grid((rows * ffn).div_ceil(256), 1, 256)) }?;
        Ok(())
    }

    /// y (rows) = W · x for GGML blocks of Q8_0 (`q4_1` false) or Q4_1 (`q4_1` true).
    #[allow(clippy::too_many_arguments)]
    pub fn quantized_matvec(
        &self,
        dtype: Dtype,
        q4_1: bool,
        rows: usize,
        cols: usize,
        w: &CudaSlice<u8>,
        x: &CudaSlice<u16>,
        y: &mut CudaSlice<u16>,
    ) -> Result<()> {
        if cols == 0 || !cols.is_multiple_of(32) {
            return Err(invalid(format!(
                "{cols} columns are not whole blocks of 32"
            )));
        }
        let block_bytes = if q4_1 { 20 } else { 34 };
        check_len("W", w, rows * cols / 32 * block_bytes)?;
        check_len("x", x, cols)?;
        check_len("y", y, rows)?;
        let name = if q4_1 { "q4_1_matvec" } else { "q8_0_matvec" };
        let f = self.function(name, dtype)?;
        let (r, c) = (rows as i32, cols as i32);
        let mut b = self.stream.launch_builder(f);
        b.arg(w).arg(x).arg(y).arg(&r).arg(&c);
        // SAFETY: as above.
        unsafe { b.launch(grid(rows.div_ceil(8), 1, 256)) }?;
        Ok(())
    }

    /// y[:, off..off+n] += scale[slot] · v · B[slot]ᵀ for rows with an adapter.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_expand_add(
        &self,
        dtype: Dtype,
        shape: LoraShape,
        v: &CudaSlice<f32>,
        b_weights: &CudaSlice<u16>,
        slot: &CudaSlice<i32>,
        slot_host: &[i32],
        scale: &CudaSlice<f32>,
        y: &mut CudaSlice<u16>,
    ) -> Result<()> {
        shape.validate()?;
        check_slots(slot_host, shape.slots)?;
        check_len("v", v, shape.rows * shape.rank)?;
        check_len("B", b_weights, shape.slots * shape.output * shape.rank)?;
        check_len("scale", scale, shape.slots)?;
        check_len("y", y, shape.rows * shape.y_stride)?;
        let f = self.function("lora_expand_add", dtype)?;
        let ints = [
            shape.rows as i32,
            shape.rank as i32,
            shape.output as i32,
            shape.y_stride as i32,
            shape.y_offset as i32,
            shape.slots as i32,
        ];
        let mut b = self.stream.launch_builder(f);
        b.arg(v).arg(b_weights).arg(slot).arg(scale).arg(y);
        for i in &ints {
            b.arg(i);
        }
        // SAFETY: as above.
        unsafe { b.launch(grid(shape.rows, shape.output.div_ceil(128), 128)) }?;
        Ok(())
    }

    /// RMS norm of `rows` rows of `dim`, with the residual added first when given.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        dtype: Dtype,
        rows: usize,
        dim: usize,
        eps: f32,
        x: &CudaSlice<u16>,
        residual: Option<(&CudaSlice<u16>, &mut CudaSlice<u16>)>,
        w: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
    ) -> Result<()> {
        check_len("x", x, rows * dim)?;
        check_len("w", w, dim)?;
        check_len("out", out, rows * dim)?;
        let f = self.function("rms_norm", dtype)?;
        let (r, d) = (rows as i32, dim as i32);
        let null = 0u64;
        let mut b = self.stream.launch_builder(f);
        b.arg(x);
        match residual {
            Some((res, res_out)) => {
                check_len("residual", res, rows * dim)?;
                check_len("residual_out", res_out, rows * dim)?;
                b.arg(res).arg(w).arg(out).arg(res_out);
            }
            None => {
                b.arg(&null).arg(w).arg(out).arg(&null);
            }
        }
        b.arg(&r).arg(&d).arg(&eps);
        // SAFETY: as above; null pointers are what the kernel expects without a residual.
        unsafe { b.launch(grid(rows, 1, 256)) }?;
        Ok(())
    }

    /// Paged decode attention; `block_table` is (seqs, max_blocks), `seq_lens` (seqs).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode_attention(
        &self,
        dtype: Dtype,
        seqs: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        max_blocks: usize,
        q: &CudaSlice<u16>,
        k_cache: &CudaSlice<u16>,
        v_cache: &CudaSlice<u16>,
        block_table: &CudaSlice<i32>,
        seq_lens: &CudaSlice<i32>,
        host: (&[i32], &[i32]),
        out: &mut CudaSlice<u16>,
    ) -> Result<()> {
        // `host` is (block_table, seq_lens) as uploaded: every page a sequence reads must exist.
        let (table_host, lens_host) = host;
        let page = block_size * kv_heads * head_dim;
        let pages = k_cache.len().checked_div(page).unwrap_or(0);
        for (s, &len) in lens_host.iter().enumerate().take(seqs) {
            if len < 0 || len as usize > max_blocks * block_size {
                return Err(invalid(format!(
                    "sequence {s} has length {len}, beyond its {max_blocks} pages of {block_size}"
                )));
            }
            for b in 0..(len as usize).div_ceil(block_size.max(1)) {
                let p = table_host.get(s * max_blocks + b).copied().unwrap_or(-1);
                if p < 0 || p as usize >= pages {
                    return Err(invalid(format!(
                        "sequence {s} block {b} names page {p}, outside the {pages} pages of the cache"
                    )));
                }
            }
        }
        if head_dim == 0 || head_dim > MAX_HEAD_DIM {
            return Err(invalid(format!(
                "head size {head_dim} is not supported (1..={MAX_HEAD_DIM})"
            )));
        }
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(invalid(format!(
                "{heads} query heads cannot share {kv_heads} kv heads evenly"
            )));
        }
        check_len("q", q, seqs * heads * head_dim)?;
        check_len("block_table", block_table, seqs * max_blocks)?;
        check_len("seq_lens", seq_lens, seqs)?;
        check_len("out", out, seqs * heads * head_dim)?;
        if k_cache.len() != v_cache.len()
            || !k_cache
                .len()
                .is_multiple_of(block_size * kv_heads * head_dim)
        {
            return Err(invalid("the key and value caches do not hold whole pages"));
        }
        let f = self.function("paged_decode_attention", dtype)?;
        let ints = [
            seqs as i32,
            heads as i32,
            kv_heads as i32,
            head_dim as i32,
            block_size as i32,
            max_blocks as i32,
        ];
        let scale = 1.0f32 / (head_dim as f32).sqrt();
        let mut b = self.stream.launch_builder(f);
        b.arg(q)
            .arg(k_cache)
            .arg(v_cache)
            .arg(block_table)
            .arg(seq_lens)
            .arg(out);
        for i in &ints {
            b.arg(i);
        }
        b.arg(&scale);
        // SAFETY: as above; the kernel needs exactly 128 threads per block.
        unsafe { b.launch(grid(seqs, heads, 128)) }?;
        Ok(())
    }
}
