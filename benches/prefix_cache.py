#!/usr/bin/env python3
"""Time to first token of agent-style requests (a system prompt and eight tool definitions, ~660
prompt tokens) that share their prefix, against a running gateway serving the default local model:
`python3 benches/prefix_cache.py http://127.0.0.1:8080/v1/chat/completions`. Run it once with the
model's `prefix_cache_mb` at its default and once at 0."""
import json, sys, time, urllib.request
url = sys.argv[1]
tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": f"Does thing number {i} for the user, carefully and completely.", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "A city name"}, "days": {"type": "integer"}}, "required": ["city"]}}} for i in range(8)]
def ask(q):
    body = {"model": "smollm2", "temperature": 0, "max_tokens": 1, "tools": tools,
            "messages": [{"role": "system", "content": "You are an agent for a travel company. Use the tools when they help."}, {"role": "user", "content": q}]}
    t = time.time()
    r = json.load(urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})))
    return (time.time() - t) * 1000, r["usage"]
qs = ["Weather in Paris?", "Flights to Rome next week?", "Hotels in Oslo for 3 days?", "Trains from Lyon?", "Museums in Kyoto?", "Events in Lima?"]
for q in qs:
    ms, u = ask(q)
    print(f"{ms:8.1f} ms  prompt {u['prompt_tokens']}  cached {u['prompt_tokens_details']['cached_tokens']}")
