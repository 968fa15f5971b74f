//! With the `cuda` feature, compiles kernels/*.cu into fat binaries (sm_80 and sm_90 code, plus
//! compute_80 PTX for newer GPUs to JIT) that `ops::cuda` embeds. nvcc comes from `NVCC`,
//! `CUDA_HOME`, or the toolchain `scripts/cuda-toolkit.sh` assembles from NVIDIA's PyPI wheels.
//! Without the feature this does nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: &[&str] = &["lora", "norm", "rope", "act", "attention", "qmatvec"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let nvcc = find_nvcc();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into()));
    for k in KERNELS {
        let src = Path::new("kernels").join(format!("{k}.cu"));
        let dst = out.join(format!("{k}.fatbin"));
        let status = Command::new(&nvcc)
            .args(["-fatbin", "-O3", "-I", "kernels"])
            .args(["-gencode", "arch=compute_80,code=[sm_80,compute_80]"])
            .args(["-gencode", "arch=compute_90,code=sm_90"])
            .arg("-o")
            .arg(&dst)
            .arg(&src)
            .status();
        match status {
            Ok(s) if s.success() => {}
            other => fail(&format!("nvcc failed on {} ({other:?})", src.display())),
        }
    }
}

fn find_nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        return PathBuf::from(home).join("bin/nvcc");
    }
    let out = Command::new("bash").arg("scripts/cuda-toolkit.sh").output();
    match out {
        Ok(o) if o.status.success() => {
            let home = String::from_utf8_lossy(&o.stdout).trim().to_string();
            PathBuf::from(home).join("bin/nvcc")
        }
        _ => fail(
            "no nvcc: set NVCC or CUDA_HOME, or let scripts/cuda-toolkit.sh fetch NVIDIA's wheels",
        ),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("flywheel build (feature cuda): {message}");
    std::process::exit(1)
}
