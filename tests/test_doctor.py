"""`flowpo doctor` on a good setup (exit 0, versions, devices, the fast paths) and on a broken one
(exit 1, one FAIL line with its fix per problem: missing model directory, unreachable reward
service, attention backend that cannot run here, stale DeepSpeed build lock)."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from tests.conftest import flowpo_main, free_port

RECIPE = ["-c", "configs/tiny_sd3_jpeg.yaml"]


def _fails(stdout: str) -> list[str]:
    return [ln.strip() for ln in stdout.splitlines() if ln.strip().startswith("FAIL")]


def test_good_setup_reports_versions_devices_and_fast_paths(tmp_path):
    out = flowpo_main("doctor", *RECIPE, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    for name in ("torch", "Triton", "DeepSpeed", "diffusers", "transformers", "peft"):
        assert f"\n  {name} " in text, name
    assert "flash-attn" in text and "CUDA (torch built for)" in text
    assert "CPU only" in text or "cuda:0" in text
    assert "kernels: torch" in text  # auto picks torch off CUDA
    assert "attention: native" in text and "compile: off" in text
    assert "precision: engine.precision=fp32, model.dtype=float32" in text
    assert "model.path tiny:sd3" in text and "build locks: none" in text
    assert not _fails(text) and "nothing would stop a run" in text


def test_broken_setup_one_fail_line_per_problem_with_its_fix(tmp_path):
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))  # an hour old, and no process holds it open
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = flowpo_main(
        "doctor",
        *RECIPE,
        f"--model.path={tmp_path / 'no-such-model'}",
        "--model.attn_backend=flash",
        "--reward.options=" + json.dumps({"jpeg_incompressibility": {"url": url}}),
        TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
    )
    assert out.returncode == 1, out.stdout + out.stderr
    fails = _fails(out.stdout)
    assert len(fails) == 4, "\n".join(fails)
    want = {
        "model.path": ["no-such-model", "does not exist", "--model.path"],
        "attention": ["model.attn_backend=flash", "flash_attn", "pip install"],
        "reward service": [url, "flowpo serve-reward", "reward.options.jpeg_incompressibility.url"],
        "stale lock": [str(lock), f"rm {lock}"],
    }
    for key, words in want.items():
        (line,) = [f for f in fails if key in f]
        assert all(w in line for w in words), line
    assert "4 problem(s)" in out.stdout


def test_recipe_errors_and_refused_settings_fail(tmp_path):
    ext = str(tmp_path / "ext")
    out = flowpo_main("doctor", *RECIPE, "--train.learning_rat=1", TORCH_EXTENSIONS_DIR=ext)
    assert out.returncode == 1 and "DeepSpeed" in out.stdout  # versions still shown
    assert "did you mean 'train.learning_rate'" in _fails(out.stdout)[0]
    out = flowpo_main(
        "doctor",
        *RECIPE,
        "--engine.compile=true",
        "--engine.zero_stage=3",
        "--train.kernels=triton",
        TORCH_EXTENSIONS_DIR=ext,
    )
    assert out.returncode == 1
    text = "\n".join(_fails(out.stdout))
    assert "refused under ZeRO-3" in text and "TRITON_INTERPRET=1" in text
    out = flowpo_main("doctor", *RECIPE, "--engine.compile=true", TORCH_EXTENSIONS_DIR=ext)
    assert out.returncode == 0 and "compile: on" in out.stdout


def test_python_m_flowpo_doctor_is_the_same_command(tmp_path, capsys, monkeypatch):
    import runpy

    from tests.conftest import as_fresh_process

    monkeypatch.setattr(
        sys, "argv", ["flowpo", "doctor", *RECIPE, "--model.path=/nonexistent/model"]
    )
    with as_fresh_process(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")):
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module("flowpo", run_name="__main__")
    assert exit_.value.code == 1
    assert "model.path '/nonexistent/model' does not exist" in capsys.readouterr().out
