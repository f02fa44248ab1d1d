#!/usr/bin/env bash
# Create (or reuse) .venv and install flowpo with its dev extras. CPU torch is pinned by
# constraints.txt so pip never pulls a multi-GB CUDA build; on a GPU machine install your CUDA
# torch into the environment first (or set FLOWPO_NO_CONSTRAINTS=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.flowpo-installed
want=$(cat setup.py constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if [ "${FLOWPO_NO_CONSTRAINTS:-0}" = "1" ]; then
    .venv/bin/python -m pip install -q -e ".[dev]"
  else
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
  fi
  # hpsv2's tokenizer reads open_clip's bundled BPE vocabulary; --no-deps: open_clip requires
  # torchvision, and PyPI's torchvision (a CUDA build) breaks transformers on a CPU torch
  .venv/bin/python -m pip install -q --no-deps -c constraints.txt open-clip-torch
  echo "$want" > "$stamp"
fi
# DeepSpeed compiles its CPU shared-memory comm op on first use (30-70 s) under a lock file in
# torch's extension cache; build it here, once, so no run compiles it (a stale lock stops this
# with the file to delete instead of waiting forever). Skipped where CUDA is present.
if ! .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  .venv/bin/python - <<'PY'
import sys

from flowpo.trainer.engine import build_jit_ops
from flowpo.trainer.jit_lock import StaleExtensionLock

try:
    build_jit_ops()
except StaleExtensionLock as e:
    sys.exit(f"setup: error: {e}")
PY
fi
