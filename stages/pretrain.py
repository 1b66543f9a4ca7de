"""pretrain: the base CLIP. Loads `pretrained` weights, or trains `arch` from scratch
on the (noisy) train split the way web pre-training works: many pairs, few passes.

Writes `<out>/` (open_clip_config.json + model.safetensors) and `<results>/`
(metrics.json, plots/loss.tsv).
"""

from __future__ import annotations

from otcurate.data.shards import read_split
from stages._common import (
    StageError,
    live_logger,
    main_process,
    parser,
    read_params,
    run,
    save_model_and_curve,
)


def pretrain(args) -> None:
    base, p = read_params(args.params, "pretrain")
    train = None
    if p.pretrained is None:
        train = read_split(args.data, "train", columns=["image", "caption"])
        if train.num_rows < 2:
            raise StageError(
                f"the train split in {args.data} has {train.num_rows} pairs; pre-training needs at least 2."
            )
        print(
            f"pretrain: {p.arch} from scratch, {p.steps} steps of {p.batch_size} on "
            f"{train.num_rows} train pairs",
            flush=True,
        )
    else:
        print(f"pretrain: {p.arch}, weights {p.pretrained}", flush=True)
    # torch and open_clip load now, after the params and inputs are read (#18)
    from otcurate import models
    from otcurate.runtime import make_reproducible, resolve_device
    from otcurate.train import train_contrastive

    device = resolve_device(base.device)
    make_reproducible(base.seed, base.threads, device)
    try:
        clip = models.create(p.arch, p.pretrained, device=device)
    except (ValueError, FileNotFoundError) as exc:
        raise StageError(f"pretrain: {exc}") from exc
    metrics = {
        "params_m": sum(t.numel() for t in clip.model.parameters()) / 1e6,
        "trained_steps": 0,
    }
    curve = None
    if train is not None:
        images, tokens = models.lazy_pairs(
            train["image"].to_pylist(), train["caption"].to_pylist(), clip
        )
        res = train_contrastive(
            clip.model,
            images,
            tokens,
            **p.optim_kwargs(),
            seed=base.seed,
            log=live_logger(),
            description="pretrain",
        )
        n_seen = p.steps * min(p.batch_size, train.num_rows)
        metrics.update(
            trained_steps=p.steps, final_loss=res.losses[-1], epochs=n_seen / train.num_rows
        )
        curve = res
    save_model_and_curve(clip, args.out, args.results, metrics, curve)
    print(f"pretrain: saved {p.arch} to {args.out} ({metrics})")


def main(argv=None) -> int:
    ap = parser("pretrain", __doc__)
    ap.add_argument("--data", required=True, help="ingest output folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--results", required=True)
    return run("pretrain", pretrain, ap.parse_args(argv))


if __name__ == "__main__":
    main_process(main, __spec__ and __spec__.name)
