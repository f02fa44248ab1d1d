"""`unifiedreward` against a small OpenAI-compatible chat server run on loopback in the test:
request format (PNG data URLs, temperature 0), score parsing, unparseable answers per failure
policy, retries on 5xx."""

from __future__ import annotations

import base64
import json
import math

import pytest
import torch

from flowpo.rewards.base import RewardError, WeightedReward, build_reward
from flowpo.rewards.server import ThreadedServer as LoopbackServer
from flowpo.rewards.unifiedreward import parse_final_score


def judge_app(requests: list, fail_first: int = 0, delay: float = 0.0, load: dict | None = None):
    """Answers by the prompt: 'good' -> 5, 'poor' -> 1, 'mute' -> no final score. `load`
    records the peak number of requests in flight."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request: Request):
        body = json.loads(await request.body())
        requests.append(body)
        if load is not None:
            load["now"] = load.get("now", 0) + 1
            load["peak"] = max(load.get("peak", 0), load["now"])
            await asyncio.sleep(delay)
            load["now"] -= 1
        if len(requests) <= fail_first:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        text = body["messages"][0]["content"][1]["text"]
        if "good" in text.split("Prompt:")[-1]:
            answer = "The image matches well.\nFinal Score: 5"
        elif "poor" in text.split("Prompt:")[-1]:
            answer = "Missing objects. Final Score: **1**"
        else:
            answer = "I cannot judge this image."
        return JSONResponse({"choices": [{"message": {"role": "assistant", "content": answer}}]})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def test_parse_final_score():
    assert parse_final_score("blah\nFinal Score: 4") == pytest.approx(0.8)
    assert parse_final_score("final score：3.5") == pytest.approx(0.7)
    assert parse_final_score("Final Score: 2 ... Final Score: 5") == 1.0  # the last one
    assert math.isnan(parse_final_score("Score: 4"))
    assert math.isnan(parse_final_score("Final Score: 9"))  # out of the 1-5 scale
    assert math.isnan(parse_final_score(""))


def test_judge_request_format_and_scores():
    requests: list = []
    x = torch.rand(2, 3, 16, 16)
    with LoopbackServer(judge_app(requests)) as srv:
        fn = build_reward("unifiedreward", api_url=srv.url, model="judge-7b", max_concurrency=2)
        out = fn(x, ["a good cat", "a poor dog"], [{}, {}])
    assert out.scores.tolist() == pytest.approx([1.0, 0.2])
    assert out.details["unparseable"].tolist() == [0.0, 0.0]
    assert len(requests) == 2
    for body in requests:
        assert body["temperature"] == 0 and body["model"] == "judge-7b"
        url = body["messages"][0]["content"][0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        assert base64.b64decode(url.split(",", 1)[1]).startswith(b"\x89PNG")


def test_unparseable_answer_is_an_error_or_masked_never_zero():
    x = torch.rand(2, 3, 16, 16)
    with LoopbackServer(judge_app([])) as srv:
        opts = {"api_url": srv.url}
        strict = WeightedReward({"unifiedreward": 1.0}, {"unifiedreward": opts})
        with pytest.raises(RewardError, match="could not score 1 of 2"):
            strict(x, ["a good cat", "a mute dog"], [{}, {}])
        masked = WeightedReward(
            {"unifiedreward": 1.0}, {"unifiedreward": {**opts, "failure": "mask"}}
        )
        out = masked(x, ["a good cat", "a mute dog"], [{}, {}])
    assert out.scores[0] == 1.0 and torch.isnan(out.scores[1])
    assert out.details["unifiedreward/unparseable"].tolist() == [0.0, 1.0]
    assert out.details["unifiedreward/failed"].tolist() == [0.0, 1.0]


def test_judge_overload_is_retried():
    requests: list = []
    with LoopbackServer(judge_app(requests, fail_first=2)) as srv:
        fn = build_reward("unifiedreward", api_url=srv.url, max_concurrency=1)
        out = fn(torch.rand(1, 3, 16, 16), ["a good cat"], [{}])
    assert out.scores.tolist() == [1.0] and len(requests) == 3 and fn.http.retries == 2


def test_judge_needs_an_address():
    with pytest.raises(ValueError, match="api_url"):
        build_reward("unifiedreward")


def test_judge_concurrency_is_bounded_across_calling_threads():
    import threading

    load: dict = {}
    requests: list = []
    with LoopbackServer(judge_app(requests, delay=0.05, load=load)) as srv:
        fn = build_reward("unifiedreward", api_url=srv.url, max_concurrency=2)
        x = torch.rand(4, 3, 8, 8)
        threads = [
            threading.Thread(target=fn, args=(x, ["a good cat"] * 4, [{}] * 4)) for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(requests) == 12 and load["peak"] == 2
