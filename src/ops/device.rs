//! The ops on an accelerator: the kernels of `kernels/*.cu` behind one checked interface, whatever
//! runs them. A [`Device`] owns memory and launches kernels by name, the way the CUDA driver does
//! (`ops::cuda::CudaDevice` through cudarc; the tests' emulated device runs the same sources on the
//! CPU). [`Kernels`] is the op layer above it: every launch is checked on the host first (shapes,
//! ranks, head sizes, adapter slots, token ids, cache rows), so bad input is an error before
//! launch, never an out-of-bounds access on the device.

use std::marker::PhantomData;

/// Input rows one matvec block takes at once (`FW_QMV_ROWS` in kernels/qmatvec.cu).
const QMV_ROWS: usize = 8;

/// The most a LoRA rank may be (the expand kernel stages a row's rank vector in shared memory).
pub const MAX_RANK: usize = 64;
/// The largest attention head the attention and RoPE kernels handle.
pub const MAX_HEAD_DIM: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no CUDA driver (libcuda) on this machine")]
    NoDriver,
    #[error("CUDA device {0} is not present ({1} found)")]
    NoDevice(usize, i32),
    #[error("device: {0}")]
    Driver(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, DeviceError>;

fn invalid(m: impl Into<String>) -> DeviceError {
    DeviceError::Invalid(m.into())
}

/// One kernel argument, as the kernel's parameter list takes it.
pub enum Arg<'a, B> {
    /// A device pointer to the buffer's first byte.
    Buf(&'a B),
    /// A null device pointer (an optional input the kernel skips).
    Null,
    I32(i32),
    F32(f32),
}

/// Memory and kernel launches on one accelerator. Launches are ordered: each sees the writes of
/// the launches and copies before it; `read` returns once everything before it has finished.
pub trait Device: Send + Sync {
    type Buf: Send + Sync;
    /// What the log calls it.
    fn describe(&self) -> String;
    /// `bytes` of zeroed memory.
    fn alloc(&self, bytes: usize) -> Result<Self::Buf>;
    /// A new buffer holding `bytes`.
    fn upload(&self, bytes: &[u8]) -> Result<Self::Buf>;
    /// Overwrites `bytes.len()` bytes of `dst` from byte `offset` (within what it holds).
    fn write(&self, dst: &mut Self::Buf, offset: usize, bytes: &[u8]) -> Result<()>;
    /// The first `bytes` bytes of `src` (no more than it holds).
    fn read(&self, src: &Self::Buf, bytes: usize) -> Result<Vec<u8>>;
    /// Launches the kernel named `kernel` (with its dtype suffix) over a grid of (x, y) blocks of
    /// `block` threads.
    fn launch(
        &self,
        kernel: &str,
        grid: (u32, u32),
        block: u32,
        args: &[Arg<'_, Self::Buf>],
    ) -> Result<()>;
}

/// An element type of device buffers: raw f16/bf16 bits (`u16`), f32, i32, or bytes of
/// quantized blocks.
pub trait Elem: Copy + Default + 'static {
    const SIZE: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(bytes: &[u8]) -> Self;
}

macro_rules! elem {
    ($t:ty) => {
        impl Elem for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get(bytes: &[u8]) -> Self {
                let mut b = [0u8; std::mem::size_of::<$t>()];
                b.copy_from_slice(&bytes[..Self::SIZE]);
                <$t>::from_le_bytes(b)
            }
        }
    };
}
elem!(u8);
elem!(u16);
elem!(i32);
elem!(f32);

/// A typed buffer of `len` elements on a device.
pub struct Buffer<D: Device, T: Elem> {
    raw: D::Buf,
    len: usize,
    _t: PhantomData<T>,
}

impl<D: Device, T: Elem> Buffer<D, T> {
    pub fn zeros(dev: &D, len: usize) -> Result<Self> {
        Ok(Self {
            raw: dev.alloc((len * T::SIZE).max(1))?,
            len,
            _t: PhantomData,
        })
    }

    pub fn from_host(dev: &D, host: &[T]) -> Result<Self> {
        if host.is_empty() {
            return Self::zeros(dev, 0);
        }
        Ok(Self {
            raw: dev.upload(&to_bytes(host))?,
            len: host.len(),
            _t: PhantomData,
        })
    }

    /// Overwrites the first `host.len()` elements.
    pub fn write(&mut self, dev: &D, host: &[T]) -> Result<()> {
        self.write_at(dev, 0, host)
    }

    /// Overwrites `host.len()` elements from element `at`.
    pub fn write_at(&mut self, dev: &D, at: usize, host: &[T]) -> Result<()> {
        if at + host.len() > self.len {
            return Err(invalid(format!(
                "{} elements at {at} do not fit a buffer of {}",
                host.len(),
                self.len
            )));
        }
        if host.is_empty() {
            return Ok(());
        }
        dev.write(&mut self.raw, at * T::SIZE, &to_bytes(host))
    }

    /// The first `n` elements.
    pub fn read(&self, dev: &D, n: usize) -> Result<Vec<T>> {
        if n > self.len {
            return Err(invalid(format!(
                "cannot read {n} elements of a buffer of {}",
                self.len
            )));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let bytes = dev.read(&self.raw, n * T::SIZE)?;
        Ok(bytes.chunks_exact(T::SIZE).map(T::get).collect())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn arg(&self) -> Arg<'_, D::Buf> {
        Arg::Buf(&self.raw)
    }

    fn need(&self, what: &str, n: usize) -> Result<()> {
        if self.len < n {
            return Err(invalid(format!(
                "{what} holds {} elements, the shape needs {n}",
                self.len
            )));
        }
        Ok(())
    }
}

fn to_bytes<T: Elem>(host: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(host.len() * T::SIZE);
    for v in host {
        v.put(&mut out);
    }
    out
}

/// Storage type of activations and adapter weights on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F16,
    Bf16,
}

impl Dtype {
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// The bits of `v` in this type (round to nearest even).
    pub fn encode(self, v: f32) -> u16 {
        match self {
            Dtype::F16 => half::f16::from_f32(v).to_bits(),
            Dtype::Bf16 => half::bf16::from_f32(v).to_bits(),
        }
    }

    pub fn decode(self, bits: u16) -> f32 {
        match self {
            Dtype::F16 => half::f16::from_bits(bits).to_f32(),
            Dtype::Bf16 => half::bf16::from_bits(bits).to_f32(),
        }
    }
}

/// GGML block formats the dequantizing kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    Q8_0,
    Q4_1,
}

impl QFormat {
    fn prefix(self) -> &'static str {
        match self {
            QFormat::Q8_0 => "q8_0",
            QFormat::Q4_1 => "q4_1",
        }
    }

    /// Bytes of one block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::Q8_0 => 34,
            QFormat::Q4_1 => 20,
        }
    }
}

/// A quantized matrix on the device: `rows` rows of `cols` weights in GGML blocks.
pub struct QMatrix<D: Device> {
    pub format: QFormat,
    pub rows: usize,
    pub cols: usize,
    pub blocks: Buffer<D, u8>,
}

impl<D: Device> QMatrix<D> {
    /// Uploads GGML block bytes (as `QTensor::data` gives them) of a rows × cols matrix.
    pub fn upload(
        dev: &D,
        format: QFormat,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self> {
        if cols == 0 || !cols.is_multiple_of(32) {
            return Err(invalid(format!(
                "{cols} columns are not whole blocks of 32"
            )));
        }
        let want = rows * cols / 32 * format.block_bytes();
        if bytes.len() != want {
            return Err(invalid(format!(
                "a {rows}x{cols} {format:?} matrix is {want} bytes, not {}",
                bytes.len()
            )));
        }
        Ok(Self {
            format,
            rows,
            cols,
            blocks: Buffer::from_host(dev, bytes)?,
        })
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

/// Attention heads of a model.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Heads {
    /// Checks the head size (even where RoPE rotates pairs) and the grouping.
    pub fn validate(&self, rope: bool) -> Result<()> {
        if self.head_dim == 0
            || self.head_dim > MAX_HEAD_DIM
            || (rope && !self.head_dim.is_multiple_of(2))
        {
            return Err(invalid(format!(
                "head size {} is not supported (even, at most {MAX_HEAD_DIM})",
                self.head_dim
            )));
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(invalid(format!(
                "{} query heads cannot share {} kv heads evenly",
                self.heads, self.kv_heads
            )));
        }
        Ok(())
    }
}

/// A paged KV cache layer's geometry: `pages` pages of `block_size` positions.
#[derive(Debug, Clone, Copy)]
pub struct Pages {
    pub pages: usize,
    pub block_size: usize,
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

/// Every index must be in `0..bound`.
fn check_indices(what: &str, idx: &[i32], bound: usize) -> Result<()> {
    match idx.iter().find(|&&i| i < 0 || i as usize >= bound) {
        Some(i) => Err(invalid(format!("{what} {i} is outside 0..{bound}"))),
        None => Ok(()),
    }
}

/// A device-resident index array together with the host copy it was uploaded from, which the
/// checks read.
pub struct Indices<'a, D: Device> {
    pub dev: &'a Buffer<D, i32>,
    pub host: &'a [i32],
}

impl<D: Device> Clone for Indices<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<D: Device> Copy for Indices<'_, D> {}

impl<D: Device> Indices<'_, D> {
    fn check(&self, what: &str, n: usize) -> Result<()> {
        if self.host.len() < n {
            return Err(invalid(format!(
                "{what} lists {} entries, the shape needs {n}",
                self.host.len()
            )));
        }
        self.dev.need(what, n)
    }
}

fn grid(x: usize, y: usize) -> Result<(u32, u32)> {
    match (u32::try_from(x), u32::try_from(y)) {
        (Ok(x), Ok(y)) if x > 0 && y > 0 && y <= 65_535 => Ok((x, y)),
        _ => Err(invalid(format!("a launch grid of {x} x {y} blocks"))),
    }
}

fn int(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| invalid(format!("{v} does not fit a kernel's int argument")))
}

/// A residual to add before a norm, and where the sum goes.
pub type Residual<'a, D> = (&'a Buffer<D, u16>, &'a mut Buffer<D, u16>);

/// The checked kernel launches on one device, in one storage type.
pub struct Kernels<'a, D: Device> {
    pub dev: &'a D,
    pub dtype: Dtype,
}

impl<'a, D: Device> Kernels<'a, D> {
    pub fn new(dev: &'a D, dtype: Dtype) -> Self {
        Self { dev, dtype }
    }

    fn launch(
        &self,
        name: &str,
        grid: (u32, u32),
        block: u32,
        args: &[Arg<'_, D::Buf>],
    ) -> Result<()> {
        self.dev.launch(
            &format!("{name}_{}", self.dtype.suffix()),
            grid,
            block,
            args,
        )
    }

    /// v (rows, rank) = x (rows, input) · A[slot]ᵀ, one slot per row (BGMV, decode).
    pub fn lora_shrink_bgmv(
        &self,
        shape: LoraShape,
        x: &Buffer<D, u16>,
        a: &Buffer<D, u16>,
        slot: Indices<'_, D>,
        v: &mut Buffer<D, f32>,
    ) -> Result<()> {
        shape.validate()?;
        slot.check("slot", shape.rows)?;
        check_slots(&slot.host[..shape.rows], shape.slots)?;
        x.need("x", shape.rows * shape.input)?;
        a.need("A", shape.slots * shape.rank * shape.input)?;
        v.need("v", shape.rows * shape.rank)?;
        self.launch(
            "lora_shrink_bgmv",
            grid(shape.rows, shape.rank.div_ceil(4))?,
            128,
            &[
                x.arg(),
                a.arg(),
                slot.dev.arg(),
                v.arg(),
                Arg::I32(int(shape.rows)?),
                Arg::I32(int(shape.input)?),
                Arg::I32(int(shape.rank)?),
                Arg::I32(int(shape.slots)?),
            ],
        )
    }

    /// The shrink over segments of consecutive rows sharing a slot (SGMV, prefill): `seg_start`
    /// holds S + 1 row offsets and `seg_slot` S slots.
    pub fn lora_shrink_sgmv(
        &self,
        shape: LoraShape,
        x: &Buffer<D, u16>,
        a: &Buffer<D, u16>,
        seg_start: Indices<'_, D>,
        seg_slot: Indices<'_, D>,
        v: &mut Buffer<D, f32>,
    ) -> Result<()> {
        shape.validate()?;
        let segments = seg_slot.host.len();
        let starts = seg_start.host;
        if starts.len() != segments + 1
            || starts.first() != Some(&0)
            || starts.windows(2).any(|w| w[1] < w[0])
            || starts.last().copied() != Some(int(shape.rows)?)
        {
            return Err(invalid(format!(
                "segment starts must rise from 0 to {} in {} steps",
                shape.rows,
                segments + 1
            )));
        }
        check_slots(seg_slot.host, shape.slots)?;
        seg_start.check("seg_start", segments + 1)?;
        seg_slot.check("seg_slot", segments)?;
        x.need("x", shape.rows * shape.input)?;
        a.need("A", shape.slots * shape.rank * shape.input)?;
        v.need("v", shape.rows * shape.rank)?;
        self.launch(
            "lora_shrink_sgmv",
            grid(segments, shape.rank.div_ceil(4))?,
            128,
            &[
                x.arg(),
                a.arg(),
                seg_start.dev.arg(),
                seg_slot.dev.arg(),
                v.arg(),
                Arg::I32(int(segments)?),
                Arg::I32(int(shape.input)?),
                Arg::I32(int(shape.rank)?),
                Arg::I32(int(shape.slots)?),
            ],
        )
    }

    /// y[:, off..off+n] += scale[slot] · v · B[slot]ᵀ for rows with an adapter.
    pub fn lora_expand_add(
        &self,
        shape: LoraShape,
        v: &Buffer<D, f32>,
        b: &Buffer<D, u16>,
        slot: Indices<'_, D>,
        scale: &Buffer<D, f32>,
        y: &mut Buffer<D, u16>,
    ) -> Result<()> {
        shape.validate()?;
        slot.check("slot", shape.rows)?;
        check_slots(&slot.host[..shape.rows], shape.slots)?;
        v.need("v", shape.rows * shape.rank)?;
        b.need("B", shape.slots * shape.output * shape.rank)?;
        scale.need("scale", shape.slots)?;
        y.need("y", shape.rows * shape.y_stride)?;
        self.launch(
            "lora_expand_add",
            grid(shape.rows, shape.output.div_ceil(128))?,
            128,
            &[
                v.arg(),
                b.arg(),
                slot.dev.arg(),
                scale.arg(),
                y.arg(),
                Arg::I32(int(shape.rows)?),
                Arg::I32(int(shape.rank)?),
                Arg::I32(int(shape.output)?),
                Arg::I32(int(shape.y_stride)?),
                Arg::I32(int(shape.y_offset)?),
                Arg::I32(int(shape.slots)?),
            ],
        )
    }

    /// RMS norm of `rows` rows of `dim` into `out`. With `residual = (r, sum)`, x + r is written
    /// to `sum` first and normed.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        rows: usize,
        dim: usize,
        eps: f32,
        x: &Buffer<D, u16>,
        residual: Option<Residual<'_, D>>,
        w: &Buffer<D, u16>,
        out: &mut Buffer<D, u16>,
    ) -> Result<()> {
        x.need("x", rows * dim)?;
        w.need("w", dim)?;
        out.need("out", rows * dim)?;
        let (r, sum) = match residual {
            Some((r, sum)) => {
                r.need("residual", rows * dim)?;
                sum.need("residual_out", rows * dim)?;
                (r.arg(), sum.arg())
            }
            None => (Arg::Null, Arg::Null),
        };
        self.launch(
            "rms_norm",
            grid(rows, 1)?,
            256,
            &[
                x.arg(),
                r,
                w.arg(),
                out.arg(),
                sum,
                Arg::I32(int(rows)?),
                Arg::I32(int(dim)?),
                Arg::F32(eps),
            ],
        )
    }

    /// RoPE in place on x (n, heads, head_dim) at positions `pos` (n), angles from `theta`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        n: usize,
        heads: usize,
        head_dim: usize,
        theta: f32,
        neox: bool,
        x: &mut Buffer<D, u16>,
        pos: &Buffer<D, i32>,
    ) -> Result<()> {
        Heads {
            heads,
            kv_heads: heads.max(1),
            head_dim,
        }
        .validate(true)?;
        x.need("x", n * heads * head_dim)?;
        pos.need("pos", n)?;
        self.launch(
            "rope",
            grid(n, heads)?,
            (head_dim / 2).next_multiple_of(32) as u32,
            &[
                x.arg(),
                pos.arg(),
                Arg::I32(int(n)?),
                Arg::I32(int(heads)?),
                Arg::I32(int(head_dim)?),
                Arg::F32(theta),
                Arg::I32(i32::from(neox)),
            ],
        )
    }

    /// From the fused projection qkv (n, (H + 2 KVH) · D): rotated queries into `q` (n, H, D),
    /// rotated keys and the values into cache rows `slot` of the paged caches. Angles are
    /// `pos · inv_freq` (D / 2 frequencies, scaling applied by the caller).
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_rope_cache(
        &self,
        n: usize,
        heads: Heads,
        pages: Pages,
        neox: bool,
        qkv: &Buffer<D, u16>,
        pos: &Buffer<D, i32>,
        inv_freq: &Buffer<D, f32>,
        slot: Indices<'_, D>,
        q: &mut Buffer<D, u16>,
        k_cache: &mut Buffer<D, u16>,
        v_cache: &mut Buffer<D, u16>,
    ) -> Result<()> {
        heads.validate(true)?;
        let Heads {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
        } = heads;
        slot.check("cache slot", n)?;
        check_indices("cache row", &slot.host[..n], pages.pages * pages.block_size)?;
        qkv.need("qkv", n * (h + 2 * kvh) * d)?;
        pos.need("pos", n)?;
        inv_freq.need("inv_freq", d / 2)?;
        q.need("q", n * h * d)?;
        let cache = pages.pages * pages.block_size * kvh * d;
        k_cache.need("k_cache", cache)?;
        v_cache.need("v_cache", cache)?;
        self.launch(
            "qkv_rope_cache",
            grid(n, h + kvh)?,
            (d / 2).next_multiple_of(32) as u32,
            &[
                qkv.arg(),
                pos.arg(),
                inv_freq.arg(),
                slot.dev.arg(),
                q.arg(),
                k_cache.arg(),
                v_cache.arg(),
                Arg::I32(int(n)?),
                Arg::I32(int(h)?),
                Arg::I32(int(kvh)?),
                Arg::I32(int(d)?),
                Arg::I32(i32::from(neox)),
            ],
        )
    }

    /// SwiGLU: out (rows, ffn) from the fused gate/up projection gu (rows, 2 ffn).
    pub fn silu_mul(
        &self,
        rows: usize,
        ffn: usize,
        gu: &Buffer<D, u16>,
        out: &mut Buffer<D, u16>,
    ) -> Result<()> {
        gu.need("gu", rows * 2 * ffn)?;
        out.need("out", rows * ffn)?;
        self.launch(
            "silu_mul",
            grid((rows * ffn).div_ceil(256), 1)?,
            256,
            &[
                gu.arg(),
                out.arg(),
                Arg::I32(int(rows)?),
                Arg::I32(int(ffn)?),
            ],
        )
    }

    /// out[t] = x[idx[t]] for `n` rows of `dim`, x holding `rows` rows.
    pub fn gather_rows(
        &self,
        rows: usize,
        dim: usize,
        x: &Buffer<D, u16>,
        idx: Indices<'_, D>,
        out: &mut Buffer<D, u16>,
    ) -> Result<()> {
        let n = idx.host.len();
        idx.check("row index", n)?;
        check_indices("row index", idx.host, rows)?;
        x.need("x", rows * dim)?;
        out.need("out", n * dim)?;
        self.launch(
            "gather_rows",
            grid(n, 1)?,
            256,
            &[
                x.arg(),
                idx.dev.arg(),
                out.arg(),
                Arg::I32(int(n)?),
                Arg::I32(int(dim)?),
            ],
        )
    }

    /// y (n, rows) = x (n, cols) · Wᵀ.
    pub fn matvec(
        &self,
        w: &QMatrix<D>,
        n: usize,
        x: &Buffer<D, u16>,
        y: &mut Buffer<D, u16>,
    ) -> Result<()> {
        self.product("matvec", w, n, x, y)
    }

    /// `matvec` into f32 (the model's head).
    pub fn logits(
        &self,
        w: &QMatrix<D>,
        n: usize,
        x: &Buffer<D, u16>,
        y: &mut Buffer<D, f32>,
    ) -> Result<()> {
        self.product("logits", w, n, x, y)
    }

    fn product<T: Elem>(
        &self,
        kind: &str,
        w: &QMatrix<D>,
        n: usize,
        x: &Buffer<D, u16>,
        y: &mut Buffer<D, T>,
    ) -> Result<()> {
        x.need("x", n * w.cols)?;
        y.need("y", n * w.rows)?;
        self.launch(
            &format!("{}_{kind}", w.format.prefix()),
            grid(w.rows.div_ceil(8), n.div_ceil(QMV_ROWS))?,
            256,
            &[
                w.blocks.arg(),
                x.arg(),
                y.arg(),
                Arg::I32(int(w.rows)?),
                Arg::I32(int(w.cols)?),
                Arg::I32(int(n)?),
            ],
        )
    }

    /// out[t] = W[ids[t]], dequantized (the token embedding).
    pub fn get_rows(
        &self,
        w: &QMatrix<D>,
        ids: Indices<'_, D>,
        out: &mut Buffer<D, u16>,
    ) -> Result<()> {
        let n = ids.host.len();
        ids.check("token id", n)?;
        check_indices("token id", ids.host, w.rows)?;
        out.need("out", n * w.cols)?;
        self.launch(
            &format!("{}_get_rows", w.format.prefix()),
            grid(n, 1)?,
            256,
            &[
                w.blocks.arg(),
                ids.dev.arg(),
                out.arg(),
                Arg::I32(int(n)?),
                Arg::I32(int(w.cols)?),
            ],
        )
    }

    /// Attention of one query row per entry of `seq_lens` over a paged KV cache: row s attends
    /// to the first `seq_lens[s]` positions its row of `block_table` (max_blocks pages) names.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode_attention(
        &self,
        heads: Heads,
        pages: Pages,
        max_blocks: usize,
        q: &Buffer<D, u16>,
        k_cache: &Buffer<D, u16>,
        v_cache: &Buffer<D, u16>,
        block_table: Indices<'_, D>,
        seq_lens: Indices<'_, D>,
        out: &mut Buffer<D, u16>,
    ) -> Result<()> {
        heads.validate(false)?;
        let Heads {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
        } = heads;
        let seqs = seq_lens.host.len();
        let bs = pages.block_size;
        if bs == 0 {
            return Err(invalid("pages of 0 positions"));
        }
        seq_lens.check("seq_lens", seqs)?;
        block_table.check("block_table", seqs * max_blocks)?;
        for (s, &len) in seq_lens.host.iter().enumerate() {
            if len <= 0 || len as usize > max_blocks * bs {
                return Err(invalid(format!(
                    "sequence {s} has length {len}, outside its {max_blocks} pages of {bs}"
                )));
            }
            let row =
                &block_table.host[s * max_blocks..s * max_blocks + (len as usize).div_ceil(bs)];
            check_indices(&format!("sequence {s} page"), row, pages.pages)?;
        }
        q.need("q", seqs * h * d)?;
        out.need("out", seqs * h * d)?;
        let cache = pages.pages * bs * kvh * d;
        k_cache.need("k_cache", cache)?;
        v_cache.need("v_cache", cache)?;
        let scale = 1.0f32 / (d as f32).sqrt();
        self.launch(
            "paged_decode_attention",
            grid(seqs, h)?,
            128,
            &[
                q.arg(),
                k_cache.arg(),
                v_cache.arg(),
                block_table.dev.arg(),
                seq_lens.dev.arg(),
                out.arg(),
                Arg::I32(int(seqs)?),
                Arg::I32(int(h)?),
                Arg::I32(int(kvh)?),
                Arg::I32(int(d)?),
                Arg::I32(int(bs)?),
                Arg::I32(int(max_blocks)?),
                Arg::F32(scale),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_lora_shapes_are_named() {
        let ok = LoraShape {
            rows: 4,
            input: 64,
            rank: 16,
            output: 32,
            y_stride: 96,
            y_offset: 64,
            slots: 2,
        };
        ok.validate().unwrap();
        for (shape, expected) in [
            (LoraShape { rank: 0, ..ok }, "rank 0"),
            (LoraShape { rank: 65, ..ok }, "rank 65"),
            (LoraShape { y_offset: 65, ..ok }, "exceed the row width"),
            (LoraShape { rows: 0, ..ok }, "empty"),
        ] {
            let e = shape.validate().unwrap_err().to_string();
            assert!(e.contains(expected), "{e}");
        }
        assert!(check_slots(&[0, 1, -1], 2).is_ok());
        assert!(check_slots(&[0, 2], 2)
            .unwrap_err()
            .to_string()
            .contains("slot 2"));
        assert!(check_indices("token id", &[3, -1], 5)
            .unwrap_err()
            .to_string()
            .contains("token id -1"));
    }
}
