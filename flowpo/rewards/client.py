"""Client of a reward service (`flowpo serve-reward`): the same reward contract as an in-process
reward, over HTTP with JSON and base64 PNG images (never pickle).

Protocol (flowpo/rewards/server.py): `POST /score` {"images": [base64 PNG], "prompts": [...],
"metadata": [{...}]} -> {"scores": [float | null], "details": {name: [float | null]}}; a null
score means the service could not score that sample (it becomes NaN here and is handled by the
reward's failure policy). Errors come back as {"error": {"code", "message"}} with a status.

Retries: timeouts, connection errors and 5xx/408/429 answers are retried with exponential
backoff and jitter until `deadline_s` after the batch was first sent; then a RewardError says
how many attempts were made and what the last error was. Other 4xx answers (401, 413, 400, 422)
and malformed answers are not retried: the same request would fail the same way.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image

from flowpo.rewards.contract import RewardError, RewardOutput, to_uint8_hwc
from flowpo.rewards.registry import known_rewards

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_POSITIVE = ("timeout_s", "deadline_s", "batch_size", "max_concurrency", "backoff_s")


log = logging.getLogger(__name__)


class RewardServiceError(RewardError):
    """The reward service refused a request, answered malformed JSON, or stayed unreachable."""


class RewardRequestRefused(RewardServiceError, ValueError):
    """A 4xx refusal (bad token, oversized batch, rejected inputs): a configuration error that
    no retry fixes, so it always raises, whatever the failure policy."""


def check_client_options(where: str, opts: dict[str, Any]) -> None:
    """Validate reward-service client options; errors name `where.<key>` and the fix."""
    url = str(opts.get("url", ""))
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{where}.url '{url}' must start with http:// or https://")
    for key in _POSITIVE:
        if key in opts:
            try:
                ok = float(opts[key]) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"{where}.{key} ({opts[key]!r}) must be a number > 0")
    if opts.get("token") and opts.get("token_env"):
        raise ValueError(f"{where}: set token or token_env, not both")


def encode_png(images: torch.Tensor) -> list[str]:
    """(B, 3, H, W) float [0, 1] -> base64 PNG strings (lossless, so the service scores the
    same uint8 pixels an in-process reward would)."""
    out = []
    for arr in to_uint8_hwc(images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)  # speed over size
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def _float_or_nan(x: Any, what: str) -> float:
    if x is None:
        return math.nan
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise RewardServiceError(f"{what}: expected a number or null, got {x!r}")
    return float(x)


class JsonHttp:
    """JSON over HTTP with retries: POSTs until an answer, a non-retryable refusal, or the
    deadline. `who` names the caller in errors (e.g. "reward 'pickscore'")."""

    def __init__(
        self,
        base_url: str,
        *,
        who: str,
        token: str = "",
        timeout_s: float = 120.0,
        deadline_s: float = 900.0,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        deadline_field: str = "deadline_s",
    ):
        self.url, self.who, self.token = base_url.rstrip("/"), who, token
        self.timeout_s, self.deadline_s = float(timeout_s), float(deadline_s)
        self.backoff_s, self.backoff_max_s = float(backoff_s), float(backoff_max_s)
        self.deadline_field = deadline_field
        self.attempts = 0  # requests sent (retries included), for logs and tests
        self.retries = 0

    def request(self, method: str, path: str, body: bytes | None, timeout: float) -> tuple:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, payload: dict) -> dict:
        """POST JSON with retries until the deadline; the parsed JSON object answered."""
        body = json.dumps(payload).encode()
        t_end = time.monotonic() + self.deadline_s
        attempt, last = 0, ""
        while True:
            attempt += 1
            self.attempts += 1
            timeout = max(0.05, min(self.timeout_s, t_end - time.monotonic()))
            try:
                status, raw = self.request("POST", path, body, timeout)
            except (TimeoutError, OSError, http.client.HTTPException) as e:
                # timeouts, refused/reset connections, a server that died mid-answer
                last = f"{type(e).__name__}: {e}"
            else:
                if status == 200:
                    return self._parse(raw)
                message = _error_message(raw)
                if status not in RETRY_STATUS:
                    raise RewardRequestRefused(
                        f"{self.who} at {self.url} refused the request ({status}): {message}"
                    )
                last = f"HTTP {status}: {message}"
            # exponential backoff with equal jitter: half fixed, half random, so retrying
            # clients spread out instead of hitting a restarted server at the same instant
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
            delay = delay / 2 + random.uniform(0, delay / 2)
            if time.monotonic() + delay >= t_end:
                raise RewardServiceError(
                    f"{self.who} at {self.url}: no answer after {attempt} attempts in "
                    f"{self.deadline_s:g} s ({self.deadline_field}); last error: {last}"
                )
            self.retries += 1
            time.sleep(delay)

    def _parse(self, raw: bytes) -> dict:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RewardServiceError(f"{self.who} at {self.url} answered invalid JSON: {e}") from e
        if not isinstance(data, dict):
            raise RewardServiceError(f"{self.who} at {self.url} answered a non-object JSON")
        return data


class RemoteReward:
    """A reward scored by a service at `url`; batches of `batch_size` images, up to
    `max_concurrency` requests in flight, per-request `timeout_s`, retries until `deadline_s`."""

    def __init__(
        self,
        url: str,
        *,
        name: str = "remote",
        token: str = "",
        token_env: str = "",
        timeout_s: float = 120.0,
        deadline_s: float = 900.0,
        batch_size: int = 32,
        max_concurrency: int = 2,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ):
        where = f"reward.options.{name}"
        check_client_options(
            where,
            {
                "url": url,
                "token": token,
                "token_env": token_env,
                "timeout_s": timeout_s,
                "deadline_s": deadline_s,
                "batch_size": batch_size,
                "max_concurrency": max_concurrency,
                "backoff_s": backoff_s,
            },
        )
        if token_env:
            token = os.environ.get(token_env, "")
            if not token:
                raise ValueError(f"{where}.token_env: environment variable {token_env} is unset")
        self.name, self.url = name, url.rstrip("/")
        self.batch_size, self.max_concurrency = int(batch_size), int(max_concurrency)
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self.http = JsonHttp(
            url,
            who=f"reward '{name}'",
            token=token,
            timeout_s=timeout_s,
            deadline_s=deadline_s,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
            deadline_field=f"{where}.deadline_s",
        )

    def health(self, timeout: float = 5.0) -> dict:
        status, raw = self.http.request("GET", "/health", None, timeout)
        if status != 200:
            raise RewardServiceError(f"{self.url}/health answered {status}: {raw[:200]!r}")
        try:
            info = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            info = None
        if not isinstance(info, dict):
            raise RewardServiceError(
                f"reward '{self.name}': the server at {self.url} is not a flowpo reward service "
                f"(GET /health answered {raw[:80]!r}); fix reward.options.{self.name}.url"
            )
        return info

    def check(self, wait_s: float | None = None) -> dict:
        """Before training: poll GET /health until the service answers (it may still be loading
        its model) or `wait_s` passes (default: the client's deadline_s, as scoring would wait),
        and check that it does not serve another registered reward. Errors say how to start the
        service or fix reward.options.<name>.url."""
        wait_s = self.http.deadline_s if wait_s is None else wait_s
        t_end, last, shown = time.monotonic() + wait_s, "", False
        while True:
            try:
                info = self.health(timeout=min(5.0, max(0.5, wait_s)))
                break
            except RewardServiceError as e:
                if "not a flowpo reward service" in str(e):
                    raise
                code = str(e).split(" answered ", 1)[-1][:3]
                if code.isdigit() and 400 <= int(code) < 500 and int(code) not in (408, 429):
                    raise RewardServiceError(
                        f"reward '{self.name}': the server at {self.url} refused GET /health "
                        f"({e}); fix reward.options.{self.name}.url"
                    ) from None
                last = str(e)
            except (TimeoutError, OSError, http.client.HTTPException) as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() + 1.0 >= t_end:
                raise RewardServiceError(
                    f"reward '{self.name}': no service answers at {self.url} after {wait_s:g} s "
                    f"({last}); start one with 'flowpo serve-reward --reward {self.name} --port "
                    f"PORT' or fix reward.options.{self.name}.url (the wait is its deadline_s)"
                )
            if not shown:
                log.warning("reward '%s': waiting for the service at %s", self.name, self.url)
                shown = True
            time.sleep(1.0)
        # a service of another registered reward is a wrong url; a custom service may report
        # any name (or none) and is trusted
        served = info.get("reward") if isinstance(info, dict) else None
        if served in known_rewards() and served != self.name:
            raise RewardServiceError(
                f"reward '{self.name}': the service at {self.url} serves {served!r}, not "
                f"'{self.name}'; fix reward.options.{self.name}.url"
            )
        return info

    def _post(self, payload: dict) -> dict:
        with self._slots:  # shared by all calls: concurrent scoring threads stay within the bound
            data = self.http.post("/score", payload)
        if not isinstance(data.get("scores"), list):
            raise RewardServiceError(
                f"reward '{self.name}' at {self.url} answered without a 'scores' list"
            )
        return data

    # -- reward contract -----------------------------------------------------------------------
    def _score_chunk(self, images: list[str], prompts: list[str], metadata: list[dict]) -> tuple:
        data = self._post({"images": images, "prompts": prompts, "metadata": metadata})
        n = len(images)
        if len(data["scores"]) != n:
            raise RewardServiceError(
                f"reward '{self.name}' at {self.url} returned {len(data['scores'])} scores for "
                f"{n} images"
            )
        scores = [_float_or_nan(s, f"scores[{i}]") for i, s in enumerate(data["scores"])]
        details = {}
        for key, vals in (data.get("details") or {}).items():
            if not isinstance(vals, list) or len(vals) != n:
                raise RewardServiceError(
                    f"reward '{self.name}' at {self.url}: details['{key}'] must list {n} values"
                )
            details[key] = [_float_or_nan(v, f"details['{key}']") for v in vals]
        return scores, details

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        b = images.shape[0]
        if len(prompts) != b or len(metadata) != b:
            raise ValueError(f"{b} images but {len(prompts)} prompts, {len(metadata)} metadata")
        encoded = encode_png(images)
        bs = self.batch_size
        chunks = [
            (encoded[i : i + bs], list(prompts[i : i + bs]), list(metadata[i : i + bs]))
            for i in range(0, b, bs)
        ]
        if len(chunks) == 1:
            results = [self._score_chunk(*chunks[0])]
        else:
            with ThreadPoolExecutor(min(self.max_concurrency, len(chunks))) as pool:
                results = list(pool.map(lambda c: self._score_chunk(*c), chunks))
        scores = [s for r, _ in results for s in r]
        keys = set(results[0][1])
        if any(set(d) != keys for _, d in results):
            raise RewardServiceError(f"reward '{self.name}': detail keys differ between batches")
        details = {
            k: torch.tensor([v for _, d in results for v in d[k]], dtype=torch.float32)
            for k in sorted(keys)
        }
        return RewardOutput(scores=torch.tensor(scores, dtype=torch.float32), details=details)


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw).get("error", {})
        return f"{err.get('code', '?')}: {err.get('message', '')}"
    except (ValueError, AttributeError):
        return repr(raw[:200])
