"""Can the cosine and OT detection be combined? On `bench/quality.py` cells that ran both
`clip_score` and `ot`: AUROC against the planted noise of each, and of rank combinations
of the two (no training; the scores detect wrote).

    .venv/bin/python -m bench.combine_diag --work /tmp/qwork/shapes-mixed-0.5-0 ...

Scores are ranked (higher = cleaner) and combined per pair: `rank_mean` (the mean rank),
`rank_min` (noisy when either calls it noisy), `rank_max` (noisy only when both do),
`rank_product`. Besides all pairs, each scorer is judged on each part of the noise alone
(the clean pairs against one part): `borrowed` (the caption of another train pair: shuffle
or near) and `generic` (an uninformative caption), from ingest's `caption_from`. Writes
bench/results/combine_diag.{json,md} (flat rows: cell, group, name, metric, value).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.reference_diag import table
from bench.results_io import RESULTS, save

TITLE = "Combining the cosine and OT detection (train split, planted truth)"


def noise_parts(cell: Path):
    """A cell's train uids, its planted noise, and the noise split into its parts: `all`,
    `borrowed` (another train pair's caption: shuffle or near) and `generic` (an
    uninformative caption), from ingest's `caption_from`."""
    import numpy as np

    from otcurate.data.shards import read_split

    t = read_split(cell / "data" / "ingest", "train", columns=["uid", "noisy", "caption_from"])
    noisy = np.asarray(t["noisy"].to_pylist(), dtype=bool)
    generic = noisy & (np.asarray(t["caption_from"].to_pylist(), dtype=object) == "")
    parts = {"all": noisy, "borrowed": noisy & ~generic, "generic": generic}
    return t["uid"].to_pylist(), noisy, parts


def part_rows(bench: str, cell: str, noisy, parts: dict, scorers: dict) -> list[dict]:
    """AUROC rows of each scorer (higher = cleaner) on all the noise and on each part of it
    alone (the clean pairs against that part); a kind without a part gets no rows for it."""
    from sklearn.metrics import roc_auc_score

    rows = []
    for part, positive in parts.items():
        if not positive.any():
            continue  # a kind without that part of the noise
        keep = positive | ~noisy  # the clean pairs and this part of the noise
        group = cell.rsplit("-", 1)[0] + ("" if part == "all" else f": {part}")
        for name, s in scorers.items():
            auroc = float(roc_auc_score(positive[keep], -s[keep]))
            rows.append({"bench": bench, "cell": cell, "group": group,
                         "name": name, "metric": "auroc", "value": auroc})  # fmt: skip
            print(f"[{bench}] {cell} {part} {name}: auroc {auroc:.4f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", type=Path, nargs="+", required=True, help="bench/quality cells")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import numpy as np
    from scipy.stats import rankdata

    from otcurate_pipeline import artifacts

    rows = []
    for w in args.work:
        uids, noisy, parts = noise_parts(w)
        rank = {
            m: rankdata(artifacts.read_scores(w / "data" / f"detect-{m}", uids).score)
            for m in ("clip_score", "ot")
        }
        a, b = rank["clip_score"], rank["ot"]
        scorers = {
            "clip_score": a,
            "ot": b,
            "rank_mean": (a + b) / 2,
            "rank_min": np.minimum(a, b),
            "rank_max": np.maximum(a, b),
            "rank_product": a * b,
        }
        rows += part_rows("combine_diag", w.name, noisy, parts, scorers)
    md = table(rows, TITLE, "combine_diag")
    save("combine_diag", rows, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
