import os
import subprocess
import sys
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


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny sd3 and flux model directories built once per test session."""
    from flowpo.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_tiny(fam, str(root / fam), seed=0) for fam in ("sd3", "flux")}
