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


def test_grouped_recall_with_several_captions_per_image_by_hand():
    # 3 images on the axes; 5 captions: 0,1 -> image 0; 2 -> image 1; 3,4 -> image 2.
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [0, 1.0, 0], [0.8, 0, 0.6], [0, 0, 1.0]])
    owner = torch.tensor([0, 0, 1, 2, 2])
    r = ev.retrieval_recall_grouped(image, text, owner, ks=(1, 2))
    # image 0: best text 0 (its own) hit; image 1: best text 2 hit;
    # image 2: best text 4 (own) hit -> i2t@1 = 1.
    assert r["i2t_r1"] == 1.0
    # text 1 (owner 0) is closest to image 1 -> miss at 1, hit at 2; text 3 (owner 2) is
    # closest to image 0 -> miss at 1, hit at 2; the other three hit at 1.
    assert r["t2i_r1"] == pytest.approx(3 / 5) and r["t2i_r2"] == 1.0


def test_grouped_recall_equals_paired_recall_with_one_caption_each():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(30, 8, generator=g), dim=1)
    caps = [f"caption {i}" for i in range(30)]
    assert ev.retrieval_recall_grouped(img, txt, torch.arange(30)) == ev.retrieval_recall(
        img, txt, caps
    )
