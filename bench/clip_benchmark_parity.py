"""A second opinion from a real client: CLIP_benchmark scores the fine-tuned model on the
sets `otcurate export-clip-benchmark` writes, and the numbers sit beside `evaluate`'s.

A small pipeline (the stages, in a workspace, on the built-in shapes) gives a model and
evaluate's metrics; the test split is exported in CLIP_benchmark's webdataset layout; then
clip_benchmark 1.6.2 runs in its own virtual environment (it needs numpy < 2.4 and
`requests`, which it does not declare; torch, open_clip and the rest come from this
project's venv through a .pth file) with the exact command lines the export prints, plus
`--no_amp` (CPU autocast would score in bf16) and `--recall_k 1 5 10`.

Writes bench/results/clip_benchmark.json (rows: set, metric, otcurate, clip_benchmark,
difference) and clip_benchmark.md.

    .venv/bin/python -m bench.clip_benchmark_parity
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

from bench.quality import workspace
from bench.results_io import command, save

ROOT = Path(__file__).resolve().parents[1]
PINS = ["clip_benchmark==1.6.2", "numpy<2.4", "requests", "webdataset", "pycocoevalcap"]
# evaluate's metric -> clip_benchmark's, per exported set
PAIRS = {
    "test_zeroshot": {"zs_acc": "acc1", "zs_acc_top5": "acc5"},
    "test_retrieval": {
        "i2t_r1": "text_retrieval_recall@1",
        "t2i_r1": "image_retrieval_recall@1",
        "i2t_r5": "text_retrieval_recall@5",
        "t2i_r5": "image_retrieval_recall@5",
        "t2i_r10": "image_retrieval_recall@10",
    },
}


def client_env(venv: Path) -> Path:
    """A venv holding clip_benchmark and its pins, on top of this project's packages."""
    py = venv / "bin" / "python"
    if not (venv / ".ready").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        # this project's packages after the client's own (its numpy < 2.4 wins)
        (Path(site) / "zz-otcurate.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "--no-deps", "clip_benchmark==1.6.2"], check=True)
        subprocess.run([*pip, *PINS[1:]], check=True)
        (venv / ".ready").write_text("ok\n")
    return py


def own_image_recall(model: Path, data: Path) -> dict[str, float]:
    """The library's grouped recall (otcurate.evaluate.retrieval_recall_grouped) on the test
    split with clip_benchmark's rule: a caption's only right answer is its own image (rows
    that share an image's bytes are one image with several captions)."""
    import torch

    from otcurate import evaluate as ev
    from otcurate import models
    from otcurate.data.evalsets import group_images
    from otcurate.data.shards import read_split

    test = read_split(data, "test", columns=["image", "caption"])
    captions = test["caption"].to_pylist()
    unique, owner = group_images(test["image"].to_pylist())
    clip = models.load(model)
    img, _ = models.encode(clip, models.pairs_to_tensors(unique, [""] * len(unique), clip)[0])
    txt = models.encode_texts(clip, [" ".join(c.split()) for c in captions])
    return ev.retrieval_recall_grouped(img, txt, torch.tensor(owner))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "clip_benchmark")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--size", type=int, default=3000, help="ingest.size of the small pipeline")
    args = ap.parse_args()
    from otcurate_pipeline.export import clip_benchmark_command, export_clip_benchmark

    over = {
        "ingest": {"size": args.size, "noise": {"rate": 0.2}},
        "pretrain": {"steps": 200, "warmup": 20},
        "finetune": {"steps": 30, "warmup": 3},
    }
    ws = workspace(args.work / "run", over)
    for stage in ("ingest", "pretrain", "embed", "detect", "coreset", "distill", "finetune"):
        ws.check(stage)
    ws.check("evaluate")
    ours = ws.metrics("results/evaluate")
    done = export_clip_benchmark(ROOT, args.work / "export", data=Path(ws.p("data/ingest")))
    py = client_env(args.work / "venv")
    model = Path(ws.p("models/finetune"))
    rows = []
    (args.work / "results").mkdir(parents=True, exist_ok=True)  # clip_benchmark does not
    for e in done:
        if e.name not in PAIRS:
            continue
        line = clip_benchmark_command(e, str(model), args.work / "results")
        argv = line.split()[1:] + ["--no_amp", "--num_workers", "0", "--recall_k", "1", "5", "10"]
        subprocess.run(
            [str(py), "-c", "import sys; from clip_benchmark.cli import main; sys.exit(main())",
             *argv],
            check=True,
        )  # fmt: skip
        theirs = json.loads((args.work / "results" / f"{e.name}.json").read_text())["metrics"]
        own = (
            own_image_recall(model, Path(ws.p("data/ingest"))) if e.name == "test_retrieval" else {}
        )
        for mine, key in PAIRS[e.name].items():
            a, b = ours[f"finetune_{mine}"], theirs[key]
            rows.append(
                {"bench": "clip_benchmark", "set": e.name, "metric": mine,
                 "clip_benchmark_metric": key, "otcurate": a, "clip_benchmark": b,
                 "difference": b - a, "own_image_rule": own.get(mine), "command": line}
            )  # fmt: skip
    lines = [
        "# evaluate vs CLIP_benchmark on the same model and data",
        "",
        f"`{command('clip_benchmark_parity')}`",
        "",
        "The fine-tuned model of a small shapes pipeline; the test split exported by "
        "`otcurate export-clip-benchmark`, scored by clip_benchmark 1.6.2 (`--no_amp`). "
        "Retrieval counts a caption shared by several images differently: evaluate "
        "credits any image whose caption is the same text, clip_benchmark only its own.",
        "",
        "The last column is the library's grouped recall under clip_benchmark's rule (only "
        "a caption's own image is right), computed by this script on the same model.",
        "",
        "| set | metric | evaluate | clip_benchmark | difference | evaluate, own-image rule |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['set']} | {r['metric']} ({r['clip_benchmark_metric']}) | {r['otcurate']:.4f} | "
        f"{r['clip_benchmark']:.4f} | {r['difference']:+.4f} | "
        f"{'—' if r['own_image_rule'] is None else format(r['own_image_rule'], '.4f')} |"
        for r in rows
    ]
    save("clip_benchmark", rows, "\n".join(lines) + "\n", args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
