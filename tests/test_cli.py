"""Command line: help texts, bad input gives a one-line error naming the problem, make-tiny and
sample work on a directory loaded like real weights. `python -m flowpo` runs in a fresh process
once (the entry point); the rest call the CLI's `main(argv)` in this process."""

import pytest

from tests.conftest import flowpo_main, run_flowpo


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("flowpo: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_help_explains_each_command():
    out = run_flowpo("--help")  # the `python -m flowpo` entry point, in a fresh process
    assert out.returncode == 0
    for cmd in ("train", "sample", "make-tiny"):
        assert cmd in out.stdout
    train = flowpo_main("train", "--help")
    assert train.returncode == 0
    assert "--section.field=value" in train.stdout and "Resume" in train.stdout


def test_unknown_key_error():
    line = _one_line_error(flowpo_main("train", "--train.learning_rat=1e-3"))
    assert "unknown config key 'train.learning_rat'; did you mean 'train.learning_rate'" in line


def test_wrong_type_error():
    line = _one_line_error(flowpo_main("train", "--rollout.group_size=four"))
    assert line.endswith("rollout.group_size: expected an integer, got 'four'")


def test_missing_model_dir_error(tmp_path):
    missing = tmp_path / "no-such-model"
    line = _one_line_error(flowpo_main("train", f"--model.path={missing}"))
    assert f"model.path '{missing}' does not exist" in line


def test_non_divisible_layout_error():
    line = _one_line_error(flowpo_main("train", "--rollout.group_size=5"))
    assert "rollout.group_size (5) must divide the images per epoch" in line


def test_unknown_reward_error(tmp_path):
    line = _one_line_error(flowpo_main("train", "--reward.weights=nope:1"))
    assert "reward.weights: unknown reward 'nope'; choose one of: " in line
    assert "jpeg_compressibility" in line and "pickscore" in line


def test_new_run_into_a_folder_that_holds_one_error(tmp_path):
    """A second `flowpo train` under the same run name without --resume would append its
    metrics to the first run's: it stops before any model loads, naming the ways out."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 0, "reward_mean": 0.5}\n')
    args = ("train", f"--logging.run_dir={tmp_path}", "--logging.run_name=r")
    line = _one_line_error(flowpo_main(*args))
    assert f"logging.run_name 'r': {run} already holds a run" in line
    assert "--resume latest --logging.run_name=r" in line
    assert (run / "metrics.jsonl").read_text().count("\n") == 1 and not (
        run / "config.yaml"
    ).exists()


@pytest.mark.slow
def test_make_tiny_then_sample(tmp_path):
    out = tmp_path / "tiny-sd3"
    proc = flowpo_main("make-tiny", "sd3", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "model_index.json").is_file() and (out / "transformer").is_dir()
    png = tmp_path / "grid.png"
    proc = flowpo_main(
        "sample",
        "--model",
        str(out),
        "--prompt",
        "a red circle",
        "--num",
        "2",
        "--steps",
        "4",
        "--out",
        str(png),
    )
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    img = Image.open(png)
    assert img.width > img.height > 0
