//! LoRA supervised fine-tuning on the local base model: loss on the answer tokens only, AdamW with
//! linear warmup and cosine decay, gradient accumulation and clipping, validation loss each epoch
//! with best-epoch selection, and checkpoints so a killed job resumes where it stopped.

pub mod model;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use model::{Batch, LoraFactors, SplitMix, TrainBase, MODULES};

/// One training sequence: prompt then answer; the answer's tokens carry the loss.
#[derive(Debug, Clone)]
pub struct TrainExample {
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
}

/// Training settings, with NeMo Customizer's names where it has one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Hyperparameters {
    pub epochs: usize,
    /// Examples per optimizer step.
    pub batch_size: usize,
    /// Examples per forward pass; gradients accumulate over `batch_size / micro_batch_size` passes.
    pub micro_batch_size: usize,
    pub learning_rate: f64,
    /// LoRA rank.
    pub adapter_dim: usize,
    /// LoRA alpha; the delta is scaled by alpha / rank. Defaults to twice the rank.
    pub alpha: Option<f64>,
    pub adapter_dropout: f32,
    pub target_modules: Vec<String>,
    pub weight_decay: f64,
    /// Share of the optimizer steps spent warming the learning rate up from zero.
    pub warmup_ratio: f64,
    /// Global gradient-norm clip; 0 turns clipping off.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Longest example in tokens; longer ones are refused when the dataset is prepared.
    pub max_seq_len: usize,
    /// The frozen base's products: `f32`, `bf16` (operands rounded to bf16, sums in f32, on AMX
    /// tiles), or `auto`: bf16 where the CPU has AMX and the kernel grants it, f32 elsewhere.
    pub precision: Precision,
}

/// How the frozen base's matrix products run while training. LoRA factors, their gradients, the
/// optimizer's state and every other op stay f32 in both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Auto,
    F32,
    Bf16,
}

impl Precision {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "f32" => Some(Self::F32),
            "bf16" => Some(Self::Bf16),
            _ => None,
        }
    }

    /// What runs on this host: `F32` or `Bf16`. `bf16` asked of a host without AMX tiles runs
    /// f32, with a log line.
    pub fn resolve(self) -> Self {
        let amx = crate::ops::amx::available();
        match self {
            Self::Auto if amx => Self::Bf16,
            Self::Bf16 if !amx => {
                tracing::warn!(
                    cpu = %crate::ops::cpu::features().describe(),
                    "bf16 training needs AMX tiles, which this host does not offer; training in f32"
                );
                Self::F32
            }
            Self::Auto => Self::F32,
            p => p,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Self {
            epochs: 2,
            batch_size: 8,
            micro_batch_size: 4,
            learning_rate: 1e-4,
            adapter_dim: 16,
            alpha: None,
            adapter_dropout: 0.0,
            target_modules: MODULES.iter().map(|m| m.to_string()).collect(),
            weight_decay: 0.01,
            warmup_ratio: 0.1,
            max_grad_norm: 1.0,
            seed: 42,
            max_seq_len: 1024,
            precision: Precision::Auto,
        }
    }
}

impl Hyperparameters {
    /// Checks every value's range; the error names the field.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |field: &str, why: String| {
            Err(TrainError::Hyperparameter {
                field: field.to_string(),
                message: why,
            })
        };
        if !(1..=1000).contains(&self.epochs) {
            return bad("epochs", format!("{} is outside 1..=1000", self.epochs));
        }
        if !(1..=4096).contains(&self.batch_size) {
            return bad(
                "batch_size",
                format!("{} is outside 1..=4096", self.batch_size),
            );
        }
        if self.micro_batch_size == 0 {
            return bad("micro_batch_size", "must be at least 1".into());
        }
        if !(self.learning_rate > 0.0 && self.learning_rate <= 1.0) {
            return bad(
                "learning_rate",
                format!("{} is outside (0, 1]", self.learning_rate),
            );
        }
        if !(1..=512).contains(&self.adapter_dim) {
            return bad(
                "adapter_dim",
                format!("{} is outside 1..=512", self.adapter_dim),
            );
        }
        if let Some(a) = self.alpha {
            if !(a > 0.0 && a.is_finite()) {
                return bad("alpha", format!("{a} must be positive"));
            }
        }
        if !(0.0..1.0).contains(&self.adapter_dropout) {
            return bad(
                "adapter_dropout",
                format!("{} is outside [0, 1)", self.adapter_dropout),
            );
        }
        if self.target_modules.is_empty() {
            return bad("target_modules", "name at least one projection".into());
        }
        for m in &self.target_modules {
            if !MODULES.contains(&m.as_str()) {
                return bad(
                    "target_modules",
                    format!(
                        "unknown module '{m}' (expected one of {})",
                        MODULES.join(", ")
                    ),
                );
            }
        }
        if !(0.0..=1.0).contains(&self.weight_decay) {
            return bad(
                "weight_decay",
                format!("{} is outside [0, 1]", self.weight_decay),
            );
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(
                "warmup_ratio",
                format!("{} is outside [0, 1)", self.warmup_ratio),
            );
        }
        if !(self.max_grad_norm >= 0.0 && self.max_grad_norm.is_finite()) {
            return bad("max_grad_norm", "must be 0 (off) or positive".into());
        }
        if !(16..=131_072).contains(&self.max_seq_len) {
            return bad(
                "max_seq_len",
                format!("{} is outside 16..=131072", self.max_seq_len),
            );
        }
        Ok(())
    }

    fn targets(&self) -> Vec<usize> {
        MODULES
            .iter()
            .enumerate()
            .filter(|(_, m)| self.target_modules.iter().any(|t| t == *m))
            .map(|(i, _)| i)
            .collect()
    }

    pub fn lora_alpha(&self) -> f64 {
        self.alpha.unwrap_or(2.0 * self.adapter_dim as f64)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("hyperparameter '{field}': {message}")]
    Hyperparameter { field: String, message: String },
    #[error("dataset: {0}")]
    Data(String),
    #[error("model: {0}")]
    Model(#[from] crate::engine::model::ModelError),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
    #[error("cancelled")]
    Cancelled,
    #[error("training diverged: the loss became {0}")]
    Diverged(f64),
}

/// Where a job stands, reported after every optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub epoch: usize,
    pub epochs: usize,
    pub step: usize,
    pub total_steps: usize,
    /// Mean loss per answer token over the last optimizer step.
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub tokens_per_sec: f64,
    pub eta_secs: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochStats {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
}

pub struct TrainOutcome {
    pub lora: LoraFactors,
    /// The factors of the best epoch (lowest validation loss, or training loss without one).
    pub theta: Vec<f32>,
    pub best_epoch: usize,
    pub epochs: Vec<EpochStats>,
    pub steps: usize,
    pub tokens_per_sec: f64,
}

/// Optimizer and loop state, all of it in the checkpoint.
#[derive(Serialize, Deserialize)]
struct LoopState {
    fingerprint: String,
    epoch: usize,
    /// Optimizer steps done within `epoch`.
    step_in_epoch: usize,
    global_step: usize,
    epochs: Vec<EpochStats>,
    best_epoch: usize,
    best_loss: f64,
    #[serde(skip)]
    theta: Vec<f32>,
    #[serde(skip)]
    m: Vec<f32>,
    #[serde(skip)]
    v: Vec<f32>,
    #[serde(skip)]
    best_theta: Vec<f32>,
    /// Summed loss and targets of the epoch so far.
    epoch_loss: f64,
    epoch_targets: usize,
}

impl LoopState {
    /// The state saved at `checkpoint` when it was made by these settings and data
    /// (`fingerprint`), or a fresh start.
    fn resume_or_start(
        checkpoint: Option<&Path>,
        fingerprint: String,
        lora: &LoraFactors,
        seed: u64,
    ) -> Self {
        let mut st = match checkpoint.filter(|p| p.exists()) {
            Some(p) => match LoopState::load(p, lora.len) {
                Ok(s) if s.fingerprint == fingerprint => {
                    tracing::info!(path = %p.display(), epoch = s.epoch, step = s.global_step, "resuming training from its checkpoint");
                    Some(s)
                }
                Ok(_) => {
                    tracing::warn!(path = %p.display(), "checkpoint is for other settings or data; starting over");
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable checkpoint; starting over");
                    None
                }
            },
            None => None,
        }
        .unwrap_or_else(|| LoopState {
            fingerprint,
            epoch: 0,
            step_in_epoch: 0,
            global_step: 0,
            epochs: Vec::new(),
            best_epoch: 0,
            best_loss: f64::INFINITY,
            theta: lora.init(seed),
            m: vec![0.0; lora.len],
            v: vec![0.0; lora.len],
            best_theta: Vec::new(),
            epoch_loss: 0.0,
            epoch_targets: 0,
        });
        if st.best_theta.len() != lora.len {
            st.best_theta = st.theta.clone();
        }
        st
    }

    /// Closes an epoch: its statistics, and the best epoch so far (by validation loss, or the
    /// training loss without a validation split).
    fn finish_epoch(&mut self, val_loss: Option<f64>) {
        let train_loss = self.epoch_loss / self.epoch_targets.max(1) as f64;
        let score = val_loss.unwrap_or(train_loss);
        if score < self.best_loss {
            self.best_loss = score;
            self.best_epoch = self.epoch;
            self.best_theta = self.theta.clone();
        }
        self.epochs.push(EpochStats {
            epoch: self.epoch,
            train_loss,
            val_loss,
        });
        tracing::info!(epoch = self.epoch, train_loss, ?val_loss, "epoch done");
        self.epoch += 1;
        self.step_in_epoch = 0;
        self.epoch_loss = 0.0;
        self.epoch_targets = 0;
    }

    /// One file: a JSON header line, then theta, m, v and the best theta as little-endian f32.
    /// Written to a temporary file and renamed, so a crash leaves the previous checkpoint whole.
    fn save(&self, path: &Path) -> Result<(), TrainError> {
        let err = |e: std::io::Error| TrainError::Checkpoint {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let header = serde_json::to_string(self).map_err(|e| TrainError::Checkpoint {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let mut bytes = Vec::with_capacity(header.len() + 1 + 16 * self.theta.len());
        bytes.extend_from_slice(header.as_bytes());
        bytes.push(b'\n');
        for v in [&self.theta, &self.m, &self.v, &self.best_theta] {
            for x in v.iter() {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, &bytes).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    fn load(path: &Path, len: usize) -> Result<Self, TrainError> {
        let bad = |message: String| TrainError::Checkpoint {
            path: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let nl = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| bad("no header".into()))?;
        let mut state: LoopState =
            serde_json::from_slice(&bytes[..nl]).map_err(|e| bad(e.to_string()))?;
        let body = &bytes[nl + 1..];
        if body.len() != 16 * len {
            return Err(bad(format!(
                "holds {} bytes of parameters, expected {}",
                body.len(),
                16 * len
            )));
        }
        let mut vecs = body.chunks(4 * len).map(|c| {
            c.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<f32>>()
        });
        let mut next = || vecs.next().ok_or_else(|| bad("truncated".into()));
        state.theta = next()?;
        state.m = next()?;
        state.v = next()?;
        state.best_theta = next()?;
        Ok(state)
    }
}

/// The learning rate at optimizer step `step` (0-based) of `total`.
fn learning_rate(hp: &Hyperparameters, step: usize, total: usize) -> f64 {
    let warmup = ((total as f64) * hp.warmup_ratio).ceil() as usize;
    if step < warmup {
        return hp.learning_rate * (step + 1) as f64 / warmup as f64;
    }
    let span = (total - warmup).max(1) as f64;
    let t = (step - warmup) as f64 / span;
    hp.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// Pads `examples` into one batch; positions after each prompt predict the next answer token.
fn make_batch(examples: &[&TrainExample]) -> Batch {
    let t = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(1);
    let mut tokens = Vec::with_capacity(examples.len() * t);
    let mut targets = Vec::new();
    for (r, e) in examples.iter().enumerate() {
        tokens.extend_from_slice(&e.tokens);
        tokens.resize((r + 1) * t, 0);
        for i in e.prompt_len.max(1)..e.tokens.len() {
            targets.push((r * t + i - 1, e.tokens[i]));
        }
    }
    Batch {
        tokens,
        rows: examples.len(),
        t,
        targets,
    }
}

/// Mean loss per answer token over `examples`.
fn mean_loss(
    base: &TrainBase,
    examples: &[TrainExample],
    lora: &LoraFactors,
    theta: &[f32],
    micro: usize,
) -> Result<f64, TrainError> {
    let mut sorted: Vec<&TrainExample> = examples.iter().collect();
    sorted.sort_by_key(|e| e.tokens.len());
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in sorted.chunks(micro) {
        let r = base.loss(&make_batch(chunk), lora, theta)?;
        sum += r.loss_sum;
        n += r.targets;
    }
    Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
}

/// Deterministic shuffle of 0..n for one epoch.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = SplitMix(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Trains a LoRA adapter on `train`, scoring `val` after every epoch. With `checkpoint`, the loop
/// state is saved there after every epoch and at least every 30 seconds, and a matching
/// checkpoint found at the start is resumed from. `cancel` stops the job between steps.
pub fn train(
    base: &TrainBase,
    train: &[TrainExample],
    val: &[TrainExample],
    hp: &Hyperparameters,
    checkpoint: Option<&Path>,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<TrainOutcome, TrainError> {
    let control = Control {
        checkpoint,
        cancel,
        pace: &|| {},
    };
    train_paced(base, train, val, hp, &control, progress)
}

/// How a training job is steered from outside.
pub struct Control<'a> {
    /// Where the loop state is saved (after every epoch, and at least every 30 seconds) and
    /// resumed from.
    pub checkpoint: Option<&'a Path>,
    /// Stops the job between steps (the state is saved first).
    pub cancel: &'a AtomicBool,
    /// Called before every forward/backward pass: a job sharing the machine with serving waits
    /// there for the engines to go quiet.
    pub pace: &'a dyn Fn(),
}

/// [`train`] under a [`Control`] that also paces it.
pub fn train_paced(
    base: &TrainBase,
    train: &[TrainExample],
    val: &[TrainExample],
    hp: &Hyperparameters,
    control: &Control<'_>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<TrainOutcome, TrainError> {
    hp.validate()?;
    check_examples(base, train, val, hp)?;
    let lora = LoraFactors::new(&base.cfg, hp.adapter_dim, hp.lora_alpha(), &hp.targets());
    let _memory = crate::ops::memory::RetainFreedMemory::new();
    let steps_per_epoch = train.len().div_ceil(hp.batch_size);
    let total_steps = steps_per_epoch * hp.epochs;
    let fingerprint = format!(
        "{}|{}|{}|{}",
        serde_json::to_string(hp).unwrap_or_default(),
        train.len(),
        val.len(),
        lora.len
    );
    let mut st = LoopState::resume_or_start(control.checkpoint, fingerprint, &lora, hp.seed);
    let micro = hp.micro_batch_size.min(hp.batch_size);
    let started = Instant::now();
    let mut tokens_done = 0usize;
    let mut last_save = Instant::now();
    let mut grad = vec![0f32; lora.len];
    while st.epoch < hp.epochs {
        let order = epoch_order(train.len(), hp.seed, st.epoch);
        while st.step_in_epoch < steps_per_epoch {
            if control.cancel.load(Ordering::Relaxed) {
                if let Some(p) = control.checkpoint {
                    st.save(p)?;
                }
                return Err(TrainError::Cancelled);
            }
            let lo = st.step_in_epoch * hp.batch_size;
            let hi = (lo + hp.batch_size).min(train.len());
            let step: Vec<&TrainExample> = order[lo..hi].iter().map(|&i| &train[i]).collect();
            let pass = StepPass {
                base,
                lora: &lora,
                hp,
                micro,
                pace: control.pace,
            };
            let (loss_sum, targets, tokens) = pass.gradient(step, &st, &mut grad)?;
            tokens_done += tokens;
            let step_loss = loss_sum / targets.max(1) as f64;
            if !step_loss.is_finite() {
                return Err(TrainError::Diverged(step_loss));
            }
            let lr = learning_rate(hp, st.global_step, total_steps);
            adamw_update(hp, &mut st, &grad, lr);
            st.global_step += 1;
            st.step_in_epoch += 1;
            st.epoch_loss += loss_sum;
            st.epoch_targets += targets;
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            progress(&Progress {
                epoch: st.epoch,
                epochs: hp.epochs,
                step: st.global_step,
                total_steps,
                train_loss: step_loss,
                val_loss: st.epochs.last().and_then(|e| e.val_loss),
                tokens_per_sec: tokens_done as f64 / secs,
                eta_secs: eta(
                    secs,
                    tokens_done,
                    train,
                    hp.epochs,
                    st.global_step,
                    total_steps,
                ),
            });
            if let Some(p) = control.checkpoint {
                if last_save.elapsed().as_secs() >= 30 {
                    st.save(p)?;
                    last_save = Instant::now();
                }
            }
        }
        st.finish_epoch(mean_loss_of(base, val, &lora, &st.theta, micro)?);
        if let Some(p) = control.checkpoint {
            st.save(p)?;
            last_save = Instant::now();
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    Ok(TrainOutcome {
        lora,
        theta: st.best_theta,
        best_epoch: st.best_epoch,
        epochs: st.epochs,
        steps: st.global_step,
        tokens_per_sec: tokens_done as f64 / secs,
    })
}

/// Every example has answer tokens and fits the sequence limit.
fn check_examples(
    base: &TrainBase,
    train: &[TrainExample],
    val: &[TrainExample],
    hp: &Hyperparameters,
) -> Result<(), TrainError> {
    if train.is_empty() {
        return Err(TrainError::Data("the training split is empty".into()));
    }
    for (i, e) in train.iter().chain(val).enumerate() {
        if e.prompt_len >= e.tokens.len() {
            return Err(TrainError::Data(format!(
                "example {i} has no answer tokens"
            )));
        }
        if e.tokens.len() > hp.max_seq_len.min(base.cfg.context_length) {
            return Err(TrainError::Data(format!(
                "example {i} is {} tokens, over max_seq_len {} (or the model's context {})",
                e.tokens.len(),
                hp.max_seq_len,
                base.cfg.context_length
            )));
        }
    }
    Ok(())
}

/// The validation loss, when there is a validation split.
fn mean_loss_of(
    base: &TrainBase,
    val: &[TrainExample],
    lora: &LoraFactors,
    theta: &[f32],
    micro: usize,
) -> Result<Option<f64>, TrainError> {
    if val.is_empty() {
        return Ok(None);
    }
    Ok(Some(mean_loss(base, val, lora, theta, micro)?))
}

/// What one optimizer step's passes share.
struct StepPass<'a> {
    base: &'a TrainBase,
    lora: &'a LoraFactors,
    hp: &'a Hyperparameters,
    micro: usize,
    pace: &'a dyn Fn(),
}

impl StepPass<'_> {
    /// The step's gradient (into `grad`, per answer token), over its examples in micro-batches
    /// of similar lengths: the summed loss, the answer tokens, and the tokens run.
    fn gradient(
        &self,
        mut step: Vec<&TrainExample>,
        st: &LoopState,
        grad: &mut [f32],
    ) -> Result<(f64, usize, usize), TrainError> {
        // Similar lengths share a micro-batch: less padding.
        step.sort_by_key(|e| e.tokens.len());
        let targets: usize = step
            .iter()
            .map(|e| e.tokens.len() - e.prompt_len.max(1))
            .sum();
        grad.iter_mut().for_each(|g| *g = 0.0);
        // Dropout masks depend only on the seed and the step, so a resumed job draws the same.
        let mut rng = SplitMix(
            self.hp
                .seed
                .wrapping_mul(0x2545_F491)
                .wrapping_add(st.global_step as u64),
        );
        let (mut loss_sum, mut tokens) = (0.0, 0);
        for chunk in step.chunks(self.micro) {
            (self.pace)();
            let r = self.base.loss_and_grad(
                &make_batch(chunk),
                self.lora,
                &st.theta,
                self.hp.adapter_dropout,
                &mut rng,
                1.0 / targets.max(1) as f32,
                grad,
            )?;
            loss_sum += r.loss_sum;
            tokens += chunk.iter().map(|e| e.tokens.len()).sum::<usize>();
        }
        Ok((loss_sum, targets, tokens))
    }
}

/// Clips the gradient's global norm, then one AdamW step with decoupled weight decay at `lr`.
fn adamw_update(hp: &Hyperparameters, st: &mut LoopState, grad: &[f32], lr: f64) {
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let norm = grad
        .iter()
        .map(|g| f64::from(*g) * f64::from(*g))
        .sum::<f64>()
        .sqrt();
    let clip = if hp.max_grad_norm > 0.0 && norm > hp.max_grad_norm {
        hp.max_grad_norm / norm
    } else {
        1.0
    };
    let t = (st.global_step + 1) as i32;
    let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
    let params = st
        .theta
        .iter_mut()
        .zip(st.m.iter_mut())
        .zip(st.v.iter_mut());
    for (((theta, m1), m2), g) in params.zip(grad) {
        let g = f64::from(*g) * clip;
        let m = b1 * f64::from(*m1) + (1.0 - b1) * g;
        let v = b2 * f64::from(*m2) + (1.0 - b2) * g * g;
        *m1 = m as f32;
        *m2 = v as f32;
        let p = f64::from(*theta);
        let update = (m / c1) / ((v / c2).sqrt() + eps) + hp.weight_decay * p;
        *theta = (p - lr * update) as f32;
    }
}

/// Seconds left, from the pace so far in this process.
fn eta(
    secs: f64,
    tokens_done: usize,
    train: &[TrainExample],
    epochs: usize,
    step: usize,
    total_steps: usize,
) -> f64 {
    if tokens_done == 0 || total_steps == 0 {
        return 0.0;
    }
    let total_tokens: usize = train.iter().map(|e| e.tokens.len()).sum::<usize>() * epochs;
    let left_fraction = (total_steps - step.min(total_steps)) as f64 / total_steps as f64;
    secs / tokens_done as f64 * total_tokens as f64 * left_fraction
}
