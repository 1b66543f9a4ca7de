"""finetune 'filter' with rounds: one round is plain fine-tuning on the unflagged pairs (the
same bytes); more rounds rescore the pairs with the model being fine-tuned and drop as many
as detect flagged, the rescored pairs chosen by that model's scores."""

import math

import numpy as np
import pytest
import torch

from otcurate import filtering, finetuning, models, train
from otcurate.options import FilterOptions


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


def test_rounds_rescore_with_the_model_and_keep_the_flagged_count():
    clip, x, tok, noisy = _setup()
    logged = {}
    r = finetuning.finetune(
        "filter", clip.model, x, tok, FilterOptions(rounds=3, rescore="clip_score"),
        noisy=noisy, log=lambda k, v, s: logged.setdefault(k, []).append((s, v)), **KW,
    )  # fmt: skip
    assert len(r.losses) == 6 and all(math.isfinite(v) for v in r.losses)
    assert [s for s, _ in logged["filter_flags_changed"]] == [2, 4]  # after rounds 1 and 2
    assert all(0.0 <= v <= 1.0 for _, v in logged["filter_flags_changed"])


def test_embed_pairs_matches_the_towers_and_rescore_must_be_a_detect_method():
    clip, x, tok, _ = _setup(10)
    clip.model.eval()
    img, txt = filtering.embed_pairs(clip.model, x, tok, batch_size=3)
    with torch.no_grad():
        torch.testing.assert_close(img, clip.model.encode_image(x, normalize=True))
        torch.testing.assert_close(txt, clip.model.encode_text(tok, normalize=True))
    with pytest.raises(ValueError, match="rescore must be one of"):
        FilterOptions(rescore="cosine")
    with pytest.raises(ValueError, match="rounds must be"):
        FilterOptions(rounds=0)
