"""finetune: fine-tune the base CLIP on the coreset plus the distilled set (as pairs, or
through its soft labels when distill relabelled it: finetune.soft_labels).

Writes `<out>/` (same format as pretrain) and `<results>/` (metrics.json, plots/loss.tsv).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from otcurate.data.shards import read_selected
from otcurate_pipeline import artifacts
from stages._common import (
    StageError,
    live_logger,
    main_process,
    parser,
    read_params,
    run,
    save_model_and_curve,
)


def launch(nproc: int, argv: list[str]) -> None:
    """Rerun this stage under torchrun with `nproc` processes on this machine."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
        "-m", "stages.finetune", *argv,
    ]  # fmt: skip
    root = str(Path(__file__).resolve().parents[1])  # so that `-m stages.finetune` imports
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": path}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo on the loopback only
    print(f"finetune: torchrun with {nproc} processes", file=sys.stderr, flush=True)
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise SystemExit(rc)  # the workers printed the reason


def finetune(args) -> None:
    base, p = read_params(args.params, "finetune")
    subset = pa.array(artifacts.read_subset(args.coreset).uids, pa.string())
    if "RANK" not in os.environ:  # not a torchrun worker: the launcher says it once
        print(f"finetune ({p.method}): {len(subset)} coreset pairs, {p.steps} steps", flush=True)
    # torch and open_clip load now, after the params and inputs are read (#18)
    import torch

    from otcurate import distill as dist
    from otcurate import finetuning, models, parallel
    from otcurate.runtime import make_reproducible, resolve_device

    if p.nproc > 1 and not parallel.launched():
        launch(p.nproc, args.argv)
        return
    device = parallel.init(resolve_device(base.device))
    rank, size = parallel.world()
    # The processes share this machine's cores: same total threads as one process.
    threads = max(1, base.threads // size) if base.threads > 0 else base.threads
    make_reproducible(base.seed, threads, device)
    # only the chosen rows, shard by shard; images stay encoded until their batch comes
    chosen = read_selected(args.data, "train", subset, ["uid", "image", "caption"])
    distilled = artifacts.read_distilled(args.distill, columns=["uid", "image", "caption"])
    # A relabelled distilled set is learned through its soft labels, not as pairs.
    soft = artifacts.read_soft_labels(args.distill, distilled["uid"].to_pylist())
    if soft is None:
        hard = distilled.filter(pc.invert(pc.is_in(distilled["uid"], value_set=chosen["uid"])))
    else:
        hard = distilled.slice(0, 0)
    data = pa.concat_tables([chosen, hard])
    # detect's flags for the coreset part; distilled examples are treated as clean.
    flagged = artifacts.read_scores(args.detect).flagged()
    noisy = np.array(
        [u in flagged for u in chosen["uid"].to_pylist()] + [False] * hard.num_rows, dtype=bool
    )
    if data.num_rows < 2 and (soft is None or distilled.num_rows == 0):
        raise StageError(
            f"only {data.num_rows} pairs to fine-tune on (coreset + distilled); raise coreset.fraction or distill.ipc."
        )
    clip = models.load(args.model, device=device)
    if size > 1:
        parallel.global_batchnorm(clip.model)
    replay = None
    if soft is not None and distilled.num_rows:
        cfg, sl = clip.preprocess_cfg, p.soft_labels
        replay = dist.SoftReplay(
            pixels=models.decode_pixels(distilled["image"].to_pylist(), clip),
            views=soft.views,
            logits=soft.logits,
            prompts=clip.tokenizer([t for row in soft.prompts for t in row]),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            weight=sl.weight,
            temperature=sl.temperature,
            batch_size=sl.batch_size,
            batch_norm=sl.batch_norm,
        )
    images, tokens = models.lazy_pairs(data["image"].to_pylist(), data["caption"].to_pylist(), clip)
    opts, scored = p.method_options(), {}
    if p.method == "filter":
        # in rounds it rescores the pairs detect scored, never the distilled ones after them
        scored = {"scored": np.arange(data.num_rows) < chosen.num_rows}
        if opts.rounds > 1 and opts.rescore == "detect":  # detect's method and options
            from otcurate.detect import options

            meta, _ = artifacts.read_detector(args.detect, with_tensors=False)
            opts = dataclasses.replace(opts, rescore=meta["method"])
            scored["rescore_options"] = options(meta["method"], **meta["options"])
    res = finetuning.finetune(
        p.method,
        clip.model,
        images,
        tokens,
        opts,
        noisy=noisy,
        **scored,
        **p.optim_kwargs(),
        seed=base.seed,
        log=live_logger() if rank == 0 else None,
        replay=replay,
    )
    used = "none" if not distilled.num_rows else "pairs" if soft is None else "soft_labels"
    metrics = {
        "flagged_pairs": int(noisy.sum()),
        "pairs": data.num_rows,
        "coreset_pairs": chosen.num_rows,
        "distilled_pairs": distilled.num_rows,
        "distilled_as": used,
        "steps": p.steps,
        "processes": size,
        "final_loss": res.losses[-1],
        **res.metrics,
    }
    if p.check_distilled and used != "none" and chosen.num_rows >= 2:
        # The same fine-tune without the distilled set; the better on val is kept.
        alone = torch.arange(data.num_rows) < chosen.num_rows
        res = _check_distilled(
            clip, args, res, metrics,
            lambda: finetuning.finetune(
                p.method, clip.model, images[alone], tokens[alone],
                p.method_options(), noisy=noisy[alone.numpy()], **p.optim_kwargs(), seed=base.seed,
                log=None,
            ),
        )  # fmt: skip
    parallel.shutdown()
    if rank > 0:
        return  # the first process writes
    unmixed = None
    if p.wise.active:
        unmixed, wise_metrics = _wise(clip, args, p.wise)
        metrics.update(wise_metrics)
    save_model_and_curve(clip, args.out, args.results, metrics, res, extra=unmixed)
    print(
        f"finetune ({p.method}): {p.steps} steps on {data.num_rows} pairs, final loss {res.losses[-1]:.4f}"
        + (f"; WiSE-FT alpha {metrics['wise_alpha']:g}" if p.wise.active else "")
    )


def _val_scorer(args, key: str, instead: str):
    """score(clip): zero-shot top-1 on the val split when it has classes, else mean R@1."""
    from otcurate import evaluate as ev
    from otcurate.data.shards import read_classes, read_split

    val = read_split(args.data, "val", columns=["image", "caption", "label"])
    if val.num_rows == 0:
        raise StageError(f"{key} needs a val split; raise ingest.val_fraction, or {instead}.")
    info = read_classes(args.data)

    def score(clip) -> float:
        m = ev.split_metrics(clip, val, info, [1], 512)
        return m["zs_acc"] if "zs_acc" in m else (m["i2t_r1"] + m["t2i_r1"]) / 2

    return score


def _check_distilled(clip, args, res, metrics: dict, alone):
    """finetune.check_distilled: score the model fine-tuned with the distilled set on val,
    fine-tune again from the base without it (``alone()``), and keep the better; a warning
    says so when the distilled set lowered the score. Returns the kept run's curve."""
    from otcurate import models

    score = _val_scorer(args, "finetune.check_distilled", "set it to false")
    with_set = {k: v.detach().clone() for k, v in clip.model.state_dict().items()}
    s_with = score(clip)
    clip.model.load_state_dict(models.load(args.model, device="cpu").model.state_dict())
    res_alone = alone()
    s_alone = score(clip)
    kept = s_with >= s_alone
    metrics.update(
        val_score_with_distilled=s_with, val_score_coreset_alone=s_alone, distilled_kept=kept
    )
    if kept:
        clip.model.load_state_dict(with_set)
        return res
    print(
        f"finetune: WARNING the distilled set lowered the val score ({s_with:.4f} with it, "
        f"{s_alone:.4f} on the coreset alone): the model written is the one fine-tuned on the "
        "coreset alone. Consider distill.ipc: 0 or another distill.method.",
        file=sys.stderr,
        flush=True,
    )
    metrics["final_loss"] = res_alone.losses[-1]
    return res_alone


def _wise(clip, args, w):
    """Replace `clip`'s weights by the WiSE-FT interpolation with the base; returns the
    fine-tuned weights as trained (saved beside the model, for evaluate's forgetting
    report) and the metrics: the alpha used and, when chosen, each alpha's val score."""
    from otcurate import models, wise

    trained = {k: v.detach().clone() for k, v in clip.model.state_dict().items()}
    base = models.load(args.model, device="cpu").model.state_dict()
    metrics: dict[str, float] = {}

    def use(alpha: float) -> None:
        clip.model.load_state_dict(wise.interpolate(base, trained, alpha))

    if w.choose:
        scorer = _val_scorer(args, "finetune.wise.choose", "give finetune.wise.alpha instead")

        def score(alpha: float) -> float:
            use(alpha)
            return scorer(clip)

        alpha, scores = wise.choose_alpha(score, w.alphas)
        metrics.update({f"wise_val_score_{a:g}": v for a, v in scores.items()})
    else:
        alpha = float(w.alpha)
    use(alpha)
    metrics["wise_alpha"] = alpha
    return {k: v.to("cpu").contiguous() for k, v in trained.items()}, metrics


def main(argv=None) -> int:
    ap = parser("finetune", __doc__)
    ap.add_argument("--model", required=True, help="pretrain output folder")
    ap.add_argument("--data", required=True, help="ingest output folder")
    ap.add_argument("--coreset", required=True)
    ap.add_argument("--detect", required=True)
    ap.add_argument("--distill", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--results", required=True)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run("finetune", finetune, args)


if __name__ == "__main__":
    main_process(main, __spec__ and __spec__.name)
