"""Records llama.cpp's top-5 logprobs for the first 16 greedy steps of SmolLM2 on a chat prompt,
the oracle `tests/local_engine.rs` checks the engine's f32 path against.

llama.cpp runs an F32 copy of the default Q4_1 GGUF (made here with llama.cpp's own quantize tool,
`--allow-requantize` to F32: every weight is the Q4_1 value dequantized), so both sides hold the
same weights in f32 and compute in f32; what differs is only the order of floating-point sums.

Usage: python llamacpp_logprobs.py MODEL_Q4_1_GGUF OUT_JSON   (run by benches/oracle.sh)
"""

import json
import math
import os
import sys

import llama_cpp
from llama_cpp import Llama

src, out = sys.argv[1], sys.argv[2]
tmp = os.path.join("target", "smollm2-f32.gguf")
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
params.allow_requantize = True
rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params)
assert rc == 0, f"quantize to F32 failed: {rc}"

# An f32 KV cache too (llama.cpp keeps f16 by default).
llm = Llama(model_path=tmp, n_threads=2, n_ctx=512, logits_all=True, verbose=False,
            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
prompt_text = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nExplain why the sky is blue.<|im_end|>\n<|im_start|>assistant\n"
prompt = llm.tokenize(prompt_text.encode(), add_bos=False, special=True)

steps = []
llm.reset()
llm.eval(prompt)
for _ in range(16):
    logits = [float(x) for x in llm.scores[llm.n_tokens - 1]]
    m = max(logits)
    lse = m + math.log(sum(math.exp(x - m) for x in logits))
    order = sorted(range(len(logits)), key=lambda i: -logits[i])[:5]
    top = [[i, logits[i] - lse] for i in order]
    token = order[0]
    steps.append({"token": token, "logprob": top[0][1], "top": top})
    llm.eval([token])

json.dump({
    "oracle": f"llama-cpp-python {llama_cpp.__version__}, F32 copy of models/SmolLM2-135M-Instruct.Q4_1.gguf, greedy",
    "prompt": prompt_text,
    "prompt_ids": prompt,
    "steps": steps,
}, open(out, "w"), indent=1)
print(f"wrote {out}: {len(steps)} steps; text: {llm.detokenize([s['token'] for s in steps]).decode(errors='replace')!r}")
