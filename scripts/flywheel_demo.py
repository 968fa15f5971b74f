#!/usr/bin/env python3
"""The flywheel story on SmolLM2-135M, with nobody acting.

A synthetic support agent calls three tools. A stand-in for the big upstream model (the "teacher",
answering every request correctly) serves the agent's route; the local student, SmolLM2-135M, has
never seen these tools. The gateway logs the traffic, notices drift (tools its champion was never
trained on), trains a LoRA adapter on the teacher's logged answers, evaluates it against the
teacher on held-out traffic, and rolls it out through shadow and canary. The script only sends
the agent's traffic and reads the gateway's API; it prints the before-and-after table.

Usage: python3 scripts/flywheel_demo.py [--binary target/release/flywheel] [--keep DIR]
Standard library only.
"""

import argparse
import http.server
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

TOOLS = [
    {"type": "function", "function": {
        "name": "get_order_status", "description": "Status of a customer order",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}},
                       "required": ["order_id"]}}},
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
            "required": ["amount", "from", "to"]}}},
]

CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Hanoi", "Sofia", "Riga",
          "Bern", "Doha", "Accra", "Tunis", "Rabat", "Minsk", "Porto", "Genoa", "Leeds", "Kobe",
          "Lyon", "Nice", "Bonn", "Graz", "Linz", "Kyiv", "Baku", "Suva", "Nuuk", "Apia"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "INR", "BRL"]
PHRASES = {
    "get_order_status": ["Where is my order {order_id}?", "Can you check order {order_id} for me",
                         "status of order {order_id} please", "has {order_id} shipped yet?"],
    "get_weather": ["What's the weather in {city}?", "Is it raining in {city} right now",
                    "weather for {city} please", "how warm is it in {city}?"],
    "convert_currency": ["Convert {amount} {from} to {to}", "how much is {amount} {from} in {to}?",
                         "{amount} {from} to {to} please", "What do I get for {amount} {from} in {to}"],
}


def workload(n, seed):
    """n distinct (query, tool, arguments) triples."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        tool = ["get_order_status", "get_weather", "convert_currency"][len(out) % 3]
        if tool == "get_order_status":
            args = {"order_id": f"{rng.choice('ABCDEFGH')}{rng.randint(1000, 9999)}"}
        elif tool == "get_weather":
            args = {"city": rng.choice(CITIES)}
        else:
            a, b = rng.sample(CURRENCIES, 2)
            args = {"amount": rng.choice([5, 12, 20, 50, 75, 100, 250, 1000]), "from": a, "to": b}
        query = rng.choice(PHRASES[tool]).format(**args)
        if query not in seen:
            seen.add(query)
            out.append((query, tool, args))
    return out


ANSWERS = {}


class Teacher(http.server.BaseHTTPRequestHandler):
    """The big model: right every time (it knows the workload's answers)."""
    calls = 0

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Teacher.calls += 1
        query = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        tool, args = ANSWERS.get(query, ("get_weather", {"city": "unknown"}))
        reply = {"id": "chatcmpl-teacher", "object": "chat.completion", "created": int(time.time()),
                 "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                     "role": "assistant", "content": None, "tool_calls": [{
                         "id": "call_1", "type": "function",
                         "function": {"name": tool, "arguments": json.dumps(args)}}]}}],
                 "usage": {"prompt_tokens": 200, "completion_tokens": 20, "total_tokens": 220}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def api(base, method, path, body=None):
    req = urllib.request.Request(base + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def ask(base, model, query):
    """The agent's request; returns (tool name, arguments) of the first call, or (None, None)."""
    v = api(base, "POST", "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": query}], "tools": TOOLS,
        "temperature": 0, "max_tokens": 96})
    calls = v["choices"][0]["message"].get("tool_calls") or []
    if not calls:
        return None, None
    f = calls[0]["function"]
    try:
        return f["name"], json.loads(f["arguments"])
    except (ValueError, TypeError):
        return f["name"], None


def score(base, model, items):
    names = both = 0
    t = time.time()
    for q, tool, args in items:
        n, a = ask(base, model, q)
        names += n == tool
        both += n == tool and a == args
    return names / len(items), both / len(items), (time.time() - t) / len(items)


def route(base):
    return api(base, "GET", "/v1/flywheel/routes/agent")


CONFIG = """
listen = "127.0.0.1:0"
data_dir = "{data}"

[flywheel]
schedule = ""
check_interval_secs = 1.0

[[models]]
name = "smollm2"
path = "{model}"
weights = "q8_0"
context_length = 2048
max_batch = 8

[[upstreams]]
name = "big"
base_url = "http://127.0.0.1:{teacher_port}/v1"

[[routes]]
name = "smollm2"
champion = {{ local = "smollm2" }}

[[routes]]
name = "agent"
champion = {{ upstream = "big", model = "big-model" }}

[routes.flywheel]
student = "smollm2"
min_records = 100
min_new_records = 10
validation_share = 0.0
test_share = 0.2
seed = 7
hyperparameters = {{ epochs = 2, batch_size = 8, learning_rate = 0.001, lora = {{ adapter_dim = 16, alpha = 32 }} }}

[routes.flywheel.policy]
metric = "function_name_and_args_accuracy"
min_test_items = 20
teacher_margin = 0.15
max_tool_regression = 0.2
max_parse_failure_increase = 0.05

[routes.flywheel.rollout]
agreement_on = "arguments"
shadow_sample_rate = 1.0
shadow_min_samples = 15
shadow_min_agreement = 0.8
canary_percent = 50.0
canary_min_requests = 15
canary_mirror_rate = 1.0
canary_min_agreement = 0.8
guard_min_requests = 10
teacher_sample_rate = 0.2

[routes.flywheel.drift]
new_tool_min_records = {n_train}
cooldown_secs = 3600
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "flywheel"))
    p.add_argument("--keep", help="data directory to keep (default: a temporary one)")
    p.add_argument("--train", type=int, default=125, help="distinct requests before the drift run")
    a = p.parse_args()
    if not os.path.exists(MODEL):
        sys.exit("the model is missing: run bash scripts/fetch-model.sh")

    items = workload(a.train + 120, seed=11)
    for q, tool, args in items:
        ANSWERS[q] = (tool, args)
    traffic, live, probe = items[:a.train], items[a.train:a.train + 80], items[a.train + 80:]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Teacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    work = a.keep or tempfile.mkdtemp(prefix="flywheel-demo-")
    os.makedirs(work, exist_ok=True)
    cfg = os.path.join(work, "flywheel.toml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(data=os.path.join(work, "data"), model=MODEL,
                              teacher_port=server.server_address[1], n_train=a.train))
    log = open(os.path.join(work, "gateway.log"), "w")
    gw = subprocess.Popen([a.binary, "serve", "--config", cfg], stderr=subprocess.PIPE, text=True)
    base = None
    for line in gw.stderr:
        log.write(line)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            base = m.group(1)
            break
    threading.Thread(target=lambda: [log.write(l) for l in gw.stderr], daemon=True).start()
    started = time.time()

    def say(msg):
        print(f"[{time.time() - started:6.0f} s] {msg}", flush=True)

    try:
        say(f"gateway at {base}; data in {work}")
        before = score(base, "smollm2", probe)
        say(f"student before (SmolLM2-135M base, {len(probe)} probe requests): names {before[0]:.2f}, names+args {before[1]:.2f}")
        t0 = Teacher.calls
        for q, _, _ in traffic:
            ask(base, "agent", q)
        say(f"{len(traffic)} agent requests served by the teacher ({Teacher.calls - t0} teacher calls)")

        run = None
        while True:
            runs = api(base, "GET", "/v1/flywheel/runs")["data"]
            if runs:
                run = runs[0]
                if run["status"] != "running":
                    break
                say(f"run {run['id']} ({run['trigger'].get('signal', run['trigger']['kind'])}): {run['stage']}")
            time.sleep(15)
        say(f"run {run['status']}: {run['decision']['reason']}")
        ev = run["details"].get("evaluation", {})
        if not run["decision"].get("promote"):
            print(json.dumps(run["details"], indent=1))
            return 1

        i = 0
        while route(base)["stage"] != "idle" and time.time() - started < 3600:
            ask(base, "agent", live[i % len(live)][0])
            # An agent's pace, not a load test: mirrored requests to the student stay within the
            # gateway's shadow concurrency instead of being shed.
            time.sleep(0.25)
            i += 1
            if i % 10 == 0:
                r = route(base)
                say(f"stage {r['stage']}: {json.dumps(r.get('live') or {})[:160]}")
        r = route(base)
        say("rollout: " + " → ".join(f"{e['action']} ({e['reason'][:90]})" for e in r["events"]))
        if r["champion"].get("local") != "smollm2":
            say(f"the candidate did not become champion: {r['champion']}")
            return 1

        t1 = Teacher.calls
        after = score(base, "agent", probe)
        teacher_share = (Teacher.calls - t1) / len(probe)
        cand = ev["candidate"]["scores"]
        rows = [
            ("teacher (upstream stand-in), logged answers", "1.00", "1.00", "-"),
            ("SmolLM2-135M base, probe requests", f"{before[0]:.2f}", f"{before[1]:.2f}", f"{before[2] * 1000:.0f} ms"),
            (f"candidate adapter, held-out run items ({ev['items']})", f"{cand['function_name_accuracy']:.2f}",
             f"{cand['function_name_and_args_accuracy']:.2f}", f"{cand['latency_p50_ms']:.0f} ms p50"),
            ("route 'agent' after takeover, probe requests", f"{after[0]:.2f}", f"{after[1]:.2f}", f"{after[2] * 1000:.0f} ms"),
        ]
        print()
        print("| target | function name acc. | name + args acc. | latency / request |")
        print("|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print()
        print(f"training: {run['details']['training'].get('elapsed_time', 0):.0f} s, "
              f"{run['details']['training'].get('tokens_per_sec', 0):.0f} tok/s; whole story {time.time() - started:.0f} s; "
              f"after takeover the teacher sees {teacher_share:.0%} of the route's requests (shadow labels only)")
        return 0
    finally:
        gw.terminate()
        try:
            gw.wait(timeout=30)
        except subprocess.TimeoutExpired:
            gw.kill()
        server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
