import io
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from otcurate.data import builtin
from otcurate.data.records import (
    GENERIC_CAPTIONS,
    assign_splits,
    check_record,
    content_uid,
    plant_noise,
)


def test_plant_noise_ground_truth_is_exact():
    caps = [f"caption {i}" for i in range(101)]
    planted = plant_noise(caps, 0.3, seed=5)
    k = round(0.3 * 101)
    assert planted.noisy.sum() == k  # all captions distinct: every chosen pair is mismatched
    for i, c in enumerate(planted.captions):
        assert c == caps[planted.caption_from[i]]
        assert planted.noisy[i] == (planted.caption_from[i] != i)
    # a permutation of the chosen captions among themselves
    chosen = np.flatnonzero(planted.noisy)
    assert sorted(planted.caption_from[chosen]) == sorted(chosen)


def test_plant_noise_counts_identical_captions_as_clean():
    caps = ["same"] * 10 + ["other"]
    planted = plant_noise(caps, 1.0, seed=0)
    assert planted.noisy.sum() == 2  # only the two pairs swapping 'same' and 'other' changed text
    assert plant_noise(caps, 0.0, seed=0).noisy.sum() == 0


def test_plant_noise_is_seeded():
    caps = [str(i) for i in range(50)]
    a, b, c = plant_noise(caps, 0.5, 1), plant_noise(caps, 0.5, 1), plant_noise(caps, 0.5, 2)
    assert a.captions == b.captions and a.captions != c.captions


def _sattolo_before_kinds(captions, rate, seed):
    """plant_noise as it was before the noise kinds (a2cec11), verbatim."""
    n = len(captions)
    k = int(round(rate * n))
    src = np.arange(n)
    if k >= 2:
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(n, size=k, replace=False))
        perm = np.arange(k)
        for i in range(k - 1, 0, -1):
            j = int(rng.integers(i))
            perm[i], perm[j] = perm[j], perm[i]
        src[chosen] = chosen[perm]
    return [captions[j] for j in src], src


def test_shuffle_noise_is_todays_protocol():
    """kind='shuffle' is the default and draws exactly as before the kinds existed."""
    caps = [f"caption {i}" for i in range(60)]
    for rate, seed in ((0.4, 3), (0.2, 0), (1.0, 7)):
        a = plant_noise(caps, rate, seed)
        old_caps, old_src = _sattolo_before_kinds(caps, rate, seed)
        assert a.captions == old_caps and (a.caption_from == old_src).all()
        assert set(a.kind[a.noisy]) == {"shuffle"} and set(a.kind[~a.noisy]) <= {""}


def _words(caption):
    return set(re.findall(r"\w+", caption.lower()))


def _shape_captions(n, seed=0):
    return [builtin.shapes_record(seed, i, 8).caption for i in range(n)]


def _shape_records(n, seed=0):
    return [builtin.shapes_record(seed, i, 8) for i in range(n)]


def test_near_noise_takes_the_closest_caption_of_another_class():
    recs = _shape_records(400)
    caps, labels = [r.caption for r in recs], [r.label for r in recs]
    planted = plant_noise(caps, 0.5, 0, "near", labels)
    rows = np.flatnonzero(planted.noisy)
    assert len(rows) == 200
    for i in rows:
        j = planted.caption_from[i]
        assert planted.captions[i] == caps[j] != caps[i]
        # never a caption that still names the image's shape: another class ...
        assert labels[j] != labels[i]
        assert builtin.SHAPES[labels[i]] not in planted.captions[i]
        # ... and the closest such caption
        best = max(
            len(_words(caps[i]) & _words(c))
            for c, lab in zip(caps, labels, strict=True)
            if lab != labels[i]
        )
        assert len(_words(caps[i]) & _words(planted.captions[i])) == best
    shared = [len(_words(caps[i]) & _words(planted.captions[i])) for i in rows]
    assert np.mean(shared) >= 4  # e.g. "a small red circle at the top left" -> "... square ..."
    shuffled = plant_noise(caps, 0.5, 0, "shuffle")
    rand = [
        len(_words(caps[i]) & _words(shuffled.captions[i])) for i in np.flatnonzero(shuffled.noisy)
    ]
    assert np.mean(shared) > np.mean(rand) + 2  # far closer than a random caption


def test_near_noise_without_labels_swaps_a_word_never_only_drops_one():
    """Without labels, "a red circle" is not near noise for "a small red circle": a subset
    of the words may still be true of the image."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    caps = _shape_captions(400)
    planted = plant_noise(caps, 0.5, 0, "near")
    content = lambda c: _words(c) - ENGLISH_STOP_WORDS  # noqa: E731
    for i in np.flatnonzero(planted.noisy):
        own, new = content(caps[i]), content(planted.captions[i])
        assert own - new and new - own, (caps[i], planted.captions[i])


def test_generic_noise_is_uninformative_and_comes_from_no_pair():
    caps = _shape_captions(100)
    planted = plant_noise(caps, 0.3, 1, "generic")
    rows = np.flatnonzero(planted.noisy)
    assert len(rows) == 30 and (planted.caption_from[rows] == -1).all()
    stems = {g.split("{")[0] for g in GENERIC_CAPTIONS}
    assert all(any(planted.captions[i].startswith(s) for s in stems) for i in rows)
    assert (planted.caption_from[~planted.noisy] == np.flatnonzero(~planted.noisy)).all()


def test_mixed_noise_plants_the_three_kinds_in_equal_parts():
    recs = _shape_records(300)
    planted = plant_noise([r.caption for r in recs], 0.5, 2, "mixed", [r.label for r in recs])
    counts = {k: int((planted.kind == k).sum()) for k in ("shuffle", "near", "generic")}
    assert planted.noisy.sum() == sum(counts.values())
    assert all(45 <= c <= 50 for c in counts.values()), counts  # 150 / 3, less unchanged texts


def test_plant_noise_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="noise kind must be one of shuffle, near, generic, mixed"):
        plant_noise(["a", "b"], 0.5, 0, "typo")


def test_splits_are_stable_per_uid_and_near_the_fractions():
    uids = [f"u{i}" for i in range(5000)]
    s = assign_splits(uids, 0.1, 0.2, seed=0)
    assert abs((s == "val").mean() - 0.1) < 0.02 and abs((s == "test").mean() - 0.2) < 0.02
    # adding data never moves an existing pair
    s2 = assign_splits(uids[:100] + ["new"], 0.1, 0.2, seed=0)
    assert list(s2[:100]) == list(s[:100])


def _png(color=(1, 2, 3)):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("image", "caption", "reason"),
    [
        (b"garbage", "ok", "undecodable image"),
        (None, "ok", "missing image"),
        ("PNG", "  ", "empty caption"),
        ("PNG", None, "empty caption"),
        ("PNG", 3, "caption is not text"),
    ],
)
def test_check_record_reasons(image, caption, reason):
    image = _png() if image == "PNG" else image
    assert reason in check_record(image, caption)


def test_check_record_accepts_good_pairs():
    assert check_record(_png(), "a caption") is None
    assert check_record(_png(), "tab\tand\nnewline, \u00e9t\u00e9 \U0001f600") is None


def _bomb(side=20000):
    """A 1-bit PNG of side x side pixels: a few hundred KB that decode to side**2 pixels."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("caption", "reason"),
    [
        ("\x00\x01\x02", "control characters (U+0000, U+0001, U+0002)"),
        ("a cat\x07", "control characters (U+0007)"),
        ("\u200b\u200b \u200d", "no visible text"),
        ("x" * 4097, "caption too long (4097 characters; the limit is 4096)"),
    ],
)
def test_check_record_refuses_hostile_captions(caption, reason):
    assert reason in check_record(_png(), caption)


def test_check_record_refuses_oversize_images_and_bombs_without_decoding():
    from otcurate.data.records import RecordLimits

    bomb = _bomb()  # 400M pixels: over PIL's own bomb guard (2 x 89M)
    assert len(bomb) < 2_000_000
    assert check_record(bomb, "ok").startswith("a decompression bomb (")
    big = _bomb(12000)  # 144M: under PIL's guard, over the default limit: never decoded
    assert check_record(big, "ok") == (
        "image too large (12000x12000 = 144000000 pixels; the limit is 64000000)"
    )
    big = _bomb(3000)  # 9M pixels: under PIL's guard, over a configured limit
    assert check_record(big, "ok") is None
    why = check_record(big, "ok", RecordLimits(max_image_pixels=1_000_000))
    assert why == "image too large (3000x3000 = 9000000 pixels; the limit is 1000000)"
    assert "caption too long" in check_record(_png(), "abc", RecordLimits(max_caption_chars=2))


def test_content_uid_depends_on_both_parts():
    assert content_uid(b"a", "x") != content_uid(b"a", "y") != content_uid(b"b", "x")
    assert content_uid(b"a", "x") == content_uid(b"a", "x")


def test_shapes_are_deterministic_and_captioned():
    a = builtin.shapes_record(0, 7)
    assert a == builtin.shapes_record(0, 7)
    assert a != builtin.shapes_record(1, 7)
    shape = builtin.SHAPES[a.label]
    assert shape in a.caption
    with Image.open(io.BytesIO(a.image)) as im:
        assert im.size == (32, 32)
    assert " a orange" not in " " + " ".join(
        builtin.shapes_record(0, i).caption for i in range(300)
    )


def test_digits_labels_and_captions():
    recs = list(builtin.digits(0, 20, image_size=24))
    assert len(recs) == 20
    for r in recs:
        assert builtin.DIGIT_NAMES[r.label] in r.caption or str(r.label) in r.caption
    with pytest.raises(ValueError, match="exceeds the 1797 images"):
        list(builtin.digits(0, 5000))


def test_glyphs_show_what_their_captions_say():
    """Every attribute in a glyphs caption is visible: its digit, colour and position."""
    a = builtin.glyphs_record(0, 7)
    assert a == builtin.glyphs_record(0, 7) and a != builtin.glyphs_record(1, 7)
    labels = set()
    for i in range(60):
        r = builtin.glyphs_record(3, i, 64)
        labels.add(r.label)
        name, digit = builtin.DIGIT_NAMES[r.label], str(r.label)
        assert re.search(rf"\b({name}|{digit})\b", r.caption), r.caption
        color = next(c for c in builtin.COLORS if c in r.caption)
        pos = (
            next(p for p in builtin.POSITIONS if p in r.caption)
            if "picture" not in r.caption
            else None
        )
        px = np.asarray(Image.open(io.BytesIO(r.image)).convert("RGB"), dtype=np.float64)
        near = np.linalg.norm(px - np.array(builtin.COLORS[color]), axis=2) < 60
        assert near.sum() > 10, (r.caption, near.sum())  # the colour is there
        if pos is not None:
            ys, xs = np.nonzero(near)
            fx, fy = builtin.POSITIONS[pos]
            assert abs(xs.mean() / 64 - fx) < 0.15 and abs(ys.mean() / 64 - fy) < 0.15, r.caption
    assert labels == set(range(10))
    assert builtin.glyphs_classes().class_names == list(builtin.DIGIT_NAMES)


@pytest.mark.parametrize("make", [builtin.shapes_record, builtin.glyphs_record])
def test_built_ins_in_worker_processes_give_the_same_records_in_order(make):
    one = list(builtin.generate(make, 4, 700, 16, start=30))
    # small chunks: several per worker, the consumer behind the producers
    two = list(builtin.generate(make, 4, 700, 16, start=30, workers=2, chunk=64))
    assert len(one) == 670 and one == two
    head = builtin.generate(make, 4, 700, 16, workers=2, chunk=64)
    assert [next(head) for _ in range(3)] == [make(4, i, 16) for i in range(3)]
    head.close()  # stopped early: the pool shuts down, nothing left running
    import multiprocessing

    assert not multiprocessing.active_children()


_KILLED_PARENT = """
import multiprocessing, time
from otcurate.data import builtin
records = builtin.generate(builtin.shapes_record, 0, 100_000, 16, workers=2, chunk=64)
next(records)
print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
time.sleep(60)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_built_in_workers_exit_when_the_process_that_started_them_is_killed():
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PARENT], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_running(p) for p in pids)
    finally:
        proc.send_signal(signal.SIGKILL)  # no pool shutdown runs
        proc.wait()
    deadline = time.monotonic() + 10
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(p) for p in pids), pids


def _fails_at_300(seed: int, index: int, image_size: int = 32):
    if index == 300:
        raise OSError(5, "the disk went away")
    return builtin.shapes_record(seed, index, image_size)


def test_a_failure_in_a_built_in_worker_reaches_the_consumer_in_order():
    records = builtin.generate(_fails_at_300, 0, 2000, 8, workers=2, chunk=64)
    got = []
    with pytest.raises(OSError, match="the disk went away"):
        for r in records:
            got.append(r)
    assert len(got) == 256  # every record before the failing chunk, and none after it


def test_a_built_in_maker_that_cannot_cross_processes_runs_in_this_one():
    made = []

    def local(seed, index, image_size=32):  # a closure: not picklable
        made.append(index)
        return builtin.shapes_record(seed, index, image_size)

    got = list(builtin.generate(local, 0, 400, 8, workers=2, chunk=64))
    assert made == list(range(400)) and got == list(
        builtin.generate(builtin.shapes_record, 0, 400, 8)
    )
