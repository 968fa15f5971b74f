//! What this CPU (and the kernel under it) lets the process run, detected once: AVX2 and FMA (the
//! build's baseline), AVX-512 with VNNI and BF16, and AMX's tile units. AMX needs more than the
//! CPU: Linux hands out tile state only to a process that asks for it (`arch_prctl` with
//! `ARCH_REQ_XCOMP_PERM`), and a refused request (an older kernel, a sandbox) means no AMX here,
//! whatever the CPU has. Kernels consult `features()`; nothing uses an instruction it does not
//! list.
#![allow(unsafe_code)]

use std::sync::OnceLock;

/// The instruction sets the kernels may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    pub avx512vl: bool,
    pub avx512vnni: bool,
    pub avx512bf16: bool,
    /// The CPU has AMX tiles with bf16 and int8 products...
    pub amx_bf16: bool,
    pub amx_int8: bool,
    /// ...and the kernel granted this process the tile state (so they may be used).
    pub amx_granted: bool,
    /// What an environment variable turned off for this process, if anything (for the
    /// description; the flags above already leave it out).
    pub turned_off: Option<TurnedOff>,
}

/// Instruction sets a variable keeps unused, so one host can run another's kernel paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnedOff {
    /// `FLYWHEEL_NO_AMX=1`: the tiles.
    Amx,
    /// `FLYWHEEL_NO_AVX512=1`: AVX-512 and the tiles, what an AVX2-only CPU runs.
    Avx512,
}

impl TurnedOff {
    /// The variable that does it.
    pub fn variable(self) -> &'static str {
        match self {
            TurnedOff::Amx => "FLYWHEEL_NO_AMX",
            TurnedOff::Avx512 => "FLYWHEEL_NO_AVX512",
        }
    }
}

impl CpuFeatures {
    /// These features with AVX-512 and AMX taken away (AMX's kernels need AVX-512 too).
    pub fn without_avx512(self) -> Self {
        Self {
            avx2: self.avx2,
            fma: self.fma,
            turned_off: Some(TurnedOff::Avx512),
            ..Self::default()
        }
    }

    /// AMX bf16 products may run.
    pub fn amx_bf16_usable(&self) -> bool {
        self.amx_bf16 && self.amx_granted
    }

    /// One line for the log and `flywheel check`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.avx2 && self.fma {
            parts.push("AVX2+FMA".to_string());
        }
        if self.avx512f {
            let mut ext = Vec::new();
            if self.avx512vnni {
                ext.push("VNNI");
            }
            if self.avx512bf16 {
                ext.push("BF16");
            }
            parts.push(if ext.is_empty() {
                "AVX-512".to_string()
            } else {
                format!("AVX-512 ({})", ext.join(", "))
            });
        }
        if self.amx_bf16 || self.amx_int8 {
            let mut ext = Vec::new();
            if self.amx_bf16 {
                ext.push("BF16");
            }
            if self.amx_int8 {
                ext.push("INT8");
            }
            let state = match (self.amx_granted, self.turned_off) {
                (true, _) => "tile state granted".to_string(),
                (false, Some(off)) => format!("turned off by {}", off.variable()),
                (false, None) => "tile state refused by the kernel: not used".to_string(),
            };
            parts.push(format!("AMX ({}; {state})", ext.join(", ")));
        }
        let line = if parts.is_empty() {
            "no SIMD extension beyond the baseline".to_string()
        } else {
            parts.join(", ")
        };
        match self.turned_off {
            Some(off @ TurnedOff::Avx512) => {
                format!("{line} (AVX-512 and AMX turned off by {})", off.variable())
            }
            _ => line,
        }
    }
}

/// The features of this CPU and process, detected (and AMX requested) on first use.
pub fn features() -> &'static CpuFeatures {
    static FEATURES: OnceLock<CpuFeatures> = OnceLock::new();
    FEATURES.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> CpuFeatures {
    use std::arch::is_x86_feature_detected as has;
    // CPUID leaf 7, sub-leaf 0, EDX: AMX-BF16 is bit 22, AMX-TILE bit 24, AMX-INT8 bit 25. (The
    // standard library's detection of these is not stable yet.)
    let edx = if has!("xsave") {
        // Leaf 7 is valid when leaf 0 says so.
        let max = std::arch::x86_64::__cpuid(0).eax;
        if max >= 7 {
            std::arch::x86_64::__cpuid_count(7, 0).edx
        } else {
            0
        }
    } else {
        0
    };
    let tile = edx & (1 << 24) != 0;
    let amx_bf16 = tile && edx & (1 << 22) != 0;
    let amx_int8 = tile && edx & (1 << 25) != 0;
    let no_amx = disabled_by_env(TurnedOff::Amx.variable());
    let found = CpuFeatures {
        avx2: has!("avx2"),
        fma: has!("fma"),
        avx512f: has!("avx512f"),
        avx512bw: has!("avx512bw"),
        avx512vl: has!("avx512vl"),
        avx512vnni: has!("avx512vnni"),
        avx512bf16: has!("avx512bf16"),
        amx_bf16,
        amx_int8,
        amx_granted: tile && !no_amx && request_tile_state(),
        turned_off: (tile && no_amx).then_some(TurnedOff::Amx),
    };
    if disabled_by_env(TurnedOff::Avx512.variable()) {
        found.without_avx512()
    } else {
        found
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> CpuFeatures {
    CpuFeatures::default()
}

/// `FLYWHEEL_NO_AMX=1` keeps AMX unused, and `FLYWHEEL_NO_AVX512=1` AVX-512 and AMX both, so one
/// host can compare its kernel paths (the second runs what an AVX2-only CPU runs).
fn disabled_by_env(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Asks Linux for the AMX tile data state for this process (every thread, present and future).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes the process's permitted xstate; a
    // kernel that does not know the request answers with an error.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_state() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_names_what_was_found() {
        let f = features();
        let d = f.describe();
        println!("this host: {d}");
        // Under FLYWHEEL_NO_AVX512 the line names both as turned off.
        let masked = matches!(f.turned_off, Some(TurnedOff::Avx512));
        assert_eq!(d.contains("AVX-512"), f.avx512f || masked);
        assert_eq!(d.contains("AMX"), f.amx_bf16 || f.amx_int8 || masked);
        let refused = CpuFeatures {
            amx_bf16: true,
            amx_int8: true,
            amx_granted: false,
            ..CpuFeatures::default()
        };
        assert!(!refused.amx_bf16_usable());
        let masked = CpuFeatures {
            avx2: true,
            fma: true,
            avx512f: true,
            avx512vnni: true,
            ..refused
        }
        .without_avx512();
        assert_eq!(
            masked.describe(),
            "AVX2+FMA (AVX-512 and AMX turned off by FLYWHEEL_NO_AVX512)"
        );
        let off = CpuFeatures {
            turned_off: Some(TurnedOff::Amx),
            ..refused
        };
        assert!(off.describe().contains("turned off by FLYWHEEL_NO_AMX"));
        assert!(!off.amx_bf16_usable());
        assert!(
            refused.describe().contains("refused"),
            "{}",
            refused.describe()
        );
    }
}
