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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from otcurate.io import write_text

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


def _key(root: Path, rel: str) -> str:
    """A file's hash-cache key: its path, size and mtime (a rewrite changes the key)."""
    st = (root / rel).stat()
    return f"{rel}|{st.st_size}|{st.st_mtime_ns}"


def describe(root: Path, spec: Mapping[str, Any], cache: dict[str, Any]) -> dict:
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
        rel = os.path.relpath(p, root)
        key = _key(root, rel)
        digest = cache.get(key) or _sha256(p)
        cache[key] = digest
        entries.append({"path": rel, "size": int(key.rsplit("|", 2)[1]), "sha256": digest})
    out["files"] = entries
    return out


def build(root: Path, ingest: Mapping[str, Any], cache: dict[str, Any] | None = None) -> dict:
    """The manifest for the `ingest` params section (see `describe`)."""
    return describe(root, ingest, cache if cache is not None else {})


def build_clean(
    root: Path, params: Mapping[str, Any], cache: dict[str, Any] | None = None
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


def scan(root: Path, ingest: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """(manifest on disk or {}, manifest of the source now, hash cache) without writing
    anything; hashes come from `.otcurate/hash-cache.json` where size and mtime match."""
    root = Path(root)
    try:
        cache = json.loads((root / CACHE).read_text())
    except (OSError, ValueError):
        cache = {}
    new = build(root, ingest, cache)
    path = root / MANIFEST
    old = json.loads(path.read_text()) if path.exists() else {}
    return old, new, cache


def _text(manifest: Mapping[str, Any]) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def sync(root: Path, params: Mapping[str, Any], *, allow_rewrite: bool = False) -> dict:
    """Write the manifests for the current params (the whole params.yaml mapping) where
    their content changed, each atomically: `data/sources.json` for ingest and the clean
    sources' ones. Returns {"changed" (ingest's), "added", "rewritten", "files",
    "clean_changed" (the stages whose clean-source manifest changed)}. Raises SourceChanged,
    writing nothing, when a file the ingest source had vanished or changed and
    ``allow_rewrite`` is false."""
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
    written = []
    for rel, manifest in ((MANIFEST, new), *clean.items()):
        path, text = root / rel, _text(manifest)
        if not path.exists() or path.read_text() != text:
            write_text(path, text)
            written.append(rel)
    live = {_key(root, e["path"]) for m in (new, *clean.values()) for e in _files(m)}
    write_text(root / CACHE, json.dumps({k: v for k, v in cache.items() if k in live}))
    return {
        "changed": MANIFEST in written,
        "added": added,
        "rewritten": broken,
        "files": len(new.get("files", [])),
        "clean_changed": [s for s, rel in CLEAN_MANIFESTS.items() if rel in written],
    }


def _files(manifest: Mapping[str, Any]) -> list[dict]:
    """Every file entry of a manifest (ingest's, or a clean one with target / sets)."""
    if "files" in manifest:
        return list(manifest["files"])
    found = [manifest.get("target")] + list(manifest.get("sets") or [])
    return [e for m in found if m for e in m.get("files", [])]
