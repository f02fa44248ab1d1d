"""Published settings the recipes and rewards follow (issue 15 §5): Flow-GRPO's T5 text length
of 128 tokens in the real-size SD3/FLUX recipes that cite it, and Flow-GRPO's UnifiedReward
judge question (with its 512x512 resize) as the `unifiedreward` default, ours beside it."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

from flowpo.config import load_config
from flowpo.rewards.base import build_reward, check_reward_options
from flowpo.rewards.server import ThreadedServer
from flowpo.rewards.unifiedreward import FLOW_GRPO_JUDGE_PROMPT, JUDGE_PROMPT
from tests.conftest import ROOT

CITING = sorted(
    p
    for p in [*ROOT.glob("configs/sd3_*.yaml"), *ROOT.glob("configs/flux_*.yaml")]
    if "flow_grpo" in p.read_text().lower() or "flow-grpo" in p.read_text().lower()
)


def test_flow_grpo_recipes_encode_128_t5_tokens():
    names = {p.stem for p in CITING}
    assert {"sd3_flow_grpo_pickscore", "flux_flow_grpo_pickscore", "flux_fast_pickscore"} <= names
    for path in CITING:
        if path.stem == "flux_egrpo_hps":  # E-GRPO's recipe; Flow-GRPO only lends its lr/LoRA
            continue
        cfg = load_config(str(path))
        assert cfg.model.options.get("max_sequence_length") == 128, path.name


def test_the_text_length_option_reaches_the_t5_encoder(tiny_dirs):
    from flowpo.models.base import load_adapter

    lengths = {}
    for n in (6, 10):
        adapter = load_adapter("sd3", tiny_dirs["sd3"], max_sequence_length=n)
        lengths[n] = adapter.encode_prompts(["a red circle"]).prompt_embeds.shape[1]
    assert lengths[10] - lengths[6] == 4  # CLIP tokens, then max_sequence_length T5 tokens


def judge(requests: list):
    """A chat endpoint that records each request and answers 'Final Score: 4'."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request: Request):
        requests.append(json.loads(await request.body()))
        answer = {"role": "assistant", "content": "Good.\nFinal Score: 4"}
        return JSONResponse({"choices": [{"message": answer}]})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def _sent(body) -> tuple[str, tuple[int, int]]:
    """(text, image size) of one recorded request."""
    image, text = body["messages"][0]["content"]
    png = base64.b64decode(image["image_url"]["url"].split(",", 1)[1])
    return text["text"], Image.open(io.BytesIO(png)).size


@pytest.mark.parametrize(
    "options,text,size",
    [
        ({}, FLOW_GRPO_JUDGE_PROMPT.format(prompt="a cat"), (512, 512)),
        ({"prompt_template": "flow_grpo", "image_size": 0}, None, (24, 24)),
        ({"prompt_template": "flowpo"}, JUDGE_PROMPT.format(prompt="a cat"), (24, 24)),
        ({"prompt_template": "Rate: {prompt}", "image_size": 64}, "Rate: a cat", (64, 64)),
    ],
)
def test_unifiedreward_sends_the_published_question_by_default(options, text, size):
    requests: list = []
    with ThreadedServer(judge(requests)) as srv:
        fn = build_reward("unifiedreward", api_url=srv.url, **options)
        out = fn(torch.rand(1, 3, 24, 24), ["a cat"], [{}])
    assert out.scores.tolist() == [pytest.approx(0.8)]
    sent_text, sent_size = _sent(requests[0])
    assert sent_size == size
    if text is not None:
        assert sent_text == text


def test_the_published_question_is_flow_grpos_wording():
    q = FLOW_GRPO_JUDGE_PROMPT.format(prompt="two dogs")
    assert q.startswith("<image>\nYou are given a text caption and a generated image")
    assert "assign a score from 1 to 5 after 'Final Score:'." in q
    assert q.endswith("Text Caption: [two dogs]")


def test_prompt_options_are_known_and_a_bad_name_is_refused():
    opts = {"api_url": "http://127.0.0.1:9", "prompt_template": "flowpo", "image_size": 0}
    check_reward_options({"unifiedreward": 1.0}, {"unifiedreward": opts})
    with pytest.raises(ValueError, match="prompt_template 'flowgrpo' is neither one of"):
        build_reward("unifiedreward", api_url="http://127.0.0.1:9", prompt_template="flowgrpo")
