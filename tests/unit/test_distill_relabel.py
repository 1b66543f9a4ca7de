"""WMDD's relabel step: augmented views, the teacher's soft labels, and the student's KL."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF1

from otcurate import distill as dist
from otcurate import finetuning, models
from otcurate.data.records import ClassInfo
from otcurate.evaluate import class_means


def _classifier(clip, prompts):
    """The teacher's classes: the mean of each class's prompt embeddings."""
    return class_means(models.encode_texts(clip, [p for row in prompts for p in row]), len(prompts))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    clip = models.create("otcurate-tiny")
    clip.model.eval()
    return clip


def test_views_are_seeded_in_bounds_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = dist.sample_views(5, 7, (32, 24), 0.08, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a, dist.sample_views(5, 7, (32, 24), 0.08, seed=3))
    assert not torch.equal(a, dist.sample_views(5, 7, (32, 24), 0.08, seed=4))
    top, left, h, w, flip = a.reshape(-1, 5).T
    assert (
        (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 24).all()
    )
    assert set(flip.tolist()) <= {0.0, 1.0} and 0 < flip.mean() < 1
    area = h * w / (32 * 24)
    assert area.min() >= 0.08 - 0.02 and area.max() <= 1.0
    full = dist.sample_views(3, 4, (32, 32), 1.0, seed=0)  # min_scale 1: the whole image
    assert (full[..., 2:4] == 32).all()


def test_apply_views_matches_torchvision_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g)
    v = torch.tensor([[2, 3, 8, 10, 0], [0, 0, 16, 16, 1], [5, 1, 11, 7, 1]], dtype=torch.float)
    got = dist.apply_views(x, v)
    for i, (t, left, h, w, f) in enumerate(v.long().tolist()):
        want = TF1.resized_crop(x[i], t, left, h, w, [16, 16], antialias=True)
        want = TF1.hflip(want) if f else want
        torch.testing.assert_close(got[i], want)
    torch.testing.assert_close(got[1], x[1].flip(-1))  # the whole image, flipped


def test_relabel_logits_are_the_teachers_scaled_cosines(tiny):
    g = torch.Generator().manual_seed(1)
    pix = torch.rand(4, 3, 32, 32, generator=g)
    info = ClassInfo(["red circle", "blue square", "green star"], ["a {}", "a photo of a {}"])
    prompts = dist.class_prompts(info, [0, 1, 2])
    assert prompts[1] == ["a blue square", "a photo of a blue square"]
    cls = _classifier(tiny, prompts)
    cfg = tiny.preprocess_cfg
    soft = dist.relabel(
        tiny.model, pix, cls, prompts, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        opts=dist.RelabelOptions(views=3, min_scale=0.3), seed=0,
    )  # fmt: skip
    assert soft.logits.shape == (4, 3, 3) and soft.views.shape == (4, 3, 5)
    i, v = 2, 1
    x = dist.apply_views(pix[i : i + 1], soft.views[i, v : v + 1])
    mu = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    sd = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        f = F.normalize(tiny.model.encode_image((x - mu) / sd), dim=-1)
        want = tiny.model.logit_scale.exp() * f @ cls.T
    torch.testing.assert_close(soft.logits[i, v], want[0], rtol=1e-4, atol=1e-4)
    m = dist.soft_label_metrics(soft, [0, 1, 2, 0])
    assert 0 <= m["relabel_teacher_entropy"] <= np.log(3) + 1e-6
    assert 0 <= m["relabel_teacher_view_acc"] <= 1 and m["relabel_views"] == 3


def test_cluster_prompts_are_the_captions_nearest_each_centre():
    text = F.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0.5, 1], [0, 1], [0.1, 0.9]]), dim=1)
    classes = np.array([0, 0, 1, 1, 1])
    caps = ["a", "b", "c", "d", "e"]
    got = dist.class_prompts(
        None, [0, 1], captions=caps, text=text, classes=classes, candidates=np.arange(5)
    )
    assert [len(r) for r in got] == [2, 2]  # as many per class: the smallest cluster's size
    assert set(got[0]) == {"a", "b"} and set(got[1]) == {"d", "e"}  # c is the outlier


def _replay(clip, logits, prompts, n_views=2):
    cfg = clip.preprocess_cfg
    g = torch.Generator().manual_seed(5)
    m = logits.shape[0]
    return dist.SoftReplay(
        pixels=torch.rand(m, 3, 32, 32, generator=g),
        views=dist.sample_views(m, n_views, (32, 32), 0.5, seed=0),
        logits=logits,
        prompts=clip.tokenizer([t for row in prompts for t in row]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        batch_size=4,
    )


def test_soft_label_loss_is_zero_against_itself_and_learns_a_target(tiny):
    prompts = [["a red circle"], ["a blue square"], ["a green star"]]
    cls = _classifier(tiny, prompts)
    cfg = tiny.preprocess_cfg
    g = torch.Generator().manual_seed(5)
    pix = torch.rand(6, 3, 32, 32, generator=g)
    soft = dist.relabel(
        tiny.model, pix, cls, prompts, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        opts=dist.RelabelOptions(views=2, min_scale=0.5), seed=0,
    )  # fmt: skip
    r = dist.SoftReplay(
        pixels=pix, views=soft.views, logits=soft.logits,
        prompts=tiny.tokenizer([t for row in prompts for t in row]),
        mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), batch_size=4,
    )  # fmt: skip
    with torch.no_grad():  # the teacher against its own labels: KL 0
        own = dist.soft_label_loss(tiny.model, r, torch.Generator().manual_seed(0))
    assert float(own) == pytest.approx(0.0, abs=1e-4)

    # A student trained by KL alone (no pairs) towards a one-hot-ish target gets closer.
    torch.manual_seed(1)
    student = models.create("otcurate-tiny")
    target = torch.full((6, 2, 3), -5.0)
    target[:, :, 0] = 5.0
    rep = _replay(student, target, prompts)
    with torch.no_grad():
        before = float(dist.soft_label_loss(student.model, rep, torch.Generator().manual_seed(0)))
    res = finetuning.finetune(
        "clip", student.model, torch.empty(0, 3, 32, 32), torch.empty(0, 77, dtype=torch.long),
        noisy=np.zeros(0, bool), steps=30, batch_size=8, lr=1e-3, warmup=0, weight_decay=0.0,
        seed=0, log=None, replay=rep,
    )  # fmt: skip
    with torch.no_grad():
        after = float(dist.soft_label_loss(student.model, rep, torch.Generator().manual_seed(0)))
    assert len(res.losses) == 30 and after < 0.5 * before


def test_replay_does_not_change_the_pair_batches(tiny):
    """The soft-label term draws from its own generator: weight 0 trains exactly as none."""
    prompts = [["a red circle"], ["a blue square"]]
    g = torch.Generator().manual_seed(2)
    images, tokens = torch.rand(8, 3, 32, 32, generator=g), tiny.tokenizer(["x"] * 8)
    runs = []
    for weight in (None, 0.0):
        torch.manual_seed(3)
        student = models.create("otcurate-tiny")
        rep = None
        if weight is not None:
            rep = _replay(student, torch.zeros(3, 2, 2), prompts)
            rep = dist.SoftReplay(**{**rep.__dict__, "weight": weight})
        res = finetuning.finetune(
            "clip", student.model, images, tokens, noisy=np.zeros(8, bool), steps=3,
            batch_size=4, lr=1e-3, warmup=0, weight_decay=0.0, seed=0, log=None, replay=rep,
        )  # fmt: skip
        runs.append(res.losses)
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)


def test_soft_replay_checks_its_shapes(tiny):
    with pytest.raises(ValueError, match="soft labels for 3 images"):
        dist.SoftReplay(
            pixels=torch.rand(2, 3, 8, 8), views=torch.zeros(3, 2, 5), logits=torch.zeros(3, 2, 2),
            prompts=torch.zeros(2, 77, dtype=torch.long), mean=(0, 0, 0), std=(1, 1, 1),
        )  # fmt: skip


def test_beside_pairs_the_views_never_move_batchnorm_statistics(tiny):
    """A base in training mode against its own soft labels: loss 0, running statistics kept;
    batch_norm "batch" (a student from scratch) trains BatchNorm on the views."""
    import copy

    prompts = [["a red circle"], ["a blue square"]]
    cls = _classifier(tiny, prompts)
    cfg = tiny.preprocess_cfg
    pix = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    soft = dist.relabel(
        tiny.model, pix, cls, prompts, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        opts=dist.RelabelOptions(views=2, min_scale=0.08), seed=0,
    )  # fmt: skip
    model = copy.deepcopy(tiny.model).train()
    r = dist.SoftReplay(
        pixels=pix, views=soft.views, logits=soft.logits,
        prompts=tiny.tokenizer([t for row in prompts for t in row]),
        mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), batch_size=4,
    )  # fmt: skip
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    with torch.no_grad():
        kept = r.loss(model, torch.Generator().manual_seed(0))
    assert float(kept) == pytest.approx(0.0, abs=1e-4) and torch.equal(bn.running_mean, before)
    assert bn.training  # put back as it was
    with torch.no_grad():
        dist.SoftReplay(**{**r.__dict__, "batch_norm": "batch"}).loss(
            model, torch.Generator().manual_seed(0)
        )
    assert not torch.equal(bn.running_mean, before)
