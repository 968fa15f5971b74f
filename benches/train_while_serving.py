#!/usr/bin/env python3
"""Serving latency while a LoRA training job runs in the same gateway, with the job yielding to
the engine (the default) and without (flywheel.max_yield_ms = 0), against an idle gateway.

Usage: python3 benches/train_while_serving.py [--binary target/release/flywheel] [--requests 15]
Standard library only; the model must be fetched (bash scripts/fetch-model.sh).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from flywheel_demo import MODEL, TOOLS, api, workload  # noqa: E402

CONFIG = """
listen = "127.0.0.1:0"
data_dir = "{data}"

[flywheel]
schedule = ""
max_yield_ms = {max_yield}

[[models]]
name = "smollm2"
path = "{model}"
context_length = 2048

[[routes]]
name = "smollm2"
champion = {{ local = "smollm2" }}
"""


def start(work, max_yield):
    cfg = os.path.join(work, "flywheel.toml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(data=os.path.join(work, "data"), model=MODEL, max_yield=max_yield))
    gw = subprocess.Popen([ARGS.binary, "serve", "--config", cfg], stderr=subprocess.PIPE, text=True)
    for line in gw.stderr:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in gw.stderr], daemon=True).start()
            return gw, m.group(1)
    sys.exit("the gateway did not start")


def latencies(base, items):
    out = []
    for q, _, _ in items:
        t = time.time()
        api(base, "POST", "/v1/chat/completions", {
            "model": "smollm2", "messages": [{"role": "user", "content": q}], "tools": TOOLS,
            "temperature": 0, "max_tokens": 48})
        out.append((time.time() - t) * 1000)
    return out


def upload(base, rows):
    api(base, "POST", "/v1/namespaces", {"id": "bench"})
    api(base, "POST", "/v1/datasets", {"name": "tools", "namespace": "bench"})
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    req = urllib.request.Request(base + "/v1/datasets/bench/tools/files/training/data.jsonl",
                                 data=data, method="PUT")
    urllib.request.urlopen(req).read()


def job_status(base, jid):
    return api(base, "GET", f"/v1/customization/jobs/{jid}")


def scenario(max_yield, rows, probe, train):
    work = tempfile.mkdtemp(prefix="flywheel-yield-")
    gw, base = start(work, max_yield)
    try:
        latencies(base, probe[:2])  # warm-up
        idle = latencies(base, probe) if not train else None
        if not train:
            return idle, None
        upload(base, rows)
        job = api(base, "POST", "/v1/customization/jobs", {
            "config": "smollm2", "dataset": {"name": "tools", "namespace": "bench"},
            "output_model": "bench/yield",
            "hyperparameters": {"epochs": 20, "batch_size": 8, "learning_rate": 0.0005,
                                "lora": {"adapter_dim": 16}}})
        while job_status(base, job["id"])["status_details"].get("steps_completed", 0) < 1:
            time.sleep(1)
        s0 = job_status(base, job["id"])["status_details"]
        t0 = time.time()
        lat = latencies(base, probe)
        s1 = job_status(base, job["id"])["status_details"]
        steps = s1.get("steps_completed", 0) - s0.get("steps_completed", 0)
        api(base, "POST", f"/v1/customization/jobs/{job['id']}/cancel", {})
        return lat, (steps, time.time() - t0)
    finally:
        gw.terminate()
        gw.wait(timeout=60)


def describe(xs):
    xs = sorted(xs)
    return f"{statistics.median(xs):.0f} ms / {xs[int(0.95 * (len(xs) - 1))]:.0f} ms"


def main():
    items = workload(96 + ARGS.requests, seed=5)
    rows = [{"messages": [{"role": "user", "content": q},
                          {"role": "assistant", "content": None, "tool_calls": [{
                              "id": "c", "type": "function",
                              "function": {"name": t, "arguments": json.dumps(a)}}]}],
             "tools": TOOLS} for q, t, a in items[:96]]
    probe = items[96:]
    idle, _ = scenario(2000, rows, probe, train=False)
    yielding, steps_y = scenario(2000, rows, probe, train=True)
    greedy, steps_g = scenario(0, rows, probe, train=True)
    print(f"| serving {len(probe)} sequential tool-call requests (max_tokens 48) | p50 / p95 latency | optimizer steps the job completed meanwhile |")
    print("|---|---|---|")
    print(f"| idle gateway | {describe(idle)} | - |")
    print(f"| training, yielding to the engine (max_yield_ms = 2000, the default) | {describe(yielding)} | {steps_y[0]} in {steps_y[1]:.0f} s |")
    print(f"| training, not yielding (max_yield_ms = 0; lowered priority only) | {describe(greedy)} | {steps_g[0]} in {steps_g[1]:.0f} s |")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "flywheel"))
    p.add_argument("--requests", type=int, default=15)
    ARGS = p.parse_args()
    main()
