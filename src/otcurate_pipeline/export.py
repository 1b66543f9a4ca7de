"""Export the sets `evaluate` judges by (the test split and every `evaluate.sets` entry) in
CLIP_benchmark's webdataset layout, so that a checkpoint can be scored by a real client:

    <out>/<name>/test/0.tar ... nshards.txt     samples <key>.png|jpg|webp + <key>.cls | .txt
    <out>/<name>/dataset_type.txt               classification | retrieval
    <out>/<name>/classnames.txt                 classification: one class name per line
    <out>/<name>/zeroshot_classification_templates.txt   one template per line, "{c}"

(the layout `clip_benchmark.datasets.builder.build_wds_dataset` reads; a retrieval sample's
.txt holds every caption of its image, one per line).
"""

from __future__ import annotations

import io
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SHARD = 1000  # samples per tar
RESERVED = ("test_zeroshot", "test_retrieval", "results")  # the export's own folder names
_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


@dataclass(frozen=True)
class Exported:
    name: str  # the dataset's folder under the export root (clip_benchmark: wds/<name>)
    task: str  # zeroshot_classification | zeroshot_retrieval
    images: int
    folder: Path


def _image_entry(image: bytes) -> tuple[str, bytes]:
    """(extension, bytes) in a format clip_benchmark decodes (png/jpg/webp; others -> png)."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as im:
        ext = _EXT.get(im.format or "")
        if ext is not None:
            return ext, image
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        return "png", buf.getvalue()


def _write(folder: Path, samples: list[tuple[bytes, bytes, str]], meta: dict[str, str]) -> None:
    """samples: (image bytes, label/captions bytes, its extension: cls | txt); atomically."""
    tmp = folder.with_name(folder.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "test").mkdir(parents=True)
    n_shards = max(1, -(-len(samples) // SHARD))
    for s in range(n_shards):
        with tarfile.open(tmp / "test" / f"{s}.tar", "w") as tar:
            for i in range(s * SHARD, min(len(samples), (s + 1) * SHARD)):
                image, target, kind = samples[i]
                ext, data = _image_entry(image)
                for name, payload in ((f"{i:08d}.{ext}", data), (f"{i:08d}.{kind}", target)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    (tmp / "test" / "nshards.txt").write_text(f"{n_shards}\n")
    for fname, text in meta.items():
        (tmp / fname).write_text(text)
    if folder.exists():
        if not (folder / "dataset_type.txt").exists():  # not an earlier export: not ours
            shutil.rmtree(tmp)
            raise FileExistsError(
                f"{folder} exists and is not a CLIP_benchmark export; give another output "
                "folder or remove it."
            )
        shutil.rmtree(folder)
    tmp.replace(folder)


def write_classification(
    folder: Path,
    images: Sequence[bytes],
    labels: Sequence[int],
    class_names: Sequence[str],
    templates: Sequence[str],
) -> Exported:
    samples = [(im, f"{int(y)}".encode(), "cls") for im, y in zip(images, labels, strict=True)]
    meta = {
        "dataset_type.txt": "classification\n",
        "classnames.txt": "".join(f"{c}\n" for c in class_names),
        "zeroshot_classification_templates.txt": "".join(
            t.replace("{}", "{c}") + "\n" for t in templates
        ),
    }
    _write(folder, samples, meta)
    return Exported(folder.name, "zeroshot_classification", len(samples), folder)


def write_retrieval(
    folder: Path, images: Sequence[bytes], captions: Sequence[str], owner: Sequence[int]
) -> Exported:
    """`owner[j]`: the index in `images` of caption j's image."""
    per: dict[int, list[str]] = {}
    for c, o in zip(captions, owner, strict=True):
        per.setdefault(int(o), []).append(" ".join(c.split()))  # one caption per line
    samples = [(images[i], "\n".join(per[i]).encode(), "txt") for i in sorted(per)]
    _write(folder, samples, {"dataset_type.txt": "retrieval\n"})
    return Exported(folder.name, "zeroshot_retrieval", len(samples), folder)


def export_clip_benchmark(
    root: Path, out: Path, only: Sequence[str] = (), data: Path | None = None
) -> list[Exported]:
    """The test split (as `test_zeroshot` when it has classes, and `test_retrieval`) and
    each `evaluate.sets` entry (by its name) of the project at `root`, under `out`; `data`:
    ingest's folder when it is not where dvc.yaml puts it."""
    from otcurate.data.evalsets import group_images, load_clean
    from otcurate.data.shards import read_classes, read_split
    from otcurate_pipeline import layout
    from otcurate_pipeline.params import load_all, read_file

    params = load_all(read_file(root / "params.yaml"))
    data = data or root / layout.stages(root)["evaluate"].paths["data"]
    out.mkdir(parents=True, exist_ok=True)
    done: list[Exported] = []

    def wanted(name: str) -> bool:
        return not only or name in only

    test = read_split(data, "test", columns=["image", "caption", "label"])
    info = read_classes(data)
    images, captions = test["image"].to_pylist(), test["caption"].to_pylist()
    if info is not None and wanted("test_zeroshot"):
        labels = test["label"].to_pylist()
        done.append(
            write_classification(
                out / "test_zeroshot", images, labels, info.class_names, info.templates
            )
        )
    if wanted("test_retrieval"):
        unique, owner = group_images(images)
        done.append(write_retrieval(out / "test_retrieval", unique, captions, owner))
    for i, spec in enumerate(params["evaluate"].sets):
        if not wanted(spec.name):
            continue
        if spec.name in RESERVED:
            raise ValueError(
                f"evaluate.sets[{i}].name {spec.name!r} is a name the export uses itself "
                f"({', '.join(RESERVED)}); rename the set."
            )
        cset = load_clean(spec, key=f"evaluate.sets[{i}].hf")
        if spec.task == "classification":
            templates = spec.templates or cset.info.templates
            done.append(
                write_classification(
                    out / spec.name, cset.images, cset.labels, cset.info.class_names, templates
                )
            )
        else:
            done.append(
                write_retrieval(out / spec.name, cset.images, cset.captions, cset.caption_image)
            )
    return done


def clip_benchmark_command(e: Exported, model: str, results: Path) -> str:
    """The clip_benchmark command line that scores `model` (an open_clip folder) on `e`."""
    return (
        f"clip_benchmark eval --dataset wds/{e.name} --dataset_root {e.folder} "
        f"--task {e.task} --model local-dir:{model} --pretrained none "
        f"--output {results / (e.name + '.json')}"
    )
