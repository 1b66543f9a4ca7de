"""Detection beyond the balanced plan, on `bench/quality.py` cells: does OT among the pairs
the cosine does not already reject, unbalanced OT, or the agreement of a pair's
neighbourhoods in the two modalities, separate the noise the cosine cannot? AUROC against
the planted noise on the cell's own train embeddings (no training).

    .venv/bin/python -m bench.structure_diag --work /tmp/qwork/shapes-mixed-0.5-0 ...

Scorers (higher = cleaner):
- `clip_score`: the pair's cosine.
- `ot_both`: the pipeline's `ot` detector, `relative_to: both`, B = 1024, 4 passes, 100
  iterations (`otcurate.detect.ot_score`).
- `trim_ot_both`: `ot_both` with `trim: mixture`: when the cosines are bimodal, the pairs a
  two-component mixture on them calls noisy are set aside (below every other pair, in the
  cosine's order) and OT is solved among the rest only. `trim99_ot_both`: only the pairs
  whose noisy posterior is above 0.99 are set aside.
- `uot_<reg_m>`: a pair's own-cell mass in the entropic *unbalanced* plan of its batch
  (POT's `sinkhorn_unbalanced`, KL-relaxed marginals of weight reg_m, reg 0.02 on the
  max-normalised 1 - cosine cost, same batches and passes as `ot_both`). Balanced OT must give
  every caption, generic ones included, a full share of mass; the relaxed plan need not.
- `knn_<k>`: neighbourhood consensus: the caption against the mean caption of the image's k
  nearest images, plus the image against the mean image of the caption's k nearest captions.
- `cos+knn_<k>`: the mean of the two scorers' ranks.

Each scorer is also judged on each part of the noise alone (`borrowed`: another pair's
caption; `generic`: an uninformative one), as in `bench.combine_diag`. Writes
bench/results/structure_diag.{json,md} (flat rows: cell, group, name, metric, value).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.combine_diag import noise_parts, part_rows
from bench.reference_diag import table
from bench.results_io import RESULTS, save

TITLE = "Trimmed and unbalanced OT, and neighbourhood consensus, as detectors (train split, planted truth)"
B, PASSES, ITERS, REG = 1024, 4, 100, 0.02
REG_M = (0.1, 0.03)
KNN = (8, 32)


def uot_own_mass(image, text, reg_m: float, seed: int = 0):
    """Mean over passes of each pair's own-cell mass in its batch's unbalanced plan, (n,)."""
    import ot
    import torch

    from otcurate.detect.minibatch import partitions
    from otcurate.ot import cost_cosine, normalize_cost

    idx = partitions(image.shape[0], B, PASSES, seed)
    out = torch.zeros(image.shape[0], dtype=torch.float64)
    for rows in idx.reshape(-1, idx.shape[-1]):
        M = normalize_cost(cost_cosine(image[rows], text[rows])).double()
        w = torch.full((len(rows),), 1.0 / len(rows), dtype=torch.float64)
        P = ot.unbalanced.sinkhorn_unbalanced(w, w, M, REG, reg_m, numItermax=ITERS)
        out.index_add_(0, rows, P.diagonal())
    # the top-up rows of a pass's last batch count twice; divide by each row's count
    return out / torch.bincount(idx.reshape(-1), minlength=image.shape[0]).double()


def knn_consensus(image, text, k: int):
    from torch.nn.functional import normalize

    def mean_of_neighbours(by, of):
        s = by @ by.T
        s.fill_diagonal_(-2.0)
        return normalize(of[s.topk(k, dim=1).indices].mean(dim=1), dim=1)

    return (text * mean_of_neighbours(image, text)).sum(1) + (
        image * mean_of_neighbours(text, image)
    ).sum(1)


def score_cell(cell: str, image, text) -> tuple[dict, dict]:
    """Every scorer's scores on one cell's pairs, and the seconds each took."""
    import time
    from dataclasses import replace

    import numpy as np
    import torch
    from scipy.stats import rankdata

    from otcurate import detect as det
    from otcurate.runtime import make_reproducible

    make_reproducible(0, 2, torch.device("cpu"))
    opts = det.options("ot", relative_to="both", batch_size=B, passes=PASSES, max_iter=ITERS)
    runs = {
        "clip_score": lambda: det.score("clip_score", image, text),
        "ot_both": lambda: det.score("ot", image, text, opts, seed=0),
        "trim_ot_both": lambda: det.score("ot", image, text, replace(opts, trim="mixture")),
        "trim99_ot_both": lambda: det.score(
            "ot", image, text, replace(opts, trim="mixture", trim_posterior=0.99)
        ),
        **{f"uot_{m}": (lambda m=m: uot_own_mass(image, text, m)) for m in REG_M},
        **{f"knn_{k}": (lambda k=k: knn_consensus(image, text, k)) for k in KNN},
    }
    scorers, seconds = {}, {}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            scorers[name] = np.asarray(fn(), dtype=np.float64)
        seconds[name] = time.perf_counter() - t0
        print(f"[structure_diag] {cell} {name}: {seconds[name]:.1f} s", flush=True)
    for k in KNN:
        scorers[f"cos+knn_{k}"] = (
            rankdata(scorers["clip_score"]) + rankdata(scorers[f"knn_{k}"])
        ) / 2
    return scorers, seconds


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", type=Path, nargs="+", required=True, help="bench/quality cells")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from otcurate_pipeline import artifacts

    rows = []
    for w in args.work:
        uids, noisy, parts = noise_parts(w)
        _, image, text = artifacts.read_embeddings(w / "data" / "embed", "train", uids)
        scorers, seconds = score_cell(w.name, image, text)
        rows += part_rows("structure_diag", w.name, noisy, parts, scorers)
        for name, sec in seconds.items():
            rows.append({"bench": "structure_diag", "cell": w.name, "group": w.name.rsplit("-", 1)[0],
                         "name": name, "metric": "seconds", "value": sec})  # fmt: skip
        md = table(rows, TITLE, "structure_diag")
        save("structure_diag", rows, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
