"""Where a user waits: a stage's start-up, a no-op run, the default run, the test suite.

In a clone-like copy of the project under --work (the files git tracks or would track, one
commit, params.yaml as committed):
- `default_run_seconds`: `otcurate run` from nothing (the built-in default; the venv is
  installed), wall clock; `--default-repeats` fresh copies. The run starts its own stage
  worker (otcurate_pipeline.stageworker.for_run); with `--plain-default`, interleaved, the
  same run with every stage in its own process (OTCURATE_STAGE_WORKER=0); with `--baseline
  REV`, interleaved, the default run of commit REV with its own code (a same-machine A/B).
- `noop_run_seconds`: `otcurate run` again with nothing changed; `--repeats` times.
- `changed_run_seconds`: `otcurate run --set evaluate.batch_size=<a new value>`, a change
  that reruns one stage (evaluate) through the Prefect flow, MLflow records and all;
  `--repeats` times, each with a value not run before (no run-cache restore), with the
  run's MLflow records written by the recorder's process (the default) and, interleaved,
  by the flow itself (OTCURATE_TRACKING_PROCESS=0, as before that process existed).
- `startup_seconds` (case = the stage): `python -m stages.<name>` with its cmd from dvc.yaml,
  from the spawn to its first line of output (params read and checked, its input opened:
  the first unit of work); `--repeats` times each, the process stopped there.
- `stage_run_seconds` (case = the stage, plain or through a stage worker): a whole stage
  run, its cmd from dvc.yaml on the default run's outputs (`--whole` stages), as a plain
  process and forked from a stage worker that imported torch and open_clip once
  (otcurate_pipeline.stageworker, which the pipeline tests use); `--repeats` times each.
- `calibration_step_seconds` (unless `--no-calibrate`): one fine-tuning step before and after
  the runs (`bench.speed --only steps`), this machine's speed that day.
- `suite_seconds` (`--suite`): the README's test command (`make test`), once; `--suite-only`
  times only it and keeps the other rows of startup.json.

Each figure is the median; `<metric>_min` / `<metric>_max` rows give the spread. Run it
alone on the machine. Writes bench/results/startup.json (flat rows {case, metric, value})
and startup.md.

    .venv/bin/python -m bench.startup --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.results_io import RESULTS, command, save
from otcurate_pipeline.stageworker import ENV as STAGE_WORKER
from otcurate_pipeline.uptodate import TRACKING_PROCESS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def clone_like(dest: Path) -> Path:
    """The working tree's project files (what git tracks or would track) in `dest`, one commit."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    if dest.exists():
        shutil.rmtree(dest)
    for f in filter(None, listed):
        src = ROOT / f
        if src.is_file() and not f.startswith("bench/results/"):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return _one_commit(dest)


def clone_at(rev: str, dest: Path) -> Path:
    """Commit `rev`'s project files in `dest`, one commit. Its own code runs only with its
    src/ first on PYTHONPATH (`at_rev_env`); the venv's editable install is the working tree's."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    tar = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar.stdout, check=True)
    return _one_commit(dest)


def at_rev_env(root: Path) -> dict[str, str]:
    return {
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(root / "src"), os.environ.get("PYTHONPATH")])
        )
    }


def _one_commit(dest: Path) -> Path:
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "bench.startup"], cwd=dest, check=True)
    return dest


def env() -> dict[str, str]:
    """The caller's environment, the venv first on PATH, and no stage worker of the caller's
    (`otcurate run` starts its own)."""
    caller = {k: v for k, v in os.environ.items() if k != STAGE_WORKER}
    return {**caller, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def timed(argv: list[str], cwd: Path, extra: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        argv, cwd=cwd, env={**env(), **(extra or {})}, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def first_line_seconds(argv: list[str], cwd: Path) -> tuple[float, str]:
    """Seconds from spawning `argv` to its first line on stdout or stderr; then stop it."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    seconds = time.perf_counter() - t0
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for left in [*cwd.glob("*/*.partial"), *cwd.glob("*/*.tmp-*")]:  # a stopped stage's staging
        shutil.rmtree(left, ignore_errors=True)
    if not line:
        raise RuntimeError(f"{' '.join(argv)} printed nothing (exit {proc.returncode}).")
    return seconds, line.strip()


@contextlib.contextmanager
def stage_worker(folder: Path):
    """A stage worker listening in `folder` for the duration; yields its socket."""
    folder.mkdir(parents=True, exist_ok=True)
    sock = folder / "stages.sock"
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "otcurate_pipeline.stageworker", str(sock)],
        env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=(folder / "stage-worker.log").open("ab"), start_new_session=True,
    )  # fmt: skip
    try:
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"the stage worker exited {proc.returncode}")
            time.sleep(0.05)
        yield sock
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


def stage_commands(root: Path) -> dict[str, list[str]]:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, spec in stages.items():
        argv = shlex.split(spec["cmd"])
        out[name] = [sys.executable, *argv[1:]] if argv[0] == "python" else argv
    return out


def calibration(work: Path, when: str) -> list[dict]:
    """This machine's speed now: the seconds of one plain fine-tuning step (otcurate-tiny,
    B = 128; `bench.speed --only steps`, median of 3), so that timings taken on a slower
    day of the same machine read as such."""
    out = work / f"calibration-{when}"
    argv = [sys.executable, "-m", "bench.speed", "--only", "steps", "--repeats", "3"]
    subprocess.run([*argv, "--out", str(out)], cwd=ROOT, env=env(), check=True, capture_output=True)
    rows = json.loads((out / "speed.json").read_text())
    step = next(r["value"] for r in rows if r["metric"] == "seconds_clip_step")
    print(f"[startup] calibration ({when} the runs): a fine-tuning step {step:.3f} s", flush=True)
    case = f"a fine-tuning step (bench.speed --only steps), {when} the runs"
    return summary(case, "calibration_step_seconds", [step])


def summary(case: str, metric: str, values: list[float]) -> list[dict]:
    return [
        {"case": case, "metric": metric, "value": statistics.median(values)},
        {"case": case, "metric": f"{metric}_min", "value": min(values)},
        {"case": case, "metric": f"{metric}_max", "value": max(values)},
    ]


def fmt(seconds: float) -> str:
    """Two decimals, or three significant digits below a second (a 71 ms step read 0.07)."""
    return f"{seconds:.2f}" if seconds >= 1 else f"{seconds:.3g}"


def table(rows: list[dict], repeats: dict[str, int], notes: list[str]) -> str:
    by = {(r["case"], r["metric"]): r["value"] for r in rows}
    lines = [
        "# Where a user waits",
        "",
        f"`{command('startup')}` on {platform.machine()}, {os.cpu_count()} CPU cores.",
        "",
        "Median (min-max) seconds. startup: from `python -m stages.<name>` to the stage's "
        "first line of output. stage_run: the whole stage on the default run's outputs, as "
        "a plain process and through a stage worker (otcurate_pipeline.stageworker). "
        "`otcurate run` starts a stage worker of its own unless OTCURATE_STAGE_WORKER says "
        "otherwise.",
        "",
        "| case | metric | median | min | max | repeats |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r["metric"]
        if m.endswith(("_min", "_max")):
            continue
        lo, hi = by[(r["case"], f"{m}_min")], by[(r["case"], f"{m}_max")]
        lines.append(
            f"| {r['case']} | {m} | {fmt(r['value'])} | {fmt(lo)} | {fmt(hi)} | {repeats[m]} |"
        )
    return "\n".join([*lines, "", *notes, ""])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=5, help="no-op runs and stage start-ups")
    ap.add_argument(
        "--default-repeats", type=int, default=1, help="default runs from nothing (>= 1)"
    )
    ap.add_argument("--suite", action="store_true", help="also time the test suite (make test)")
    ap.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time a fine-tuning step before and after the runs (calibration_step_seconds)",
    )
    ap.add_argument(
        "--suite-only",
        action="store_true",
        help="time only the suite; keep the other rows of <out>/startup.json",
    )
    ap.add_argument(
        "--plain-default",
        action="store_true",
        help=f"also time each default run with every stage in its own process ({STAGE_WORKER}=0)",
    )
    ap.add_argument(
        "--baseline",
        metavar="REV",
        help="also time each default run at this commit (its own code), interleaved with the "
        "working tree's: a same-machine A/B",
    )
    ap.add_argument(
        "--whole",
        nargs="*",
        default=["detect", "evaluate"],
        help="stages whose whole run is timed plain and through a stage worker",
    )
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "startup")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.suite_only:
        suite_only(args.work, args.out)
        return
    if args.default_repeats < 1 or args.repeats < 1:
        ap.error("--repeats and --default-repeats must be >= 1")
    otc = str(BIN / "otcurate")
    rows: list[dict] = []
    repeats = {"default_run_seconds": args.default_repeats, "noop_run_seconds": args.repeats}
    repeats["startup_seconds"] = args.repeats
    default, plain, baseline = [], [], []
    if args.calibrate:
        rows += calibration(args.work, "before")
        repeats["calibration_step_seconds"] = 3

    def plain_run(k: int) -> None:
        alone = clone_like(args.work / "project-plain")
        plain.append(timed([otc, "run"], alone, {STAGE_WORKER: "0"}))
        print(f"[startup] default run {k + 1}, plain stages: {plain[-1]:.1f} s", flush=True)
        shutil.rmtree(alone)

    def baseline_run(k: int) -> None:
        then = clone_at(args.baseline, args.work / "project-baseline")
        baseline.append(timed([otc, "run"], then, at_rev_env(then)))
        print(f"[startup] default run {k + 1} at {args.baseline}: {baseline[-1]:.1f} s", flush=True)
        shutil.rmtree(then)

    extras = [
        run for on, run in ((args.plain_default, plain_run), (args.baseline, baseline_run)) if on
    ]
    for k in range(args.default_repeats):  # interleaved, alternating which goes first
        for run in extras if k % 2 == 0 else ():
            run(k)
        root = clone_like(args.work / "project")
        default.append(timed([otc, "run"], root))
        print(f"[startup] default run {k + 1}: {default[-1]:.1f} s", flush=True)
        for run in extras if k % 2 == 1 else ():
            run(k)
    rows += summary("otcurate run (built-in default, from nothing)", "default_run_seconds", default)
    if plain:
        case = f"otcurate run (built-in default, from nothing; plain stages, {STAGE_WORKER}=0)"
        rows += summary(case, "default_run_seconds", plain)
    if baseline:
        case = f"otcurate run (built-in default, from nothing; at {args.baseline})"
        rows += summary(case, "default_run_seconds", baseline)
    noop = []
    for _ in range(args.repeats):
        noop.append(timed([otc, "run"], root))
    print(f"[startup] no-op runs: {', '.join(f'{s:.2f}' for s in noop)} s", flush=True)
    rows += summary("otcurate run (nothing changed)", "noop_run_seconds", noop)
    changed: dict[str, list[float]] = {"1": [], "0": []}
    for k in range(args.repeats):  # interleaved: the recorder's process tracks, or the flow
        for how, values in changed.items():
            batch = f"evaluate.batch_size={500 - 10 * k - (5 if how == '0' else 0)}"  # new
            values.append(timed([otc, "run", "--set", batch], root, {TRACKING_PROCESS: how}))
    for how, values in changed.items():
        case = "tracking process" if how == "1" else f"in-process tracker, {TRACKING_PROCESS}=0"
        print(f"[startup] changed runs ({case}): {values} s", flush=True)
        rows += summary(f"otcurate run (evaluate reruns; {case})", "changed_run_seconds", values)
    repeats["changed_run_seconds"] = args.repeats
    notes = []
    for name, argv in stage_commands(root).items():
        got = [first_line_seconds(argv, root) for _ in range(args.repeats)]
        rows += summary(name, "startup_seconds", [s for s, _ in got])
        notes.append(f"- {name}'s first line: `{got[0][1][:120]}`")
        print(f"[startup] {name}: {statistics.median(s for s, _ in got):.2f} s", flush=True)
    if args.whole:
        repeats["stage_run_seconds"] = args.repeats
    with stage_worker(args.work / "worker") as sock:
        for name in args.whole:
            argv = stage_commands(root)[name]
            plain = [timed(argv, root) for _ in range(args.repeats)]
            forked = [timed(argv, root, {STAGE_WORKER: str(sock)}) for _ in range(args.repeats)]
            rows += summary(f"{name} (plain)", "stage_run_seconds", plain)
            rows += summary(f"{name} (stage worker)", "stage_run_seconds", forked)
            print(
                f"[startup] {name} whole: plain {statistics.median(plain):.2f} s, "
                f"stage worker {statistics.median(forked):.2f} s",
                flush=True,
            )
    if args.calibrate:
        rows += calibration(args.work, "after")
    if args.suite:
        save("startup", rows, table(rows, repeats, notes), args.out)  # kept if the suite fails
        rows += summary("make test", "suite_seconds", [run_suite(args.work)])
        repeats["suite_seconds"] = 1
    save("startup", rows, table(rows, repeats, notes), args.out)
    print(table(rows, repeats, notes))


def run_suite(work: Path) -> float:
    """Seconds of the README's test command (`make test`); its own output, with pytest's 30
    slowest tests, in <work>/suite.log. Exits when the suite fails."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / "suite.log"
    suite_env = {**env(), "PYTEST_ADDOPTS": "--durations=30"}
    t0 = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(
            ["make", "test"], cwd=ROOT, env=suite_env, stdout=f, stderr=subprocess.STDOUT
        )
    t = time.perf_counter() - t0
    print(f"[startup] make test: {t:.0f} s, exit {code.returncode}; output in {log}", flush=True)
    if code.returncode != 0:
        raise SystemExit(f"make test failed ({code.returncode}): see {log}")
    return t


def suite_only(work: Path, out: Path) -> None:
    """Time the suite alone and put its row in <out>/startup.json beside the earlier rows
    (their repeats, first lines and command read back from startup.md)."""
    rows = [r for r in json.loads((out / "startup.json").read_text()) if r["case"] != "make test"]
    md = (out / "startup.md").read_text().splitlines()
    repeats: dict[str, int] = {}
    for line in md:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[5].isdigit():
            repeats[cells[1]] = int(cells[5])
    commands = re.findall(r"`(\.venv/bin/python -m bench\.startup[^`]*)`", "\n".join(md))
    earlier = next((c for c in commands if "--suite-only" not in c), None)
    notes = [line for line in md if line.startswith("- ") and "every row but" not in line]
    if earlier:
        notes.append(f"- every row but make test's: `{earlier}`")
    rows += summary("make test", "suite_seconds", [run_suite(work)])
    repeats["suite_seconds"] = 1
    save("startup", rows, table(rows, repeats, notes), out)
    print(table(rows, repeats, notes))


if __name__ == "__main__":
    main()
