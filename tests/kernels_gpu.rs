//! The CUDA kernels on a real GPU (feature `cuda`), against the Rust CPU ops. On a machine without
//! a CUDA driver every GPU test says so and passes, after checking that the driver's absence is an
//! error value and not a panic. Run with `cargo test --release --features cuda --test kernels_gpu`.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use flywheel::ops::cuda::CudaDevice;
use flywheel::ops::device::{
    Buffer, DeviceError, Dtype, Indices, Kernels, LoraShape, QFormat, QMatrix,
};
use flywheel::ops::lora::{bgmv_add, LowRank, Slot};

/// Device 0 with the kernels loaded, or `None` (with the reason printed) where there is no GPU.
fn gpu() -> Option<CudaDevice> {
    match CudaDevice::open(0) {
        Ok(k) => Some(k),
        Err(DeviceError::NoDriver) | Err(DeviceError::NoDevice(..)) => {
            eprintln!("no CUDA device here: GPU kernel tests skipped");
            None
        }
        Err(e) => panic!("CUDA is present but the kernels do not load: {e}"),
    }
}

#[test]
fn without_a_driver_the_engine_falls_back_to_the_cpu() {
    // Never a panic, whatever the machine has.
    let opened = flywheel::ops::open_cuda("m", "cuda:0");
    if let Err(e) = CudaDevice::open(0) {
        assert!(opened.is_none());
        assert!(
            matches!(e, DeviceError::NoDriver | DeviceError::NoDevice(..)),
            "{e}"
        );
    }
}

fn lcg(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

#[test]
fn lora_shrink_and_expand_match_the_cpu_bgmv_on_the_gpu() {
    let Some(dev) = gpu() else { return };
    let k = Kernels::new(&dev, Dtype::F16);
    for rank in [8usize, 16, 64] {
        let shape = LoraShape {
            rows: 9,
            input: 576,
            rank,
            output: 192,
            y_stride: 576 + 2 * 192,
            y_offset: 576,
            slots: 3,
        };
        let slot: Vec<i32> = vec![0, 0, -1, 2, 2, 2, 1, -1, 0];
        let enc = |v: &[f32]| -> Vec<u16> {
            v.iter()
                .map(|x| half::f16::from_f32(*x).to_bits())
                .collect()
        };
        let dec = |v: &[u16]| -> Vec<f32> {
            v.iter()
                .map(|b| half::f16::from_bits(*b).to_f32())
                .collect()
        };
        let x = enc(&lcg(shape.rows * shape.input, 1, 1.0));
        let a = enc(&lcg(shape.slots * rank * shape.input, 2, 0.2));
        let b = enc(&lcg(shape.slots * shape.output * rank, 3, 0.2));
        let y0 = enc(&lcg(shape.rows * shape.y_stride, 4, 1.0));
        let scale = vec![0.5f32, 1.5, 2.5];
        let dx = Buffer::from_host(&dev, &x).unwrap();
        let da = Buffer::from_host(&dev, &a).unwrap();
        let db = Buffer::from_host(&dev, &b).unwrap();
        let ds = Buffer::from_host(&dev, &slot).unwrap();
        let dscale = Buffer::from_host(&dev, &scale).unwrap();
        let mut dv = Buffer::<_, f32>::zeros(&dev, shape.rows * rank).unwrap();
        let mut dy = Buffer::from_host(&dev, &y0).unwrap();
        let ix = || Indices {
            dev: &ds,
            host: &slot,
        };
        k.lora_shrink_bgmv(shape, &dx, &da, ix(), &mut dv).unwrap();
        k.lora_expand_add(shape, &dv, &db, ix(), &dscale, &mut dy)
            .unwrap();
        let got = dec(&dy.read(&dev, dy.len()).unwrap());

        let (xf, af, bf) = (dec(&x), dec(&a), dec(&b));
        let (input, output) = (shape.input, shape.output);
        let modules: Vec<LowRank> = (0..shape.slots)
            .map(|s| {
                LowRank::from_kernel_layout(
                    &af[s * rank * input..(s + 1) * rank * input],
                    &bf[s * output * rank..(s + 1) * output * rank],
                    rank,
                    input,
                    output,
                )
            })
            .collect();
        let rows: Vec<Vec<Slot<'_>>> = slot
            .iter()
            .map(|&s| {
                if s < 0 {
                    vec![]
                } else {
                    vec![Slot {
                        module: &modules[s as usize],
                        scale: scale[s as usize],
                        offset: shape.y_offset,
                    }]
                }
            })
            .collect();
        let mut want = dec(&y0);
        bgmv_add(&mut want, shape.y_stride, &xf, shape.input, &rows);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 2e-3 * (w.abs() + 1.0),
                "rank {rank} [{i}]: {g} vs {w}"
            );
        }
    }
}

#[test]
fn bad_shapes_are_refused_before_launch() {
    let Some(dev) = gpu() else { return };
    let k = Kernels::new(&dev, Dtype::F16);
    let shape = LoraShape {
        rows: 2,
        input: 64,
        rank: 128,
        output: 64,
        y_stride: 64,
        y_offset: 0,
        slots: 1,
    };
    let x = Buffer::<_, u16>::zeros(&dev, 128).unwrap();
    let a = Buffer::<_, u16>::zeros(&dev, 128 * 64).unwrap();
    let host = [0i32, 5];
    let s = Buffer::from_host(&dev, &host).unwrap();
    let mut v = Buffer::<_, f32>::zeros(&dev, 256).unwrap();
    let ix = || Indices {
        dev: &s,
        host: &host,
    };
    let e = k.lora_shrink_bgmv(shape, &x, &a, ix(), &mut v).unwrap_err();
    assert!(e.to_string().contains("rank 128"), "{e}");
    let shape = LoraShape { rank: 16, ..shape };
    let e = k.lora_shrink_bgmv(shape, &x, &a, ix(), &mut v).unwrap_err();
    assert!(e.to_string().contains("slot 5"), "{e}");
}

#[test]
fn silu_mul_and_quantized_matvec_match_the_cpu_on_the_gpu() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let Some(dev) = gpu() else { return };
    let k = Kernels::new(&dev, Dtype::Bf16);
    let enc = |v: &[f32]| -> Vec<u16> {
        v.iter()
            .map(|x| half::bf16::from_f32(*x).to_bits())
            .collect()
    };
    let dec = |v: &[u16]| -> Vec<f32> {
        v.iter()
            .map(|b| half::bf16::from_bits(*b).to_f32())
            .collect()
    };
    // SwiGLU.
    let (rows, ffn) = (4usize, 1536usize);
    let gu = enc(&lcg(rows * 2 * ffn, 7, 4.0));
    let dgu = Buffer::from_host(&dev, &gu).unwrap();
    let mut dout = Buffer::<_, u16>::zeros(&dev, rows * ffn).unwrap();
    k.silu_mul(rows, ffn, &dgu, &mut dout).unwrap();
    let got = dec(&dout.read(&dev, rows * ffn).unwrap());
    let g = Tensor::from_vec(dec(&gu), (rows, 2 * ffn), &Device::Cpu).unwrap();
    let want: Vec<f32> = flywheel::ops::silu_mul(
        &g.narrow(1, 0, ffn).unwrap(),
        &g.narrow(1, ffn, ffn).unwrap(),
    )
    .unwrap()
    .flatten_all()
    .unwrap()
    .to_vec1()
    .unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() <= 1.6e-2 * (w.abs() + 0.05),
            "silu_mul {g} vs {w}"
        );
    }
    // Dequantizing matvec, both formats.
    for (format, dtype) in [
        (QFormat::Q8_0, GgmlDType::Q8_0),
        (QFormat::Q4_1, GgmlDType::Q4_1),
    ] {
        let (r, c) = (70usize, 576usize);
        let w = Tensor::from_vec(lcg(r * c, 8, 1.0), (r, c), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let x = enc(&lcg(c, 9, 1.0));
        let dw = QMatrix::upload(&dev, format, r, c, q.data().unwrap().as_ref()).unwrap();
        let dx = Buffer::from_host(&dev, &x).unwrap();
        let mut dy = Buffer::<_, u16>::zeros(&dev, r).unwrap();
        k.matvec(&dw, 1, &dx, &mut dy).unwrap();
        let got = dec(&dy.read(&dev, r).unwrap());
        let want: Vec<f32> = Tensor::from_vec(dec(&x), (1, c), &Device::Cpu)
            .unwrap()
            .matmul(&q.dequantize(&Device::Cpu).unwrap().t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1.6e-2 * (w.abs() + 1.0),
                "matvec {format:?}: {g} vs {w}"
            );
        }
    }
}

#[test]
fn the_forward_pass_on_the_gpu_matches_the_cpu_model() {
    use candle_core::quantized::{gguf_file, GgmlDType};
    use candle_core::Device;
    use flywheel::engine::gpu::{GpuModel, GpuOptions};
    use flywheel::engine::lora::LoraAdapter;
    use flywheel::engine::model::{LlamaModel, ModelSource, WeightFormat};
    use flywheel::engine::testing::{write_tiny_adapter, write_tiny_llama};

    let Some(dev) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path, GgmlDType::Q8_0, 11);
    let adapter_dir = dir.path().join("adapter");
    write_tiny_adapter(&adapter_dir, 8, 16.0, &["q_proj", "o_proj", "up_proj"], 5);
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let cpu =
        LlamaModel::from_gguf(&content, &mut file, WeightFormat::F32, 128, &Device::Cpu).unwrap();
    let adapter =
        LoraAdapter::load("t/a", "tiny", &adapter_dir, &cpu.cfg, cpu.gguf_layout()).unwrap();
    let src = ModelSource::gguf(&content, &mut file, 128, &Device::Cpu).unwrap();
    let opts = GpuOptions {
        dtype: Dtype::F16,
        pages: 8,
        lora_slots: 2,
        lora_rank: 16,
    };
    let mut gpu = GpuModel::load(dev, src, opts).unwrap();
    let slot = gpu.adapter_slot(&adapter, &[]).unwrap();
    let mut caches = [cpu.new_cache(), cpu.new_cache()];
    let mut seqs = [gpu.new_seq(), gpu.new_seq()];
    let mut tokens: Vec<Vec<u32>> = vec![(0..21).map(|i| 40 + i * 3).collect(), vec![72, 105]];
    for step in 0..4 {
        let refs: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
        let want: Vec<Vec<f32>> = {
            let [a, b] = &mut caches;
            cpu.forward_with(&refs, &mut [a, b], &[Some(&adapter), None])
                .unwrap()
                .to_vec2()
                .unwrap()
        };
        let got = {
            let [a, b] = &mut seqs;
            gpu.forward(&refs, &mut [a, b], &[slot, -1]).unwrap()
        };
        for (g, w) in got.iter().zip(&want) {
            let spread = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() <= 0.02 * spread, "step {step}: {a} vs {b}");
            }
        }
        tokens = want
            .iter()
            .map(|l| {
                let top =
                    l.iter()
                        .enumerate()
                        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b });
                vec![top.0 as u32]
            })
            .collect();
    }
}
