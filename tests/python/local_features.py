"""Structured outputs, logprobs and n on the embedded model, through the clients people use:
LangChain's `with_structured_output`, the `openai` package's `chat.completions.parse` and
`responses.parse`, random JSON schemas sampled at temperature 1 and validated with `jsonschema`,
logprobs checked for consistency, `n` choices checked for reproducibility.

Usage: python local_features.py BASE_URL MODEL
Exits non-zero with a message on the first mismatch; prints one line per check passed.
"""

import json
import math
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import List, Optional

import jsonschema
import openai
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel, Field

BASE, MODEL = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=BASE, api_key="unused", max_retries=0, timeout=600)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


class Kind(str, Enum):
    person = "person"
    company = "company"


class Address(BaseModel):
    city: str
    country: str
    zip_code: Optional[str] = None


class Entity(BaseModel):
    name: str
    kind: Kind
    address: Address
    tags: List[str] = Field(max_length=3)
    founded: Optional[int] = None
    rating: float = Field(ge=0, le=5)


ASK = [{"role": "user", "content": "Describe the company Apple Inc."}]

# LangChain's default structured output (json_schema), nested pydantic models, enum, list, optional.
llm = ChatOpenAI(base_url=BASE, api_key="unused", model=MODEL, temperature=0, max_retries=0)
got = llm.with_structured_output(Entity).invoke(ASK[0]["content"])
check(isinstance(got, Entity) and isinstance(got.address, Address) and isinstance(got.kind, Kind),
      f"langchain with_structured_output returns a parsed Entity: {got!r}")
check(len(got.tags) <= 3 and 0 <= got.rating <= 5, "its list and bound hold")

# The openai package's parse helper (strict schema: every field required, nullable unions).
r = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Entity, temperature=0)
parsed = r.choices[0].message.parsed
check(isinstance(parsed, Entity), f"chat.completions.parse returns a parsed Entity: {parsed!r}")
check(r.choices[0].finish_reason == "stop", "a whole structured answer finishes with stop")

# Streamed: the JSON arrives in content deltas and parses whole.
text = ""
for chunk in client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {
            "name": "entity", "schema": Entity.model_json_schema()}}):
    for ch in chunk.choices:
        text += ch.delta.content or ""
check(Entity.model_validate_json(text) is not None, "a streamed structured answer parses whole")

# json_object: one JSON object.
r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "List three fruits."}],
                                   response_format={"type": "json_object"}, temperature=0)
check(isinstance(json.loads(r.choices[0].message.content), dict), "json_object gives one JSON object")

# The Responses API's text.format takes the same path.
rr = client.responses.parse(model=MODEL, input=ASK[0]["content"], text_format=Entity, temperature=0)
check(isinstance(rr.output_parsed, Entity), f"responses.parse returns a parsed Entity: {rr.output_parsed!r}")

# max_tokens cutting a structured answer says so.
r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0,
                                   response_format={"type": "json_schema", "json_schema": {
                                       "name": "entity", "schema": Entity.model_json_schema()}})
check(r.choices[0].finish_reason == "length", "a structured answer cut by max_tokens finishes with length")

# What the grammar cannot enforce is refused, naming the keyword.
try:
    client.chat.completions.create(model=MODEL, messages=ASK, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"h": {"type": "string", "format": "hostname"}}}}})
    check(False, "an unenforceable format is refused")
except openai.BadRequestError as e:
    check(e.body.get("param") == "response_format.json_schema.schema.properties.h.format",
          f"an unenforceable keyword is refused with 400 naming it: {e.body}")


# Random schemas at temperature 1: every answer that finishes validates.
def rand_schema(rng, depth):
    kinds = ["string", "integer", "number", "boolean", "enum", "nullable", "const"]
    if depth < 2:
        kinds += ["array", "object", "object"]
    k = rng.choice(kinds)
    if k == "string":
        s = {"type": "string", "maxLength": rng.randint(1, 12)}
        extra = rng.random()
        if extra < 0.15:
            s = {"type": "string", "pattern": "^[a-z]{2,6}$"}
        elif extra < 0.25:
            s = {"type": "string", "format": rng.choice(["date", "uuid", "email"])}
        elif extra < 0.4:
            s["minLength"] = 1
        return s
    if k == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 1000)}
    if k == "number":
        return rng.choice([{"type": "number", "minimum": 0, "maximum": 1},
                           {"type": "number", "exclusiveMinimum": -10, "exclusiveMaximum": 10},
                           {"type": "number"}])
    if k == "boolean":
        return {"type": "boolean"}
    if k == "enum":
        pool = ["red", "green", 3, 2.5, None, True, {"k": 1}, [1, "a"]]
        return {"enum": rng.sample(pool, rng.randint(1, 4))}
    if k == "const":
        return {"const": rng.choice(["fixed", 7, None, {"a": [1]}])}
    if k == "nullable":
        inner = rand_schema(rng, depth + 1)
        return {"anyOf": [inner, {"type": "null"}]}
    if k == "array":
        return {"type": "array", "items": rand_schema(rng, depth + 1), "maxItems": rng.randint(1, 2)}
    props = {f"f{i}": rand_schema(rng, depth + 1) for i in range(rng.randint(1, 3))}
    required = [p for p in props if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def rand_root(rng):
    root = rand_schema(rng, 1) if rng.random() < 0.5 else None
    props = {f"p{i}": rand_schema(rng, 1) for i in range(rng.randint(1, 3))}
    schema = {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
    if root is not None:
        # A definition reached through $ref, as pydantic writes nested models.
        schema["$defs"] = {"Part": root}
        schema["properties"]["part"] = {"$ref": "#/$defs/Part"}
        schema["required"].append("part")
    return schema


def sample(i):
    rng = random.Random(1000 + i)
    schema = rand_root(rng)
    r = client.chat.completions.create(
        model=MODEL, temperature=1, seed=i, max_tokens=1200,
        messages=[{"role": "user", "content": "Fill in this JSON schema with example values: " + json.dumps(schema)}],
        response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}})
    return schema, r.choices[0]


validated, cut = 0, 0
with ThreadPoolExecutor(max_workers=8) as pool:
    for schema, choice in pool.map(sample, range(110)):
        if choice.finish_reason == "length":
            cut += 1
            continue
        if validated == 100:
            continue
        try:
            value = json.loads(choice.message.content)
            jsonschema.validate(value, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            check(False, f"a sampled answer validates: {e}\nschema: {json.dumps(schema)}\nanswer: {choice.message.content}")
        validated += 1
print(f"random schemas: {validated} answers validated, {cut} cut by max_tokens (not counted)")
check(validated == 100, "100 answers sampled at temperature 1 on random schemas all validate")


# logprobs: a distribution, the sampled token's entry, bytes that spell the content.
def check_logprobs(content, entries, greedy, what):
    check(entries and b"".join(bytes(e.bytes) for e in entries).decode() == content,
          f"{what}: the tokens' bytes spell the content")
    for e in entries:
        total = sum(math.exp(t.logprob) for t in e.top_logprobs)
        if total > 1 + 1e-4 or e.logprob > 1e-6:
            check(False, f"{what}: top logprobs are a distribution ({total})")
        lps = [t.logprob for t in e.top_logprobs]
        if lps != sorted(lps, reverse=True):
            check(False, f"{what}: top logprobs most likely first")
        same = [t for t in e.top_logprobs if t.token == e.token]
        if same and abs(same[0].logprob - e.logprob) > 1e-6:
            check(False, f"{what}: the sampled token's logprob equals its top entry")
        if greedy and e.top_logprobs[0].token != e.token:
            check(False, f"{what}: greedy picks the most likely token")
    check(True, f"{what}: exp(top) <= 1, sorted, sampled token consistent")


r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}],
                                   logprobs=True, top_logprobs=5, max_tokens=24, temperature=0)
check_logprobs(r.choices[0].message.content, r.choices[0].logprobs.content, True, "greedy logprobs")
whole = r.choices[0].logprobs.content
r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                   logprobs=True, top_logprobs=20, max_tokens=24, temperature=1, seed=3)
check_logprobs(r.choices[0].message.content, r.choices[0].logprobs.content, False, "sampled logprobs")
check(all(len(e.top_logprobs) == 20 for e in r.choices[0].logprobs.content), "top_logprobs = 20 lists 20")
streamed, text = [], ""
for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}],
                                            logprobs=True, top_logprobs=5, max_tokens=24, temperature=0, stream=True):
    for ch in chunk.choices:
        text += ch.delta.content or ""
        if ch.logprobs and ch.logprobs.content:
            streamed += ch.logprobs.content
check([(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in whole],
      "streamed logprobs are the whole answer's")
r = client.chat.completions.create(model=MODEL, messages=ASK, logprobs=True, top_logprobs=3, temperature=0,
                                   response_format={"type": "json_schema", "json_schema": {
                                       "name": "entity", "schema": Entity.model_json_schema()}})
check_logprobs(r.choices[0].message.content, r.choices[0].logprobs.content, True, "constrained logprobs")
try:
    client.chat.completions.create(model=MODEL, messages=ASK, top_logprobs=3)
    check(False, "top_logprobs without logprobs is refused")
except openai.BadRequestError as e:
    check(e.body.get("param") == "top_logprobs", "top_logprobs without logprobs is refused naming it")

# n: three choices, reproducible with a seed, the first equal to n = 1's, streamed the same.
ask = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a joke."}], max_tokens=20, temperature=1, seed=7)
a = client.chat.completions.create(n=3, **ask)
b = client.chat.completions.create(n=3, **ask)
check([c.index for c in a.choices] == [0, 1, 2], "n = 3 gives three choices")
texts = [c.message.content for c in a.choices]
check(texts == [c.message.content for c in b.choices], "n = 3 is reproducible with seed")
check(len(set(texts)) > 1, f"the choices are sampled independently: {texts}")
one = client.chat.completions.create(**ask)
check(one.choices[0].message.content == texts[0], "choice 0 is what n = 1 with the same seed gives")
check(a.usage.completion_tokens > one.usage.completion_tokens and a.usage.prompt_tokens == one.usage.prompt_tokens,
      "usage counts the prompt once and every choice's tokens")
parts = {0: "", 1: "", 2: ""}
usage = None
for chunk in client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **ask):
    for ch in chunk.choices:
        parts[ch.index] += ch.delta.content or ""
    usage = chunk.usage or usage
check([parts[i] for i in range(3)] == texts, "streamed choices interleave by index to the same texts")
check(usage.completion_tokens == a.usage.completion_tokens, "the stream's usage is the whole answer's")

# Legacy completions: n and integer logprobs.
c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, n=2,
                              logprobs=2, temperature=0)
check(len(c.choices) == 2 and c.choices[0].text == c.choices[1].text, "completions: n = 2 greedy choices agree")
lp = c.choices[0].logprobs
check(len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
      and "".join(lp.tokens) == c.choices[0].text
      and all(len(t) <= 2 for t in lp.top_logprobs), "completions: logprobs in the legacy columns")

# n beyond what the engine decodes at once.
try:
    client.chat.completions.create(n=100, **ask)
    check(False, "n beyond max_batch is refused")
except openai.BadRequestError as e:
    check(e.body.get("param") == "n", "n beyond max_batch is refused naming n")
