"""The reward service: one reward model behind HTTP, JSON in and out, images as base64 PNG.

    flowpo serve-reward --reward pickscore --model-dir /models/PickScore_v1 --port 8101
    flowpo serve-reward --reward ocr --workers 2 --token-env FLOWPO_REWARD_TOKEN

Endpoints:
- `GET /health` -> {"status": "ok", "reward", "workers", "max_batch", "max_body_bytes"} (no
  token needed, so load balancers can probe it).
- `POST /score` {"images": [base64 PNG], "prompts": [str], "metadata": [object] (optional)}
  -> 200 {"scores": [float | null], "details": {name: [float | null]}}; null marks a sample
  the reward could not score (JSON has no NaN).

Errors are JSON {"error": {"code", "message"}}, never a traceback: 400 malformed JSON, a field
of the wrong type, an image that is not base64 PNG or is too large; 401 missing or wrong bearer
token; 413 body over `max_body_bytes` or more than `max_batch` images; 422 the reward rejected
the request (its ValueError, e.g. missing metadata); 500 the reward failed; 504 scoring took
longer than `score_timeout_s`. Nothing is ever unpickled: the only decoders are json, base64
and PIL's PNG plugin.

Workers: one replica of the reward per device (`cuda:i` when there are GPUs); each request
takes a free replica, so N replicas score N batches at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from flowpo.rewards.contract import RewardFn, RewardOutput

log = logging.getLogger("flowpo.reward_server")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RequestError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def decode_png(text: Any, i: int, max_side: int) -> torch.Tensor:
    """base64 PNG -> (3, H, W) float [0, 1]; RequestError(400) on anything else."""
    from PIL import Image, PngImagePlugin

    if not isinstance(text, str):
        raise RequestError(400, "bad_image", f"images[{i}] must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "bad_image", f"images[{i}] is not valid base64") from None
    if not raw.startswith(PNG_SIGNATURE):
        raise RequestError(400, "bad_image", f"images[{i}] is not a PNG (send PNG only)")
    try:
        # PngImageFile directly: no other format plugin ever parses client bytes
        img = PngImagePlugin.PngImageFile(io.BytesIO(raw))
        w, h = img.size
        if max(w, h) > max_side:
            raise RequestError(
                400, "image_too_large", f"images[{i}] is {w}x{h}; the limit is {max_side} px"
            )
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except RequestError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(400, "bad_image", f"images[{i}] is not a readable PNG: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def parse_request(body: bytes, max_batch: int, max_side: int) -> tuple:
    """JSON body -> (images [(3, H, W)], prompts, metadata), or RequestError."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, "bad_json", f"body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "bad_request", "body must be a JSON object")
    images, prompts = data.get("images"), data.get("prompts")
    metadata = data.get("metadata")
    if not isinstance(images, list) or not images:
        raise RequestError(400, "bad_request", "'images' must be a non-empty list")
    if len(images) > max_batch:
        raise RequestError(
            413, "batch_too_large", f"{len(images)} images; this service takes <= {max_batch}"
        )
    n = len(images)
    if not isinstance(prompts, list) or len(prompts) != n:
        raise RequestError(400, "bad_request", f"'prompts' must be a list of {n} strings")
    if not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, "bad_request", "'prompts' must hold strings")
    if metadata is None:
        metadata = [{} for _ in range(n)]
    if not isinstance(metadata, list) or len(metadata) != n:
        raise RequestError(400, "bad_request", f"'metadata' must be a list of {n} objects")
    if not all(isinstance(m, dict) for m in metadata):
        raise RequestError(400, "bad_request", "'metadata' must hold JSON objects")
    tensors = [decode_png(t, i, max_side) for i, t in enumerate(images)]
    return tensors, prompts, metadata


def _jsonable(values: torch.Tensor) -> list[float | None]:
    return [None if not math.isfinite(v) else v for v in values.detach().float().cpu().tolist()]


def score_batch(fn: RewardFn, images: list[torch.Tensor], prompts, metadata) -> dict:
    """Score images of possibly different sizes: one call per size, answers in request order."""
    n = len(images)
    by_size: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(tuple(im.shape), []).append(i)
    scores = torch.full((n,), float("nan"))
    details: dict[str, torch.Tensor] = {}
    for idx in by_size.values():
        out: RewardOutput = fn(
            torch.stack([images[i] for i in idx]),
            [prompts[i] for i in idx],
            [metadata[i] for i in idx],
        )
        if tuple(out.scores.shape) != (len(idx),):
            raise RuntimeError(
                f"reward returned {tuple(out.scores.shape)} scores for {len(idx)} images"
            )
        scores[idx] = out.scores.detach().float().cpu()
        for k, v in out.details.items():
            details.setdefault(k, torch.full((n,), float("nan")))[idx] = v.detach().float().cpu()
    return {"scores": _jsonable(scores), "details": {k: _jsonable(v) for k, v in details.items()}}


def create_app(
    replicas: Sequence[RewardFn],
    *,
    name: str = "reward",
    token: str = "",
    max_batch: int = 64,
    max_body_bytes: int = 64 * 2**20,
    max_side: int = 4096,
    score_timeout_s: float = 600.0,
) -> Any:
    """A Starlette app scoring with `replicas` (one per device)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    if not replicas:
        raise ValueError("the reward service needs at least one worker")
    free: queue.Queue = queue.Queue()
    for r in replicas:
        free.put(r)

    def error(status: int, code: str, message: str, headers=None) -> JSONResponse:
        return JSONResponse(
            {"error": {"code": code, "message": message}}, status_code=status, headers=headers
        )

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                "reward": name,
                "workers": len(replicas),
                "free_workers": free.qsize(),
                "max_batch": max_batch,
                "max_body_bytes": max_body_bytes,
            }
        )

    def run_scorer(images, prompts, metadata) -> dict:
        fn = free.get()  # blocks until a replica is free
        try:
            return score_batch(fn, images, prompts, metadata)
        finally:
            free.put(fn)

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            raise RequestError(
                413, "body_too_large", f"body of {length} bytes; the limit is {max_body_bytes}"
            )
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounds chunked bodies without a length
            size += len(chunk)
            if size > max_body_bytes:
                raise RequestError(
                    413, "body_too_large", f"body over the limit of {max_body_bytes} bytes"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    async def score(request: Request) -> JSONResponse:
        try:
            if token:
                got = request.headers.get("authorization", "")
                # constant-time comparison: the answer time tells nothing about the token
                if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
                    raise RequestError(401, "unauthorized", "missing or wrong bearer token")
            body = await read_body(request)
            images, prompts, metadata = await run_in_threadpool(
                parse_request, body, max_batch, max_side
            )
            result = await asyncio.wait_for(
                run_in_threadpool(run_scorer, images, prompts, metadata), score_timeout_s
            )
        except RequestError as e:
            headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
            return error(e.status, e.code, e.message, headers)
        except asyncio.TimeoutError:
            return error(504, "timeout", f"scoring took longer than {score_timeout_s:g} s")
        except ValueError as e:  # the reward rejects these inputs: retrying will not help
            return error(422, "rejected", f"{type(e).__name__}: {e}")
        except Exception as e:
            log.exception("reward '%s' failed", name)
            return error(500, "reward_failed", f"{type(e).__name__}: {e}")
        return JSONResponse(result)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, "http_error", str(exc.detail))

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error(500, "internal", type(exc).__name__)

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/score", score, methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )


def build_replicas(
    reward: str, model_dir: str, workers: int, options: dict[str, Any] | None = None
) -> list[RewardFn]:
    """`workers` replicas of reward `reward`, replica i on cuda:i when GPUs exist (and the
    reward takes a `device`), else all on CPU."""
    import inspect

    from flowpo.rewards.registry import REWARD_REGISTRY, check_factory_kwargs, reward_factory

    if reward not in REWARD_REGISTRY:
        raise ValueError(
            f"--reward '{reward}' is unknown; choose one of: {sorted(REWARD_REGISTRY)}"
        )
    kwargs = dict(options or {})
    factory = reward_factory(reward)
    params = inspect.signature(factory).parameters
    if model_dir:
        if "model_dir" not in params:
            raise ValueError(f"reward '{reward}' takes no --model-dir")
        kwargs["model_dir"] = model_dir
    check_factory_kwargs(reward, kwargs, f"serve-reward {reward}")
    gpus = torch.cuda.device_count()
    if workers > 1 and gpus and workers > gpus:
        raise ValueError(f"--workers {workers} exceeds the {gpus} visible GPUs (one per GPU)")
    out = []
    for i in range(workers):
        kw = dict(kwargs)
        if "device" in params and gpus:
            kw.setdefault("device", f"cuda:{i}")
        out.append(factory(**kw))
    return out


def serve(app: Any, host: str = "127.0.0.1", port: int = 8100, log_level: str = "info") -> None:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable beyond this machine; set --token", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30)


class ThreadedServer:
    """uvicorn serving `app` in a background thread on `host` and a port the OS picks
    (`.url`); a context manager. For tests and notebooks; `serve` is the command's path."""

    def __init__(self, app: Any, host: str = "127.0.0.1"):
        import socket

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="error", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        t_end = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > t_end:
                raise RuntimeError("reward server did not start within 10 s")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def make_app_from_args(
    reward: str,
    model_dir: str = "",
    workers: int = 1,
    token: str = "",
    options: dict[str, Any] | None = None,
    **limits: Any,
) -> Any:
    return create_app(
        build_replicas(reward, model_dir, workers, options), name=reward, token=token, **limits
    )
