"""The content manifest of ingest's source: what DVC sees change when new data arrives.

DVC tracks files it is told about; a local `hf` source (an imagefolder, CSV, parquet or
webdataset folder given by `ingest.hf.data_dir`, `data_files` or `image_root`) lives outside
the repo. `data/sources.json` lists that source's files (relative path, size, sha256) and is
a dep of the ingest stage, so a new shard dropped into the folder changes the manifest and
DVC reruns from ingest; no new file, byte-identical manifest, nothing reruns.

The source is append-only: a listed file that vanished or changed content is an error
(the old runs' lineage would no longer describe the data), unless the caller accepts it.
Hashes are reused while a file's size and mtime are unchanged (`.otcurate/hash-cache.json`).

The clean sources that judge and target the run (`evaluate.sets`, `coreset.target`) get
manifests of their own, deps of the stage that reads them (`data/sources.evaluate.json`,
`data/sources.coreset.json`): a fixed or extended benchmark file reruns that stage only.
They are not append-only (correcting a benchmark is legitimate); the change shows in
`dvc.lock` and the lineage like any other dep.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import ChainMap
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

MANIFEST = Path("data") / "sources.json"
CLEAN_MANIFESTS = {
    "coreset": Path("data") / "sources.coreset.json",
    "evaluate": Path("data") / "sources.evaluate.json",
}
ALL_MANIFESTS = (MANIFEST, *CLEAN_MANIFESTS.values())
CACHE = Path(".otcurate") / "hash-cache.json"


class SourceChanged(ValueError):
    """An append-only source lost or rewrote a file it already had."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def local_files(root: Path, hf: Mapping[str, Any]) -> list[Path]:
    """The local files behind an `hf` source: everything under data_dir and image_root, and
    what data_files names (globs allowed), relative paths taken from the project root."""
    found: set[Path] = set()
    for key in ("data_dir", "image_root"):
        if hf.get(key):
            base = root / hf[key]
            if base.is_dir():
                found.update(p for p in base.rglob("*") if p.is_file())
    files = hf.get("data_files")
    for pattern in [files] if isinstance(files, str) else files or []:
        for hit in glob.glob(str(root / pattern), recursive=True):
            if Path(hit).is_file():
                found.add(Path(hit))
    return sorted(p for p in found if not any(part.startswith(".") for part in p.parts[-2:]))


def describe(root: Path, spec: Mapping[str, Any], cache: MutableMapping[str, str]) -> dict:
    """One source's manifest entry: its settings, and for a local `hf` source its files
    (path relative to the root, size, sha256; hashes reused from ``cache``)."""
    source = spec.get("source", "shapes")
    out: dict[str, Any] = {"source": source}
    if source != "hf":
        return out
    hf = dict(spec.get("hf") or {})
    out["hf"] = {k: hf.get(k) for k in ("path", "name", "data_dir", "data_files", "split")}
    entries = []
    for p in local_files(root, hf):
        st = p.stat()
        rel = os.path.relpath(p, root)
        key = f"{rel}|{st.st_size}|{st.st_mtime_ns}"  # a rewrite changes the key
        digest = cache.get(key) or _sha256(p)
        cache[key] = digest
        entries.append({"path": rel, "size": st.st_size, "sha256": digest})
    out["files"] = entries
    return out


def build(
    root: Path, ingest: Mapping[str, Any], cache: MutableMapping[str, str] | None = None
) -> dict:
    """The manifest for the `ingest` params section (see `describe`)."""
    return describe(root, ingest, cache if cache is not None else {})


def build_clean(
    root: Path, params: Mapping[str, Any], cache: MutableMapping[str, str] | None = None
) -> dict[Path, dict]:
    """The clean sources' manifests, by path: `coreset.target` and each of `evaluate.sets`."""
    cache = cache if cache is not None else {}
    target = (params.get("coreset") or {}).get("target")
    sets = (params.get("evaluate") or {}).get("sets") or []
    return {
        CLEAN_MANIFESTS["coreset"]: {"target": describe(root, target, cache) if target else None},
        CLEAN_MANIFESTS["evaluate"]: {
            "sets": [{"name": s.get("name"), **describe(root, s, cache)} for s in sets]
        },
    }


def compare(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(added paths, removed-or-rewritten paths) between two manifests of the same source."""
    if old.get("source") != new.get("source") or old.get("hf") != new.get("hf"):
        return [], []  # a different source altogether: params changed, not the data
    before = {e["path"]: e["sha256"] for e in old.get("files", [])}
    after = {e["path"]: e["sha256"] for e in new.get("files", [])}
    added = sorted(set(after) - set(before))
    broken = sorted(p for p in before if after.get(p) != before[p])
    return added, broken


def scan(root: Path, ingest: Mapping[str, Any]) -> tuple[dict, dict, ChainMap]:
    """(manifest on disk or {}, manifest of the source now, hash cache) without writing
    anything; hashes come from `.otcurate/hash-cache.json` where size and mtime match.
    The cache is a ChainMap over the file's entries: every key a scan (or a later
    `build_clean` given the same cache) looks up lands in its first map, which is what
    `sync` keeps."""
    root = Path(root)
    try:
        known = json.loads((root / CACHE).read_text())
    except (OSError, ValueError):
        known = {}
    cache = ChainMap({}, known)
    new = build(root, ingest, cache)
    path = root / MANIFEST
    old = json.loads(path.read_text()) if path.exists() else {}
    return old, new, cache


def stale(root: Path, rel: Path, manifest: Mapping[str, Any]) -> bool:
    """Whether the manifest file ``rel`` is missing or differs from ``manifest``."""
    path = root / rel
    return not path.exists() or path.read_text() != _text(manifest)


def _text(manifest: Mapping[str, Any]) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def sync(root: Path, params: Mapping[str, Any], *, allow_rewrite: bool = False) -> dict:
    """Write the manifests for the current params (the whole params.yaml mapping) where
    their content changed, each atomically: `data/sources.json` for ingest and the clean
    sources' ones. Returns {"changed" (ingest's), "added", "rewritten", "files",
    "clean_changed" (the stages whose clean-source manifest changed)}. Raises SourceChanged,
    writing nothing, when a file the ingest source had vanished or changed and
    ``allow_rewrite`` is false."""
    from otcurate.io import write_text  # here, not at import: status and the flow stay light

    root = Path(root)
    old, new, cache = scan(root, params.get("ingest") or {})
    added, broken = compare(old, new)
    if broken and not allow_rewrite:
        raise SourceChanged(
            f"the source is append-only, but {len(broken)} file(s) it had were removed or "
            f"rewritten: {', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''}. Put new data "
            "in new files; to accept the change (the old runs keep their md5s in MLflow), "
            "rerun with --allow-rewrite."
        )
    clean = build_clean(root, params, cache)
    written = [rel for rel, m in ((MANIFEST, new), *clean.items()) if stale(root, rel, m)]
    for rel in written:
        write_text(root / rel, _text(new if rel == MANIFEST else clean[rel]))
    write_text(root / CACHE, json.dumps(cache.maps[0]))  # the live files' entries only
    return {
        "changed": MANIFEST in written,
        "added": added,
        "rewritten": broken,
        "files": len(new.get("files", [])),
        "clean_changed": [s for s, rel in CLEAN_MANIFESTS.items() if rel in written],
    }


def pending_news(root: Path) -> str:
    """What the sources have that their manifests (data/sources*.json) do not list yet:
    new or rewritten ingest files, changed clean sources (read only)."""
    from otcurate_pipeline.params import parse_yaml

    try:
        params = parse_yaml((root / "params.yaml").read_text()) or {}
        old, new, cache = scan(root, params.get("ingest") or {})
        clean = build_clean(root, params, cache)
    except Exception as exc:  # noqa: BLE001 - status must still show DVC's view
        return f"(could not scan the sources: {exc})"
    lines = []
    if new != old:
        added, broken = compare(old, new)
        parts = []
        if added:
            parts.append(f"{len(added)} new file(s), e.g. {added[0]}")
        if broken:
            parts.append(
                f"{len(broken)} removed or rewritten, e.g. {broken[0]} (needs --allow-rewrite)"
            )
        what = "; ".join(parts) or "a different source"
        lines.append(
            f"ingest source changed since {MANIFEST}: {what}. `otcurate run` reruns from ingest."
        )
    for stage, rel in CLEAN_MANIFESTS.items():
        if stale(root, rel, clean[rel]):
            lines.append(
                f"{stage}'s clean source changed since {rel}. `otcurate run` reruns {stage}."
            )
    return "\n".join(lines)
