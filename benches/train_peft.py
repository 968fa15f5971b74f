"""PyTorch + PEFT LoRA training throughput on the same GGUF, dequantized to f32, in the same
setting as benches/train.rs: rank 16 on q/k/v/o/gate/up/down, batches of 8 x 256 tokens, loss on
every token, AdamW, 2 threads. With --bf16 the forward and backward run under
torch.autocast("cpu", dtype=torch.bfloat16) (oneDNN uses AMX tiles where the CPU has them); the
weights, LoRA factors and optimizer state stay f32.

Usage: python benches/train_peft.py MODEL.gguf [STEPS] [--bf16]
"""
import contextlib
import os
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

args = [a for a in sys.argv[1:] if a != "--bf16"]
bf16 = "--bf16" in sys.argv
path = args[0]
steps = int(args[1]) if len(args) > 1 else 3
torch.set_num_threads(2)
torch.manual_seed(0)
t = time.time()
model = AutoModelForCausalLM.from_pretrained(
    os.path.dirname(os.path.abspath(path)),
    gguf_file=os.path.basename(path),
    torch_dtype=torch.float32,
)
mode = "bf16 autocast" if bf16 else "f32"
print(f"peft benchmark ({mode}): {os.path.basename(path)} dequantized to f32, load {1000 * (time.time() - t):.0f} ms")
config = LoraConfig(
    r=16,
    lora_alpha=32,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    task_type="CAUSAL_LM",
)
model = get_peft_model(model, config)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
per_step = []
for s in range(steps):
    batch = torch.tensor(
        [[100 + ((i * 37 + (s * 8 + r) * 11) % 4000) for i in range(256)] for r in range(8)]
    )
    t = time.time()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    per_step.append(time.time() - t)
    print(f"step {s + 1}/{steps}: loss {out.loss.item():.3f}")
total = sum(per_step)
print(
    f"PyTorch + PEFT ({mode}), rank-16 LoRA, 7 projections, 8 x 256 tokens per step: {8 * 256 * steps / total:.1f} tok/s overall, "
    f"{8 * 256 / min(per_step):.1f} tok/s best step"
)
