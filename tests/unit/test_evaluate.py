import numpy as np
import pytest
import torch

from otcurate import evaluate as ev


def test_retrieval_recall_by_hand():
    # 3 pairs; image 0 matches text 0 best, image 1 prefers text 2, image 2 prefers text 1.
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0.2, 1.0], [0, 1.0, 0.3]])
    txt = torch.nn.functional.normalize(txt, dim=1)
    r = ev.retrieval_recall(img, txt, ["a", "b", "c"], ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(1 / 3)
    assert r["i2t_r2"] == pytest.approx(1.0)
    assert r["t2i_r1"] == pytest.approx(1 / 3)


def test_identical_captions_count_as_hits():
    img = torch.eye(2)
    txt = torch.eye(2).flip(0)  # each image's nearest text is the other pair's
    assert ev.retrieval_recall(img, txt, ["x", "y"], ks=(1,))["i2t_r1"] == 0.0
    assert ev.retrieval_recall(img, txt, ["same", "same"], ks=(1,))["i2t_r1"] == 1.0


def test_zero_shot_accuracy():
    classes = torch.eye(3)
    img = torch.tensor([[1.0, 0.1, 0], [0, 0.2, 1.0], [0.9, 1.0, 0]])
    labels = torch.tensor([0, 2, 0])
    assert ev.zero_shot_accuracy(img, classes, labels) == pytest.approx(2 / 3)
    assert ev.zero_shot_accuracy(img, classes, labels, topk=2) == pytest.approx(1.0)


def test_class_embeddings_average_templates():
    def fake(prompts):
        return torch.nn.functional.normalize(torch.tensor([[len(p), 1.0] for p in prompts]), dim=1)

    c = ev.class_embeddings(fake, ["a", "bbbb"], ["{}", "x {}"])
    assert c.shape == (2, 2)
    np.testing.assert_allclose(c.norm(dim=1).numpy(), 1.0, rtol=1e-6)


def test_plots_write_pngs(tmp_path):
    from PIL import Image

    s = np.random.default_rng(0).normal(size=200)
    ev.plot_score_hist(tmp_path / "h.png", s, s < -1, "t")
    ev.plot_comparison(
        tmp_path / "c.png", {"base": {"zs_acc": 0.3}, "finetune": {"zs_acc": 0.5}}, ["zs_acc"]
    )
    for f in ("h.png", "c.png"):
        with Image.open(tmp_path / f) as im:
            assert im.format == "PNG"
    a = (tmp_path / "h.png").read_bytes()
    ev.plot_score_hist(tmp_path / "h.png", s, s < -1, "t")
    assert (tmp_path / "h.png").read_bytes() == a
