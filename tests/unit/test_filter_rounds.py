"""finetune 'filter' with rounds: one round is plain fine-tuning on the unflagged pairs (the
same bytes); more rounds rescore the pairs with the model being fine-tuned and drop as many
as detect flagged, the rescored pairs chosen by that model's scores."""

import math

import numpy as np
import pytest
import torch

from otcurate import filtering, finetuning, models, train
from otcurate.options import FilterOptions, OTOptions


def _setup(n=40):
    from otcurate.data import builtin

    torch.manual_seed(0)
    clip = models.create("otcurate-tiny")
    recs = [builtin.shapes_record(2, i) for i in range(n)]
    x, tok = models.pairs_to_tensors([r.image for r in recs], [r.caption for r in recs], clip)
    noisy = np.zeros(n, dtype=bool)
    noisy[::4] = True
    return clip, x, tok, noisy


KW = dict(steps=6, batch_size=16, lr=1e-3, warmup=0, weight_decay=0.0, seed=0)


def test_one_round_is_plain_finetuning_on_the_unflagged_pairs():
    clip, x, tok, noisy = _setup()
    state = {k: v.clone() for k, v in clip.model.state_dict().items()}
    a = finetuning.finetune(
        "filter", clip.model, x, tok, FilterOptions(rounds=1), noisy=noisy, **KW
    )
    clip.model.load_state_dict(state)
    keep = torch.as_tensor(~noisy)
    b = train.train_contrastive(clip.model, x[keep], tok[keep], **KW)
    assert a.losses == b.losses


class _Drawn:
    """The images, recording the rows fetched once `recording` is set."""

    def __init__(self, x: torch.Tensor):
        self.x, self.rows, self.recording = x, [], False

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, rows):
        if self.recording:
            self.rows += torch.as_tensor(rows).tolist()
        return self.x[rows]


def test_rounds_drop_the_rescored_lowest_and_never_an_unscored_pair(monkeypatch):
    import otcurate.detect

    clip, x, tok, noisy = _setup()  # 40 pairs, 10 flagged (every 4th)
    scored = np.arange(40) < 36  # the last 4 stand for a distilled set: never rescored
    images = _Drawn(x)

    def rescored(method, image, text, opts=None, *, seed=0):
        assert method == "ot" and len(image) == 36 and not images.recording
        assert opts == OTOptions(max_iter=7)  # the options the caller gave, not the defaults
        images.recording = True  # from here on, only training batches fetch images
        return np.where(np.arange(36) >= 26, 0.0, 1.0)  # rows 26..35 lowest

    monkeypatch.setattr(otcurate.detect, "score", rescored)
    logged = {}
    r = finetuning.finetune(
        "filter", clip.model, images, tok, FilterOptions(rounds=2, rescore="ot"), noisy=noisy,
        scored=scored, rescore_options=OTOptions(max_iter=7),
        log=lambda k, v, s: logged.setdefault(k, []).append(s), **KW,
    )  # fmt: skip
    assert len(r.losses) == 6 and all(math.isfinite(v) for v in r.losses)
    drawn = set(images.rows)
    assert len(images.rows) == 3 * 16  # steps 4..6 after the rescore at step 3
    assert not drawn & set(range(26, 36))  # the rescored lowest 10 (as many as flagged) dropped
    assert drawn <= set(range(26)) | set(range(36, 40))
    flagged_then = set(np.flatnonzero(noisy)) - set(range(26, 36))
    assert drawn & flagged_then  # detect's flagged pairs are back: its flags no longer decide
    want = float(((np.arange(36) >= 26) != noisy[:36]).mean())
    assert r.metrics == {"filter_flags_changed_round_2": pytest.approx(want)}
    assert logged["filter_flags_changed"] == [2]  # logged at the last step of round 1


def test_rounds_need_flags_and_steps():
    clip, x, tok, noisy = _setup()
    with pytest.raises(ValueError, match="pass the method as opts.rescore"):  # the caller's
        finetuning.finetune("filter", clip.model, x, tok, FilterOptions(rounds=2, rescore="detect"),
                            noisy=noisy, **KW)  # fmt: skip
    with pytest.raises(ValueError, match="coreset.exclude_flagged: false"):
        finetuning.finetune("filter", clip.model, x, tok, FilterOptions(rounds=2),
                            noisy=np.zeros(40, dtype=bool), **KW)  # fmt: skip
    with pytest.raises(ValueError, match="needs at least as many steps"):
        finetuning.finetune("filter", clip.model, x, tok, FilterOptions(rounds=3),
                            noisy=noisy, **(KW | {"steps": 1}))  # fmt: skip


def test_embed_pairs_matches_the_towers_and_rescore_must_be_a_detect_method():
    clip, x, tok, _ = _setup(10)
    clip.model.eval()
    img, txt = filtering.embed_pairs(clip.model, x, tok, batch_size=3)
    with torch.no_grad():
        torch.testing.assert_close(img, clip.model.encode_image(x, normalize=True))
        torch.testing.assert_close(txt, clip.model.encode_text(tok, normalize=True))
    with pytest.raises(ValueError, match="rescore must be 'detect' or one of"):
        FilterOptions(rescore="cosine")
    with pytest.raises(ValueError, match="rounds must be"):
        FilterOptions(rounds=0)
