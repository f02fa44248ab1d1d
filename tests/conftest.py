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
    config.addinivalue_line(
        "markers",
        "two_rank(group): the test reads the 2-rank group GROUP (conftest.two_rank_group) from "
        "the session's one 2-rank launch (the `two_rank` fixture)",
    )


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
    left open is closed (with DeepSpeed's cached groups), so the next block starts clean; the
    block starts and ends with torch's own torch.nn.functional.linear (a ZeRO-3 engine replaces
    it with DeepSpeed's for the rest of the process, which rounds some layers differently)."""
    import numpy as np
    import torch

    saved_env, cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    os.environ.clear()
    os.environ.update(ENV, **env)
    os.chdir(ROOT)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    torch.nn.functional.linear = torch._C._nn.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = torch._C._nn.linear
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


def kill_tree(pid: int) -> None:
    """SIGKILL process PID, its process group and every process below it, and wait until they
    are gone. torchrun starts each rank in a session of its own, so killing the launcher's
    group alone would leave the ranks running (and writing) without it."""
    import signal

    import psutil

    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for p in below:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(below, timeout=60)


def sigkill_at_checkpoint(cmd: list[str], run_dir: Path, checkpoint: str = "checkpoint-1"):
    """Start CMD (a training run writing to RUN_DIR) in its own process group and SIGKILL the
    whole job (`kill_tree`: the launcher and every rank) as soon as `checkpoints/latest` names
    CHECKPOINT; asserts it was killed, not finished. For the exact-resume tests."""
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
    try:
        pointer = Path(run_dir) / "checkpoints" / "latest"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if pointer.is_file() and pointer.read_text().strip() == checkpoint:
                break
            time.sleep(0.02)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run must be killed before it finishes"


def run_group(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run CMD in a fresh process group (cwd ROOT, env ENV, text output captured); returns the
    CompletedProcess. A timeout or an interrupt SIGKILLs the launcher and every process below
    it (`kill_tree`): no rank process outlives the call."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        kill_tree(proc.pid)
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_ok(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run CMD (`run_group`: its own process group; a timeout kills every rank) and assert it
    exits 0, showing the tail of its output otherwise."""
    proc = run_group(cmd, timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


# A tiny SD3 run on the jpeg reward that checks training mechanics (steps, checkpoints every
# epoch, skipped steps): 3 sampling steps, 4 images, no evaluations.
TINY_CHECKPOINTED_RUN = [
    "train",
    "-c",
    "configs/tiny_sd3_jpeg.yaml",
    "--logging.wandb=off",
    "--logging.progress=false",
    "--sampling.num_steps=3",
    "--rollout.batch_size=4",
    "--rollout.num_batches=1",
    "--checkpoint.every=1",
    "--checkpoint.keep_last_n=0",
    *NO_EVAL,
]


def poison_grpo_loss(monkeypatch, epochs: set[int], what: str) -> None:
    """Make GRPO's per-transition loss non-finite in `epochs`: `loss` (the loss itself) or
    `log_prob` (a NaN re-scored log-probability next to a finite loss)."""
    import torch

    from flowpo.trainer.algorithms import GRPO

    real = GRPO.loss

    def loss(self, sub, j, embeds, adv, *, epoch, start):
        term = real(self, sub, j, embeds, adv, epoch=epoch, start=start)
        if epoch in epochs:
            if what == "loss":
                term.loss = term.loss * float("inf") * 0.0  # NaN, still attached to the graph
            else:
                term.log_probs = (torch.full_like(term.log_probs[0], float("nan")),)
        return term

    monkeypatch.setattr(GRPO, "loss", loss)


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


# -- every 2-rank case of the session in one torchrun launch, beside the other tests ------------
# A torchrun launch costs two fresh processes importing torch, DeepSpeed and diffusers before any
# case runs: the test modules declare their 2-rank cases as groups (`two_rank_group`) and mark the
# tests that read them (`@pytest.mark.two_rank(GROUP)`); the session starts one launch of
# tests/dist_update.py with the cases of every collected marked test (`two_rank_launch`), which
# runs while the other tests run (they compute on one thread, so a 2-core machine has a core
# free most of the time), and the marked tests run last (`pytest_collection_modifyitems`),
# reading their own cases' results (`two_rank`).
ZERO3_P0 = "--engine.ds_config=<zero3_threshold0>"  # the `zero3_threshold0` template, at launch
# a tiny random CLIP + LAION-layout head (rewards/tiny.py), built at launch: the `aesthetic`
# reward's model_dir for train cases that need a reward continuous in the pixels
TINY_AESTHETIC = "<tiny_aesthetic>"


@dataclass(frozen=True)
class TwoRankGroup:
    """2-rank cases on one tiny model (`family`, its recipe): `cases` pairs a case name with
    its overrides (kind "update": dist_update.run_case) or with `flowpo` arguments (kind "train":
    a whole run, given --model.path, --logging.run_dir and --logging.run_name=CASE; `poison`
    (RANK, EPOCHS) makes GRPO's loss NaN on rank RANK alone in EPOCHS, dist_update.poisoned);
    kind "bench_memory" is bench_memory's per-rank measurement (no cases)."""

    name: str
    family: str = "sd3"
    recipe: str = "tiny_sd3_jpeg"
    cases: tuple = ()  # (case name, overrides) pairs
    kind: str = "update"
    poison: tuple = ()  # kind "train": (rank, (epochs...)), see dist_update.poisoned


def two_rank_group(name: str, cases: dict | None = None, **fields) -> TwoRankGroup:
    """The 2-rank group NAME (a unique prefix of its case names), for `pytest.mark.two_rank`
    and `two_rank.results`."""
    pairs = tuple((case, tuple(overrides)) for case, overrides in (cases or {}).items())
    return TwoRankGroup(name, cases=pairs, **fields)


@dataclass
class TrainRun(Completed):
    """A "train" case of the 2-rank launch: both ranks' output and the run directory."""

    run_dir: Path = None


class TwoRankResults:
    """The outcome of the session's one 2-rank launch; each test asks for its own group."""

    def __init__(self, out: Path, proc, launched: list[str]):
        self.out, self.proc, self.launched = out, proc, launched

    def _missing(self, group: TwoRankGroup, case: str) -> str:
        if group.name not in self.launched:
            return f"2-rank group {group.name!r} was not launched (no collected test marks it)"
        p = self.proc
        return (
            f"2-rank case {group.name}.{case} did not finish: the launch exited {p.returncode} "
            "(each rank prints '[dist_update] rank R: case NAME' as a case starts)\n"
            + p.stdout[-3000:]
            + p.stderr[-5000:]
        )

    def results(self, group: TwoRankGroup) -> dict:
        """{case: dist_update.run_case's result} of an update group."""
        import torch

        res = {}
        for case, _ in group.cases:
            path = self.out / f"{group.name}.{case}.pt"
            if not path.is_file():
                pytest.fail(self._missing(group, case), pytrace=False)
            res[case] = torch.load(path, weights_only=False)
        return res

    def runs(self, group: TwoRankGroup, world: int = 2) -> dict[str, "TrainRun"]:
        """{case: TrainRun} of a "train" group; asserts each run exited 0 on every rank (as
        `run_ok` does), showing the tail of its output otherwise."""
        res = {}
        for case, _ in group.cases:
            base = self.out / f"{group.name}.{case}"
            rcs = [Path(f"{base}.rank{r}.rc") for r in range(world)]
            if not all(rc.is_file() for rc in rcs):
                pytest.fail(self._missing(group, case), pytrace=False)
            out = "".join(Path(f"{base}.rank{r}.out").read_text() for r in range(world))
            err = "".join(Path(f"{base}.rank{r}.err").read_text() for r in range(world))
            codes = [int(rc.read_text()) for rc in rcs]
            assert codes == [0] * world, (group.name, case, codes, out[-3000:] + err[-5000:])
            res[case] = TrainRun(0, out, err, self.out / "runs" / group.name / case)
        return res

    def rows(self, group: TwoRankGroup, world: int = 2) -> list[dict]:
        """Every rank's rows of a bench_memory group, as bench_memory.run_ranks returns them."""
        import json

        rows = []
        for r in range(world):
            path = self.out / f"{group.name}.rank{r}.json"
            if not path.is_file():
                pytest.fail(self._missing(group, f"rank{r}"), pytrace=False)
            rows += json.loads(path.read_text())
        return rows


def _two_rank_groups(items) -> dict[str, TwoRankGroup]:
    """The groups of the marked tests among ITEMS, in collection order."""
    groups: dict[str, TwoRankGroup] = {}
    for item in items:
        for mark in item.iter_markers("two_rank"):
            group = mark.args[0]
            assert groups.setdefault(group.name, group) == group, f"two groups {group.name!r}"
    return groups


def _two_rank_cases(items, out: Path, models: Path, tiny_cache: str, zero3: str):
    """The marked tests' groups (collection order) and dist_update's case list for them."""
    groups = _two_rank_groups(items)
    model_dirs: dict[str, str] = {}
    cases = []
    for group in groups.values():
        if group.kind == "bench_memory":
            cases.append({"name": group.name, "kind": "bench_memory"})
            continue
        if group.family not in model_dirs:
            model_dirs[group.family] = tiny_model(tiny_cache, group.family, models / group.family)
        model = model_dirs[group.family]
        if group.kind == "train":  # flowpo ARGS, in the group's run directory, named CASE
            for case, args in group.cases:
                args = [a.replace("<zero3_threshold0>", zero3) for a in args]
                if any(TINY_AESTHETIC in a for a in args):
                    aesthetic = models / "aesthetic"
                    if not aesthetic.is_dir():
                        from flowpo.rewards.tiny import make_tiny_aesthetic

                        make_tiny_aesthetic(str(aesthetic))
                    args = [a.replace(TINY_AESTHETIC, str(aesthetic)) for a in args]
                args += [f"--model.path={model}", f"--logging.run_name={case}"]
                args.append(f"--logging.run_dir={out / 'runs' / group.name}")
                entry = {"name": f"{group.name}.{case}", "kind": "train", "args": args}
                if group.poison:
                    entry["poison"] = [group.poison[0], list(group.poison[1])]
                cases.append(entry)
            continue
        for case, overrides in group.cases:
            overrides = [o.replace("<zero3_threshold0>", zero3) for o in overrides]
            cases.append(
                {
                    "name": f"{group.name}.{case}",
                    "kind": "update",
                    "model": model,
                    "recipe": group.recipe,
                    "overrides": overrides,
                }
            )
    return list(groups), cases


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The tests of minutes (marked `heavy`) run first, so that under xdist the worker that
    draws one is not the last to finish; the tests that read the 2-rank launch run last (in
    their order), so that the launch, started with the session, runs beside every other test
    before anything waits for it."""

    def rank(item) -> int:
        if item.get_closest_marker("heavy"):
            return 0
        return 2 if item.get_closest_marker("two_rank") else 1

    items.sort(key=rank)  # stable: the collection order within each group


def _die_with_parent() -> None:
    """In the launched process, before exec: SIGTERM when the test process dies (Linux), which
    torchrun passes on to its ranks."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_INTERRUPTED = []  # set by pytest_keyboard_interrupt: a launch still running is killed, not awaited


def pytest_keyboard_interrupt(excinfo):
    _INTERRUPTED.append(True)


def _xdist_worker() -> str:
    """This process's pytest-xdist worker id ("gw0", ...), "" without xdist."""
    return os.environ.get("PYTEST_XDIST_WORKER", "")


def _write_when_done(proc, out: Path) -> None:
    """In a thread: the launch's exit status to out/returncode once it ends, for the worker
    that reads the results when another worker launched (pytest-xdist)."""
    proc.wait()
    (out / "returncode.tmp").write_text(str(proc.returncode))
    (out / "returncode.tmp").rename(out / "returncode")


@pytest.fixture(scope="session", autouse=True)
def two_rank_launch(request, tmp_path_factory, tiny_cache, zero3_threshold0):
    """Starts the session's one 2-rank launch (when a collected test is marked two_rank) in
    its own process group, output to files; yields (out dir, groups, Popen or None). Under
    pytest-xdist the first worker to start launches for the whole session, into a folder every
    worker sees, and keeps the launch until it ends (the worker that runs the marked tests may be
    another); a launch still running when the session is interrupted or its own worker is the
    only reader is SIGKILLed (`kill_tree`): no rank outlives the session."""
    import json
    import threading

    worker = _xdist_worker()
    base = tmp_path_factory.getbasetemp()
    out = (base.parent if worker else base) / "two_rank_launch"
    try:
        out.mkdir()  # the first worker to get here launches
    except FileExistsError:
        yield out, list(_two_rank_groups(request.session.items)), None
        return
    groups, cases = _two_rank_cases(
        request.session.items,
        out,
        tmp_path_factory.mktemp("two_rank_models"),
        tiny_cache,
        zero3_threshold0,
    )
    proc = None
    if cases:
        spec = out / "cases.json"
        spec.write_text(json.dumps(cases, indent=1))
        script = str(ROOT / "tests" / "dist_update.py")
        with open(out / "stdout.txt", "w") as o, open(out / "stderr.txt", "w") as e:
            proc = subprocess.Popen(
                torchrun_cmd(2, script, str(out), str(spec)),
                cwd=ROOT,
                env=ENV,
                stdout=o,
                stderr=e,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        threading.Thread(target=_write_when_done, args=(proc, out), daemon=True).start()
    else:
        (out / "returncode").write_text("0")
    try:
        yield out, groups, proc
    finally:
        if proc is not None and proc.poll() is None:
            if worker and not _INTERRUPTED:  # another worker may still read it
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1500)
            kill_tree(proc.pid)
            proc.wait()


@pytest.fixture(scope="session")
def two_rank(two_rank_launch) -> TwoRankResults:
    """The session's 2-rank launch, finished: waits for it (the first marked test), then every
    marked test reads its own cases (`results`, `runs`, `rows`)."""
    import time

    out, groups, proc = two_rank_launch
    deadline = time.monotonic() + 1500
    while not (out / "returncode").is_file():  # written by the launching worker's thread
        if time.monotonic() > deadline:
            raise TimeoutError(f"the 2-rank launch in {out} did not finish in 1500 s")
        time.sleep(0.5)
    done = None
    if (out / "cases.json").is_file():
        done = subprocess.CompletedProcess(
            ["torchrun", "tests/dist_update.py"],
            int((out / "returncode").read_text()),
            (out / "stdout.txt").read_text(),
            (out / "stderr.txt").read_text(),
        )
    return TwoRankResults(out, done, groups)
