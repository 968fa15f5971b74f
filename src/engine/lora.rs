//! LoRA adapters in PEFT format (`adapter_config.json` + `adapter_model.safetensors`), checked
//! against the base they load onto, and an LRU registry of resident adapters. Deltas are applied per
//! row in the model's forward pass, grouped by adapter; base weights are never modified.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::model::LlamaConfig;
use crate::names::Name;
use crate::ops::lora::{LowRank, Q4LowRank, Q8LowRank};

/// The projections an adapter may target, in the order the fused base matrices stack them.
pub const MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("adapter name '{0}' is invalid: use 'namespace/name' (or 'name') with letters, digits, '.', '_' and '-' (no '..')")]
    BadName(String),
    #[error("adapter path '{path}' is outside the allowed adapter directories ({allowed})")]
    PathNotAllowed { path: String, allowed: String },
    #[error("adapter '{name}': cannot read '{path}': {message}")]
    Read {
        name: String,
        path: String,
        message: String,
    },
    #[error("adapter '{name}': {message}")]
    Invalid { name: String, message: String },
    #[error("adapter '{0}' is not loaded")]
    NotLoaded(String),
}

/// One targeted projection: `delta = scale · (x Aᵀ) Bᵀ`, in f32 or quantized like its base.
pub type ModuleLora = crate::ops::lora::Module;

/// Per layer, per fused base matrix: the parts of its output each targeted module covers.
#[derive(Default)]
pub struct LayerLora {
    /// q, k, v (None where not targeted).
    pub qkv: [Option<ModuleLora>; 3],
    pub o: Option<ModuleLora>,
    /// gate, up.
    pub gate_up: [Option<ModuleLora>; 2],
    pub down: Option<ModuleLora>,
}

pub struct LoraAdapter {
    pub id: String,
    pub base: String,
    pub rank: usize,
    pub alpha: f64,
    pub scale: f64,
    pub target_modules: Vec<String>,
    pub path: PathBuf,
    pub layers: Vec<LayerLora>,
    /// Increases with every load, so a reload is a new generation; in-flight requests keep theirs.
    pub generation: u64,
}

/// Where adapter `namespace/name` (a bare name is in `default`) lives under an adapter store root.
pub fn store_path(root: &Path, id: &str) -> PathBuf {
    let (ns, name) = id.split_once('/').unwrap_or(("default", id));
    root.join(ns).join(name)
}

/// A valid adapter id: `namespace/name` (or a bare `name`, as vLLM clients send).
pub fn check_name(name: &str) -> Result<(), LoraError> {
    let ok_part = |p: &str| Name::parse(p).is_some();
    let ok = match name.split_once('/') {
        Some((ns, n)) => ok_part(ns) && ok_part(n),
        None => ok_part(name),
    };
    if ok && !name.contains("..") {
        Ok(())
    } else {
        Err(LoraError::BadName(name.to_string()))
    }
}

/// Resolves `path` and checks it lies inside one of `allowed` (after following symlinks).
pub fn check_path(path: &Path, allowed: &[PathBuf]) -> Result<PathBuf, LoraError> {
    let shown = || {
        allowed
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let real = path.canonicalize().map_err(|_| LoraError::PathNotAllowed {
        path: path.display().to_string(),
        allowed: shown(),
    })?;
    for root in allowed {
        if let Ok(r) = root.canonicalize() {
            if real.starts_with(&r) {
                return Ok(real);
            }
        }
    }
    Err(LoraError::PathNotAllowed {
        path: path.display().to_string(),
        allowed: shown(),
    })
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// How finely a CPU engine on a Q8_0 base holds its adapters' factors (`adapter_bits`): 4 bits
/// (the default: f16 scale per 32 values of A and per row of B), which halves the bytes eight
/// distinct adapters stream per decode step, or int8 in blocks of 32, as the base. A module's
/// delta errs by 8-11% RMS at 4 bits against 1% at int8; on a tool-calling adapter trained by
/// `flywheel train` both gave the same scores on every held-out item (BENCHMARKS.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum AdapterBits {
    Eight,
    #[default]
    Four,
}

impl TryFrom<u8> for AdapterBits {
    type Error = String;
    fn try_from(bits: u8) -> Result<Self, String> {
        match bits {
            8 => Ok(Self::Eight),
            4 => Ok(Self::Four),
            other => Err(format!("adapter_bits takes 8 or 4, not {other}")),
        }
    }
}

impl From<AdapterBits> for u8 {
    fn from(bits: AdapterBits) -> u8 {
        match bits {
            AdapterBits::Eight => 8,
            AdapterBits::Four => 4,
        }
    }
}

/// Reorders the output rows of a q or k projection from Hugging Face's half-split RoPE layout to the
/// interleaved layout of GGUF weights (llama.cpp permutes q/k at conversion; adapters must follow).
fn permute_rows_for_gguf(b: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, r) = b.dims2()?;
    let half = out / heads / 2;
    b.reshape((heads, 2, half, r))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, r))
}

impl LoraAdapter {
    /// Loads a PEFT adapter directory for a base of shape `cfg`, in f32. `gguf_layout` applies
    /// the q/k row permutation GGUF bases need.
    pub fn load(
        id: &str,
        base: &str,
        dir: &Path,
        cfg: &LlamaConfig,
        gguf_layout: bool,
    ) -> Result<Self, LoraError> {
        Self::load_as(id, base, dir, cfg, gguf_layout, None)
    }

    /// `load`, quantizing every module whose widths allow it as it goes (for a Q8_0 base): the
    /// same adapter as `load` then `quantize_q8`, in about half the time.
    pub fn load_q8(
        id: &str,
        base: &str,
        dir: &Path,
        cfg: &LlamaConfig,
        gguf_layout: bool,
    ) -> Result<Self, LoraError> {
        Self::load_as(id, base, dir, cfg, gguf_layout, Some(AdapterBits::Eight))
    }

    /// `load`, quantizing each module as it goes to `quantize`'s precision where its widths
    /// allow (4 bits needs inputs in multiples of 64; a module that cannot be held in 4 bits is
    /// held in int8 if it can, else in f32). `None` keeps every module in f32.
    pub fn load_as(
        id: &str,
        base: &str,
        dir: &Path,
        cfg: &LlamaConfig,
        gguf_layout: bool,
        quantize: Option<AdapterBits>,
    ) -> Result<Self, LoraError> {
        let config = AdapterConfig::read(id, dir)?;
        let factors = read_factors(id, base, dir, cfg, config.rank, gguf_layout)?;
        if factors.is_empty() {
            return Err(invalid(
                id,
                "adapter_model.safetensors holds no lora_A/lora_B weights for a supported module",
            ));
        }
        let layers = convert(&factors, cfg.n_layers, config.rank, quantize);
        Ok(Self {
            id: id.to_string(),
            base: base.to_string(),
            rank: config.rank,
            alpha: config.alpha,
            scale: config.scale,
            target_modules: config.targets,
            path: dir.to_path_buf(),
            layers,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
        })
    }
}

fn invalid(id: &str, message: impl Into<String>) -> LoraError {
    LoraError::Invalid {
        name: id.to_string(),
        message: message.into(),
    }
}

fn unreadable(id: &str, path: &Path, message: impl Into<String>) -> LoraError {
    LoraError::Read {
        name: id.to_string(),
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// What `adapter_config.json` says: rank, alpha, the scale they make (rsLoRA's when
/// `use_rslora`), and the target modules (each one this engine supports).
struct AdapterConfig {
    rank: usize,
    alpha: f64,
    scale: f64,
    targets: Vec<String>,
}

impl AdapterConfig {
    fn read(id: &str, dir: &Path) -> Result<Self, LoraError> {
        let path = dir.join("adapter_config.json");
        let text =
            std::fs::read_to_string(&path).map_err(|e| unreadable(id, &path, e.to_string()))?;
        let ac: Value = serde_json::from_str(&text)
            .map_err(|e| unreadable(id, &path, format!("not valid JSON: {e}")))?;
        let rank =
            ac.get("r")
                .and_then(Value::as_u64)
                .ok_or_else(|| invalid(id, "adapter_config.json lacks 'r'"))? as usize;
        if rank == 0 {
            return Err(invalid(id, "rank 'r' must be at least 1"));
        }
        let alpha = ac
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .unwrap_or(rank as f64);
        let rslora = ac
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let scale = if rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        };
        let targets: Vec<String> = match ac.get("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => return Err(invalid(id, "adapter_config.json lacks 'target_modules'")),
        };
        if let Some(t) = targets.iter().find(|t| !MODULES.contains(&t.as_str())) {
            return Err(invalid(
                id,
                format!(
                    "target module '{t}' is not supported (supported: {})",
                    MODULES.join(", ")
                ),
            ));
        }
        Ok(Self {
            rank,
            alpha,
            scale,
            targets,
        })
    }
}

/// Every module's factors in `adapter_model.safetensors`, in f32 and the kernels' layout, each
/// checked against the base's shape and `rank` (and permuted for a GGUF base's q/k rows).
fn read_factors(
    id: &str,
    base: &str,
    dir: &Path,
    cfg: &LlamaConfig,
    rank: usize,
    gguf_layout: bool,
) -> Result<Vec<ModuleFactors>, LoraError> {
    let invalid = |message: String| invalid(id, message);
    let weights_path = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu)
        .map_err(|e| unreadable(id, &weights_path, e.to_string()))?;
    let (h, kvh, hd) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
    let dims = |m: &str| -> (usize, usize) {
        match m {
            "q_proj" => (cfg.hidden, h * hd),
            "k_proj" | "v_proj" => (cfg.hidden, kvh * hd),
            "o_proj" => (h * hd, cfg.hidden),
            "gate_proj" | "up_proj" => (cfg.hidden, cfg.ffn),
            _ => (cfg.ffn, cfg.hidden),
        }
    };
    let mut jobs = Vec::new();
    for (key, t) in &tensors {
        let Some((layer, module, which)) = parse_key(key) else {
            continue;
        };
        if which != 'A' {
            continue;
        }
        if layer >= cfg.n_layers {
            return Err(invalid(format!(
                "has weights for layer {layer} but base '{base}' has {} layers",
                cfg.n_layers
            )));
        }
        let b_key = key.replacen("lora_A", "lora_B", 1);
        let b = tensors
            .get(&b_key)
            .ok_or_else(|| invalid(format!("'{key}' has no matching '{b_key}'")))?;
        let a = t.to_dtype(DType::F32).map_err(|e| invalid(e.to_string()))?;
        let mut b = b.to_dtype(DType::F32).map_err(|e| invalid(e.to_string()))?;
        let (in_dim, out_dim) = dims(module);
        let (ar, ain) = a.dims2().map_err(|e| invalid(format!("{key}: {e}")))?;
        let (bout, br) = b.dims2().map_err(|e| invalid(format!("{b_key}: {e}")))?;
        if ar != rank || br != rank {
            return Err(invalid(format!("{module} in layer {layer} has rank {ar}/{br}, but adapter_config.json says r = {rank}")));
        }
        if ain != in_dim || bout != out_dim {
            return Err(invalid(format!(
                "{module} in layer {layer} maps {ain} -> {bout}, but base '{base}' has {in_dim} -> {out_dim} (hidden size {}); this adapter was trained for another base",
                cfg.hidden
            )));
        }
        if gguf_layout && module == "q_proj" {
            b = permute_rows_for_gguf(&b, h).map_err(|e| invalid(e.to_string()))?;
        }
        if gguf_layout && module == "k_proj" {
            b = permute_rows_for_gguf(&b, kvh).map_err(|e| invalid(e.to_string()))?;
        }
        let flat = |t: &Tensor| {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| invalid(e.to_string()))
        };
        jobs.push(ModuleFactors {
            layer,
            module,
            a: flat(&a)?,
            b: flat(&b)?,
            input: in_dim,
            output: out_dim,
        });
    }
    Ok(jobs)
}

/// The factors held as `quantize` asks (per module, as its widths allow), placed in their layers.
/// Quantizing is the largest part of a load (at 4 bits, a search over steps for every block), and
/// each module's is its own: it is spread over the cores.
fn convert(
    jobs: &[ModuleFactors],
    n_layers: usize,
    rank: usize,
    quantize: Option<AdapterBits>,
) -> Vec<LayerLora> {
    let convert = |j: &ModuleFactors| -> ModuleLora {
        let (a, b, r, i, o) = (&j.a, &j.b, rank, j.input, j.output);
        let q4 = (quantize == Some(AdapterBits::Four))
            .then(|| Q4LowRank::from_factors(a, b, r, i, o))
            .flatten()
            .map(ModuleLora::Q4);
        let quantized = q4.or_else(|| {
            quantize
                .and_then(|_| Q8LowRank::from_factors(a, b, r, i, o))
                .map(ModuleLora::Q8)
        });
        quantized.unwrap_or_else(|| ModuleLora::F32(LowRank::from_kernel_layout(a, b, r, i, o)))
    };
    let mut layers: Vec<LayerLora> = (0..n_layers).map(|_| LayerLora::default()).collect();
    for (j, m) in jobs.iter().zip(par_map(jobs, convert)) {
        let l = &mut layers[j.layer];
        let slot = match j.module {
            "q_proj" => &mut l.qkv[0],
            "k_proj" => &mut l.qkv[1],
            "v_proj" => &mut l.qkv[2],
            "o_proj" => &mut l.o,
            "gate_proj" => &mut l.gate_up[0],
            "up_proj" => &mut l.gate_up[1],
            _ => &mut l.down,
        };
        *slot = Some(m);
    }
    layers
}

impl LoraAdapter {
    /// Quantizes every module whose widths allow it to Q8_0 blocks, as the engine does for a
    /// Q8_0 base: the adapter then streams about a quarter of the bytes per decode step.
    pub fn quantize_q8(&mut self) {
        for l in &mut self.layers {
            let slots = l
                .qkv
                .iter_mut()
                .chain(std::iter::once(&mut l.o))
                .chain(l.gate_up.iter_mut())
                .chain(std::iter::once(&mut l.down));
            for m in slots {
                if let Some(q) = m.as_ref().and_then(ModuleLora::to_q8) {
                    *m = Some(q);
                }
            }
        }
    }

    /// Bytes of adapter weights held.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| {
                l.qkv
                    .iter()
                    .chain(std::iter::once(&l.o))
                    .chain(l.gate_up.iter())
                    .chain(std::iter::once(&l.down))
            })
            .flatten()
            .map(ModuleLora::bytes)
            .sum()
    }
}

/// One module's factors, checked against the base, waiting to be converted.
struct ModuleFactors {
    layer: usize,
    module: &'static str,
    a: Vec<f32>,
    b: Vec<f32>,
    input: usize,
    output: usize,
}

/// `f` of each item, in order, the items split over the machine's cores.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let f = &f;
    std::thread::scope(|s| {
        let parts: Vec<_> = items
            .chunks(items.len().div_ceil(threads))
            .map(|part| s.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// `...layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}[.default].weight` → (i, module, A|B).
fn parse_key(key: &str) -> Option<(usize, &'static str, char)> {
    let rest = &key[key.find("layers.")? + "layers.".len()..];
    let (num, rest) = rest.split_once('.')?;
    let layer = num.parse().ok()?;
    let module = MODULES
        .iter()
        .find(|m| rest.contains(&format!("{m}.lora_")))?;
    let which = if rest.contains("lora_A") {
        'A'
    } else if rest.contains("lora_B") {
        'B'
    } else {
        return None;
    };
    Some((layer, module, which))
}

struct Resident {
    adapter: Arc<LoraAdapter>,
    last_used: Instant,
    /// Requests run with it since it was loaded.
    served: u64,
}

/// A resident adapter and how it has been used since it was loaded.
pub struct AdapterUse {
    pub adapter: Arc<LoraAdapter>,
    pub served: u64,
    pub idle: std::time::Duration,
}

/// The resident adapters of one base model, capped, least recently used evicted first.
pub struct AdapterRegistry {
    cap: usize,
    resident: Mutex<HashMap<String, Resident>>,
}

impl AdapterRegistry {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            resident: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Resident>> {
        match self.resident.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Installs (or replaces) an adapter; returns the ids evicted to make room.
    pub fn insert(&self, adapter: LoraAdapter) -> Vec<String> {
        let mut map = self.lock();
        let mut evicted = Vec::new();
        if !map.contains_key(&adapter.id) {
            while map.len() >= self.cap {
                let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, r)| r.last_used)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                map.remove(&oldest);
                evicted.push(oldest);
            }
        }
        map.insert(
            adapter.id.clone(),
            Resident {
                adapter: Arc::new(adapter),
                last_used: Instant::now(),
                served: 0,
            },
        );
        evicted
    }

    /// The adapter for a request (marking it used, and counting the request).
    pub fn get(&self, id: &str) -> Option<Arc<LoraAdapter>> {
        let mut map = self.lock();
        let r = map.get_mut(id)?;
        r.last_used = Instant::now();
        r.served += 1;
        Some(r.adapter.clone())
    }

    /// The adapter, without counting a request.
    pub fn peek(&self, id: &str) -> Option<Arc<LoraAdapter>> {
        self.lock().get(id).map(|r| r.adapter.clone())
    }

    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    pub fn remove(&self, id: &str) -> Result<(), LoraError> {
        self.lock()
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| LoraError::NotLoaded(id.to_string()))
    }

    pub fn list(&self) -> Vec<Arc<LoraAdapter>> {
        let mut v: Vec<_> = self.lock().values().map(|r| r.adapter.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// The resident adapters by id, with the requests each has served since it was loaded.
    pub fn usage(&self) -> Vec<AdapterUse> {
        let mut v: Vec<_> = self
            .lock()
            .values()
            .map(|r| AdapterUse {
                adapter: r.adapter.clone(),
                served: r.served,
                idle: r.last_used.elapsed(),
            })
            .collect();
        v.sort_by(|a, b| a.adapter.id.cmp(&b.adapter.id));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_bits_take_eight_or_four() {
        let parse = |v| serde_json::from_value::<AdapterBits>(serde_json::json!(v));
        assert_eq!(parse(8).unwrap(), AdapterBits::Eight);
        assert_eq!(parse(4).unwrap(), AdapterBits::Four);
        let err = parse(6).unwrap_err().to_string();
        assert!(err.contains("adapter_bits takes 8 or 4, not 6"), "{err}");
    }

    #[test]
    fn names_and_paths_are_checked() {
        assert!(check_name("team/my-adapter.v2").is_ok());
        assert!(check_name("plain_name").is_ok());
        for bad in ["a/b/c", "../x", "a/..", "a/", "/b", "a/b c", "..", ""] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let root = tempfile::tempdir().unwrap();
        let inside = root.path().join("ok");
        std::fs::create_dir(&inside).unwrap();
        let allowed = vec![root.path().to_path_buf()];
        assert!(check_path(&inside, &allowed).is_ok());
        assert!(check_path(&inside.join("..").join(".."), &allowed).is_err());
        assert!(check_path(Path::new("/etc"), &allowed).is_err());
    }

    #[test]
    fn peft_keys_parse() {
        assert_eq!(
            parse_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, "q_proj", 'A'))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.12.mlp.down_proj.lora_B.default.weight"),
            Some((12, "down_proj", 'B'))
        );
        assert_eq!(parse_key("base_model.model.lm_head.weight"), None);
    }

    #[test]
    fn the_gguf_permutation_interleaves_halves_per_head() {
        // 2 heads of head_dim 4: HF rows [h0: a0 a1 b0 b1 | h1: ...] -> GGUF [a0 b0 a1 b1 | ...].
        let b = Tensor::from_vec(
            (0..8).map(|x| x as f32).collect::<Vec<_>>(),
            (8, 1),
            &Device::Cpu,
        )
        .unwrap();
        let p: Vec<f32> = permute_rows_for_gguf(&b, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(p, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
    }
}
