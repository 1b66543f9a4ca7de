"""ingest: image-text pairs from a source -> validated, deduplicated, split, noised parquet shards.

Streams the source (bounded memory) into `<out>.partial/` chunks of `shard_size` source
records; a rerun after a crash keeps the finished chunks and resumes after them. Then
writes `<out>/{train,val,test}-*.parquet` (source order, `shard_size` rows each),
`<out>/classes.json`, `<out>/rejects.jsonl` and `<results>/metrics.json`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from otcurate.data import builtin
from otcurate.data.hf import SourceError, load_pairs, source_kwargs
from otcurate.data.records import SPLITS, RecordLimits, check_record, plant_noise, split_of
from otcurate.data.shards import write_classes, write_provenance
from otcurate.data.staging import Stager, finalize, read_column, split_positions
from otcurate.io import atomic_dir, write_json
from otcurate.progress import track
from stages._common import StageError, main_process, parser, read_params, run


def _limit_hint(reason: str) -> str:
    if reason.startswith("image too large ("):
        return "raise ingest.max_image_pixels, "
    if reason.startswith("caption too long ("):
        return "raise ingest.max_caption_chars, "
    return ""


def _raw_pairs(p, seed: int, start: int = 0, workers: int = 1):
    """(iterator of RawPairs from source position `start`, class info, source size or None);
    a procedural built-in is drawn in `workers` processes."""
    from otcurate.data.hf import RawPair

    limits = RecordLimits(p.max_image_pixels, p.max_caption_chars)
    if p.source == "shapes":
        recs = builtin.shapes(seed, p.size, p.image_size, start=start, workers=workers)
        info, n = builtin.shapes_classes(), p.size
    elif p.source == "glyphs":
        recs = builtin.glyphs(seed, p.size, p.image_size, start=start, workers=workers)
        info, n = builtin.glyphs_classes(), p.size
    elif p.source == "digits":
        total = builtin.digits_count()
        if p.size is not None and p.size > total:
            raise StageError(
                f"ingest.size={p.size} exceeds the {total} images of the 'digits' source; "
                "set ingest.size to null (all) or at most that."
            )
        recs = builtin.digits(seed, p.size, p.image_size, start=start)
        info, n = builtin.digits_classes(), p.size or total
    else:
        try:
            pairs, info, n = load_pairs(
                **source_kwargs(p.hf), limit=p.size, start=start, limits=limits
            )
        except SourceError as exc:
            raise StageError(str(exc)) from exc
        return pairs, info, n

    def gen():
        for i, r in enumerate(recs, start):
            why = check_record(r.image, r.caption, limits)
            yield RawPair(i, r.uid, r.image, r.caption, r.label, why)

    return gen(), info, n


def _fingerprint(params_path: str, sources: Path) -> str:
    """What the staged chunks depend on: the ingest and base params and the source manifest."""
    from otcurate_pipeline.params import parse_yaml

    raw = parse_yaml(Path(params_path).read_text()) or {}
    blob = json.dumps({k: raw.get(k) for k in ("base", "ingest")}, sort_keys=True, default=str)
    if sources.exists():
        blob += sources.read_text()
    return hashlib.sha1(blob.encode()).hexdigest()


def ingest(args) -> None:
    base, p = read_params(args.params, "ingest")
    staging = Path(f"{args.out}.partial")
    stager = Stager(
        staging,
        _fingerprint(args.params, Path(args.sources)),
        p.shard_size,
        drop_images=p.duplicates == "drop_images",
    )
    start = stager.counts.consumed
    if stager.resumed:
        print(
            f"ingest: resuming after {start} source records ({len(stager.counts.chunks)} finished "
            f"shards in {staging}, kept)",
            file=sys.stderr,
        )
    size = f", up to {p.size} pairs" if p.size is not None else ""
    print(f"ingest: reading the {p.source} source{size}", flush=True)
    pairs, info, n = _raw_pairs(p, base.seed, start, workers=base.threads)

    # Phase 1: stream the source into chunk files (resumable).
    remaining = None if n is None else max(0, n - start)
    for pair in track(pairs, total=remaining, description="ingest: records"):
        if pair.reject is not None:
            if p.on_bad_record == "fail":
                raise StageError(
                    f"bad record {pair.index} (uid {pair.uid}): {pair.reject}. Fix or remove it, "
                    f"{_limit_hint(pair.reject)}or set ingest.on_bad_record: skip to skip bad "
                    "records and list them in rejects.jsonl."
                )
            stager.reject(pair.index, pair.uid, pair.reject)
            continue
        split = split_of(pair.uid, p.val_fraction, p.test_fraction, base.seed)
        stager.add(pair.uid, split, pair.image, pair.caption, pair.label)
    stager.flush()
    c = stager.counts
    if c.rows == 0:
        raise StageError(
            f"the source gave no usable pairs ({c.rejected} rejected); see the reasons above."
        )

    # Phase 2: chunks -> per-split shards, planting noise on the train captions.
    cols = read_column(staging, c.chunks, ["uid", "split", "caption", "label"])
    counts = Counter(cols["split"])
    for s in SPLITS:
        if counts.get(s, 0) == 0:
            raise StageError(
                f"the {s} split is empty ({c.rows} usable pairs, val_fraction={p.val_fraction}, "
                f"test_fraction={p.test_fraction}); use more data or larger fractions."
            )
    train = split_positions(cols["split"], "train")
    train_caps = [cols["caption"][i] for i in train]
    metrics: dict[str, float] = {
        "pairs": c.rows,
        "rejected": c.rejected,
        "duplicates": c.duplicate_pairs,
        "duplicate_images": c.duplicate_images,
        "duplicate_captions": c.duplicate_captions,
        "noise_rate_planted": 0.0,
    }
    caption_from = np.arange(len(train))
    noisy = np.zeros(len(train), dtype=bool)
    if p.noise.rate > 0:
        train_labels = [cols["label"][i] for i in train]
        planted = plant_noise(train_caps, p.noise.rate, base.seed, p.noise.kind, train_labels)
        train_caps, noisy, caption_from = planted.captions, planted.noisy, planted.caption_from
        metrics["noise_rate_planted"] = float(noisy.mean())
        for kind in ("shuffle", "near", "generic"):
            if p.noise.kind in (kind, "mixed"):
                metrics[f"noise_{kind}_planted"] = float((planted.kind == kind).mean())
    train_uids = [cols["uid"][i] for i in train]
    del cols
    with atomic_dir(args.out) as out:
        finalize(staging, c.chunks, out, p.shard_size, train_uids, train_caps, noisy, caption_from)
        metrics.update({f"{s}_pairs": counts[s] for s in SPLITS})
        write_classes(out, info)
        write_provenance(out, p.source, held_out_clean=p.source != "hf")
        with open(out / "rejects.jsonl", "w") as fh:
            for line in stager.rejects():
                fh.write(line)
    with atomic_dir(args.results) as res:
        write_json(res / "metrics.json", metrics)
    shutil.rmtree(staging, ignore_errors=True)
    if c.rejected:
        print(
            f"ingest: skipped {c.rejected} bad records, listed in {args.out}/rejects.jsonl",
            file=sys.stderr,
        )
    dups = c.duplicate_pairs + (c.duplicate_images if p.duplicates == "drop_images" else 0)
    print(
        f"ingest: {c.rows} pairs -> {dict(counts)}; planted noise {metrics['noise_rate_planted']:.3f}; "
        f"duplicates: {c.duplicate_pairs} pairs, {c.duplicate_images} images, "
        f"{c.duplicate_captions} captions ({dups} dropped)"
    )


def main(argv=None) -> int:
    ap = parser("ingest", __doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--sources", required=True, help="source manifest (resume fingerprint)")
    return run("ingest", ingest, ap.parse_args(argv))


if __name__ == "__main__":
    main_process(main, __spec__ and __spec__.name)
