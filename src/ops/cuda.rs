//! The CUDA device of the ops (feature `cuda`): the kernels of `kernels/*.cu`, compiled by build.rs
//! into fat binaries embedded here, loaded through cudarc with libcuda opened at run time, and
//! launched by name through [`Device`]; `ops::device::Kernels` checks every launch on the host.
//!
//! `CudaDevice::open` answers `NoDriver` on a machine without libcuda (cudarc would panic if asked
//! without the guard), and the caller falls back to the CPU with one log line.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};

use super::device::{Arg, Device, DeviceError, Dtype, Result};

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
        &["rope", "qkv_rope_cache"],
    ),
    (
        "act",
        include_bytes!(concat!(env!("OUT_DIR"), "/act.fatbin")),
        &["silu_mul", "gather_rows"],
    ),
    (
        "attention",
        include_bytes!(concat!(env!("OUT_DIR"), "/attention.fatbin")),
        &["paged_decode_attention"],
    ),
    (
        "qmatvec",
        include_bytes!(concat!(env!("OUT_DIR"), "/qmatvec.fatbin")),
        &[
            "q8_0_matvec",
            "q4_1_matvec",
            "q8_0_logits",
            "q4_1_logits",
            "q8_0_get_rows",
            "q4_1_get_rows",
        ],
    ),
];

impl From<DriverError> for DeviceError {
    fn from(e: DriverError) -> Self {
        DeviceError::Driver(e.to_string())
    }
}

/// One CUDA device with every kernel loaded.
pub struct CudaDevice {
    pub ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<String, CudaFunction>,
}

impl CudaDevice {
    /// Opens device `ordinal` and loads every kernel.
    pub fn open(ordinal: usize) -> Result<Self> {
        // SAFETY: only probes whether libcuda can be opened; loads nothing else.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(DeviceError::NoDriver);
        }
        let count = CudaContext::device_count()?;
        if ordinal as i32 >= count {
            return Err(DeviceError::NoDevice(ordinal, count));
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
}

impl Device for CudaDevice {
    type Buf = CudaSlice<u8>;

    fn describe(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    fn alloc(&self, bytes: usize) -> Result<Self::Buf> {
        Ok(self.stream.alloc_zeros::<u8>(bytes.max(1))?)
    }

    fn upload(&self, bytes: &[u8]) -> Result<Self::Buf> {
        Ok(self.stream.clone_htod(bytes)?)
    }

    fn write(&self, dst: &mut Self::Buf, offset: usize, bytes: &[u8]) -> Result<()> {
        if offset + bytes.len() > dst.len() {
            return Err(DeviceError::Invalid(format!(
                "{} bytes at {offset} do not fit a buffer of {}",
                bytes.len(),
                dst.len()
            )));
        }
        let mut view = dst.slice_mut(offset..offset + bytes.len());
        self.stream.memcpy_htod(bytes, &mut view)?;
        Ok(())
    }

    fn read(&self, src: &Self::Buf, bytes: usize) -> Result<Vec<u8>> {
        if bytes > src.len() {
            return Err(DeviceError::Invalid(format!(
                "cannot read {bytes} bytes of a buffer of {}",
                src.len()
            )));
        }
        let mut out = vec![0u8; bytes];
        self.stream.memcpy_dtoh(&src.slice(0..bytes), &mut out)?;
        self.stream.synchronize()?;
        Ok(out)
    }

    fn launch(
        &self,
        kernel: &str,
        grid: (u32, u32),
        block: u32,
        args: &[Arg<'_, Self::Buf>],
    ) -> Result<()> {
        let f = self
            .functions
            .get(kernel)
            .ok_or_else(|| DeviceError::Invalid(format!("kernel {kernel} is not loaded")))?;
        let null = 0u64;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Buf(s) => b.arg(*s),
                Arg::Null => b.arg(&null),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid.0, grid.1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `ops::device::Kernels` passes each kernel's arguments in its parameter order
        // and types, after checking every buffer against the launch's shapes and indices.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}
