"""The OpenAI API as evaluation harnesses and local apps use it: echo and logprobs (scoring),
batched and token-id prompts, n, chat logprobs, refusals naming the field, health and models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_adapter
from peft import PeftModel

from fineinfer_jupyter.engine.models import load_model

pytest_plugins = ["pytest_jupyter.jupyter_server", "server_fixtures"]
pytestmark = pytest.mark.timeout(180)

V1 = "fineinfer/v1"
CHAT = [{"role": "user", "content": "Hello there"}]


def reference_logprobs(ids: list[int], adapter_dir=None) -> torch.Tensor:
    """log-softmax of the tiny model's own forward over `ids` ([len(ids), V]; row t predicts t+1)."""
    model = load_model("tiny").model
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


async def post(api, route: str, body: dict):
    return await api.call("POST", f"{V1}/{route}", body)


async def test_lm_eval_loglikelihood_requests_score_each_prompt_as_the_model_does(
    ready_api, jp_root_dir
):
    """lm-eval's local-completions payload (token-id prompts, batched, echo, max_tokens 1,
    logprobs 1) for base and an adapter: the echoed logprobs are the model's own."""
    api = ready_api
    make_adapter(jp_root_dir / "alpha", seed=1)
    assert (await api.post("adapters", {"name": "alpha", "path": "alpha"}))[0] == 201
    prompts = [[72, 101, 108, 108, 111], [84, 104, 101, 32, 99, 97, 116]]
    for model, adapter in (("base", None), ("alpha", jp_root_dir / "alpha")):
        body = {"model": model, "prompt": prompts, "temperature": 0, "max_tokens": 1,
                "logprobs": 1, "seed": 1234, "echo": True}  # fmt: skip
        code, answer = await post(api, "completions", body)
        assert code == 200, answer
        assert [c["index"] for c in answer["choices"]] == [0, 1]
        for choice, ids in zip(answer["choices"], prompts, strict=True):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(ids) + 1  # the prompt, then the generated token
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            ref = reference_logprobs(ids, adapter)
            for t in range(1, len(ids)):
                assert lp["token_logprobs"][t] == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)
                (top,) = lp["top_logprobs"][t].values()
                assert top == pytest.approx(ref[t - 1].max().item(), abs=1e-4)
            assert choice["text"].startswith(bytes(i - 3 for i in ids).decode())  # echoed
            assert lp["text_offset"][:2] == [0, 1]
            # temperature 0: the generated token is the most likely one
            assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
        assert answer["usage"]["prompt_tokens"] == sum(map(len, prompts))


async def test_score_only_batched_prompts_return_one_choice_each_in_order(ready_api):
    api = ready_api
    prompts = ["Once upon", "A", "The end is near", "Hi"]
    body = {"model": "base", "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 0}
    code, answer = await post(api, "completions", body)
    assert code == 200, answer
    assert [c["text"] for c in answer["choices"]] == prompts  # the prompts, nothing generated
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] == "length" for c in answer["choices"])
    assert [len(c["logprobs"]["tokens"]) for c in answer["choices"]] == [9, 1, 15, 2]
    assert answer["usage"]["completion_tokens"] == 0
    for prompt, choice in zip(prompts, answer["choices"], strict=True):  # as if sent alone
        alone = (await post(api, "completions", {**body, "prompt": prompt}))[1]["choices"][0]
        assert alone["logprobs"]["tokens"] == choice["logprobs"]["tokens"]
        assert alone["logprobs"]["token_logprobs"][1:] == pytest.approx(
            choice["logprobs"]["token_logprobs"][1:], abs=1e-4
        )

    greedy = {"model": "base", "prompt": prompts, "max_tokens": 5, "temperature": 0}
    code, answer = await post(api, "completions", greedy)
    alone = [await post(api, "completions", {**greedy, "prompt": p}) for p in prompts]
    assert [c["text"] for c in answer["choices"]] == [a[1]["choices"][0]["text"] for a in alone]


async def test_n_choices_are_indexed_in_order_and_streamed_with_their_index(ready_api):
    api = ready_api
    body = {"model": "base", "prompt": ["Once", "Twice"], "n": 3, "max_tokens": 4, "seed": 7}
    code, answer = await post(api, "completions", body)
    assert code == 200, answer
    assert [c["index"] for c in answer["choices"]] == list(range(6))
    again = (await post(api, "completions", body))[1]
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in answer["choices"]]
    assert answer["usage"]["completion_tokens"] == 24
    code, chunks = await api.stream(f"{V1}/completions", {**body, "stream": True})
    lines = b"".join(chunks).decode().split("\n\n")
    assert lines[-2] == "data: [DONE]" and lines[:-2].count("data: [DONE]") == 0
    texts = [""] * 6
    for line in lines[:-2]:
        (choice,) = json.loads(line.removeprefix("data: "))["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in answer["choices"]]


async def test_chat_logprobs_are_in_the_chat_shape_ordered_and_agree_with_greedy(ready_api):
    api = ready_api
    body = {"model": "base", "messages": CHAT, "max_completion_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 3}  # fmt: skip
    code, answer = await post(api, "chat/completions", body)
    assert code == 200, answer
    content = answer["choices"][0]["logprobs"]["content"]
    assert len(content) == answer["usage"]["completion_tokens"] == 6
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        assert item["bytes"] == list(item["token"].encode())
        values = [t["logprob"] for t in item["top_logprobs"]]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert item["top_logprobs"][0]["token"] == item["token"]  # temperature 0 takes the top
        assert item["logprob"] == values[0]
    code, chunks = await api.stream(f"{V1}/chat/completions", {**body, "stream": True})
    streamed = []
    for line in b"".join(chunks).decode().split("\n\n"):
        if line.startswith("data: {"):
            choice = json.loads(line.removeprefix("data: "))["choices"][0]
            streamed += (choice["logprobs"] or {}).get("content", [])
    # the second request's prompt comes from the prefix cache: the same tokens, its logprobs
    # computed over the cached KV (fp32 sums in another order)
    assert [tokens(i) for i in streamed] == [tokens(i) for i in content]
    flat = [v for i in content for v in logprobs(i)]
    assert [v for i in streamed for v in logprobs(i)] == pytest.approx(flat, rel=1e-5)


def tokens(item):
    return item["token"], item["bytes"], [(t["token"], t["bytes"]) for t in item["top_logprobs"]]


def logprobs(item):
    return [item["logprob"]] + [t["logprob"] for t in item["top_logprobs"]]


@pytest.mark.parametrize(
    ("route", "extra", "field"),
    [
        ("completions", {"best_of": 3}, "best_of"),
        ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat/completions", {"echo": True}, "echo"),
        ("completions", {"logprobs": 21}, "logprobs"),
        ("completions", {"max_tokens": 0}, "max_tokens"),
        ("completions", {"n": 65}, "n"),
        ("completions", {"prompt": ["Hi", [1, -2]]}, "prompt[1]"),
        ("completions", {"prompt": [[100000]]}, "prompt"),
        ("completions", {"prompt": ["Hi", [5, 100000]]}, "prompt[1]"),
        ("completions", {"prompt": ["Hi"] * 33, "n": 2}, "n"),
        ("completions", {"suffix": "x"}, "suffix"),
    ],
)
async def test_refusals_are_one_line_400s_naming_the_field(ready_api, route, extra, field):
    body = {"model": "base", "max_tokens": 2, **extra}
    body.setdefault("messages" if route.startswith("chat") else "prompt", CHAT if route.startswith("chat") else "Hi")  # fmt: skip
    code, answer = await post(ready_api, route, body)
    assert code == 400, answer
    error = answer["error"]
    assert error["field"] == error["param"] == field and error["message"].startswith(field + ":")
    assert "\n" not in error["message"]


async def test_health_answers_ok_when_ready_and_needs_the_token(ready_api, jp_fetch):
    for path in (f"{V1}/health", "fineinfer/health"):
        assert await ready_api.call("GET", path) == (200, {"status": "ok"})
        response = await jp_fetch(
            *path.split("/"), headers={"Authorization": ""}, raise_error=False
        )
        assert response.code == 403


async def test_models_lists_base_and_every_adapter_with_its_parent(ready_api, jp_root_dir):
    make_adapter(jp_root_dir / "alpha", seed=1)
    assert (await ready_api.post("adapters", {"name": "alpha", "path": "alpha"}))[0] == 201
    code, models = await ready_api.call("GET", f"{V1}/models")
    assert [(m["id"], m["parent"], m["root"]) for m in models["data"]] == [
        ("base", None, "tiny"), ("tiny", None, "tiny"), ("alpha", "tiny", "tiny")
    ]  # fmt: skip


async def test_a_repeated_prompt_reports_its_cached_tokens_in_usage(ready_api):
    """OpenAI's usage.prompt_tokens_details.cached_tokens, for completions (n=2 counts the
    prompt once) and chat, streamed or not: 0 on the first sight of a prompt, its reused prefix
    on the second (the prefix cache, design.md S1)."""
    api = ready_api
    prompt = "herbs " * 40
    chat = [{"role": "user", "content": "Which herbs grow in shade? " * 10}]
    cases = [
        ("completions", {"prompt": prompt, "n": 2}),
        ("chat/completions", {"messages": chat}),
        (
            "chat/completions",
            {"messages": chat, "stream": True, "stream_options": {"include_usage": True}},
        ),  # fmt: skip
    ]
    seen = []
    for route, extra in cases:
        body = {"model": "base", "max_tokens": 2, "temperature": 0, **extra}
        if extra.get("stream"):
            code, chunks = await api.stream(f"{V1}/{route}", body)
            lines = b"".join(chunks).decode().split("\n\n")
            answer = json.loads(lines[-3].removeprefix("data: "))  # the usage chunk, then [DONE]
        else:
            code, answer = await post(api, route, body)
        assert code == 200, answer
        usage = answer["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        seen.append((route, usage["prompt_tokens"], usage["prompt_tokens_details"]))
    (_, n1, first), (_, n2, second), (_, n3, third) = seen
    assert first == {"cached_tokens": 0}, seen  # a fresh prompt
    assert second == {"cached_tokens": 0}, seen  # another prompt: nothing to reuse
    assert 16 <= third["cached_tokens"] < n3 == n2, seen  # the same chat again: its prefix
    code, again = await post(api, "completions", {"model": "base", "prompt": prompt,
                                                  "max_tokens": 2})  # fmt: skip
    assert code == 200 and 16 <= again["usage"]["prompt_tokens_details"]["cached_tokens"] < n1
