"""llama.cpp (llama-cpp-python) on the same GGUF, 2 threads: prefill of a 256-token prompt and
single-stream greedy decode, measured the same way as benches/engine.rs."""

import sys
import time

from llama_cpp import Llama

path = sys.argv[1]
decode = int(sys.argv[2]) if len(sys.argv) > 2 else 128
llm = Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=1024, n_batch=512, verbose=False)
prompt = [100 + (i * 37 % 4000) for i in range(256)]

best = float("inf")
for _ in range(3):
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    best = min(best, time.perf_counter() - t)
print(f"llama.cpp prefill 256 tokens: {256 / best:.1f} tok/s")

llm.reset()
llm.eval(prompt[:32])
t = time.perf_counter()
for _ in range(decode):
    tok = llm.sample(top_k=1, temp=0.0)
    llm.eval([tok])
secs = time.perf_counter() - t
print(f"llama.cpp decode 1 stream: {decode / secs:.1f} tok/s ({secs * 1000 / decode:.2f} ms/token)")
