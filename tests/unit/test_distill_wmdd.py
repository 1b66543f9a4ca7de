"""WMDD pieces: barycenters (POT), activation statistics, and the pixel synthesis."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from otcurate import distill as dist
from otcurate import models


def test_barycenter_with_as_many_points_as_members_is_the_members():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(9, 4, generator=g, dtype=torch.float64)
    classes = np.array([0] * 4 + [1] * 5)
    b = dist.barycenters(feats, classes, np.arange(9), ipc=10, seed=0)
    assert sorted(np.bincount(b.classes).tolist()) == [4, 5]
    assert max(b.cost.values()) < 1e-9
    np.testing.assert_allclose(
        b.points.double()[np.argsort(b.nearest)], feats[np.sort(b.nearest)], atol=1e-6
    )


def test_barycenter_points_find_the_modes_of_each_class():
    rng = np.random.default_rng(0)
    modes = np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0], [0.0, -3.0]])
    x = np.concatenate([modes[i] + 0.1 * rng.standard_normal((30, 2)) for i in range(4)])
    classes = np.repeat([0, 0, 1, 1], 30)  # two modes per class
    cand = np.arange(120)[::2]  # only even rows are candidates
    b = dist.barycenters(torch.as_tensor(x), classes, cand, ipc=2, seed=1)
    assert b.classes.tolist() == [0, 0, 1, 1]
    for c, want in ((0, modes[:2]), (1, modes[2:])):
        got = b.points[b.classes == c].double().numpy()
        d = np.linalg.norm(got[:, None] - want[None], axis=2)
        assert d.min(axis=1).max() < 0.2  # each point sits on a mode ...
        assert len(set(d.argmin(axis=1))) == 2  # ... and the two points cover both
    assert set(b.nearest) <= set(cand) and np.array_equal(classes[b.nearest], b.classes)


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    clip = models.create("otcurate-tiny")
    clip.model.eval()  # as a loaded base model: BatchNorm on its running statistics
    return clip


def test_stat_modules_of_resnet_and_vit(tiny_clip):
    assert len(dist.stat_modules(tiny_clip.model.visual)) == 4
    norms = dist.stat_modules(tiny_clip.model.visual, "batchnorm")
    assert norms[0] is tiny_clip.model.visual.bn1  # the stem first, as the reference
    assert norms == [
        m for m in tiny_clip.model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)
    ]
    vit = models.create("ViT-B-32").model.visual  # random weights; no download
    assert len(dist.stat_modules(vit)) == len(vit.transformer.resblocks)
    assert len(dist.stat_modules(vit, "batchnorm")) == len(vit.transformer.resblocks)
    with pytest.raises(ValueError, match="where must be one of stages, batchnorm"):
        dist.stat_modules(vit, "layers")


def test_batchnorm_statistics_are_each_layers_input(tiny_clip):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 32, 32, generator=g)
    stats = dist.class_statistics(tiny_clip.model, {0: x}, where="batchnorm")[0]
    norms = dist.stat_modules(tiny_clip.model.visual, "batchnorm")
    inputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: inputs.append(i[0])) for m in norms]
    with torch.no_grad():
        tiny_clip.model.encode_image(x)
    for h in hooks:
        h.remove()
    assert len(stats) == len(norms) == len(inputs)
    for (mean, var), a in zip(stats, inputs, strict=True):
        torch.testing.assert_close(mean, a.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(var, a.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)


def test_class_statistics_stream_equals_one_batch(tiny_clip):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, 32, 32, generator=g)
    streamed = dist.class_statistics(tiny_clip.model, {3: x}, batch_size=3)[3]
    whole = dist.class_statistics(tiny_clip.model, {3: x}, batch_size=100)[3]
    assert len(streamed) == 4
    for (m1, v1), (m2, v2) in zip(streamed, whole, strict=True):
        torch.testing.assert_close(m1, m2, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-5)
    # and equal to the per-channel moments computed directly
    acts = []
    h = tiny_clip.model.visual.layer1.register_forward_hook(lambda m, i, o: acts.append(o))
    with torch.no_grad():
        tiny_clip.model.encode_image(x)
    h.remove()
    torch.testing.assert_close(whole[0][0], acts[0].mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        whole[0][1], acts[0].var(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5
    )


def run_synthesis(clip, steps, seed=0, init=None, **options):
    g = torch.Generator().manual_seed(0)
    real = {
        0: torch.randn(8, 3, 32, 32, generator=g),
        1: torch.randn(8, 3, 32, 32, generator=g) + 1,
    }
    with torch.no_grad():
        feats = torch.cat([F.normalize(clip.model.encode_image(v), dim=-1) for v in real.values()])
    classes = np.repeat([0, 1], 8)
    bary = dist.barycenters(feats, classes, np.arange(16), ipc=2, seed=0)
    opts = dist.WmddOptions(steps=steps, **({"lr": 0.05} | options))
    stats = dist.class_statistics(clip.model, real, where=opts.stat_layers)
    classifier = F.normalize(torch.randn(2, feats.shape[1], generator=g), dim=-1)
    cfg = clip.preprocess_cfg
    return dist.synthesize(
        clip.model,
        bary,
        classifier,
        {0: 0, 1: 1},
        stats,
        size=(32, 32),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        scale=10.0,
        opts=opts,
        seed=seed,
        init=init,
    )


@pytest.mark.parametrize(
    "options", [{}, {"stat_layers": "batchnorm", "first_stat_weight": 10.0}], ids=["stages", "bn"]
)
def test_synthesis_lowers_its_loss_and_leaves_the_model_alone(tiny_clip, options):
    before = {k: v.clone() for k, v in tiny_clip.model.state_dict().items()}
    flags = [p.requires_grad for p in tiny_clip.model.parameters()]
    syn = run_synthesis(tiny_clip, steps=30, **options)
    assert syn.pixels.shape == (4, 3, 32, 32)
    assert 0.0 <= float(syn.pixels.min()) and float(syn.pixels.max()) <= 1.0
    assert np.mean(syn.losses[-5:]) < np.mean(syn.losses[:5])
    assert set(syn.terms) == {"feature", "ce", "statistics"}
    for k, v in tiny_clip.model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert [p.requires_grad for p in tiny_clip.model.parameters()] == flags


def test_synthesis_is_seeded(tiny_clip):
    a, b = run_synthesis(tiny_clip, 3, seed=5), run_synthesis(tiny_clip, 3, seed=5)
    torch.testing.assert_close(a.pixels, b.pixels, rtol=0, atol=0)
    assert not torch.equal(a.pixels, run_synthesis(tiny_clip, 3, seed=6).pixels)


def test_only_pickers_go_through_distill():
    with pytest.raises(ValueError, match="does not pick real examples"):
        dist.distill("wmdd", np.zeros(3, int), np.arange(3), 1, seed=0)


def test_synthesis_starts_from_the_given_images(tiny_clip):
    start = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    syn = run_synthesis(tiny_clip, 1, init=start, lr=1e-9)
    torch.testing.assert_close(syn.pixels, start, rtol=0, atol=1e-6)
    assert not torch.allclose(run_synthesis(tiny_clip, 1, lr=1e-9).pixels, start, atol=0.1)
    with pytest.raises(ValueError, match=r"init has shape \(2, 3, 32, 32\)"):
        run_synthesis(tiny_clip, 1, init=start[:2])
    with pytest.raises(ValueError, match="init must be 'noise' or 'real'"):
        dist.WmddOptions(init="zeros")
