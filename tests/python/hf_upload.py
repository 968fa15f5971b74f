"""NeMo Data Store's upload path as NVIDIA's notebooks use it: the official `huggingface_hub` client
pointed at the gateway's /v1/hf creates a dataset repo and uploads a training file into the entity
store. Prints "ok: ..." per check; exits non-zero on the first failure."""
import json
import os
import sys
import tempfile

from huggingface_hub import HfApi


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def main(base):
    # huggingface_hub 2.x refuses an empty token; False sends none (loopback needs no key).
    api = HfApi(endpoint=base + "/v1/hf", token=False)
    repo = "team/hf-tools"
    api.create_repo(repo_id=repo, repo_type="dataset", exist_ok=True)
    api.create_repo(repo_id=repo, repo_type="dataset", exist_ok=True)
    check(True, "create_repo, twice with exist_ok")
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    rows = [
        {"messages": [{"role": "user", "content": f"weather in city {i}?"},
                      {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": f"c{i}"})}}]}],
         "tools": [tool]}
        for i in range(5)
    ]
    d = tempfile.mkdtemp()
    good = os.path.join(d, "train.jsonl")
    with open(good, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    info = api.upload_file(path_or_fileobj=good, path_in_repo="training/train.jsonl", repo_id=repo, repo_type="dataset")
    check("commit" in str(info), "upload_file of a training file")
    bad = os.path.join(d, "bad.jsonl")
    with open(bad, "w") as f:
        f.write('{"messages": "not a list"}\n')
    try:
        api.upload_file(path_or_fileobj=bad, path_in_repo="training/bad.jsonl", repo_id=repo, repo_type="dataset")
        check(False, "a malformed file is refused")
    except Exception as e:  # the client raises its HTTP error type
        # The gateway's reason reaches the caller.
        check("must be an array" in str(e), f"a malformed file is refused ({type(e).__name__})")


if __name__ == "__main__":
    main(sys.argv[1])
