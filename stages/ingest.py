"""ingest: image-text pairs from a source -> validated, split, noised parquet shards.

Writes `<out>/{train,val,test}-*.parquet`, `<out>/classes.json`,
`<out>/rejects.jsonl` and `<results>/metrics.json`.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import pyarrow as pa

from otcurate.data import builtin
from otcurate.data.hf import SourceError, load_pairs
from otcurate.data.records import SPLITS, assign_splits, check_record, plant_noise
from otcurate.data.shards import write_classes, write_split
from otcurate.io import atomic_dir, write_json
from otcurate.progress import track
from stages._common import StageError, parser, read_params, run


def _raw_pairs(p, seed: int):
    """(iterator of RawPair-like tuples, class info, expected count) for the configured source."""
    from otcurate.data.hf import RawPair

    if p.source == "shapes":
        recs = builtin.shapes(seed, p.size, p.image_size)
        info, n = builtin.shapes_classes(), p.size
    elif p.source == "digits":
        total = builtin.digits_count()
        if p.size is not None and p.size > total:
            raise StageError(
                f"ingest.size={p.size} exceeds the {total} images of the 'digits' source; "
                "set ingest.size to null (all) or at most that."
            )
        recs = builtin.digits(seed, p.size, p.image_size)
        info, n = builtin.digits_classes(), p.size or total
    else:
        h = p.hf
        try:
            pairs, info, n = load_pairs(
                h.path,
                name=h.name,
                data_dir=h.data_dir,
                data_files=h.data_files,
                split=h.split,
                image_column=h.image_column,
                caption_column=h.caption_column,
                label_column=h.label_column,
                image_root=h.image_root,
                class_names=h.class_names,
                limit=p.size,
            )
        except SourceError as exc:
            raise StageError(str(exc)) from exc
        return pairs, info, n

    def gen():
        for i, r in enumerate(recs):
            yield RawPair(i, r.uid, r.image, r.caption, r.label, check_record(r.image, r.caption))

    return gen(), info, n


def ingest(args) -> None:
    base, p = read_params(args.params, "ingest")
    pairs, info, n = _raw_pairs(p, base.seed)

    uids, images, captions, labels, rejects = [], [], [], [], []
    seen: set[str] = set()
    duplicates = 0
    for pair in track(pairs, total=n, description="ingest: reading pairs"):
        if pair.reject is not None:
            where = f"record {pair.index} (uid {pair.uid})"
            if p.on_bad_record == "fail":
                raise StageError(
                    f"bad {where}: {pair.reject}. Fix or remove it, or set ingest.on_bad_record: skip "
                    "to skip bad records and list them in rejects.jsonl."
                )
            rejects.append({"index": pair.index, "uid": pair.uid, "reason": pair.reject})
            continue
        if pair.uid in seen:
            duplicates += 1
            continue
        seen.add(pair.uid)
        uids.append(pair.uid)
        images.append(pair.image)
        captions.append(pair.caption)
        labels.append(pair.label)
    if not uids:
        raise StageError(
            f"the source gave no usable pairs ({len(rejects)} rejected); see the reasons above."
        )

    uids_a = np.array(uids, dtype=object)
    splits = assign_splits(uids, p.val_fraction, p.test_fraction, base.seed)
    counts = Counter(splits.tolist())
    for s in SPLITS:
        if counts.get(s, 0) == 0:
            raise StageError(
                f"the {s} split is empty ({len(uids)} usable pairs, val_fraction={p.val_fraction}, "
                f"test_fraction={p.test_fraction}); use more data or larger fractions."
            )

    with atomic_dir(args.out) as out:
        metrics: dict[str, float] = {
            "pairs": len(uids),
            "rejected": len(rejects),
            "duplicates": duplicates,
        }
        for s in SPLITS:
            idx = np.flatnonzero(splits == s)
            idx = idx[np.argsort(uids_a[idx], kind="stable")]
            caps = [captions[i] for i in idx]
            noisy = np.zeros(len(idx), dtype=bool)
            src = np.arange(len(idx))
            if s == "train" and p.noise.rate > 0:
                planted = plant_noise(caps, p.noise.rate, base.seed)
                caps, noisy, src = planted.captions, planted.noisy, planted.caption_from
                metrics["noise_rate_planted"] = float(noisy.mean())
            table = pa.table(
                {
                    "uid": pa.array(uids_a[idx].tolist(), pa.string()),
                    "split": pa.array([s] * len(idx), pa.string()),
                    "image": pa.array([images[i] for i in idx], pa.binary()),
                    "caption": pa.array(caps, pa.string()),
                    "label": pa.array([labels[i] for i in idx], pa.int32()),
                    "noisy": pa.array(noisy, pa.bool_()),
                    "caption_from": pa.array(uids_a[idx][src].tolist(), pa.string()),
                }
            )
            write_split(out, s, table, p.shard_size)
            metrics[f"{s}_pairs"] = len(idx)
        metrics.setdefault("noise_rate_planted", 0.0)
        write_classes(out, info)
        (out / "rejects.jsonl").write_text(
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects)
        )

    with atomic_dir(args.results) as res:
        write_json(res / "metrics.json", metrics)
    if rejects:
        print(
            f"ingest: skipped {len(rejects)} bad records, listed in {args.out}/rejects.jsonl",
            file=sys.stderr,
        )
    print(
        f"ingest: {len(uids)} pairs -> {dict(counts)}; planted noise {metrics['noise_rate_planted']:.3f}"
    )


def main(argv=None) -> int:
    ap = parser("ingest", __doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--results", required=True)
    return run("ingest", ingest, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
