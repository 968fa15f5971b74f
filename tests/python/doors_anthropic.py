"""Drives the Messages door of a running gateway with the official `anthropic` package, on the
local model (`smol`) and through a mock upstream (`echo`, `agent`), checking each stream's event
order and shapes as Anthropic documents them.

Usage: python doors_anthropic.py GATEWAY_ROOT_URL
Exits non-zero with a message on the first mismatch; prints one line per check passed.
"""

import sys

import anthropic

TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def check_events(events, what):
    """message_start, ping, then blocks (start, deltas, stop, indices in order), message_delta,
    message_stop; every delta's type matches its block's type."""
    kinds = [e.type for e in events]
    check(kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"], f"{what}: framed by message_start ... message_delta, message_stop")
    start = events[0].message
    check(start.role == "assistant" and start.content == [] and start.stop_reason is None, f"{what}: message_start carries an empty assistant message")
    open_block, next_index, block_types = None, 0, {}
    for e in events[1:-2]:
        if e.type == "ping":
            continue
        if e.type == "content_block_start":
            check(open_block is None and e.index == next_index, f"{what}: block {e.index} starts in order")
            open_block, block_types[e.index] = e.index, e.content_block.type
        elif e.type == "content_block_delta":
            want = {"text": "text_delta", "tool_use": "input_json_delta"}[block_types[e.index]]
            if e.index != open_block or e.delta.type != want:
                check(False, f"{what}: delta {e.delta.type} in block {e.index}")
        elif e.type == "content_block_stop":
            check(e.index == open_block, f"{what}: block {e.index} stops")
            open_block, next_index = None, next_index + 1
        else:
            check(False, f"{what}: unexpected event {e.type}")
    delta = events[-2]
    check(delta.delta.stop_reason in ("end_turn", "max_tokens", "tool_use", "stop_sequence"), f"{what}: message_delta has stop_reason {delta.delta.stop_reason}")
    check(delta.usage.output_tokens > 0, f"{what}: message_delta has output usage")
    return block_types


def main(root):
    client = anthropic.Anthropic(base_url=root, api_key="sk-anything", max_retries=0)

    m = client.messages.create(model="echo", max_tokens=64, messages=[{"role": "user", "content": "hello gateway"}])
    check(m.content[0].text == "echo: hello gateway" and m.stop_reason == "end_turn", "messages: text through an upstream")
    check(m.usage.input_tokens == 11 and m.usage.output_tokens == 7, "messages: usage")

    first = client.messages.create(model="agent", max_tokens=64, tools=TOOLS,
                                   messages=[{"role": "user", "content": "What's the weather in Paris?"}])
    uses = [b for b in first.content if b.type == "tool_use"]
    check(first.stop_reason == "tool_use" and len(uses) == 1, "messages: a tool_use block")
    check(uses[0].name == "get_weather" and uses[0].input == {"city": "Paris"}, "messages: its input")
    second = client.messages.create(
        model="agent", max_tokens=64, tools=TOOLS,
        messages=[
            {"role": "user", "content": "What's the weather in Paris?"},
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"}]},
        ],
    )
    check(second.content[0].text == "the weather is sunny", "messages: a tool_result second turn")

    with client.messages.stream(model="echo", max_tokens=64, messages=[{"role": "user", "content": "stream me please"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    check(text == "echo: stream me please" == final.content[0].text, "messages.stream: text through an upstream")
    check(final.usage.output_tokens == 7, "messages.stream: usage in the final message")
    with client.messages.stream(model="agent", max_tokens=64, tools=TOOLS, messages=[{"role": "user", "content": "weather?"}]) as s:
        final = s.get_final_message()
    check(final.content[-1].type == "tool_use" and final.content[-1].input == {"city": "Paris"}, "messages.stream: a streamed tool_use reassembled")
    events = list(client.messages.create(model="agent", max_tokens=64, tools=TOOLS, stream=True,
                                         messages=[{"role": "user", "content": "weather?"}]))
    check_events(events, "raw stream (tool_use, upstream)")

    # The local model.
    m = client.messages.create(model="smol", max_tokens=24, extra_body={"temperature": 0}, system="Answer briefly.",
                               messages=[{"role": "user", "content": "What is the capital of France?"}])
    check(m.content and m.content[0].type == "text" and m.usage.output_tokens <= 24, f"messages on the local model: {m.content[0].text[:40]!r}")
    events = list(client.messages.create(model="smol", max_tokens=16, stream=True,
                                         messages=[{"role": "user", "content": "Say hello."}]))
    check_events(events, "raw stream (local)")
    t = client.messages.create(model="smol", max_tokens=64, extra_body={"temperature": 0}, tools=TOOLS, tool_choice={"type": "any"},
                               messages=[{"role": "user", "content": "What's the weather in Paris?"}])
    uses = [b for b in t.content if b.type == "tool_use"]
    check(len(uses) >= 1 and isinstance(uses[0].input.get("city"), str), "messages on the local model: tool_choice any gives a tool_use")
    with client.messages.stream(model="smol", max_tokens=64, extra_body={"temperature": 0}, tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"},
                                messages=[{"role": "user", "content": "Weather in Rome?"}]) as s:
        final = s.get_final_message()
    check(final.content[-1].type == "tool_use" and final.stop_reason in ("tool_use", "max_tokens"), "messages.stream on the local model: a named tool")

    # Errors in Anthropic's envelope.
    try:
        client.messages.create(model="echo", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_unknown", "content": "x"}]}])
        check(False, "an unknown tool_use_id is refused")
    except anthropic.BadRequestError as e:
        check(e.body["error"]["type"] == "invalid_request_error" and "tool_use_id" in e.body["error"]["message"], "messages: an unknown tool_use_id is an invalid_request_error naming it")
    try:
        client.messages.create(model="smol", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
        check(False, "an image on a text-only model is refused")
    except anthropic.BadRequestError as e:
        check(e.body["error"]["type"] == "invalid_request_error" and "text-only" in e.body["error"]["message"], "messages: an image on the text-only local model is an invalid_request_error")
    try:
        client.messages.create(model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "x"}])
        check(False, "an unknown model is refused")
    except anthropic.NotFoundError as e:
        check(e.body["error"]["type"] == "not_found_error", "messages: an unknown model is a not_found_error")


if __name__ == "__main__":
    main(sys.argv[1])
