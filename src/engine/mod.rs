//! The embedded inference engine: a Llama-family model loaded from a GGUF file or a Hugging Face
//! directory (on the CPU, or on an accelerator through `gpu`), its tokenizer and chat template, LoRA
//! adapters, and a scheduler thread that runs continuous batching: every decode step advances all
//! active sequences in one forward pass; new requests join between steps (a request's `n` choices
//! share one prefill), finished or abandoned ones leave at once. Each token is sampled within the
//! request's grammar (constrained tool calls, structured answers) and may report its logprobs.
//! The engine does no I/O beyond loading weights.

pub mod arch;
pub mod chat;
pub mod gpu;
pub mod grammar;
pub mod lora;
pub mod model;
mod prefix;
pub mod sampling;
pub mod template;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tokenizer;
pub mod tools;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use tokio::sync::mpsc;

use crate::ops::device::Device as KernelDevice;
use chat::ChatFormat;
use grammar::{Grammar, GrammarState, Vocab};
use lora::{AdapterBits, AdapterRegistry, LoraAdapter, LoraError};
use model::{KvCache, LlamaConfig, LlamaModel, ModelError, ModelSource, WeightFormat};
use sampling::{Sampler, SamplingParams, TokenLogprob};
use tokenizer::TokenizerInfo;

/// How to load one local model.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalModelConfig {
    /// The model's id in routes (`{ local = "<name>" }`) and requests.
    pub name: String,
    /// A GGUF file, or a Hugging Face directory (config.json, *.safetensors, tokenizer.json).
    pub path: PathBuf,
    /// In-memory format of the projection weights: native, q8_0 or f32.
    #[serde(default)]
    pub weights: WeightFormat,
    /// Longest sequence (prompt + completion) served; capped by the model's own.
    #[serde(default = "default_context")]
    pub context_length: usize,
    /// Sequences decoded together in one step; more wait their turn.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// LoRA adapters kept loaded at once; loading another evicts the least recently used.
    #[serde(default = "default_max_adapters")]
    pub max_adapters: usize,
    /// `cpu`, or `cuda:N` for the CUDA kernels (a build with `--features cuda` and a driver;
    /// otherwise the model runs on the CPU, said once in the log).
    #[serde(default = "default_device")]
    pub device: String,
    /// Megabytes of recent prompts' KV cache kept for reuse by prompts that start the same way
    /// (0 turns prefix caching off).
    #[serde(default = "default_prefix_cache_mb")]
    pub prefix_cache_mb: usize,
    /// Constrain tool calls as the model writes them: the function name is one of the request's
    /// tools and the arguments are JSON valid against that tool's parameter schema.
    #[serde(default = "default_true")]
    pub constrain_tool_calls: bool,
    /// Bits per value of LoRA factors on a CPU Q8_0 base: 4 (the default: half the bytes a batch
    /// of distinct adapters streams per step, at coarser factors) or 8.
    #[serde(default)]
    pub adapter_bits: AdapterBits,
    /// The syntax the model writes tool calls in (`hermes`, `llama3_json`, `mistral`); by
    /// default the one its chat template teaches.
    #[serde(default)]
    pub tool_format: Option<tools::ToolFormat>,
}

fn default_true() -> bool {
    true
}

fn default_prefix_cache_mb() -> usize {
    256
}

fn default_device() -> String {
    "cpu".into()
}

fn default_context() -> usize {
    4096
}
fn default_max_batch() -> usize {
    16
}
fn default_max_adapters() -> usize {
    64
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model '{name}': cannot open '{path}': {source}. Run `bash scripts/fetch-model.sh` to fetch the default model.")]
    Open {
        name: String,
        path: String,
        source: std::io::Error,
    },
    #[error("model '{name}': {source}")]
    Model { name: String, source: ModelError },
    #[error("model '{name}': {message}")]
    Template { name: String, message: String },
    #[error("the engine for '{0}' has stopped")]
    Stopped(String),
}

/// Why generation ended, as OpenAI's `finish_reason` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a generation reports: for each choice, text deltas then one `Done`; or, at any point,
/// one `Error` that ends them all.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    Delta {
        choice: usize,
        text: String,
        /// The tokens this text came from, when logprobs were asked for (a token whose text is
        /// held back, such as part of a character, comes with the delta that releases it).
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        choice: usize,
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens whose keys and values came from the prefix cache.
        cached_tokens: usize,
    },
    Error(String),
}

/// One generation job.
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Closed by the receiver when the client goes away: the sequence leaves the batch at once.
    pub events: mpsc::UnboundedSender<GenEvent>,
    /// The adapter this sequence runs with; held for its whole life, so an unload or reload never
    /// changes a generation that has started.
    pub adapter: Option<Arc<LoraAdapter>>,
    /// What it may write (tool calls, a structured answer), when that is constrained.
    pub grammar: Option<Arc<Grammar>>,
    /// Report each token's log probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// Independent completions (choices) of the prompt, prefilled once and decoded side by side;
    /// choice `i` samples with `seed + i`.
    pub n: usize,
}

pub struct Engine {
    pub name: String,
    pub context_length: usize,
    /// The base model's shape, for checking adapters.
    pub shape: LlamaConfig,
    /// Whether the base's q/k rows are in GGUF's layout (adapters are permuted to match).
    gguf_layout: bool,
    /// How adapters are quantized on load (they follow a Q8_0 base on the CPU), if they are.
    quantize_adapters: Option<AdapterBits>,
    pub adapters: AdapterRegistry,
    /// Tokenizer, chat template and tool prompting.
    pub chat: ChatFormat,
    /// Whether requests with tools get their calls constrained (`constrain_tool_calls`).
    pub constrain_tool_calls: bool,
    /// Sequences decoded together: the most choices one request may ask for.
    pub max_batch: usize,
    /// The vocabulary as bytes (what logprobs report of each token).
    pub vocab: Arc<Vocab>,
    queue: std_mpsc::Sender<GenerationRequest>,
    load: Arc<EngineLoad>,
    _thread: JoinHandle<()>,
}

/// Sequences submitted but not yet admitted, and sequences in the batch: what background work
/// (training) watches to stay out of serving's way.
#[derive(Default)]
struct EngineLoad {
    pending: std::sync::atomic::AtomicUsize,
    active: std::sync::atomic::AtomicUsize,
}

impl Engine {
    /// Loads a model and starts its scheduler thread. With `device = "cuda:N"`, a build with the
    /// `cuda` feature and a driver, the forward pass runs on that GPU; otherwise on the CPU (one
    /// log line says why).
    pub fn load(cfg: &LocalModelConfig) -> Result<Arc<Engine>, EngineError> {
        if cfg.device.starts_with("cuda") {
            #[cfg(feature = "cuda")]
            if let Some(dev) = crate::ops::open_cuda(&cfg.name, &cfg.device) {
                return Self::load_on(cfg, dev);
            }
            #[cfg(not(feature = "cuda"))]
            tracing::warn!(
                model = %cfg.name,
                device = %cfg.device,
                "this binary was built without the `cuda` feature; the model runs on the CPU"
            );
        }
        let device = Device::Cpu;
        let (model, chat) = Self::open(cfg, |src| {
            LlamaModel::from_source(src, cfg.weights, &device)
        })?;
        let gguf_layout = model.gguf_layout();
        Self::start(
            cfg,
            Forward::Cpu(Box::new(model)),
            chat,
            gguf_layout,
            "cpu".into(),
        )
    }

    /// Loads a model onto an accelerator (`ops::device::Device`) and starts its scheduler: the
    /// forward pass runs there, from the kernels of `kernels/*.cu`.
    pub fn load_on<D: KernelDevice + 'static>(
        cfg: &LocalModelConfig,
        dev: D,
    ) -> Result<Arc<Engine>, EngineError> {
        let where_ = dev.describe();
        let (model, chat) = Self::open(cfg, |src| {
            let shape = src.config(0);
            gpu::GpuModel::load(
                dev,
                src,
                gpu::GpuOptions::for_serving(&shape, cfg.max_batch),
            )
        })?;
        let gguf_layout = model.gguf_layout();
        Self::start(
            cfg,
            Forward::Device(Box::new(model)),
            chat,
            gguf_layout,
            where_,
        )
    }

    /// Opens the model's file or directory, builds its weights with `build`, and reads its chat
    /// format.
    fn open<M>(
        cfg: &LocalModelConfig,
        build: impl FnOnce(ModelSource<'_>) -> Result<M, ModelError>,
    ) -> Result<(M, ChatFormat), EngineError> {
        let name = cfg.name.clone();
        let model_err = |source: ModelError| EngineError::Model {
            name: name.clone(),
            source,
        };
        let template_err = |message: String| EngineError::Template {
            name: name.clone(),
            message,
        };
        if cfg.path.is_dir() {
            let src = ModelSource::hf_dir(&cfg.path, cfg.context_length, &Device::Cpu)
                .map_err(model_err)?;
            let model = build(src).map_err(model_err)?;
            let chat = ChatFormat::from_hf_dir(&cfg.path).map_err(template_err)?;
            Ok((model, Self::tool_format(cfg, chat)))
        } else {
            let mut file = std::fs::File::open(&cfg.path).map_err(|source| EngineError::Open {
                name: name.clone(),
                path: cfg.path.display().to_string(),
                source,
            })?;
            let content = gguf_file::Content::read(&mut file).map_err(|e| model_err(e.into()))?;
            let src = ModelSource::gguf(&content, &mut file, cfg.context_length, &Device::Cpu)
                .map_err(model_err)?;
            let model = build(src).map_err(model_err)?;
            let chat = ChatFormat::from_gguf(&content).map_err(template_err)?;
            Ok((model, Self::tool_format(cfg, chat)))
        }
    }

    /// The model's tool-call syntax: its setting, or its template's; said once in the log.
    fn tool_format(cfg: &LocalModelConfig, chat: ChatFormat) -> ChatFormat {
        let chat = match cfg.tool_format {
            Some(f) => chat.with_tool_format(f),
            None => chat,
        };
        chat.log_tool_format(&cfg.name);
        chat
    }

    fn start(
        cfg: &LocalModelConfig,
        forward: Forward,
        chat: ChatFormat,
        gguf_layout: bool,
        device: String,
    ) -> Result<Arc<Engine>, EngineError> {
        let name = cfg.name.clone();
        let tokenizer = chat.tokenizer.clone();
        let (tx, rx) = std_mpsc::channel();
        let shape = forward.cfg().clone();
        let context_length = shape.context_length;
        let on_cpu = matches!(forward, Forward::Cpu(_));
        let sched_tok = tokenizer.clone();
        let vocab = Arc::new(Vocab::from_tokenizer(&tokenizer.tokenizer, &tokenizer.eos));
        let engine_vocab = vocab.clone();
        let max_batch = cfg.max_batch.max(1);
        let prefix_budget = cfg.prefix_cache_mb.saturating_mul(1 << 20);
        let thread_name = format!("engine-{name}");
        let load = Arc::new(EngineLoad::default());
        let sched_load = load.clone();
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                Scheduler::new(
                    forward,
                    sched_tok,
                    vocab,
                    max_batch,
                    sched_load,
                    prefix_budget,
                )
                .run(rx)
            })
            .map_err(|source| EngineError::Open {
                name: name.clone(),
                path: cfg.path.display().to_string(),
                source,
            })?;
        tracing::info!(model = %name, path = %cfg.path.display(), context_length, device = %device, "local model loaded");
        Ok(Arc::new(Engine {
            name,
            context_length,
            shape,
            gguf_layout,
            // Adapters follow a Q8_0 base on the CPU; the device path takes them in f32.
            quantize_adapters: (on_cpu && cfg.weights == WeightFormat::Q8_0)
                .then_some(cfg.adapter_bits),
            adapters: AdapterRegistry::new(cfg.max_adapters),
            chat,
            constrain_tool_calls: cfg.constrain_tool_calls,
            max_batch,
            vocab: engine_vocab,
            queue: tx,
            load,
            _thread: thread,
        }))
    }

    /// Loads (or reloads) a PEFT adapter onto this base. Returns it and the ids evicted for room.
    pub fn load_adapter(
        &self,
        id: &str,
        dir: &Path,
    ) -> Result<(Arc<LoraAdapter>, Vec<String>), LoraError> {
        lora::check_name(id)?;
        let adapter = LoraAdapter::load_as(
            id,
            &self.name,
            dir,
            &self.shape,
            self.gguf_layout,
            self.quantize_adapters,
        )?;
        let evicted = self.adapters.insert(adapter);
        let loaded = self
            .adapters
            .peek(id)
            .ok_or_else(|| LoraError::NotLoaded(id.to_string()))?;
        Ok((loaded, evicted))
    }

    pub fn submit(&self, request: GenerationRequest) -> Result<(), EngineError> {
        self.load.pending.fetch_add(1, Ordering::Relaxed);
        self.queue.send(request).map_err(|_| {
            self.load.pending.fetch_sub(1, Ordering::Relaxed);
            EngineError::Stopped(self.name.clone())
        })
    }

    /// Sequences waiting for or holding a place in the decode batch.
    pub fn in_flight(&self) -> usize {
        self.load.pending.load(Ordering::Relaxed) + self.load.active.load(Ordering::Relaxed)
    }
}

/// Where a model's forward pass runs.
enum Forward {
    Cpu(Box<LlamaModel>),
    Device(Box<dyn gpu::DeviceForward>),
}

/// A sequence's keys and values, wherever its model runs.
enum SeqCache {
    Cpu(KvCache),
    Device(gpu::GpuSeq),
}

impl SeqCache {
    fn len(&self) -> usize {
        match self {
            SeqCache::Cpu(c) => c.len(),
            SeqCache::Device(s) => s.len(),
        }
    }
}

impl Forward {
    fn cfg(&self) -> &LlamaConfig {
        match self {
            Forward::Cpu(m) => &m.cfg,
            Forward::Device(d) => d.cfg(),
        }
    }

    fn new_cache(&self) -> SeqCache {
        match self {
            Forward::Cpu(m) => SeqCache::Cpu(m.new_cache()),
            Forward::Device(d) => SeqCache::Device(d.new_seq()),
        }
    }

    /// One batched pass; the logits of each sequence's last token.
    fn run(
        &mut self,
        tokens: &[&[u32]],
        caches: &mut [&mut SeqCache],
        adapters: &[Option<&LoraAdapter>],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let mismatch = || ModelError::Unsupported("a sequence cache of another device".into());
        match self {
            Forward::Cpu(m) => {
                let mut kv = Vec::with_capacity(caches.len());
                for c in caches.iter_mut() {
                    match &mut **c {
                        SeqCache::Cpu(k) => kv.push(k),
                        SeqCache::Device(_) => return Err(mismatch()),
                    }
                }
                Ok(m.forward_with(tokens, &mut kv, adapters)?
                    .to_vec2::<f32>()?)
            }
            Forward::Device(d) => {
                let mut seqs = Vec::with_capacity(caches.len());
                for c in caches.iter_mut() {
                    match &mut **c {
                        SeqCache::Device(s) => seqs.push(s),
                        SeqCache::Cpu(_) => return Err(mismatch()),
                    }
                }
                d.forward(tokens, &mut seqs, adapters)
            }
        }
    }
}

/// One choice of a request, decoding.
struct Sequence {
    request: Arc<GenerationRequest>,
    /// Which of the request's choices this is.
    choice: usize,
    cache: SeqCache,
    /// Prompt tokens reused from the prefix cache.
    cached: usize,
    sampler: Sampler,
    generated: Vec<u32>,
    /// Bytes of decoded text already sent.
    sent: usize,
    last: u32,
    /// Where its output stands in its grammar, when that is constrained.
    grammar: Option<GrammarState>,
    /// Logprobs of tokens whose text has not been sent yet.
    pending: Vec<TokenLogprob>,
}

impl Sequence {
    fn send_delta(&mut self, text: String) {
        let _ = self.request.events.send(GenEvent::Delta {
            choice: self.choice,
            text,
            logprobs: std::mem::take(&mut self.pending),
        });
    }
}

struct Scheduler {
    model: Forward,
    tokenizer: Arc<TokenizerInfo>,
    vocab: Arc<Vocab>,
    max_batch: usize,
    active: Vec<Sequence>,
    /// A request taken off the queue whose choices do not fit in the batch yet.
    held: Option<GenerationRequest>,
    load: Arc<EngineLoad>,
    prefixes: prefix::PrefixCache,
}

enum Step {
    Continue,
    Finished,
}

/// Choice `i`'s seed: the request's own for the first, so `n = 1` and the first of `n` agree.
fn choice_seed(seed: Option<u64>, choice: usize) -> Option<u64> {
    seed.map(|s| s.wrapping_add(choice as u64))
}

impl Scheduler {
    fn new(
        model: Forward,
        tokenizer: Arc<TokenizerInfo>,
        vocab: Arc<Vocab>,
        max_batch: usize,
        load: Arc<EngineLoad>,
        prefix_budget: usize,
    ) -> Self {
        Self {
            model,
            tokenizer,
            vocab,
            max_batch,
            active: Vec::new(),
            held: None,
            load,
            prefixes: prefix::PrefixCache::new(prefix_budget),
        }
    }

    /// Admits a request taken off the queue, keeping the load figures true meanwhile.
    fn take(&mut self, request: GenerationRequest) {
        self.load
            .active
            .store(self.active.len() + request.n.max(1), Ordering::Relaxed);
        self.load.pending.fetch_sub(1, Ordering::Relaxed);
        self.admit(request);
    }

    fn run(mut self, rx: std_mpsc::Receiver<GenerationRequest>) {
        loop {
            if self.active.is_empty() && self.held.is_none() {
                self.load.active.store(0, Ordering::Relaxed);
                match rx.recv() {
                    Ok(r) => self.held = Some(r),
                    Err(_) => return,
                }
            }
            // Admit while the batch has room for a request's every choice (an empty batch takes
            // any request whole).
            loop {
                let next = match self.held.take() {
                    Some(r) => r,
                    None => match rx.try_recv() {
                        Ok(r) => r,
                        Err(_) => break,
                    },
                };
                if !self.active.is_empty() && self.active.len() + next.n.max(1) > self.max_batch {
                    self.held = Some(next);
                    break;
                }
                self.take(next);
            }
            self.active.retain(|s| !s.request.events.is_closed());
            if !self.active.is_empty() {
                self.decode_step();
            }
            self.load.active.store(self.active.len(), Ordering::Relaxed);
        }
    }

    /// Prefills a new request and produces each choice's first token. The prompt is prefilled
    /// once; on the CPU its cache is copied for each further choice, on a device each choice
    /// prefills its own.
    fn admit(&mut self, request: GenerationRequest) {
        if request.events.is_closed() {
            return;
        }
        if request.prompt.is_empty() {
            let _ = request
                .events
                .send(GenEvent::Error("the prompt is empty".into()));
            return;
        }
        let request = Arc::new(request);
        let adapter = request.adapter.clone();
        let prompt = &request.prompt;
        let n = request.n.max(1);
        let mut starts = Vec::with_capacity(n);
        let first = match self.prefill(prompt, &adapter) {
            Ok(p) => p,
            Err(e) => {
                let _ = request.events.send(GenEvent::Error(e));
                return;
            }
        };
        // Each further choice starts from a copy of the prefilled cache on the CPU; a device
        // cache cannot be copied yet, so there each choice prefills its own.
        for _ in 1..n {
            let start = match &first.0 {
                SeqCache::Cpu(c) => {
                    Ok((SeqCache::Cpu(c.prefix(c.len())), first.1, first.2.clone()))
                }
                SeqCache::Device(_) => self.prefill(prompt, &adapter),
            };
            match start {
                Ok(s) => starts.push(s),
                Err(e) => {
                    let _ = request.events.send(GenEvent::Error(e));
                    return;
                }
            }
        }
        starts.insert(0, first);
        for (choice, (cache, cached, mut logits)) in starts.into_iter().enumerate() {
            let mut sampling = request.sampling.clone();
            sampling.seed = choice_seed(sampling.seed, choice);
            let mut seq = Sequence {
                cache,
                cached,
                sampler: Sampler::new(sampling),
                grammar: request.grammar.as_deref().map(GrammarState::new),
                request: request.clone(),
                choice,
                generated: Vec::new(),
                sent: 0,
                last: 0,
                pending: Vec::new(),
            };
            let tok = self.sample(&mut seq, &mut logits);
            if let Step::Continue = self.accept(&mut seq, tok) {
                self.active.push(seq);
            }
        }
    }

    /// Runs a prompt (what the prefix cache lacks of it): its cache, the tokens reused, and the
    /// last token's logits.
    fn prefill(
        &mut self,
        prompt: &[u32],
        adapter: &Option<Arc<LoraAdapter>>,
    ) -> Result<(SeqCache, usize, Vec<f32>), String> {
        // Prefix caching keeps host-side caches: CPU models only.
        let reused = match self.model {
            Forward::Cpu(_) => self.prefixes.lookup(prompt, adapter),
            Forward::Device(_) => None,
        };
        let (mut cache, cached) = match reused {
            Some(c) => {
                let n = c.len();
                (SeqCache::Cpu(c), n)
            }
            None => (self.model.new_cache(), 0),
        };
        let mut rows = self
            .model
            .run(
                &[&prompt[cached..]],
                &mut [&mut cache],
                &[adapter.as_deref()],
            )
            .map_err(|e| e.to_string())?;
        if rows.is_empty() {
            return Err("the forward pass returned no logits".into());
        }
        if let SeqCache::Cpu(c) = &cache {
            self.prefixes.insert(prompt, adapter, c);
        }
        Ok((cache, cached, rows.swap_remove(0)))
    }

    /// One decode step for every active sequence, in one batched forward pass.
    fn decode_step(&mut self) {
        let tokens: Vec<[u32; 1]> = self.active.iter().map(|s| [s.last]).collect();
        let token_refs: Vec<&[u32]> = tokens.iter().map(|t| &t[..]).collect();
        let adapter_arcs: Vec<Option<Arc<LoraAdapter>>> = self
            .active
            .iter()
            .map(|s| s.request.adapter.clone())
            .collect();
        let adapters: Vec<Option<&LoraAdapter>> =
            adapter_arcs.iter().map(|a| a.as_deref()).collect();
        let result = {
            let mut caches: Vec<&mut SeqCache> =
                self.active.iter_mut().map(|s| &mut s.cache).collect();
            self.model.run(&token_refs, &mut caches, &adapters)
        };
        let rows = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "decode step failed");
                for s in self.active.drain(..) {
                    let _ = s.request.events.send(GenEvent::Error(e.to_string()));
                }
                return;
            }
        };
        let mut seqs = std::mem::take(&mut self.active);
        let mut keep = Vec::with_capacity(seqs.len());
        for (mut seq, mut row) in seqs.drain(..).zip(rows) {
            let tok = self.sample(&mut seq, &mut row);
            if let Step::Continue = self.accept(&mut seq, tok) {
                keep.push(seq);
            }
        }
        self.active = keep;
    }

    /// Samples a sequence's next token from its logits, within its grammar; notes the token's
    /// logprobs (over what the grammar allows) when they were asked for.
    fn sample(&self, seq: &mut Sequence, logits: &mut [f32]) -> u32 {
        let grammar = seq.request.grammar.as_deref();
        if let (Some(state), Some(g)) = (&seq.grammar, grammar) {
            state.mask(g, &self.vocab, logits);
        }
        let tok = seq.sampler.sample(logits);
        if let Some(top) = seq.request.logprobs {
            let t = seq.request.sampling.temperature;
            seq.pending.push(sampling::logprobs(logits, t, tok, top));
        }
        if let (Some(state), Some(g)) = (&mut seq.grammar, grammar) {
            state.advance(g, self.vocab.bytes(tok));
        }
        tok
    }

    /// Takes a sampled token: emits text, checks end conditions.
    fn accept(&self, seq: &mut Sequence, tok: u32) -> Step {
        let done = |seq: &Sequence, reason: FinishReason| {
            let _ = seq.request.events.send(GenEvent::Done {
                choice: seq.choice,
                finish_reason: reason,
                prompt_tokens: seq.request.prompt.len(),
                completion_tokens: seq.generated.len(),
                cached_tokens: seq.cached,
            });
            Step::Finished
        };
        if self.tokenizer.eos.contains(&tok) {
            // The end of the turn is not part of the answer, nor are its logprobs.
            seq.pending.pop();
            self.flush(seq, None);
            return done(seq, FinishReason::Stop);
        }
        seq.generated.push(tok);
        seq.last = tok;
        let text = match self.tokenizer.decode_answer(&seq.generated) {
            Ok(t) => t,
            Err(e) => {
                let _ = seq.request.events.send(GenEvent::Error(e.to_string()));
                return Step::Finished;
            }
        };
        if let Some(at) = seq
            .request
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            self.flush_text(seq, &text[..at]);
            return done(seq, FinishReason::Stop);
        }
        // Hold back an incomplete UTF-8 character and anything that may still become a stop string.
        let mut safe = text.len();
        if text.ends_with('\u{FFFD}') {
            safe = text.len() - '\u{FFFD}'.len_utf8();
        }
        for s in &seq.request.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && text[..safe].ends_with(&s[..k]) {
                    safe = safe.min(text.len() - k);
                    break;
                }
            }
        }
        if safe > seq.sent && text.is_char_boundary(safe) && text.is_char_boundary(seq.sent) {
            let delta = text[seq.sent..safe].to_string();
            seq.sent = safe;
            seq.send_delta(delta);
        }
        if seq.generated.len() >= seq.request.max_tokens
            || seq.cache.len() + 1 >= self.model.cfg().context_length
        {
            self.flush(seq, Some(text));
            return done(seq, FinishReason::Length);
        }
        Step::Continue
    }

    /// Sends whatever decoded text (and logprobs) is still held back.
    fn flush(&self, seq: &mut Sequence, text: Option<String>) {
        let text = match text {
            Some(t) => t,
            None => self
                .tokenizer
                .decode_answer(&seq.generated)
                .unwrap_or_default(),
        };
        self.flush_text(seq, &text);
    }

    fn flush_text(&self, seq: &mut Sequence, text: &str) {
        let grown = text.len() > seq.sent && text.is_char_boundary(seq.sent);
        if grown || !seq.pending.is_empty() {
            let delta = if grown {
                text[seq.sent..].to_string()
            } else {
                String::new()
            };
            seq.sent = seq.sent.max(text.len());
            seq.send_delta(delta);
        }
    }
}

/// Loads every configured local model.
pub fn load_all(models: &[LocalModelConfig]) -> Result<Vec<Arc<Engine>>, EngineError> {
    models.iter().map(Engine::load).collect()
}

/// True if `path` looks like a GGUF file (magic bytes), for clear errors before loading.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}
