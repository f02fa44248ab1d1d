"""The reward service and its client over real HTTP on loopback: protocol, limits, auth, fault
behaviour (timeouts, 5xx, a killed and restarted server) and the failure policies."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from flowpo.rewards.base import RewardError, RewardOutput, WeightedReward, build_reward
from flowpo.rewards.client import RemoteReward, RewardServiceError, encode_png
from flowpo.rewards.server import ThreadedServer as LoopbackServer
from flowpo.rewards.server import create_app
from tests.conftest import free_port, metrics_rows

ROOT = Path(__file__).resolve().parents[1]


def jpeg_scorer():
    return build_reward("jpeg_incompressibility")


def images(b: int = 3, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        url + "/score",
        data=body,
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        assert b"Traceback" not in raw
        return e.code, json.loads(raw)


def payload(x: torch.Tensor, prompts=None) -> bytes:
    n = x.shape[0]
    return json.dumps(
        {"images": encode_png(x), "prompts": prompts or ["p"] * n, "metadata": [{}] * n}
    ).encode()


# -- protocol --------------------------------------------------------------------------------


def test_remote_scores_equal_in_process_scores():
    x = images(5)
    with LoopbackServer(create_app([jpeg_scorer()])) as srv:
        client = RemoteReward(srv.url, batch_size=2, timeout_s=10)
        out = client(x, ["p"] * 5, [{}] * 5)
        assert client.health()["max_batch"] == 64
    # PNG is lossless: the service scores the same uint8 pixels as the in-process reward
    torch.testing.assert_close(out.scores, jpeg_scorer()(x, ["p"] * 5, [{}] * 5).scores)


def test_startup_check_names_the_fix():
    """Before training, check_reward_services fails fast: no service at the url, or a service
    that serves another reward; a service of the right reward passes."""
    from flowpo.rewards.base import check_reward_services

    weights = {"jpeg_incompressibility": 1.0}
    with LoopbackServer(create_app([jpeg_scorer()], name="jpeg_incompressibility")) as srv:
        check_reward_services(weights, {"jpeg_incompressibility": {"url": srv.url}}, wait_s=5)
    with LoopbackServer(create_app([jpeg_scorer()], name="pickscore")) as srv:
        with pytest.raises(RewardServiceError, match=r"serves 'pickscore', not 'jpeg_"):
            check_reward_services(weights, {"jpeg_incompressibility": {"url": srv.url}}, wait_s=5)
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RewardServiceError, match=r"no service answers at .*flowpo serve-reward"):
        # without wait_s the check waits as long as scoring would: the client's deadline_s
        check_reward_services(weights, {"jpeg_incompressibility": {"url": dead, "deadline_s": 2}})
    assert time.monotonic() - t0 < 10
    # a url that reaches some other web server: refused at once, not retried until the deadline
    import http.server

    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = 200 if self.path == "/health" and self.server.html else 404
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")

        def log_message(self, *args):
            pass

    for html, message in ((True, "is not a flowpo reward service"), (False, "refused GET /health")):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Other)
        srv.html = html
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        t0 = time.monotonic()
        try:
            with pytest.raises(RewardServiceError, match=message):
                check_reward_services(weights, {"jpeg_incompressibility": {"url": url}})
        finally:
            srv.shutdown()
        assert time.monotonic() - t0 < 10
    check_reward_services(weights, {}, wait_s=1)  # in-process rewards: nothing to check


def test_images_of_different_sizes_are_scored_in_request_order():
    a, b = images(1, 0, 16), images(1, 1, 24)
    body = json.dumps({"images": encode_png(a) + encode_png(b), "prompts": ["p", "q"]}).encode()
    with LoopbackServer(create_app([jpeg_scorer()])) as srv:
        status, data = post(srv.url, body)
    assert status == 200
    want = [float(jpeg_scorer()(t, ["p"], [{}]).scores[0]) for t in (a, b)]
    assert data["scores"] == pytest.approx(want, rel=1e-6)


def test_bad_requests_get_json_errors_with_status():
    x = images(2)
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    not_png = base64.b64encode(jpeg.getvalue()).decode()
    cases = {
        "malformed json": (b'{"images": [', 400, "bad_json"),
        "pickle body": (pickle.dumps({"images": []}), 400, "bad_json"),
        "json array": (b"[1, 2]", 400, "bad_request"),
        "no images": (json.dumps({"images": [], "prompts": []}).encode(), 400, "bad_request"),
        "prompt count": (
            json.dumps({"images": encode_png(x), "prompts": ["p"]}).encode(),
            400,
            "bad_request",
        ),
        "jpeg payload": (
            json.dumps({"images": [not_png], "prompts": ["p"]}).encode(),
            400,
            "bad_image",
        ),
        "not base64": (
            json.dumps({"images": ["@@@not base64@@@"], "prompts": ["p"]}).encode(),
            400,
            "bad_image",
        ),
        "truncated png": (
            json.dumps(
                {"images": [encode_png(x)[0][:40]], "prompts": ["p"]}  # header only
            ).encode(),
            400,
            "bad_image",
        ),
    }
    with LoopbackServer(create_app([jpeg_scorer()])) as srv:
        for name, (body, want_status, want_code) in cases.items():
            status, data = post(srv.url, body)
            assert (status, data["error"]["code"]) == (want_status, want_code), name
            assert data["error"]["message"], name
        status, data = post(srv.url.replace("/score", "") + "/nope", b"{}")
    assert status in (404, 405) and "error" in data


def test_token_is_required_and_checked():
    x = images(2)
    with LoopbackServer(create_app([jpeg_scorer()], token="s3cret")) as srv:
        assert post(srv.url, payload(x))[0] == 401
        assert post(srv.url, payload(x), {"Authorization": "Bearer wrong"})[0] == 401
        status, data = post(srv.url, payload(x), {"Authorization": "Bearer s3cret"})
        assert status == 200 and len(data["scores"]) == 2
        # the client does not retry a 401: it cannot succeed
        client = RemoteReward(srv.url, token="wrong", deadline_s=30)
        with pytest.raises(RewardServiceError, match="401"):
            client(x, ["p"] * 2, [{}] * 2)
        assert client.http.attempts == 1
        # a refusal is a configuration error: it raises even under failure=mask
        masked = WeightedReward({"r": 1.0}, {"r": {"url": srv.url, "failure": "mask"}})
        with pytest.raises(RewardServiceError, match="401"):
            masked(x, ["p"] * 2, [{}] * 2)
        os.environ["FLOWPO_TEST_TOKEN"] = "s3cret"
        ok = RemoteReward(srv.url, token_env="FLOWPO_TEST_TOKEN")(x, ["p"] * 2, [{}] * 2)
        assert ok.scores.shape == (2,)


def test_oversized_body_and_batch_get_413():
    x = images(4)
    app = create_app([jpeg_scorer()], max_batch=3, max_body_bytes=4000)
    with LoopbackServer(app) as srv:
        status, data = post(srv.url, payload(images(1, size=64)))  # ~16 kB of PNG
        assert (status, data["error"]["code"]) == (413, "body_too_large")
        status, data = post(srv.url, payload(x))
        assert status == 413 and data["error"]["code"] in ("batch_too_large", "body_too_large")
        # a chunked body without Content-Length is bounded while it streams in
        conn = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        chunk = b"x" * 3000
        head = b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        conn.sendall(head + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2 + b"0\r\n\r\n")
        answer = conn.recv(4096)
        conn.close()
        assert answer.startswith(b"HTTP/1.1 413")
        # the client's batch_size keeps it under the service's max_batch
        out = RemoteReward(srv.url, batch_size=1)(images(4, size=8), ["p"] * 4, [{}] * 4)
        assert out.scores.shape == (4,)


def test_reward_errors_are_json_and_only_server_faults_are_retried():
    def rejecting(images, prompts, metadata):
        raise ValueError("needs GenEval metadata")

    def crashing(images, prompts, metadata):
        raise RuntimeError("CUDA out of memory")

    x = images(2)
    with LoopbackServer(create_app([rejecting])) as srv:
        status, data = post(srv.url, payload(x))
        assert (status, data["error"]["code"]) == (422, "rejected")
        client = RemoteReward(srv.url, deadline_s=30)
        with pytest.raises(RewardServiceError, match="422.*metadata"):
            client(x, ["p"] * 2, [{}] * 2)
        assert client.http.attempts == 1
    with LoopbackServer(create_app([crashing])) as srv:
        status, data = post(srv.url, payload(x))
        assert status == 500 and "out of memory" in data["error"]["message"]
        client = RemoteReward(srv.url, deadline_s=1.0, backoff_s=0.1)
        with pytest.raises(RewardServiceError, match="attempts.*HTTP 500"):
            client(x, ["p"] * 2, [{}] * 2)
        assert client.http.attempts >= 3


# -- a misbehaving server ----------------------------------------------------------------------


def fake_service(answer):
    """A Starlette app whose /score returns `answer(n_images)` as raw JSON text."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def score(request: Request):
        n = len(json.loads(await request.body())["images"])
        return Response(answer(n), media_type="application/json")

    return Starlette(routes=[Route("/score", score, methods=["POST"])])


def test_wrong_score_count_and_garbage_answers_fail_loudly_without_retry():
    x = images(3)
    for answer, match in [
        (lambda n: json.dumps({"scores": [1.0] * (n - 1)}), "2 scores for 3 images"),
        (lambda n: "<html>proxy error</html>", "invalid JSON"),
        (lambda n: json.dumps({"score": 1}), "without a 'scores' list"),
        (lambda n: json.dumps({"scores": ["high"] * n}), "expected a number"),
    ]:
        with LoopbackServer(fake_service(answer)) as srv:
            client = RemoteReward(srv.url, deadline_s=30)
            with pytest.raises(RewardServiceError, match=match):
                client(x, ["p"] * 3, [{}] * 3)
            assert client.http.attempts == 1


def test_nan_and_null_scores_follow_the_failure_policy():
    x = images(3)
    # JSON null (our server's encoding) and a NaN literal (some other server's) both mean
    # "this sample was not scored"
    for text in ('{"scores": [1.0, null, 2.0]}', '{"scores": [1.0, NaN, 2.0]}'):
        with LoopbackServer(fake_service(lambda n, t=text: t)) as srv:
            strict = WeightedReward({"judge": 1.0}, {"judge": {"url": srv.url}})
            with pytest.raises(RewardError, match="could not score 1 of 3.*failure=mask"):
                strict(x, ["p"] * 3, [{}] * 3)
            masked = WeightedReward({"judge": 2.0}, {"judge": {"url": srv.url, "failure": "mask"}})
            out = masked(x, ["p"] * 3, [{}] * 3)
    assert out.scores[0] == 2.0 and out.scores[2] == 4.0 and torch.isnan(out.scores[1])
    assert out.details["judge/failed"].tolist() == [0.0, 1.0, 0.0]


def test_reward_returning_nan_is_sent_as_null():
    def half(images, prompts, metadata):
        return RewardOutput(scores=torch.tensor([0.5, float("nan")]))

    with LoopbackServer(create_app([half])) as srv:
        status, data = post(srv.url, payload(images(2)))
    assert status == 200 and data["scores"] == [0.5, None]


# -- timeouts, retries, restarts -------------------------------------------------------------


def test_slow_handler_times_out_then_the_client_gives_up_loudly():
    def slow(images, prompts, metadata):
        time.sleep(0.6)
        return RewardOutput(scores=torch.zeros(images.shape[0]))

    x = images(1)
    with LoopbackServer(create_app([slow, slow, slow, slow])) as srv:
        client = RemoteReward(srv.url, timeout_s=0.2, deadline_s=1.0, backoff_s=0.05)
        t0 = time.monotonic()
        with pytest.raises(RewardServiceError, match=r"attempts in 1 s.*timed out"):
            client(x, ["p"], [{}])
        assert time.monotonic() - t0 < 3.0  # the deadline (1 s) bounds the whole retry loop
        assert client.http.attempts >= 2
    # the service's own limit answers 504, which the client retries
    with LoopbackServer(create_app([slow, slow], score_timeout_s=0.1)) as srv:
        status, data = post(srv.url, payload(x))
        assert (status, data["error"]["code"]) == (504, "timeout")


def test_5xx_is_retried_with_backoff_until_it_succeeds():
    calls = []

    def flaky(images, prompts, metadata):
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise RuntimeError("transient")
        return RewardOutput(scores=torch.ones(images.shape[0]))

    with LoopbackServer(create_app([flaky])) as srv:
        client = RemoteReward(srv.url, deadline_s=10, backoff_s=0.1)
        out = client(images(2), ["p"] * 2, [{}] * 2)
    assert out.scores.tolist() == [1.0, 1.0] and client.http.retries == 2
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    # equal jitter: the k-th wait is in [d/2, d] with d = 0.1 * 2^(k-1)
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1


def test_concurrent_clients_bounded_load():
    """8 threads x 6 requests against a 2-replica service: every answer right, no error."""
    scorer = jpeg_scorer()
    batches = [images(3, seed) for seed in range(6)]
    want = [scorer(b, ["p"] * 3, [{}] * 3).scores for b in batches]
    errors, done = [], []
    with LoopbackServer(create_app([jpeg_scorer(), jpeg_scorer()])) as srv:
        t_stop = time.monotonic() + 30  # the loop stops itself: fixed count, bounded time

        def worker(k: int):
            client = RemoteReward(srv.url, batch_size=2, max_concurrency=2, deadline_s=20)
            for i in range(6):
                if time.monotonic() > t_stop:
                    return
                try:
                    got = client(batches[i], ["p"] * 3, [{}] * 3).scores
                    torch.testing.assert_close(got, want[i])
                    done.append((k, i))
                except Exception as e:  # collected, asserted below
                    errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
    assert not errors and len(done) == 48


def _start_service(port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "flowpo", "serve-reward", "--reward", "jpeg_incompressibility"]
    return subprocess.Popen(
        cmd + ["--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        assert proc.poll() is None, "reward service exited"
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("reward service did not become healthy")


def test_killed_and_restarted_service_loses_no_sample():
    """`flowpo serve-reward` in a subprocess is SIGKILLed mid-run and restarted on the same
    port; the client retries through the outage and every batch gets its right scores."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_service(port)
    procs = [proc]
    try:
        _wait_healthy(url, proc)
        scorer = jpeg_scorer()
        batches = [images(4, seed) for seed in range(10)]
        client = RemoteReward(url, batch_size=2, timeout_s=5, deadline_s=60, backoff_s=0.2)
        results: dict[int, torch.Tensor] = {}
        errors: list[Exception] = []

        def run():
            for i, b in enumerate(batches):
                try:
                    results[i] = client(b, ["p"] * 4, [{}] * 4).scores
                except Exception as e:
                    errors.append(e)
                    return
                time.sleep(0.05)

        t = threading.Thread(target=run)
        t.start()
        t_end = time.monotonic() + 30
        while len(results) < 3 and time.monotonic() < t_end and t.is_alive():
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # no graceful shutdown
        proc.wait(10)
        killed_at = len(results)
        time.sleep(0.5)
        proc = _start_service(port)
        procs.append(proc)
        t.join(90)
        assert not errors, errors
        assert killed_at < len(batches), "the kill must land mid-run"
        assert sorted(results) == list(range(10))
        for i, b in enumerate(batches):
            torch.testing.assert_close(results[i], scorer(b, ["p"] * 4, [{}] * 4).scores)
        assert client.http.retries >= 1
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


def test_serve_reward_cli_rejects_unknown_reward_and_bad_options(capsys):
    from flowpo.cli import main

    assert main(["serve-reward", "--reward", "nope"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(["serve-reward", "--reward", "jpeg_compressibility", "--option", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["serve-reward", "--reward", "imagereward"]) == 2
    assert "needs ['checkpoint', 'tokenizer_dir']" in capsys.readouterr().err


# -- failure policy in the trainer -------------------------------------------------------------


def test_masked_samples_get_zero_advantage_and_leave_group_stats():
    from flowpo.config import Config
    from flowpo.trainer.advantages import compute_advantages
    from flowpo.trainer.grpo import GRPOTrainer

    cfg = Config()
    cfg.reward.weights = {"judge": 1.0}
    rewards = torch.tensor([1.0, 2.0, float("nan"), 3.0, 5.0, 4.0, float("nan"), 6.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    fake = SimpleNamespace(
        cfg=cfg,
        rank=0,
        device="cpu",
        engine=SimpleNamespace(all_gather=lambda t: t),  # one rank
        reward=SimpleNamespace(weights=cfg.reward.weights),
    )
    data = SimpleNamespace(
        rewards=rewards,
        group_ids=groups,
        details={"judge": rewards, "judge/failed": torch.isnan(rewards).float()},
    )
    adv, stats = GRPOTrainer.advantages(fake, data)
    ok = ~torch.isnan(rewards)
    assert adv[~ok].tolist() == [0.0, 0.0] and torch.isfinite(adv).all()
    want, _ = compute_advantages(rewards[ok], groups[ok], global_std=cfg.train.global_std)
    torch.testing.assert_close(adv[ok], want)
    assert stats["reward/masked"] == 2.0 and stats["reward/judge/failed_mean"] == 0.25
    with pytest.raises(RewardError, match="no sample"):
        data.rewards = torch.full((8,), float("nan"))
        GRPOTrainer.advantages(fake, data)


def test_training_through_a_served_reward_masks_failed_samples(tmp_path):
    """`flowpo train` (in this process, the service on a thread) scores through a service that
    cannot score every 4th image; under failure=mask the run finishes, those samples are counted
    and left out."""
    from tests.conftest import flowpo_main

    seen = []

    def flaky_jpeg(images, prompts, metadata):
        out = jpeg_scorer()(images, prompts, metadata).scores
        seen.append(images.shape[0])
        out[::4] = float("nan")  # sent as null: "not scored"
        return RewardOutput(scores=out)

    with LoopbackServer(create_app([flaky_jpeg])) as srv:
        opts = f'{{jpeg_incompressibility: {{url: "{srv.url}", failure: mask, batch_size: 4}}}}'
        proc = flowpo_main(
            "train",
            "-c",
            "configs/tiny_sd3_jpeg.yaml",
            f"--logging.run_dir={tmp_path}",
            "--logging.run_name=remote",
            "--logging.wandb=off",
            "--logging.progress=false",
            "--rollout.batch_size=4",
            "--rollout.num_batches=2",
            "--sampling.num_steps=4",
            "--eval.num_prompts=2",
            "--eval.seeds=0,1",
            "--train.epochs=1",
            f"--reward.options={opts}",
        )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = metrics_rows(tmp_path / "remote")
    train = [r for r in rows if "train/loss" in r]
    assert train and all(r["reward/masked"] > 0 for r in train)
    assert all(math.isfinite(r["train/loss"]) for r in train)
    assert train[0]["reward/jpeg_incompressibility/failed_mean"] == pytest.approx(0.25)
    evals = [r for r in rows if "eval/reward_mean" in r]
    assert evals and all(math.isfinite(r["eval/reward_mean"]) for r in evals)
    assert all(n <= 4 for n in seen)  # the client batches at batch_size


def test_replicas_one_per_worker_and_model_dir_checks(tmp_path):
    from flowpo.rewards.server import build_replicas

    reps = build_replicas("jpeg_incompressibility", "", 2, {"quality": 90})
    assert len(reps) == 2 and reps[0] is not reps[1]
    with pytest.raises(ValueError, match="takes no --model-dir"):
        build_replicas("jpeg_incompressibility", str(tmp_path), 1)
    with pytest.raises(ValueError, match="needs \\['model_dir'\\]"):
        build_replicas("pickscore", "", 1)
