import contextlib
import io
import os
import random
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# quiet, offline, deterministic subprocess runs
ENV = {
    **os.environ,
    "WANDB_MODE": "disabled",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_OFFLINE": "1",
    # one thread: on 2 shared cores, 2 OpenMP threads stall badly whenever anything else runs
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
}
for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(key, None)


def pytest_configure(config):
    """The tests' own process computes with the same thread count as the processes they start
    (OMP_NUM_THREADS, default 1): on 2 shared cores, tiny-model tests run about twice as fast
    with one thread as with two."""
    import torch

    torch.set_num_threads(int(ENV["OMP_NUM_THREADS"]))


def free_port() -> int:
    """A loopback TCP port that nothing listens on (just released by the OS)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_flowpo(*args: str, cwd: Path | None = None, timeout: int = 600):
    """Run `python -m flowpo ARGS` in a fresh process; returns CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "flowpo", *args],
        cwd=cwd or ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class Completed:
    """What `flowpo_main` returns: the fields of subprocess.CompletedProcess that tests read."""

    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def as_fresh_process(**env: str):
    """Run a block the way a fresh `run_flowpo` process would run: environment ENV (plus
    `env`), cwd ROOT, OMP_NUM_THREADS torch threads. Afterwards the environment, cwd, thread
    count and the python / numpy / torch RNG states are put back, and a process group the block
    left open is closed (with DeepSpeed's cached groups), so the next block starts clean."""
    import numpy as np
    import torch

    saved_env, cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    os.environ.clear()
    os.environ.update(ENV, **env)
    os.chdir(ROOT)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if "deepspeed" in sys.modules:
            # the trainer destroys its group through torch.distributed, which leaves
            # DeepSpeed's cached groups pointing at it; a later run in this process needs them
            # gone (deepspeed.comm.destroy_process_group would release them)
            from deepspeed.utils import groups

            groups._release_process_group_references()
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(cwd)
        torch.set_num_threads(threads)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])


def flowpo_main(*args: str, **env: str) -> Completed:
    """`flowpo ARGS` in this process (`flowpo.cli.main`) under `as_fresh_process(**env)`:
    stdout and stderr captured, the exit status a process would have (2 for a one-line error
    or a usage error). No process start and no torch / DeepSpeed / diffusers import: use it
    wherever the process boundary is not what a test checks (launchers, signals and several
    ranks keep `run_flowpo` / torchrun)."""
    from flowpo.cli import main

    out, err = io.StringIO(), io.StringIO()
    with as_fresh_process(**env):
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(list(args))
                except SystemExit as e:  # argparse: --help (0) and usage errors (2)
                    code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # a crash: show what the run printed (pytest captures it)
            print(out.getvalue()[-4000:])
            print(err.getvalue()[-4000:], file=sys.stderr)
            raise
    return Completed(code, out.getvalue(), err.getvalue())


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    """The command line of `torchrun` with NPROC local ranks on a free loopback port."""
    return [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *args,
    ]


def sigkill_at_checkpoint(cmd: list[str], run_dir: Path, checkpoint: str = "checkpoint-1"):
    """Start CMD (a training run writing to RUN_DIR) in its own process group and SIGKILL the
    whole group as soon as `checkpoints/latest` names CHECKPOINT; asserts it was killed, not
    finished. For the exact-resume tests."""
    import signal
    import time

    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    pointer = Path(run_dir) / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pointer.is_file() and pointer.read_text().strip() == checkpoint:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run must be killed before it finishes"


def run_ok(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run CMD in a fresh process (cwd ROOT, env ENV, text output captured) and assert it exits
    0, showing the tail of its output otherwise."""
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metrics_rows(run: Path) -> list[dict]:
    """Every row of RUN/metrics.jsonl, training and evaluation, in the order written."""
    import json

    return [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def train_rows(run: Path) -> list[dict]:
    """The training rows of RUN/metrics.jsonl (evaluation rows carry only eval/ keys)."""
    return [r for r in metrics_rows(run) if "train/loss" in r]


def euler_sample(adapter, x, embeds, steps: int):
    """The plain ODE loop the trainer's sampler reduces to, without gradients:
    x += (σ_{i+1} − σ_i)·v(x, σ_i) over the adapter's `steps`-step schedule."""
    import torch

    sig = adapter.sigmas(steps, x)
    with torch.no_grad():
        for i in range(steps):
            v = adapter.velocity(x, sig[i].expand(x.shape[0]), embeds)
            x = x + (sig[i + 1] - sig[i]) * v
    return x


# Training runs that check the training mechanics only (losses, ratios, checkpoints): no start
# and end evaluation (eval.at_start / eval.at_end), the slowest part of a short tiny run.
NO_EVAL = ["--eval.at_start=false", "--eval.at_end=false"]


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    """One tiny model per (family, seed) for the whole session: `tiny:FAMILY` runs, in this
    process and in subprocesses (ENV), copy it from here instead of building their own."""
    from flowpo.models.resolve import TINY_CACHE_ENV

    path = str(tmp_path_factory.mktemp("tiny_cache"))
    old = os.environ.get(TINY_CACHE_ENV)
    os.environ[TINY_CACHE_ENV] = ENV[TINY_CACHE_ENV] = path
    yield path
    ENV.pop(TINY_CACHE_ENV, None)
    if old is None:
        os.environ.pop(TINY_CACHE_ENV, None)
    else:
        os.environ[TINY_CACHE_ENV] = old


def tiny_model(cache: str, family: str, out: Path, seed: int = 0) -> str:
    """A copy of the session's tiny `family` model at `out` (tests may write next to it)."""
    from flowpo.models.resolve import cached_tiny

    shutil.copytree(cached_tiny(family, cache, seed=seed), out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tiny_cache):
    """Tiny sd3 and flux model directories (seed 0), built once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: tiny_model(tiny_cache, fam, root / fam) for fam in ("sd3", "flux")}


def add_active_lora(adapter, seed: int = 0):
    """Add a peft LoRA (r 4) on the adapter's targets with random B != 0, so the adapters
    change the output; the base weights are frozen. Returns the trainable module."""
    import torch
    from peft import LoraConfig

    module = adapter.trainable_module
    module.requires_grad_(False)
    module.add_adapter(
        LoraConfig(
            r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=adapter.lora_targets
        )
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture(scope="session")
def zero3_threshold0(tmp_path_factory) -> str:
    """ZeRO-3 template with no persisted parameters: every tiny tensor is really partitioned."""
    import json

    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_p0.json"
    path.write_text(json.dumps(ds))
    return str(path)
