"""Drives the Responses, completions and embeddings doors of a running gateway with the official
`openai` package, on the local model (`smol`) and through a mock upstream (`echo`, `agent`,
`embedder`). Stream events are validated one by one against OpenAI's published OpenAPI document.

Usage: python doors_openai.py BASE_URL OPENAPI_YAML
Exits non-zero with a message on the first mismatch; prints one line per check passed.
"""

import json
import sys

import urllib.request
import openai
from openai import OpenAI

import openai_spec

TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    }
]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def raw_events(base_url, body):
    """POSTs a streamed Responses request and returns its (event name, JSON data) pairs."""
    out = []
    req = urllib.request.Request(f"{base_url}/responses", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
        out.append((name, data))
    return out


def validate_stream(spec, events, what):
    """Every event is a published event whose SSE name is its type, numbered from 0 in order."""
    for i, (name, data) in enumerate(events):
        check_kind = spec.check_event(data)
        if name != data["type"] or data["sequence_number"] != i:
            check(False, f"{what}: event {i} ({check_kind}) is named {name} with sequence {data['sequence_number']}")
    kinds = [d["type"] for _, d in events]
    check(kinds[0] == "response.created" and kinds[1] == "response.in_progress", f"{what}: opens with created, in_progress")
    check(kinds[-1] in ("response.completed", "response.incomplete"), f"{what}: ends with {kinds[-1]}")
    spec.check("Response", events[-1][1]["response"])
    print(f"ok: {what}: {len(events)} events valid against the OpenAPI spec")
    return events[-1][1]["response"]


def upstream(client, spec, base_url):
    r = client.responses.create(model="echo", input="hello gateway", extra_headers={"x-workload-id": "doors"})
    check(r.output_text == "echo: hello gateway", "responses: plain text through an upstream")
    check(r.usage.input_tokens == 11 and r.usage.output_tokens == 7, "responses: usage in input/output tokens")
    check(r.status == "completed" and r.id.startswith("resp_"), "responses: completed with a resp_ id")
    spec.check("Response", r.model_dump(exclude_unset=True))

    # A function tool, answered with a function_call_output in a second turn (previous_response_id).
    first = client.responses.create(model="agent", input="What's the weather in Paris?", tools=TOOLS)
    calls = [o for o in first.output if o.type == "function_call"]
    check(len(calls) == 1 and calls[0].name == "get_weather", "responses: a function_call item")
    check(json.loads(calls[0].arguments) == {"city": "Paris"}, "responses: its arguments")
    second = client.responses.create(
        model="agent",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}],
        tools=TOOLS,
    )
    check(second.output_text == "the weather is sunny", "responses: function_call_output continues a stored response")

    # The same second turn, with the whole history sent instead of stored.
    again = client.responses.create(
        model="agent",
        store=False,
        input=[
            {"role": "user", "content": "What's the weather in Paris?"},
            {"type": "function_call", "call_id": "call_x", "name": "get_weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call_output", "call_id": "call_x", "output": "rainy"},
        ],
        tools=TOOLS,
    )
    check(again.output_text == "the weather is rainy", "responses: a full item history without storage")
    try:
        client.responses.retrieve(again.id)
        check(False, "store=false is not stored")
    except openai.NotFoundError:
        check(True, "responses: store=false is not stored")

    # Stored responses: retrieve, input items, delete.
    got = client.responses.retrieve(second.id)
    check(got.output_text == second.output_text, "responses: retrieve a stored response")
    items = client.responses.input_items.list(second.id)
    check([i.type for i in items.data] == ["function_call_output"], "responses: input_items lists the request's items")
    deleted = client.responses.delete(second.id)
    check(deleted is None or getattr(deleted, "deleted", True), "responses: delete")
    try:
        client.responses.retrieve(second.id)
        check(False, "a deleted response is gone")
    except openai.NotFoundError:
        check(True, "responses: a deleted response is gone")
    try:
        client.responses.create(model="echo", input="x", previous_response_id="resp_doesnotexist")
        check(False, "unknown previous_response_id refused")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "previous_response_id", "responses: an unknown previous_response_id is a 400 naming it")

    # Streaming: the SDK's helper, and the raw events against the spec.
    with client.responses.stream(model="echo", input="stream me please") as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    check("".join(deltas) == "echo: stream me please" == final.output_text, "responses: streamed text through the SDK helper")
    events = raw_events(base_url, {"model": "echo", "input": "stream me please", "stream": True})
    validate_stream(spec, events, "responses stream (text, upstream)")
    events = raw_events(base_url, {"model": "agent", "input": "weather?", "tools": TOOLS, "stream": True})
    final = validate_stream(spec, events, "responses stream (function call, upstream)")
    check(final["output"][0]["type"] == "function_call", "responses: a streamed function call")
    kinds = [d["type"] for _, d in events]
    check("response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds,
          "responses: function_call_arguments delta and done events")

    # text.format json_schema is passed on as response_format (checked on the upstream's side).
    r = client.responses.create(
        model="echo",
        input="json please",
        text={"format": {"type": "json_schema", "name": "city", "schema": {"type": "object", "properties": {"name": {"type": "string"}}}}},
    )
    check(r.text.format.type == "json_schema", "responses: text.format echoed")

    # Bad input, in OpenAI's envelope with the field named.
    for body, param in [
        ({"input": [{"type": "bogus"}]}, "input[0].type"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}, "input[0].call_id"),
        ({"input": "x", "background": True}, "background"),
    ]:
        try:
            client.responses.create(model="echo", **body)
            check(False, f"{param} refused")
        except openai.BadRequestError as e:
            check(e.body.get("param") == param, f"responses: bad {param} is a 400 naming it ({e.body.get('message')[:60]}...)")

    # Legacy completions and embeddings through the upstream.
    c = client.completions.create(model="echo", prompt="hello", max_tokens=5)
    check(c.choices[0].text == " after hello", "completions: forwarded to the upstream")
    text = "".join(ch.choices[0].text for ch in client.completions.create(model="echo", prompt="hi", stream=True) if ch.choices)
    check(text == " after hi", "completions: streamed through the upstream")
    e = client.embeddings.create(model="embedder", input=["a", "bcd"])
    check(len(e.data) == 2 and e.data[1].embedding[0] == 3.0, "embeddings: vectors from the upstream")
    try:
        client.embeddings.create(model="smol", input="x")
        check(False, "a chat model refuses to embed")
    except openai.BadRequestError as err:
        check("embedder" in err.body["message"], "embeddings: a local chat model refuses, naming the routes that embed")


def local(client, spec, base_url):
    r = client.responses.create(model="smol", instructions="Answer briefly.", input="What is the capital of France?",
                                max_output_tokens=24, temperature=0)
    check(len(r.output_text.strip()) > 0 and r.usage.output_tokens <= 24, f"responses on the local model: {r.output_text[:40]!r}")
    # Instructions never carry over to a continuation; an agent sends them every turn.
    follow = client.responses.create(model="smol", previous_response_id=r.id, instructions="Answer briefly.", input="And of Italy?",
                                     max_output_tokens=24, temperature=0)
    check(follow.usage.input_tokens > r.usage.input_tokens, "responses on the local model: a continuation carries the conversation")
    check(follow.usage.input_tokens_details.cached_tokens > 0, "responses on the local model: the conversation prefix is reused (cached tokens)")
    events = raw_events(base_url, {"model": "smol", "input": "Say hello.", "max_output_tokens": 12, "stream": True})
    validate_stream(spec, events, "responses stream (local)")

    calls = client.responses.create(model="smol", input="What's the weather in Paris?", tools=TOOLS,
                                    tool_choice="required", max_output_tokens=64, temperature=0)
    fc = [o for o in calls.output if o.type == "function_call"]
    check(len(fc) >= 1 and fc[0].name == "get_weather", "responses on the local model: a required function call")
    check(isinstance(json.loads(fc[0].arguments).get("city"), str), "responses on the local model: arguments valid for the schema")
    done = client.responses.create(model="smol", previous_response_id=calls.id, tools=TOOLS, max_output_tokens=32, temperature=0,
                                   input=[{"type": "function_call_output", "call_id": fc[0].call_id, "output": "sunny, 24 C"}])
    check(done.status in ("completed", "incomplete"), f"responses on the local model: the tool's output answered ({done.output_text[:40]!r})")

    try:
        client.responses.create(model="smol", input=[{"role": "user", "content": [
            {"type": "input_text", "text": "what is this?"},
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}]}])
        check(False, "an image on a text-only model is refused")
    except openai.BadRequestError as e:
        check("text-only" in e.body["message"], "responses on the local model: an image is refused, the model is text-only")

    c = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=6, temperature=0)
    check(len(c.choices[0].text) > 0 and c.usage.completion_tokens <= 6, f"completions on the local model: {c.choices[0].text!r}")
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="smol", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True) if ch.choices)
    check(streamed == c.choices[0].text, "completions on the local model: streamed equals whole")
    echoed = client.completions.create(model="smol", prompt="One, two,", max_tokens=3, temperature=0, echo=True)
    check(echoed.choices[0].text.startswith("One, two,"), "completions on the local model: echo")
    try:
        client.completions.create(model="smol", prompt="x", suffix="y")
        check(False, "suffix refused")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "suffix", "completions on the local model: suffix is refused by name")


def main(base_url, spec_path):
    spec = openai_spec.load(spec_path)
    client = OpenAI(api_key="sk-anything", base_url=base_url, max_retries=0)
    upstream(client, spec, base_url)
    local(client, spec, base_url)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
