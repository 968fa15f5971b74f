//! The CUDA kernels in `kernels/`, verified without a GPU:
//! - compiled by nvcc (from NVIDIA's PyPI wheels) for sm_80 and sm_90, with ptxas's resource report
//!   checked for spills (`scripts/check-kernels.sh`);
//! - run on the CPU from the same sources through `kernels/emu/cuda_emu.h` (built here with g++),
//!   and compared with the Rust CPU implementations in `flywheel::ops` on fresh random inputs at
//!   several shapes, in f16 and bf16, with every output poisoned (NaN) before each run.
#![allow(unsafe_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use flywheel::engine::sampling::argmax;
use flywheel::ops;
use flywheel::ops::attention::{attention, SeqAttention};
use flywheel::ops::device::{Arg, Device as KernelDevice, DeviceError, Dtype as DevDtype};
use flywheel::ops::lora::{bgmv_add, LowRank, Slot};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn kernels_compile_for_sm80_and_sm90_without_spills() {
    let out = Command::new("bash")
        .arg(root().join("scripts/check-kernels.sh"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kernels = [
        "lora_shrink_bgmv",
        "lora_shrink_sgmv",
        "lora_expand_add",
        "rms_norm",
        "rope",
        "silu_mul",
        "paged_decode_attention",
        "q8_0_matvec",
        "q4_1_matvec",
        "q8_0_logits",
        "q4_1_logits",
        "q8_0_get_rows",
        "q4_1_get_rows",
        "qkv_rope_cache",
        "gather_rows",
    ];
    for arch in ["sm_80", "sm_90"] {
        for k in kernels {
            for dtype in ["f16", "bf16"] {
                let row = table
                    .lines()
                    .find(|l| l.starts_with(&format!("| {k}_{dtype} | {arch} |")))
                    .unwrap_or_else(|| {
                        panic!("no ptxas report for {k}_{dtype} on {arch}:\n{table}")
                    });
                let cells: Vec<&str> = row.split('|').map(str::trim).collect();
                // | kernel | arch | registers | spill stores | spill loads | stack | smem |
                let regs: u32 = cells[3].parse().unwrap();
                assert!(regs > 0 && regs <= 255, "{row}");
                assert_eq!((cells[4], cells[5]), ("0", "0"), "spills: {row}");
            }
        }
    }
}

// ---- the emulated kernels ----

/// Builds `kernels/emu/harness.cpp` with g++ once per test run and opens it.
fn library() -> &'static Library {
    static LIB: OnceLock<Library> = OnceLock::new();
    LIB.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kernels_emu.so");
        let status = Command::new("g++")
            .args(["-std=c++20", "-O2", "-shared", "-fPIC", "-pthread"])
            .args(["-Wall", "-Wextra", "-Werror"])
            .arg("-o")
            .arg(&out)
            .arg(root().join("kernels/emu/harness.cpp"))
            .status()
            .expect("g++ is needed to build the kernel emulation");
        assert!(status.success(), "building the emulated kernels failed");
        Library::open(&out)
    })
}

extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

struct Library(*mut c_void);
// SAFETY: the handle is only used to look up symbols, which dlsym allows from any thread.
unsafe impl Send for Library {}
unsafe impl Sync for Library {}

impl Library {
    fn open(path: &Path) -> Self {
        let c = CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; RTLD_NOW (2) resolves everything at load.
        let h = unsafe { dlopen(c.as_ptr(), 2) };
        assert!(!h.is_null(), "dlopen {}", path.display());
        Self(h)
    }

    fn symbol(&self, name: &str) -> *mut c_void {
        let c = CString::new(name).unwrap();
        // SAFETY: a live handle and a NUL-terminated name.
        let p = unsafe { dlsym(self.0, c.as_ptr()) };
        assert!(!p.is_null(), "no symbol {name}");
        p
    }
}

/// Resolves `emu_<name>` as a function of type `F`.
macro_rules! entry {
    ($name:expr, $ty:ty) => {{
        let p = library().symbol(&format!("emu_{}", $name));
        // SAFETY: the harness defines `emu_<name>` with exactly this C signature (see harness.cpp).
        unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
    }};
}

/// A storage type of the kernels: f16 or bf16, as raw bits.
#[derive(Clone, Copy, Debug)]
enum Dtype {
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
    fn encode(self, v: f32) -> u16 {
        match self {
            Dtype::F16 => half::f16::from_f32(v).to_bits(),
            Dtype::Bf16 => half::bf16::from_f32(v).to_bits(),
        }
    }
    fn decode(self, b: u16) -> f32 {
        match self {
            Dtype::F16 => half::f16::from_bits(b).to_f32(),
            Dtype::Bf16 => half::bf16::from_bits(b).to_f32(),
        }
    }
    /// A NaN, to poison outputs before a run.
    fn nan(self) -> u16 {
        match self {
            Dtype::F16 => 0x7e00,
            Dtype::Bf16 => 0x7fc0,
        }
    }
    /// Relative tolerance of one rounding to this type (plus f32 reordering).
    fn tol(self) -> f32 {
        match self {
            Dtype::F16 => 2e-3,
            Dtype::Bf16 => 1.6e-2,
        }
    }
}

/// Random values in [-scale, scale), from a seed that changes every run (printed on failure).
struct Rng(u64);

impl Rng {
    fn fresh(tag: u64) -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let seed = t ^ tag.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        eprintln!("kernel test seed {seed:#x}");
        Self(seed | 1)
    }
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// Values stored in `dt`: the bits, and the f32 the bits stand for (what the reference computes on).
fn stored(dt: Dtype, v: &[f32]) -> (Vec<u16>, Vec<f32>) {
    let bits: Vec<u16> = v.iter().map(|x| dt.encode(*x)).collect();
    let back = bits.iter().map(|b| dt.decode(*b)).collect();
    (bits, back)
}

fn assert_close(what: &str, dt: Dtype, got: &[f32], want: &[f32], scale: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let tol = dt.tol();
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite() && (g - w).abs() <= tol * (w.abs() + scale),
            "{what} ({}) [{i}]: kernel {g} vs reference {w}",
            dt.suffix()
        );
    }
}

fn t2(v: &[f32], rows: usize, cols: usize) -> Tensor {
    Tensor::from_vec(v.to_vec(), (rows, cols), &Device::Cpu).unwrap()
}

type ShrinkBgmv = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    *const u16,
    *const u16,
    *const i32,
    *mut f32,
    i32,
    i32,
    i32,
    i32,
);
type ShrinkSgmv = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    *const u16,
    *const u16,
    *const i32,
    *const i32,
    *mut f32,
    i32,
    i32,
    i32,
    i32,
);
type ExpandAdd = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    *const f32,
    *const u16,
    *const i32,
    *const f32,
    *mut u16,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
);

#[test]
fn lora_kernels_match_the_cpu_bgmv() {
    for dt in [Dtype::F16, Dtype::Bf16] {
        for (rank, input, n) in [(8usize, 64usize, 96usize), (16, 576, 192), (64, 128, 40)] {
            lora_case(dt, rank, input, n);
        }
    }
}

fn lora_case(dt: Dtype, rank: usize, input: usize, n: usize) {
    let mut rng = Rng::fresh(rank as u64);
    let slots = 3usize;
    // Ragged segments of rows sharing an adapter, one without (-1).
    let segments: [(usize, i32); 5] = [(3, 0), (1, -1), (5, 2), (2, 1), (1, 0)];
    let rows: usize = segments.iter().map(|s| s.0).sum();
    let slot: Vec<i32> = segments
        .iter()
        .flat_map(|&(len, a)| std::iter::repeat_n(a, len))
        .collect();
    let mut seg_start = vec![0i32];
    for (len, _) in segments {
        seg_start.push(seg_start.last().unwrap() + len as i32);
    }
    let seg_slot: Vec<i32> = segments.iter().map(|s| s.1).collect();
    let (x, xf) = stored(dt, &rng.vec(rows * input, 1.0));
    let (a, af) = stored(dt, &rng.vec(slots * rank * input, 0.2));
    let (b, bf) = stored(dt, &rng.vec(slots * n * rank, 0.2));
    let scale: Vec<f32> = (0..slots).map(|s| 0.5 + s as f32).collect();
    // The delta lands in a slice of a wider output (a fused projection): columns [7, 7 + n).
    let (stride, offset) = (n + 13, 7usize);
    let (y0, y0f) = stored(dt, &rng.vec(rows * stride, 1.0));

    let warps = 4u32;
    let r_tiles = rank.div_ceil(warps as usize) as u32;
    let bgmv: ShrinkBgmv = entry!(format!("lora_shrink_bgmv_{}", dt.suffix()), ShrinkBgmv);
    let sgmv: ShrinkSgmv = entry!(format!("lora_shrink_sgmv_{}", dt.suffix()), ShrinkSgmv);
    let expand: ExpandAdd = entry!(format!("lora_expand_add_{}", dt.suffix()), ExpandAdd);
    let mut v = vec![f32::NAN; rows * rank];
    let mut v_seg = vec![f32::NAN; rows * rank];
    let mut y = y0.clone();
    // SAFETY: every buffer has the size the kernel indexes for these shapes.
    unsafe {
        bgmv(
            rows as u32,
            r_tiles,
            warps * 32,
            x.as_ptr(),
            a.as_ptr(),
            slot.as_ptr(),
            v.as_mut_ptr(),
            rows as i32,
            input as i32,
            rank as i32,
            slots as i32,
        );
        sgmv(
            segments.len() as u32,
            r_tiles,
            warps * 32,
            x.as_ptr(),
            a.as_ptr(),
            seg_start.as_ptr(),
            seg_slot.as_ptr(),
            v_seg.as_mut_ptr(),
            segments.len() as i32,
            input as i32,
            rank as i32,
            slots as i32,
        );
        expand(
            rows as u32,
            n.div_ceil(64) as u32,
            64,
            v.as_ptr(),
            b.as_ptr(),
            slot.as_ptr(),
            scale.as_ptr(),
            y.as_mut_ptr(),
            rows as i32,
            rank as i32,
            n as i32,
            stride as i32,
            offset as i32,
            slots as i32,
        );
    }
    // SGMV walks segments; it must agree with BGMV's per-row result bit for bit.
    assert_eq!(v, v_seg, "sgmv vs bgmv");

    // The reference: the CPU BGMV op on the same (rounded) values.
    let modules: Vec<LowRank> = (0..slots)
        .map(|s| {
            LowRank::from_kernel_layout(
                &af[s * rank * input..(s + 1) * rank * input],
                &bf[s * n * rank..(s + 1) * n * rank],
                rank,
                input,
                n,
            )
        })
        .collect();
    let row_slots: Vec<Vec<Slot<'_>>> = slot
        .iter()
        .map(|&s| match s {
            s if s >= 0 => vec![Slot {
                module: &modules[s as usize],
                scale: scale[s as usize],
                offset,
            }],
            _ => vec![],
        })
        .collect();
    let mut want = y0f.clone();
    bgmv_add(&mut want, stride, &xf, input, &row_slots);
    let got: Vec<f32> = y.iter().map(|b| dt.decode(*b)).collect();
    assert_close(
        &format!("lora r={rank} in={input} n={n}"),
        dt,
        &got,
        &want,
        1.0,
    );
    // Rows without an adapter are untouched, bit for bit.
    for t in (0..rows).filter(|&t| slot[t] < 0) {
        assert_eq!(
            y[t * stride..(t + 1) * stride],
            y0[t * stride..(t + 1) * stride]
        );
    }
}

type RmsNorm = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    *const u16,
    *const u16,
    *const u16,
    *mut u16,
    *mut u16,
    i32,
    i32,
    f32,
);

#[test]
fn rms_norm_matches_the_cpu_op_with_and_without_the_residual() {
    for dt in [Dtype::F16, Dtype::Bf16] {
        for (rows, dim) in [(3usize, 576usize), (5, 2048), (1, 64)] {
            let mut rng = Rng::fresh(dim as u64);
            let (x, xf) = stored(dt, &rng.vec(rows * dim, 2.0));
            let (r, rf) = stored(dt, &rng.vec(rows * dim, 2.0));
            let (w, wf) = stored(dt, &rng.vec(dim, 1.0));
            let f: RmsNorm = entry!(format!("rms_norm_{}", dt.suffix()), RmsNorm);
            for with_residual in [false, true] {
                let mut out = vec![dt.nan(); rows * dim];
                let mut res_out = vec![dt.nan(); rows * dim];
                // SAFETY: buffers sized rows × dim (dim for w); null residual pointers are allowed.
                unsafe {
                    f(
                        rows as u32,
                        1,
                        256,
                        x.as_ptr(),
                        if with_residual {
                            r.as_ptr()
                        } else {
                            std::ptr::null()
                        },
                        w.as_ptr(),
                        out.as_mut_ptr(),
                        if with_residual {
                            res_out.as_mut_ptr()
                        } else {
                            std::ptr::null_mut()
                        },
                        rows as i32,
                        dim as i32,
                        1e-5,
                    );
                }
                let h: Vec<f32> = if with_residual {
                    xf.iter().zip(&rf).map(|(a, b)| a + b).collect()
                } else {
                    xf.clone()
                };
                let want = ops::rms_norm(
                    &t2(&h, rows, dim),
                    &Tensor::new(wf.as_slice(), &Device::Cpu).unwrap(),
                    1e-5,
                )
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
                let got: Vec<f32> = out.iter().map(|b| dt.decode(*b)).collect();
                assert_close("rms_norm", dt, &got, &want, 0.1);
                if with_residual {
                    let got: Vec<f32> = res_out.iter().map(|b| dt.decode(*b)).collect();
                    assert_close("rms_norm residual", dt, &got, &h, 0.1);
                }
            }
        }
    }
}

type Rope = unsafe extern "C" fn(u32, u32, u32, *mut u16, *const i32, i32, i32, i32, f32, i32);

#[test]
fn rope_matches_the_cpu_op_in_both_layouts() {
    for dt in [Dtype::F16, Dtype::Bf16] {
        for (n, heads, hd, theta) in [(4usize, 9usize, 64usize, 10000f32), (3, 4, 128, 500000.0)] {
            let mut rng = Rng::fresh(hd as u64);
            let (x0, xf) = stored(dt, &rng.vec(n * heads * hd, 1.0));
            let pos: Vec<i32> = (0..n).map(|i| (i * 37 + 5) as i32).collect();
            let half = hd / 2;
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            for &p in &pos {
                for i in 0..half {
                    let a = p as f32 * theta.powf(-2.0 * i as f32 / hd as f32);
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
            let f: Rope = entry!(format!("rope_{}", dt.suffix()), Rope);
            for (neox, style) in [
                (1, ops::RopeStyle::Halves),
                (0, ops::RopeStyle::Interleaved),
            ] {
                let mut x = x0.clone();
                // SAFETY: x holds n × heads × hd values, pos n.
                unsafe {
                    f(
                        n as u32,
                        heads as u32,
                        half.next_multiple_of(32) as u32,
                        x.as_mut_ptr(),
                        pos.as_ptr(),
                        n as i32,
                        heads as i32,
                        hd as i32,
                        theta,
                        neox,
                    );
                }
                let xt = Tensor::from_vec(xf.clone(), (n, heads, hd), &Device::Cpu).unwrap();
                let want = ops::rope(&xt, &t2(&cos, n, half), &t2(&sin, n, half), style)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let got: Vec<f32> = x.iter().map(|b| dt.decode(*b)).collect();
                assert_close(&format!("rope neox={neox}"), dt, &got, &want, 0.05);
            }
        }
    }
}

type SiluMul = unsafe extern "C" fn(u32, u32, u32, *const u16, *mut u16, i32, i32);

#[test]
fn silu_mul_matches_the_cpu_op() {
    for dt in [Dtype::F16, Dtype::Bf16] {
        let (rows, ffn) = (5usize, 1536usize);
        let mut rng = Rng::fresh(ffn as u64);
        let (gu, guf) = stored(dt, &rng.vec(rows * 2 * ffn, 4.0));
        let mut out = vec![dt.nan(); rows * ffn];
        let f: SiluMul = entry!(format!("silu_mul_{}", dt.suffix()), SiluMul);
        // SAFETY: gu is rows × 2ffn, out rows × ffn.
        unsafe {
            f(
                (rows * ffn).div_ceil(256) as u32,
                1,
                256,
                gu.as_ptr(),
                out.as_mut_ptr(),
                rows as i32,
                ffn as i32,
            );
        }
        let g = t2(&guf, rows, 2 * ffn);
        let want = ops::silu_mul(
            &g.narrow(1, 0, ffn).unwrap(),
            &g.narrow(1, ffn, ffn).unwrap(),
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        let got: Vec<f32> = out.iter().map(|b| dt.decode(*b)).collect();
        assert_close("silu_mul", dt, &got, &want, 0.05);
    }
}

type PagedAttention = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    *const u16,
    *const u16,
    *const u16,
    *const i32,
    *const i32,
    *mut u16,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f32,
);

#[test]
fn paged_decode_attention_matches_the_cpu_attention() {
    for dt in [Dtype::F16, Dtype::Bf16] {
        // (heads, kv_heads, head_dim): GQA 3:1 (SmolLM2), 4:1 (Llama-3.2-1B), 1:1.
        for (heads, kv_heads, hd) in [(9usize, 3usize, 64usize), (8, 2, 128), (2, 2, 32)] {
            attention_case(dt, heads, kv_heads, hd);
        }
    }
}

fn attention_case(dt: Dtype, heads: usize, kv_heads: usize, hd: usize) {
    let mut rng = Rng::fresh((heads * hd) as u64);
    // Ragged lengths: one position, less than a block, several tiles of 128.
    let lens = [1usize, 13, 300, 129];
    let block_size = 16usize;
    let max_blocks = lens.iter().map(|l| l.div_ceil(block_size)).max().unwrap();
    let total_blocks: usize = lens.iter().map(|l| l.div_ceil(block_size)).sum::<usize>() + 3;
    let width = kv_heads * hd;
    // Each sequence's contiguous cache (the CPU layout), then scattered into shuffled pages.
    let seq_k: Vec<Vec<f32>> = lens
        .iter()
        .map(|&l| stored(dt, &rng.vec(l * width, 1.0)).1)
        .collect();
    let seq_v: Vec<Vec<f32>> = lens
        .iter()
        .map(|&l| stored(dt, &rng.vec(l * width, 1.0)).1)
        .collect();
    let mut order: Vec<usize> = (0..total_blocks).collect();
    for i in (1..order.len()).rev() {
        let j = ((rng.next() + 1.0) * 0.5 * (i + 1) as f32) as usize % (i + 1);
        order.swap(i, j);
    }
    let mut k_cache = vec![dt.nan(); total_blocks * block_size * width];
    let mut v_cache = vec![dt.nan(); total_blocks * block_size * width];
    let mut table = vec![-1i32; lens.len() * max_blocks];
    let mut next = 0;
    for (s, &len) in lens.iter().enumerate() {
        for b in 0..len.div_ceil(block_size) {
            let page = order[next];
            next += 1;
            table[s * max_blocks + b] = page as i32;
            for o in 0..block_size.min(len - b * block_size) {
                let p = b * block_size + o;
                for w in 0..width {
                    k_cache[(page * block_size + o) * width + w] =
                        dt.encode(seq_k[s][p * width + w]);
                    v_cache[(page * block_size + o) * width + w] =
                        dt.encode(seq_v[s][p * width + w]);
                }
            }
        }
    }
    let (q, qf) = stored(dt, &rng.vec(lens.len() * heads * hd, 1.0));
    let seq_lens: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    let mut out = vec![dt.nan(); lens.len() * heads * hd];
    let f: PagedAttention = entry!(
        format!("paged_decode_attention_{}", dt.suffix()),
        PagedAttention
    );
    let scale = 1.0 / (hd as f32).sqrt();
    // SAFETY: every buffer is sized for these shapes; the table names only written pages.
    unsafe {
        f(
            lens.len() as u32,
            heads as u32,
            128,
            q.as_ptr(),
            k_cache.as_ptr(),
            v_cache.as_ptr(),
            table.as_ptr(),
            seq_lens.as_ptr(),
            out.as_mut_ptr(),
            lens.len() as i32,
            heads as i32,
            kv_heads as i32,
            hd as i32,
            block_size as i32,
            max_blocks as i32,
            scale,
        );
    }
    let seqs: Vec<SeqAttention<'_>> = (0..lens.len())
        .map(|s| SeqAttention {
            k: &seq_k[s],
            v: &seq_v[s],
            row: s,
            tokens: 1,
        })
        .collect();
    let mut want = vec![0f32; lens.len() * heads * hd];
    attention(&qf, &mut want, &seqs, heads, kv_heads, hd);
    let got: Vec<f32> = out.iter().map(|b| dt.decode(*b)).collect();
    assert_close(
        &format!("paged attention h={heads} kvh={kv_heads} d={hd}"),
        dt,
        &got,
        &want,
        0.05,
    );
}

type QMatvec = unsafe extern "C" fn(u32, u32, u32, *const u8, *const u16, *mut u16, i32, i32, i32);
type QLogits = unsafe extern "C" fn(u32, u32, u32, *const u8, *const u16, *mut f32, i32, i32, i32);
type QGetRows = unsafe extern "C" fn(u32, u32, u32, *const u8, *const i32, *mut u16, i32, i32);

#[test]
fn quantized_matvec_logits_and_row_gather_match_candle_dequantized_weights() {
    for dt in [Dtype::F16, Dtype::Bf16] {
        for (format, ggml) in [("q8_0", GgmlDType::Q8_0), ("q4_1", GgmlDType::Q4_1)] {
            for (rows, cols, n) in [(70usize, 576usize, 1usize), (33, 1536, 11)] {
                let mut rng = Rng::fresh(cols as u64);
                let w = t2(&rng.vec(rows * cols, 1.0), rows, cols);
                let q = QTensor::quantize(&w, ggml).unwrap();
                let bytes = q.data().unwrap().to_vec();
                let wd = q.dequantize(&Device::Cpu).unwrap();
                let (x, xf) = stored(dt, &rng.vec(n * cols, 1.0));
                let mut y = vec![dt.nan(); n * rows];
                let mut logits = vec![f32::NAN; n * rows];
                let f: QMatvec = entry!(format!("{format}_matvec_{}", dt.suffix()), QMatvec);
                let g: QLogits = entry!(format!("{format}_logits_{}", dt.suffix()), QLogits);
                let grid = (rows.div_ceil(8) as u32, n.div_ceil(8) as u32);
                // SAFETY: the GGML blocks of a rows × cols matrix, x of n × cols, y of n × rows.
                unsafe {
                    f(
                        grid.0,
                        grid.1,
                        256,
                        bytes.as_ptr(),
                        x.as_ptr(),
                        y.as_mut_ptr(),
                        rows as i32,
                        cols as i32,
                        n as i32,
                    );
                    g(
                        grid.0,
                        grid.1,
                        256,
                        bytes.as_ptr(),
                        x.as_ptr(),
                        logits.as_mut_ptr(),
                        rows as i32,
                        cols as i32,
                        n as i32,
                    );
                }
                let want = t2(&xf, n, cols)
                    .matmul(&wd.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let got: Vec<f32> = y.iter().map(|b| dt.decode(*b)).collect();
                let what = format!("{format} matvec {rows}x{cols} over {n} rows");
                assert_close(&what, dt, &got, &want, 1.0);
                // The f32 head: only the inputs were rounded, so it is as close as f32 allows.
                assert_close(
                    &format!("{what} (f32 out)"),
                    Dtype::F16,
                    &logits,
                    &want,
                    0.1,
                );

                let ids: Vec<i32> = (0..5).map(|i| ((i * 17 + n) % rows) as i32).collect();
                let mut out = vec![dt.nan(); ids.len() * cols];
                let r: QGetRows = entry!(format!("{format}_get_rows_{}", dt.suffix()), QGetRows);
                // SAFETY: ids index rows of W; out holds ids.len() rows of cols.
                unsafe {
                    r(
                        ids.len() as u32,
                        1,
                        256,
                        bytes.as_ptr(),
                        ids.as_ptr(),
                        out.as_mut_ptr(),
                        ids.len() as i32,
                        cols as i32,
                    );
                }
                let dense = wd.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let want: Vec<f32> = ids
                    .iter()
                    .flat_map(|&i| dense[i as usize * cols..(i as usize + 1) * cols].to_vec())
                    .collect();
                let got: Vec<f32> = out.iter().map(|b| dt.decode(*b)).collect();
                assert_close(&format!("{format} get_rows {cols}"), dt, &got, &want, 1.0);
            }
        }
    }
}

// ---- the forward pass on the emulated device ----

/// The kernels' sources run on the CPU behind `ops::device::Device`, as the CUDA device runs
/// them on a GPU: memory is host memory, launches go through `emu_call_<kernel>` with the
/// arguments packed as cuLaunchKernel takes them. New memory is filled with 0xff bytes (NaN in
/// f16, bf16 and f32; -1 as an index), so a kernel or a forward pass that reads memory nothing
/// wrote shows in its output.
struct Emu;

struct EmuBuf {
    words: std::cell::UnsafeCell<Vec<u64>>,
    bytes: usize,
}

// SAFETY: launches run one at a time (the harness serialises them, and a kernel's threads finish
// before `launch` returns), so no two launches touch a buffer at once.
unsafe impl Send for EmuBuf {}
unsafe impl Sync for EmuBuf {}

impl EmuBuf {
    fn ptr(&self) -> *mut u8 {
        // SAFETY: the Vec is never resized after allocation; only its contents change.
        unsafe { (*self.words.get()).as_mut_ptr().cast::<u8>() }
    }
}

type EmuCall = unsafe extern "C" fn(u32, u32, u32, *mut *mut c_void);

impl KernelDevice for Emu {
    type Buf = EmuBuf;

    fn describe(&self) -> String {
        "emulated".into()
    }

    fn alloc(&self, bytes: usize) -> Result<EmuBuf, DeviceError> {
        Ok(EmuBuf {
            words: std::cell::UnsafeCell::new(vec![u64::MAX; bytes.div_ceil(8)]),
            bytes,
        })
    }

    fn upload(&self, bytes: &[u8]) -> Result<EmuBuf, DeviceError> {
        let mut b = self.alloc(bytes.len())?;
        self.write(&mut b, 0, bytes)?;
        Ok(b)
    }

    fn write(&self, dst: &mut EmuBuf, offset: usize, bytes: &[u8]) -> Result<(), DeviceError> {
        assert!(offset + bytes.len() <= dst.bytes, "write past the buffer");
        // SAFETY: in bounds (checked above); the source is a separate host slice.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst.ptr().add(offset), bytes.len())
        };
        Ok(())
    }

    fn read(&self, src: &EmuBuf, bytes: usize) -> Result<Vec<u8>, DeviceError> {
        assert!(bytes <= src.bytes, "read past the buffer");
        let mut out = vec![0u8; bytes];
        // SAFETY: in bounds (checked above).
        unsafe { std::ptr::copy_nonoverlapping(src.ptr(), out.as_mut_ptr(), bytes) };
        Ok(out)
    }

    fn launch(
        &self,
        kernel: &str,
        grid: (u32, u32),
        block: u32,
        args: &[Arg<'_, EmuBuf>],
    ) -> Result<(), DeviceError> {
        let f: EmuCall = entry!(format!("call_{kernel}"), EmuCall);
        // One 8-byte cell per argument, read by the harness as the kernel parameter's type.
        let mut cells: Vec<u64> = args
            .iter()
            .map(|a| match a {
                Arg::Buf(b) => b.ptr() as u64,
                Arg::Null => 0,
                Arg::I32(v) => u64::from(*v as u32),
                Arg::F32(v) => u64::from(v.to_bits()),
            })
            .collect();
        let mut params: Vec<*mut c_void> = cells
            .iter_mut()
            .map(|c| (c as *mut u64).cast::<c_void>())
            .collect();
        // SAFETY: `ops::device::Kernels` checked every buffer against the launch's shapes.
        unsafe { f(grid.0, grid.1, block, params.as_mut_ptr()) };
        Ok(())
    }
}

fn idx<'a>(
    dev: &'a flywheel::ops::device::Buffer<Emu, i32>,
    host: &'a [i32],
) -> flywheel::ops::device::Indices<'a, Emu> {
    flywheel::ops::device::Indices { dev, host }
}

/// The device's logits against the CPU model's: finite, close relative to their spread, and the
/// same greedy token (or one tied with it within the tolerance).
fn assert_logits_close(what: &str, dt: Dtype, got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len(), "{what}: sequences");
    let tol = match dt {
        Dtype::F16 => 0.02,
        Dtype::Bf16 => 0.08,
    };
    for (s, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: vocabulary");
        let spread = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-3);
        let worst = g
            .iter()
            .zip(w)
            .map(|(a, b)| {
                if a.is_finite() {
                    (a - b).abs()
                } else {
                    f32::INFINITY
                }
            })
            .fold(0f32, f32::max);
        assert!(
            worst <= tol * spread,
            "{what} ({}), sequence {s}: logits differ by {worst} (largest logit {spread})",
            dt.suffix()
        );
        let (top_g, top_w) = (argmax(g), argmax(w));
        assert!(
            top_g == top_w || (w[top_w as usize] - w[top_g as usize]).abs() <= tol * spread,
            "{what} ({}), sequence {s}: greedy token {top_g} vs {top_w}",
            dt.suffix()
        );
    }
}

#[test]
fn the_device_forward_pass_matches_the_cpu_model_with_mixed_adapters() {
    use candle_core::quantized::gguf_file;
    use flywheel::engine::gpu::{DeviceForward, GpuModel, GpuOptions};
    use flywheel::engine::lora::LoraAdapter;
    use flywheel::engine::model::{LlamaModel, ModelSource, WeightFormat};
    use flywheel::engine::testing::{write_tiny_adapter, write_tiny_llama};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path, GgmlDType::Q8_0, 11);
    let adapter_dir = dir.path().join("adapter");
    write_tiny_adapter(&adapter_dir, 8, 16.0, &flywheel::engine::lora::MODULES, 5);
    let wide_dir = dir.path().join("wide");
    write_tiny_adapter(&wide_dir, 16, 8.0, &["q_proj", "v_proj", "down_proj"], 6);
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let cpu =
        LlamaModel::from_gguf(&content, &mut file, WeightFormat::F32, 128, &Device::Cpu).unwrap();
    let adapter =
        LoraAdapter::load("t/a", "tiny", &adapter_dir, &cpu.cfg, cpu.gguf_layout()).unwrap();
    let wide = LoraAdapter::load("t/w", "tiny", &wide_dir, &cpu.cfg, cpu.gguf_layout()).unwrap();
    // A prompt that crosses a cache page (16 positions) and a short one.
    let long: Vec<u32> = (0..19).map(|i| 40 + (i * 7) % 90).collect();
    let short: Vec<u32> = vec![72, 101, 108, 108, 111];
    for (dt, dev_dt) in [(Dtype::F16, DevDtype::F16), (Dtype::Bf16, DevDtype::Bf16)] {
        let opts = GpuOptions {
            dtype: dev_dt,
            pages: 6,
            lora_slots: 2,
            lora_rank: 16,
        };
        let src = ModelSource::gguf(&content, &mut file, 128, &Device::Cpu).unwrap();
        let mut gpu = GpuModel::load(Emu, src, opts).unwrap();
        let mut cpu_caches = [cpu.new_cache(), cpu.new_cache()];
        let mut seqs = [gpu.new_seq(), gpu.new_seq()];
        let mut tokens: Vec<Vec<u32>> = vec![long.clone(), short.clone()];
        for step in 0..3 {
            // The last step brings a rank-16 adapter into a batch whose slots hold rank 8: the
            // slots are rebuilt at rank 16 and the rank-8 adapter loads again.
            let adapters = match step {
                2 => [Some(&adapter), Some(&wide)],
                _ => [Some(&adapter), None],
            };
            let refs: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
            let want: Vec<Vec<f32>> = {
                let [a, b] = &mut cpu_caches;
                cpu.forward_with(&refs, &mut [a, b], &adapters)
                    .unwrap()
                    .to_vec2()
                    .unwrap()
            };
            let got = {
                let [a, b] = &mut seqs;
                DeviceForward::forward(&mut gpu, &refs, &mut [a, b], &adapters).unwrap()
            };
            assert_logits_close(&format!("step {step}"), dt, &got, &want);
            tokens = want.iter().map(|l| vec![argmax(l)]).collect();
        }
        assert_eq!(seqs[0].len(), long.len() + 2);
        // Both sequences' pages go back to the pool when they are dropped.
        assert_eq!(gpu.free_pages(), 6 - 2 - 1);
        drop(seqs);
        assert_eq!(gpu.free_pages(), 6);
    }
}

#[test]
fn the_engine_serves_from_the_device_forward_pass_as_it_does_from_the_cpu() {
    use flywheel::engine::sampling::SamplingParams;
    use flywheel::engine::testing::{write_tiny_adapter, write_tiny_llama};
    use flywheel::engine::{Engine, GenEvent, GenerationRequest, LocalModelConfig};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path, GgmlDType::Q8_0, 11);
    let adapter_dir = dir.path().join("adapter");
    write_tiny_adapter(&adapter_dir, 8, 16.0, &["q_proj", "v_proj", "down_proj"], 9);
    let cfg: LocalModelConfig = serde_json::from_value(serde_json::json!({
        "name": "tiny",
        "path": path,
        "weights": "f32",
        "context_length": 64,
        "max_batch": 2,
        "prefix_cache_mb": 0,
    }))
    .unwrap();
    // Two requests in one batch, one with the adapter and one without, greedy.
    let run = |engine: &Engine| -> Vec<Vec<GenEvent>> {
        let adapter = engine.load_adapter("t/a", &adapter_dir).unwrap().0;
        let mut streams = Vec::new();
        for (prompt, adapter) in [
            (vec![72u32, 101, 108, 108, 111], Some(adapter)),
            (vec![87u32, 111, 114, 108, 100, 33], None),
        ] {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            engine
                .submit(GenerationRequest {
                    prompt,
                    max_tokens: 4,
                    stop: Vec::new(),
                    sampling: SamplingParams {
                        temperature: 0.0,
                        ..SamplingParams::default()
                    },
                    events: tx,
                    adapter,
                    grammar: None,
                    logprobs: None,
                    n: 1,
                })
                .unwrap();
            streams.push(rx);
        }
        streams
            .into_iter()
            .map(|mut rx| {
                let mut events = Vec::new();
                while let Some(e) = rx.blocking_recv() {
                    let end = !matches!(e, GenEvent::Delta { .. });
                    events.push(e);
                    if end {
                        break;
                    }
                }
                events
            })
            .collect()
    };
    let on_cpu = run(&Engine::load(&cfg).unwrap());
    let on_device = run(&Engine::load_on(&cfg, Emu).unwrap());
    for events in &on_device {
        assert!(
            matches!(events.last(), Some(GenEvent::Done { .. })),
            "{events:?}"
        );
    }
    assert_eq!(on_device, on_cpu);
}

#[test]
fn qkv_rope_cache_matches_the_cpu_rope_and_fills_only_the_named_cache_rows() {
    use flywheel::ops::device::{Buffer, Heads, Indices, Kernels, Pages};
    use flywheel::ops::RopeStyle;
    for (dt, dev_dt) in [(Dtype::F16, DevDtype::F16), (Dtype::Bf16, DevDtype::Bf16)] {
        let k = Kernels::new(&Emu, dev_dt);
        for (h, kvh, d) in [(4usize, 2usize, 32usize), (9, 3, 64), (4, 4, 128)] {
            for style in [RopeStyle::Interleaved, RopeStyle::Halves] {
                let n = 5;
                let width = (h + 2 * kvh) * d;
                let pages = Pages {
                    pages: 4,
                    block_size: 4,
                };
                let mut rng = Rng::fresh((h * d) as u64);
                let (qkv, qkv_f) = stored(dt, &rng.vec(n * width, 1.0));
                let pos = [3i32, 0, 17, 9, 900];
                // A frequency table no theta formula gives (every other frequency halved, as a
                // scaled RoPE does), so the kernel must read it.
                let inv: Vec<f32> = (0..d / 2)
                    .map(|i| {
                        let f = 10000f32.powf(-2.0 * i as f32 / d as f32);
                        if i % 2 == 1 {
                            f * 0.5
                        } else {
                            f
                        }
                    })
                    .collect();
                let rows = [7i32, 0, 15, 3, 9];
                let d_qkv = Buffer::from_host(&Emu, &qkv).unwrap();
                let d_pos = Buffer::from_host(&Emu, &pos).unwrap();
                let d_inv = Buffer::from_host(&Emu, &inv).unwrap();
                let d_rows = Buffer::from_host(&Emu, &rows).unwrap();
                let cache_len = pages.pages * pages.block_size * kvh * d;
                // Emu memory starts as NaN: rows nobody writes stay NaN.
                let mut q = Buffer::<_, u16>::zeros(&Emu, n * h * d).unwrap();
                let mut kc = Buffer::<_, u16>::zeros(&Emu, cache_len).unwrap();
                let mut vc = Buffer::<_, u16>::zeros(&Emu, cache_len).unwrap();
                k.qkv_rope_cache(
                    n,
                    Heads {
                        heads: h,
                        kv_heads: kvh,
                        head_dim: d,
                    },
                    pages,
                    style == RopeStyle::Halves,
                    &d_qkv,
                    &d_pos,
                    &d_inv,
                    Indices {
                        dev: &d_rows,
                        host: &rows,
                    },
                    &mut q,
                    &mut kc,
                    &mut vc,
                )
                .unwrap();
                let decode =
                    |b: Vec<u16>| -> Vec<f32> { b.iter().map(|x| dt.decode(*x)).collect() };
                let (q, kc, vc) = (
                    decode(q.read(&Emu, n * h * d).unwrap()),
                    decode(kc.read(&Emu, cache_len).unwrap()),
                    decode(vc.read(&Emu, cache_len).unwrap()),
                );
                let mut cos = Vec::new();
                let mut sin = Vec::new();
                for p in pos {
                    for f in &inv {
                        cos.push((p as f32 * f).cos());
                        sin.push((p as f32 * f).sin());
                    }
                }
                let cos = t2(&cos, n, d / 2);
                let sin = t2(&sin, n, d / 2);
                let part = |from: usize, heads: usize| -> Tensor {
                    let v: Vec<f32> = (0..n)
                        .flat_map(|t| {
                            qkv_f[t * width + from * d..t * width + (from + heads) * d].to_vec()
                        })
                        .collect();
                    Tensor::from_vec(v, (n, heads, d), &Device::Cpu).unwrap()
                };
                let flat = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
                let want_q = flat(ops::rope(&part(0, h), &cos, &sin, style).unwrap());
                let want_k = flat(ops::rope(&part(h, kvh), &cos, &sin, style).unwrap());
                let want_v = flat(part(h + kvh, kvh));
                let what = format!("qkv_rope_cache h={h} kvh={kvh} d={d} {style:?}");
                assert_close(&what, dt, &q, &want_q, 1.0);
                let row = kvh * d;
                for slot in 0..pages.pages * pages.block_size {
                    let got_k = &kc[slot * row..(slot + 1) * row];
                    let got_v = &vc[slot * row..(slot + 1) * row];
                    match rows.iter().position(|&r| r as usize == slot) {
                        Some(t) => {
                            assert_close(&what, dt, got_k, &want_k[t * row..(t + 1) * row], 1.0);
                            assert_eq!(got_v, &want_v[t * row..(t + 1) * row], "{what}: values");
                        }
                        None => assert!(
                            got_k.iter().chain(got_v).all(|x| x.is_nan()),
                            "{what}: cache row {slot} was written"
                        ),
                    }
                }
            }
        }
    }
}

#[test]
fn bad_launches_are_refused_before_they_reach_the_device() {
    use flywheel::ops::device::{Buffer, Heads, Kernels, LoraShape, Pages, QFormat, QMatrix};
    let k = Kernels::new(&Emu, DevDtype::F16);
    let err = |r: Result<(), DeviceError>| r.unwrap_err().to_string();
    // A token id past the embedding's rows.
    let w = QMatrix::upload(&Emu, QFormat::Q8_0, 4, 32, &[0u8; 4 * 34]).unwrap();
    let ids = [1i32, 4];
    let d_ids = Buffer::from_host(&Emu, &ids).unwrap();
    let mut out = Buffer::<_, u16>::zeros(&Emu, 2 * 32).unwrap();
    assert!(err(k.get_rows(&w, idx(&d_ids, &ids), &mut out)).contains("token id 4"));
    // Matrix bytes that do not make the stated shape.
    assert!(QMatrix::upload(&Emu, QFormat::Q4_1, 4, 32, &[0u8; 10]).is_err());
    // A cache row outside the pages, and a head size the kernels do not take.
    let heads = Heads {
        heads: 2,
        kv_heads: 1,
        head_dim: 16,
    };
    let pages = Pages {
        pages: 2,
        block_size: 4,
    };
    let zeros16 = |n: usize| Buffer::<_, u16>::zeros(&Emu, n).unwrap();
    let qkv = zeros16(4 * 16);
    let pos = Buffer::from_host(&Emu, &[0i32]).unwrap();
    let inv = Buffer::from_host(&Emu, &[1.0f32; 8]).unwrap();
    let rows = [8i32];
    let d_rows = Buffer::from_host(&Emu, &rows).unwrap();
    let (mut q, mut kc, mut vc) = (zeros16(32), zeros16(8 * 16), zeros16(8 * 16));
    let mut launch = |heads: Heads| {
        err(k.qkv_rope_cache(
            1,
            heads,
            pages,
            false,
            &qkv,
            &pos,
            &inv,
            idx(&d_rows, &rows),
            &mut q,
            &mut kc,
            &mut vc,
        ))
    };
    assert!(launch(heads).contains("cache row 8"), "{}", launch(heads));
    let e = launch(Heads {
        head_dim: 300,
        ..heads
    });
    assert!(e.contains("head size 300"), "{e}");
    let e = launch(Heads {
        heads: 3,
        kv_heads: 2,
        ..heads
    });
    assert!(e.contains("cannot share"), "{e}");
    // Attention over a page the table does not hold, or an empty sequence.
    let table = [0i32, 5];
    let d_table = Buffer::from_host(&Emu, &table).unwrap();
    for (lens, expected) in [([7i32], "page 5"), ([0], "length 0"), ([9], "length 9")] {
        let d_lens = Buffer::from_host(&Emu, &lens).unwrap();
        let mut o = zeros16(32);
        let e = err(k.paged_decode_attention(
            heads,
            pages,
            2,
            &q,
            &kc,
            &vc,
            idx(&d_table, &table),
            idx(&d_lens, &lens),
            &mut o,
        ));
        assert!(e.contains(expected), "{e}");
    }
    // An adapter slot out of range, a rank past the kernels' limit, a buffer too short.
    let shape = LoraShape {
        rows: 2,
        input: 32,
        rank: 8,
        output: 32,
        y_stride: 32,
        y_offset: 0,
        slots: 2,
    };
    let x = zeros16(64);
    let a = zeros16(2 * 8 * 32);
    let mut v = Buffer::<_, f32>::zeros(&Emu, 16).unwrap();
    let slots = [0i32, 2];
    let d_slots = Buffer::from_host(&Emu, &slots).unwrap();
    let e = err(k.lora_shrink_bgmv(shape, &x, &a, idx(&d_slots, &slots), &mut v));
    assert!(e.contains("slot 2"), "{e}");
    let ok = [0i32, -1];
    let d_ok = Buffer::from_host(&Emu, &ok).unwrap();
    let e = err(k.lora_shrink_bgmv(
        LoraShape { rank: 65, ..shape },
        &x,
        &a,
        idx(&d_ok, &ok),
        &mut v,
    ));
    assert!(e.contains("rank 65"), "{e}");
    let short = zeros16(10);
    let e = err(k.lora_shrink_bgmv(shape, &short, &a, idx(&d_ok, &ok), &mut v));
    assert!(e.contains("x holds 10"), "{e}");
}

#[test]
fn a_forward_pass_that_cannot_run_leaves_its_sequences_and_pages_as_they_were() {
    use candle_core::quantized::gguf_file;
    use flywheel::engine::gpu::{GpuModel, GpuOptions};
    use flywheel::engine::model::ModelSource;
    use flywheel::engine::testing::write_tiny_llama;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path, GgmlDType::Q8_0, 3);
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let src = ModelSource::gguf(&content, &mut file, 128, &Device::Cpu).unwrap();
    let opts = GpuOptions {
        dtype: DevDtype::F16,
        pages: 2,
        lora_slots: 1,
        lora_rank: 8,
    };
    let mut gpu = GpuModel::load(Emu, src, opts).unwrap();
    let mut seq = gpu.new_seq();
    // More positions than the cache holds (2 pages of 16).
    let long: Vec<u32> = (0..40).map(|i| 40 + i).collect();
    let e = gpu.forward(&[&long], &mut [&mut seq], &[-1]).unwrap_err();
    assert!(e.to_string().contains("KV cache is full"), "{e}");
    // A token the vocabulary does not have: refused before any launch, pages given back.
    let e = gpu
        .forward(&[&[40, 1_000_000]], &mut [&mut seq], &[-1])
        .unwrap_err();
    assert!(e.to_string().contains("token id"), "{e}");
    // An adapter slot that holds nothing, and a rank above what the device serves.
    let e = gpu.forward(&[&[40]], &mut [&mut seq], &[0]).unwrap_err();
    assert!(e.to_string().contains("slot 0"), "{e}");
    let e = gpu.ensure_rank(32).unwrap_err();
    assert!(e.to_string().contains("rank 32"), "{e}");
    assert_eq!((seq.len(), gpu.free_pages()), (0, 2));
}
