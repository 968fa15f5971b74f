#!/usr/bin/env python3
"""Records the model-family oracle the engine is tested against (tests/families.rs).

For each family (Llama 3.x, Qwen2.5, Qwen3, Mistral v0.3) this makes a tiny model with
`transformers` (random weights, fixed seed), a small byte-level BPE tokenizer trained with
`tokenizers` carrying the family's special tokens and pre-tokenizer, and the family's own chat
template (tests/data/families/templates). It writes, under tests/data/families/<family>/:

  hf/            config.json, model.safetensors, tokenizer.json, tokenizer_config.json
  model.gguf     the same weights and tokenizer, converted with the `gguf` package's writer the way
                 llama.cpp's converter lays them out (Llama q/k rows permuted, Llama 3 rope factors
                 as `rope_freqs.weight`)
  adapter/       a PEFT LoRA (rank 4 on all seven projections, both factors random)
  oracle.json    what transformers and PEFT compute: token ids, last-position logits and greedy
                 continuations of several prompts, with and without the adapter; chat templates
                 rendered by `tokenizer.apply_chat_template`; the package versions used

CI never runs this (it needs PyTorch); it compares the engine against the recorded files. Rerun it
whenever a model, a prompt or a template changes: `bash scripts/record-families.sh`.
"""

import json
import math
import os
import shutil
import sys
from importlib.metadata import version

import gguf
import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "families")
TEMPLATES = os.path.join(ROOT, "templates")

# The pre-tokenizer splits each family's tokenizer.json uses (and llama.cpp names in GGUF).
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
TEKKEN_SPLIT = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"

SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.15,
)

FAMILIES = {
    "llama3": dict(
        arch="llama",
        config=lambda v: LlamaConfig(
            vocab_size=v,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=True,
            **SHAPE,
        ),
        model=LlamaForCausalLM,
        template="llama3.2.jinja",
        special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
        added=[],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        split=LLAMA3_SPLIT,
        pre="llama-bpe",
    ),
    "qwen2": dict(
        arch="qwen2",
        config=lambda v: Qwen2Config(
            vocab_size=v, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, **SHAPE
        ),
        model=Qwen2ForCausalLM,
        template="qwen2.5.jinja",
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        added=["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
        bos=None,
        eos="<|im_end|>",
        split=QWEN2_SPLIT,
        pre="qwen2",
    ),
    "qwen3": dict(
        arch="qwen3",
        # Heads twice as wide as hidden / heads, as in Qwen3's own sizes.
        config=lambda v: Qwen3Config(
            vocab_size=v,
            head_dim=32,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            **SHAPE,
        ),
        model=Qwen3ForCausalLM,
        template="qwen3.jinja",
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        added=["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"],
        bos=None,
        eos="<|im_end|>",
        split=QWEN2_SPLIT,
        pre="qwen2",
    ),
    "mistral": dict(
        arch="llama",
        config=lambda v: MistralConfig(
            vocab_size=v, rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False, **SHAPE
        ),
        model=MistralForCausalLM,
        template="mistral-v0.3.jinja",
        special=["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
        added=[],
        bos="<s>",
        eos="</s>",
        split=TEKKEN_SPLIT,
        pre="tekken",
    ),
}

CORPUS = [
    "What is the weather like in Paris today? It is sunny and 22 degrees.",
    "Call the function get_weather with the city and the unit, then answer the user.",
    '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}',
    '{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}',
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
    "You are a helpful assistant. Answer briefly and use the tools when they help.",
    "Today Date: 26 Jul 2024. Cutting Knowledge Date: December 2023.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Environment: ipython\nGiven the following functions, please respond with a JSON",
    "The temperature in Paris is 22.0 degrees Celsius; in Oslo it is 4.",
] * 4

PROMPTS = [
    "Hello world",
    "The weather in Paris is",
    '{"name": "get_weather", "arguments": {"city": "',
    "def add(a, b):\n    return a +",
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]

# OpenAI-shaped conversations (arguments as JSON text, as clients send them).
CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"}], "tools": None},
    {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": TOOLS},
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "a1B2c3D4e", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "a1B2c3D4e", "content": '{"temperature": 4}'},
        ],
        "tools": TOOLS,
    },
    {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "It is 4 degrees in Oslo."},
            {"role": "user", "content": "Thanks!"},
        ],
        "tools": None,
    },
]


def hf_messages(messages):
    """What a serving stack hands a Hugging Face template: tool call arguments as objects."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


def train_tokenizer(fam):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(fam["split"]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=448,
        special_tokens=fam["special"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens(fam["added"])
    return tok


def randomize(model, seed):
    """transformers initializes norms to one and biases to zero; random ones test that each is used."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def last_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def greedy(model, ids, steps=8):
    ids = list(ids)
    out, margin = [], math.inf
    for _ in range(steps):
        logits = last_logits(model, ids)
        top = torch.topk(logits, 2)
        margin = min(margin, float(top.values[0] - top.values[1]))
        t = int(top.indices[0])
        out.append(t)
        ids.append(t)
    return out, margin


def permute_qk(w, heads):
    """llama.cpp's layout for Llama q/k rows: each head's two RoPE halves interleaved."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def rope(cfg):
    """RoPE settings: transformers 5 keeps them in `rope_parameters` (theta included)."""
    return dict(getattr(cfg, "rope_parameters", None) or {})


def llama3_rope_factors(cfg):
    s = rope(cfg)
    hd = cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (s["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    factors = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            factors.append(1.0)
        elif wl > low_wl:
            factors.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wl - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            factors.append(1.0 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_gguf(path, fam, cfg, model, tok, template):
    arch = fam["arch"]
    w = gguf.GGUFWriter(path, arch)
    w.add_name("flywheel-tiny-" + os.path.basename(os.path.dirname(path)))
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(rope(cfg)["rope_theta"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = set(fam["special"])
    added = set(fam["added"])
    types = [
        gguf.TokenType.CONTROL if t in special else gguf.TokenType.USER_DEFINED if t in added else gguf.TokenType.NORMAL
        for t in tokens
    ]
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(fam["pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if fam["bos"]:
        w.add_bos_token_id(vocab[fam["bos"]])
    w.add_eos_token_id(vocab[fam["eos"]])
    w.add_chat_template(template)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if rope(cfg).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, g in GGUF_NAMES.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{hf}.{kind}"
                if key not in sd:
                    continue
                t = sd[key]
                if arch == "llama" and hf in ("self_attn.q_proj", "self_attn.k_proj"):
                    heads = cfg.num_attention_heads if hf == "self_attn.q_proj" else cfg.num_key_value_heads
                    t = permute_qk(t if t.ndim == 2 else t[:, None], heads).reshape(t.shape)
                w.add_tensor(f"blk.{i}.{g}.{kind}", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def record(name, fam, seed):
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    template = open(os.path.join(TEMPLATES, fam["template"])).read()
    tok = train_tokenizer(fam)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=fam["bos"],
        eos_token=fam["eos"],
        chat_template=template,
    )
    torch.manual_seed(seed)
    cfg = fam["config"](len(tok.get_vocab(with_added_tokens=True)))
    cfg.bos_token_id = tok.token_to_id(fam["bos"]) if fam["bos"] else None
    cfg.eos_token_id = tok.token_to_id(fam["eos"])
    model = fam["model"](cfg).float().eval()
    randomize(model, seed)
    hf_dir = os.path.join(out, "hf")
    model.save_pretrained(hf_dir, safe_serialization=True)
    hf_tok.save_pretrained(hf_dir)
    # One place for the template, as older checkpoints keep it: inside tokenizer_config.json.
    tc_path = os.path.join(hf_dir, "tokenizer_config.json")
    tc = json.load(open(tc_path))
    tc["chat_template"] = template
    json.dump(tc, open(tc_path, "w"), indent=2, ensure_ascii=False)
    jinja = os.path.join(hf_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)
    write_gguf(os.path.join(out, "model.gguf"), fam, cfg, model, tok, template)

    prompts = []
    for text in PROMPTS:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        tokens, margin = greedy(model, ids)
        prompts.append(
            {
                "text": text,
                "ids": ids,
                "logits": [round(float(x), 6) for x in last_logits(model, ids)],
                "greedy": tokens,
                "greedy_margin": round(margin, 6),
            }
        )
    renders = []
    for conv in CONVERSATIONS:
        kwargs = {"date_string": "26 Jul 2024"} if name == "llama3" else {}
        rendered = hf_tok.apply_chat_template(
            hf_messages(conv["messages"]),
            tools=conv["tools"],
            add_generation_prompt=True,
            tokenize=False,
            **kwargs,
        )
        renders.append({**conv, "rendered": rendered, "ids": hf_tok(rendered, add_special_tokens=False)["input_ids"]})

    lora_cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )
    torch.manual_seed(seed + 1)
    peft_model = get_peft_model(model, lora_cfg).eval()
    peft_model.save_pretrained(os.path.join(out, "adapter"))
    os.remove(os.path.join(out, "adapter", "README.md"))
    for p in prompts:
        p["lora_logits"] = [round(float(x), 6) for x in last_logits(peft_model, p["ids"])]
        p["lora_greedy"], p["lora_greedy_margin"] = greedy(peft_model, p["ids"])
        p["lora_greedy_margin"] = round(p["lora_greedy_margin"], 6)

    oracle = {
        "family": name,
        "made_by": {k: version(k) for k in ("torch", "transformers", "peft", "gguf", "tokenizers")},
        "prompts": prompts,
        "templates": renders,
    }
    json.dump(oracle, open(os.path.join(out, "oracle.json"), "w"), indent=1, ensure_ascii=False)
    worst = min(min(p["greedy_margin"], p["lora_greedy_margin"]) for p in prompts)
    print(f"{name}: vocab {cfg.vocab_size}, smallest greedy top-2 margin {worst:.4f}")


def main():
    only = sys.argv[1:]
    for seed, (name, fam) in enumerate(FAMILIES.items()):
        if not only or name in only:
            record(name, fam, 1000 + seed)


if __name__ == "__main__":
    main()
