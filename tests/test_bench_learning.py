"""The learning-speed benchmark's prompt pick (benchmarks/bench_learning.py select --pick)."""

from tests.conftest import ROOT, load_benchmark


def _bench():
    return load_benchmark("bench_learning")


def _rows():
    tags = {"two_object": 2, "counting": 3, "position": 10, "color_attr": 12}
    return [({"tag": t, "prompt": f"{t} {i}"}, 0.3, 16) for t, n in tags.items() for i in range(n)]


def test_pick_spreads_over_tags_and_is_fixed_by_its_seed():
    bench = _bench()
    rows = _rows()
    picked = bench.pick_stratified(rows, 8, seed=0)
    tags = [m["tag"] for m in picked]
    # round robin in the world's tag order: 2 two_object, 2 counting, 2 position, 2 color_attr
    assert {t: tags.count(t) for t in set(tags)} == {
        "two_object": 2,
        "counting": 2,
        "position": 2,
        "color_attr": 2,
    }
    assert len({m["prompt"] for m in picked}) == 8
    assert picked == bench.pick_stratified(rows, 8, seed=0)
    others = [bench.pick_stratified(rows, 8, seed=s) for s in range(1, 6)]
    assert any(o != picked for o in others)


def test_pick_takes_what_a_short_tag_leaves_from_the_others():
    bench = _bench()
    picked = bench.pick_stratified(_rows(), 12, seed=3)
    tags = [m["tag"] for m in picked]
    # two_object runs out after 2; the rest fill from the later tags in turn
    assert tags.count("two_object") == 2 and tags.count("counting") == 3
    assert tags.count("position") + tags.count("color_attr") == 7
    assert len(bench.pick_stratified(_rows(), 100, seed=0)) == len(_rows())


def test_run_stops_with_flowpos_own_error_not_a_traceback(tmp_path):
    """A bad override makes `flowpo train` fail on its config; the benchmark then stops with one
    line naming the failed command (flowpo's own message above it names the field), no
    traceback and no results row."""
    import subprocess
    import sys

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"tag": "colors", "prompt": "a photo of a red circle"}\n')
    csv = tmp_path / "speed.csv"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_learning.py"), "--work",
         str(tmp_path / "w"), "--prompts", str(prompts), "--csv", str(csv), "run", "x",
         "--epochs", "1", "--", "--train.learning_rat=1e-3"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "did you mean 'train.learning_rate'" in proc.stderr
    assert "`flowpo train` failed (exit 2)" in proc.stderr
    assert "Traceback" not in proc.stderr and not csv.exists()
