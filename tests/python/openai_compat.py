"""Drives a running Flywheel gateway with the official `openai` package.

Usage: python openai_compat.py BASE_URL
Exits non-zero with a message on the first mismatch; prints one line per check passed.
"""

import json
import sys

import openai
from openai import OpenAI

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
        },
    },
]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def main(base_url):
    client = OpenAI(api_key="sk-anything", base_url=base_url, max_retries=0)

    # Non-streaming.
    r = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "hello gateway"}],
        temperature=0,
        extra_headers={"x-workload-id": "py-compat"},
    )
    check(r.choices[0].message.content == "echo: hello gateway", "non-streaming content")
    check(r.usage is not None and r.usage.total_tokens == 18, "non-streaming usage")

    # Streaming text, with the usage chunk asked for.
    pieces, usage = [], None
    stream = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "stream me please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
    check("".join(pieces) == "echo: stream me please", "streamed text reassembled")
    check(usage is not None and usage.total_tokens == 18, "usage chunk in stream")

    # Streamed parallel tool calls, reassembled by the client library's own stream helper.
    with client.chat.completions.stream(
        model="parallel",
        messages=[{"role": "user", "content": "weather and time in Paris"}],
        tools=TOOLS,
        tool_choice="auto",
    ) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    calls = final.choices[0].message.tool_calls
    check(calls is not None and len(calls) == 2, "two parallel tool calls")
    check(calls[0].function.name == "get_weather", "first call name")
    check(json.loads(calls[0].function.arguments) == {"city": "Paris"}, "first call arguments")
    check(calls[1].function.name == "get_time", "second call name")
    check(json.loads(calls[1].function.arguments) == {"tz": "Europe/Paris"}, "second call arguments")
    check(final.choices[0].finish_reason == "tool_calls", "finish_reason tool_calls")

    # Streamed single tool call through plain create(stream=True), reassembled by hand.
    args, name = "", None
    for chunk in client.chat.completions.create(
        model="tools",
        messages=[{"role": "user", "content": "weather?"}],
        tools=TOOLS,
        stream=True,
    ):
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                if tc.function and tc.function.name:
                    name = tc.function.name
                if tc.function and tc.function.arguments:
                    args += tc.function.arguments
    check(name == "get_weather" and json.loads(args) == {"city": "Paris"}, "single streamed tool call")

    # Errors come back as the library's typed exceptions.
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        check(False, "unknown model raises")
    except openai.NotFoundError as e:
        check(e.status_code == 404 and "no-such-model" in str(e), "unknown model -> NotFoundError")
    try:
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}], temperature=9)
        check(False, "bad temperature raises")
    except openai.BadRequestError as e:
        check(e.body is not None and e.body.get("param") == "temperature", "bad temperature -> BadRequestError")

    # Content-safety rails: a request names a guardrail config through extra_body; a blocked one
    # raises BadRequestError with code content_filter, a clean one is served.
    try:
        client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": "my card is 4111 1111 1111 1111"}],
            extra_body={"guardrails": {"config_id": "pii"}},
        )
        check(False, "blocked request raises")
    except openai.BadRequestError as e:
        check(e.code == "content_filter" and "CREDIT_CARD" in str(e), "blocked -> BadRequestError content_filter")
    r = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "nothing sensitive"}],
        extra_body={"guardrails": {"config_id": "pii"}},
    )
    check(r.choices[0].message.content == "echo: nothing sensitive", "clean request passes the rails")

    # The model list.
    ids = [m.id for m in client.models.list()]
    check("echo" in ids and "parallel" in ids, "models.list")

    # An agent's task as one episode: by header, then by metadata; the response names it, and its
    # request id takes feedback.
    raw = client.chat.completions.with_raw_response.create(
        model="echo",
        messages=[{"role": "user", "content": "step one"}],
        extra_headers={"x-episode-id": "py-task"},
    )
    check(raw.headers.get("x-episode-id") == "py-task", "episode id by extra_headers")
    request_id = raw.headers.get("x-request-id")
    raw = client.chat.completions.with_raw_response.create(
        model="echo",
        messages=[{"role": "user", "content": "step two"}],
        metadata={"episode_id": "py-task"},
    )
    check(raw.headers.get("x-episode-id") == "py-task", "episode id by metadata")
    import httpx

    fb = httpx.post(
        base_url + "/feedback",
        json={"metric": "thumbs_up", "value": True, "request_id": request_id},
    )
    check(fb.status_code == 201 and fb.json()["request_id"] == request_id, "feedback on a request")


if __name__ == "__main__":
    main(sys.argv[1])
