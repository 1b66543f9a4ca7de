import math

import numpy as np
import open_clip
import pytest
import torch

from otcurate import models
from otcurate.optim import batches, make_optimizer, param_groups, warmup_cosine
from otcurate.train import train_contrastive


def test_warmup_cosine_shape():
    vals = [warmup_cosine(s, steps=10, warmup=2) for s in range(10)]
    assert vals[0] == 0.5 and vals[1] == 1.0 and vals[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(vals[1:], vals[2:], strict=False))
    assert vals[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_batches_cover_each_epoch_once():
    g = torch.Generator().manual_seed(0)
    got = list(batches(10, 4, 4, g))
    assert len(got) == 4 and all(len(b) == 4 for b in got)
    first_epoch = torch.cat(got[:2])
    assert len(set(first_epoch.tolist())) == 8
    with pytest.raises(ValueError, match="at least 2"):
        list(batches(1, 4, 1, g))


def test_the_optimizer_is_fused_adamw_and_updates_as_torchs_loop():
    """make_optimizer takes torch's fused AdamW on CPU floats (#18); its updates match the
    loop AdamW's, with weight decay on the 2-D weights only and the schedule's learning rate."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    opt, sched = make_optimizer(param_groups(model, 0.1), lr=1e-2, steps=5, warmup=2)
    assert opt.defaults["fused"] is True
    ref_groups = param_groups(model, 0.1)
    by_id = {id(p): q for p, q in zip(model.parameters(), twin, strict=True)}
    ref_groups = [{**g, "params": [by_id[id(p)] for p in g["params"]]} for g in ref_groups]
    ref = torch.optim.AdamW(ref_groups, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, foreach=False)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(
        ref, lambda s: warmup_cosine(s, steps=5, warmup=2)
    )
    for _ in range(5):
        grads = [torch.randn_like(p) for p in twin]
        for p, q, g in zip(model.parameters(), twin, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step(), sched.step(), ref.step(), ref_sched.step()
    for p, q, p0 in zip(model.parameters(), twin, start, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(p.detach(), p0)  # every parameter moved


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return models.create("otcurate-tiny")


def _data(clip, n=16):
    from otcurate.data import builtin

    recs = [builtin.shapes_record(0, i) for i in range(n)]
    return models.pairs_to_tensors([r.image for r in recs], [r.caption for r in recs], clip)


def test_training_lowers_the_loss_and_clamps_the_temperature(tiny_clip):
    x, t = _data(tiny_clip)
    with torch.no_grad():
        tiny_clip.model.logit_scale.fill_(math.log(100) + 0.5)  # out of range: must come back
    r = train_contrastive(
        tiny_clip.model, x, t, steps=15, batch_size=16, lr=2e-3, warmup=0, weight_decay=0.0, seed=0
    )
    assert np.mean(r.losses[-3:]) < r.losses[0]
    assert float(tiny_clip.model.logit_scale) <= math.log(100) + 1e-6


def test_training_is_reproducible():
    outs = []
    for _ in range(2):
        torch.manual_seed(1)
        clip = models.create("otcurate-tiny")
        x, t = _data(clip, 8)
        r = train_contrastive(
            clip.model, x, t, steps=3, batch_size=8, lr=1e-3, warmup=1, weight_decay=0.1, seed=4
        )
        outs.append((r.losses, clip.model.visual.conv1.weight.detach().clone()))
    assert outs[0][0] == outs[1][0]
    assert torch.equal(outs[0][1], outs[1][1])


def test_save_load_roundtrip_in_open_clip_format(tiny_clip, tmp_path):
    models.save(tiny_clip, tmp_path)
    loaded = models.load(tmp_path)
    for (k, a), (_, b) in zip(
        tiny_clip.model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    m, _, pre = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    x, t = _data(loaded, 4)
    torch.testing.assert_close(m.encode_image(x), loaded.model.encode_image(x))
    assert open_clip.get_tokenizer(f"local-dir:{tmp_path}")(["a"]).shape[1] == 16


def test_encode_is_normalised(tiny_clip):
    x, t = _data(tiny_clip, 6)
    i, tt = models.encode(tiny_clip, x, t, batch_size=4)
    np.testing.assert_allclose(i.norm(dim=1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(tt.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_unknown_arch_and_missing_weights_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Nope'"):
        models.create("ViT-Nope")
    with pytest.raises(FileNotFoundError):
        models.load(tmp_path / "missing")


def test_fast_image_path_matches_open_clip_transform(tiny_clip):
    from otcurate.data import builtin
    from otcurate.data.records import decode_rgb

    recs = [builtin.shapes_record(0, i) for i in range(6)]
    fast, _ = models.pairs_to_tensors([r.image for r in recs], [r.caption for r in recs], tiny_clip)
    slow = models.images_to_tensor([decode_rgb(r.image) for r in recs], tiny_clip.preprocess)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    # other sizes go through open_clip's own transform
    big = [builtin.shapes_record(0, i, image_size=48) for i in range(2)]
    x, _ = models.pairs_to_tensors([r.image for r in big], [r.caption for r in big], tiny_clip)
    assert x.shape == (2, 3, 32, 32)


def test_lazy_images_decode_each_image_once_within_the_budget(tiny_clip, monkeypatch):
    """Within its budget a LazyImages decodes each image once (#18), and every batch is
    what decode_images gives it: the same bytes and memory layout (channels last on the
    vectorised path, where the convolutions round differently), mixed sizes included."""
    from otcurate.data import builtin, records

    recs = [builtin.shapes_record(0, i) for i in range(10)]
    recs += [builtin.shapes_record(0, i, image_size=48) for i in range(10, 12)]  # resized
    blobs = [r.image for r in recs]
    decoded = []
    real = records.decode_rgb

    def counting(image):
        decoded.append(image)
        return real(image)

    monkeypatch.setattr(records, "decode_rgb", counting)
    cached = models.LazyImages(blobs, tiny_clip)
    plain = models.LazyImages(blobs, tiny_clip, cache_bytes=0)
    for idx in ([3, 1, 10], [1, 2, 3], [11, 0, 3, 1], [0, 1]):
        want = models.decode_images([blobs[i] for i in idx], tiny_clip)
        for lazy in (cached, plain):
            got = lazy[torch.tensor(idx)]
            assert torch.equal(got, want) and got.stride() == want.stride()
    decoded.clear()
    for lazy in (plain, cached):
        lazy[torch.tensor([3, 10, 1])]
    assert len(decoded) == 3  # the plain one every time, the cached one never again
    keep = torch.zeros(12, dtype=torch.bool)
    keep[[1, 5, 11]] = True
    sub = cached[keep]  # a subset shares the decoded rows
    assert len(sub) == 3 and len(plain[keep]) == 3
    assert torch.equal(sub[torch.tensor([2, 0])], cached[torch.tensor([11, 1])])
    assert len(decoded) == 3
    sub[torch.tensor([1])]  # row 5: not decoded before
    assert len(decoded) == 4
    small = models.LazyImages(blobs, tiny_clip, cache_bytes=2 * 32 * 32 * 3)  # two images fit
    small[torch.tensor([0, 1, 2])], small[torch.tensor([0, 1, 2])]
    assert len(decoded) == 4 + 3 + 1
