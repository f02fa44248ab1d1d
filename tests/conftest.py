import os
import socket
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


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny sd3 and flux model directories built once per test session."""
    from flowpo.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_tiny(fam, str(root / fam), seed=0) for fam in ("sd3", "flux")}


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
