"""An agent built with the `openai-agents` SDK, on its default settings (the Responses API through
the default OpenAI client, pointed at the gateway), calls its function tool on the local model and
through a mock upstream.

Usage: python doors_agents.py BASE_URL
Exits non-zero with a message on the first mismatch; prints one line per check passed.
"""

import asyncio
import sys

from openai import AsyncOpenAI
from agents import (Agent, ModelSettings, Runner, function_tool, set_default_openai_client,
                    set_tracing_disabled)

CALLS = []


@function_tool
def get_weather(city: str) -> str:
    """Weather for a city."""
    CALLS.append(city)
    return "sunny"


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


async def main(base_url):
    # Traces would be exported to OpenAI's servers, which this machine cannot reach.
    set_tracing_disabled(True)
    set_default_openai_client(AsyncOpenAI(base_url=base_url, api_key="sk-anything", max_retries=0))

    agent = Agent(name="weather", instructions="Use the tool, then answer.", model="agent", tools=[get_weather])
    result = await Runner.run(agent, "What's the weather in Paris?")
    check(CALLS == ["Paris"], "agent through an upstream: the function tool was called")
    check(result.final_output == "the weather is sunny", f"agent through an upstream: final output {result.final_output!r}")

    streamed = Runner.run_streamed(agent, "And now?")
    kinds = [e.type async for e in streamed.stream_events()]
    check(len(CALLS) == 2 and streamed.final_output == "the weather is sunny", "streamed agent through an upstream")
    check("raw_response_event" in kinds, "streamed agent: raw Responses events reached the SDK")

    local = Agent(name="weather-local", instructions="Call get_weather for the city the user names.", model="smol",
                  tools=[get_weather], tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                                 max_tokens=128, temperature=0))
    result = await Runner.run(local, "What's the weather in Paris?")
    check(len(CALLS) == 3, f"agent on the local model: the function tool was called with {CALLS[-1]!r}")
    check(result.final_output == "sunny", "agent on the local model: the tool's output is the final output")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
