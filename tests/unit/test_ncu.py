"""NCU: prompt insertion, masked OT targets, per-phase trainable parts, and that steps learn."""

import math

import numpy as np
import pytest
import torch

from otcurate import models, ncu


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return models.create("otcurate-tiny")


def _batch(clip, n=12):
    from otcurate.data import builtin

    recs = [builtin.shapes_record(3, i) for i in range(n)]
    return models.pairs_to_tensors([r.image for r in recs], [r.caption for r in recs], clip)


def _sims(B=9, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(
        img + 0.3 * torch.randn(B, d, generator=g, dtype=torch.float64), dim=1
    )
    neg = torch.nn.functional.normalize(
        -txt + 0.5 * torch.randn(B, d, generator=g, dtype=torch.float64), dim=1
    )
    return img, txt, neg


def test_prompted_text_is_normalised_and_differs(clip):
    _, tok = _batch(clip, 4)
    g = torch.Generator().manual_seed(0)
    prompt = ncu.NegationPrompt(4, clip.model.token_embedding.weight.shape[1], g)
    plain = ncu.encode_text(clip.model, tok)
    negated = ncu.encode_text(clip.model, tok, prompt)
    torch.testing.assert_close(plain, models.encode(clip, tokens=tok)[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(negated.norm(dim=1).detach().numpy(), 1.0, atol=1e-5)
    assert not torch.allclose(plain, negated)


def test_prompt_keeps_the_end_token_of_long_captions(clip):
    tok = clip.tokenizer(["a " * 40 + "circle"])  # fills the whole 16-token context
    assert int(tok.argmax(-1)) == tok.shape[1] - 1
    prompt = ncu.NegationPrompt(4, clip.model.token_embedding.weight.shape[1])
    out = ncu.encode_text(clip.model, tok, prompt)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="leaves no room"):
        ncu.encode_text(
            clip.model, tok, ncu.NegationPrompt(15, clip.model.token_embedding.weight.shape[1])
        )


@pytest.mark.parametrize("text_targets", ["reference", "normalised"])
@pytest.mark.parametrize("noisy_rows", [[1, 4, 7], []])
def test_masked_cells_carry_no_mass_and_targets_have_the_reference_sums(noisy_rows, text_targets):
    img, txt, neg = _sims()
    B = len(img)
    noisy = torch.zeros(B, dtype=torch.bool)
    noisy[noisy_rows] = True
    s_aug = torch.cat([img @ txt.T, (img * neg).sum(1, keepdim=True)], 1)
    tg = ncu.unlearn_targets(s_aug, noisy, reg=0.03, gamma=0.7, text_targets=text_targets)
    assert float(tg.plan_v[tg.forbidden].abs().max()) == 0.0
    assert float(tg.plan_t[tg.forbidden.T].abs().max()) == 0.0
    # clean rows never reach the extra column; noisy rows never keep their own caption
    for i in range(B):
        if noisy[i]:
            assert tg.plan_v[i, i] == 0 and tg.plan_v[i, -1] > 0
        else:
            assert tg.plan_v[i, -1] == 0
    torch.testing.assert_close(tg.target_v.sum(1), torch.ones(B, dtype=torch.float64))
    rows_t = tg.target_t.sum(1)
    expected = torch.ones(B + 1, dtype=torch.float64)
    if text_targets == "reference" and noisy_rows:
        # ul_clip.py: γ·rownorm(π_t) + (1−γ)·Lᵀ as written: a noisy pair's caption row has no
        # label (γ), the extra row holds every noisy image's label (γ + (1−γ)·k)
        expected[noisy_rows] = 0.7
        expected[-1] = 0.7 + 0.3 * len(noisy_rows)
    if not noisy_rows:
        expected[-1] = 0.0  # no noisy rows: the extra row is unused
    torch.testing.assert_close(rows_t, expected)
    # the plan is balanced: image marginals uniform
    torch.testing.assert_close(
        tg.plan_v.sum(1), torch.full((B,), 1 / B, dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_noisy_mass_moves_to_the_hardest_negative():
    img, txt, neg = _sims()
    noisy = torch.zeros(len(img), dtype=torch.bool)
    noisy[2] = True
    out = ncu.phase_b_losses(img, txt, neg, torch.tensor(20.0, dtype=torch.float64), noisy)
    assert torch.isfinite(out["loss"])
    s_aug = torch.cat([img @ txt.T, (img * neg).sum(1, keepdim=True)], 1)
    tg = ncu.unlearn_targets(s_aug, noisy)
    assert tg.target_v[2, -1] >= 0.3  # (1-γ) label plus plan mass
    assert tg.target_v[2, 2] == 0


def test_batch_rule_flags_the_lowest_own_caption_probability():
    img, txt, _ = _sims(B=10)
    txt = txt.clone()
    txt[[0, 1]] = txt[[1, 0]]  # rows 0 and 1 now hold each other's caption
    flags = ncu.batch_noisy(img, txt, 50.0, nc_ratio=0.2)
    assert flags.tolist() == [True, True] + [False] * 8


def _grads(model):
    return {
        n: p.grad is not None and float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("train_image_projection", [True, False])
def test_phase_a_trains_text_prompt_and_image_projection_only(clip, train_image_projection):
    model = clip.model
    x, tok = _batch(clip)
    prompt = ncu.NegationPrompt(4, model.token_embedding.weight.shape[1])
    ncu.set_phase(
        model, prompt, "A", frozen_text_blocks=1, train_image_projection=train_image_projection
    )
    model.zero_grad()
    img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
    out = ncu.phase_a_losses(
        img,
        ncu.encode_text(model, tok),
        ncu.encode_text(model, tok, prompt),
        model.logit_scale.exp(),
    )
    out["loss"].backward()
    g = _grads(model)
    proj = {n for n, _ in model.visual.named_parameters() if n.startswith("attnpool.c_proj.")}
    assert proj
    trained = {n[len("visual.") :] for n, v in g.items() if n.startswith("visual.") and v}
    assert trained == (proj if train_image_projection else set())
    assert g["transformer.resblocks.0.attn.in_proj_weight"] and g["text_projection"]
    assert prompt.ctx.grad is not None and float(prompt.ctx.grad.abs().sum()) > 0


@pytest.mark.parametrize("freeze_token_embedding", [False, True])
def test_phase_b_freezes_prompt_positions_and_first_blocks(clip, freeze_token_embedding):
    model = clip.model
    x, tok = _batch(clip)
    prompt = ncu.NegationPrompt(4, model.token_embedding.weight.shape[1])
    ncu.set_phase(
        model, prompt, "B", frozen_text_blocks=1, freeze_token_embedding=freeze_token_embedding
    )
    model.zero_grad()
    prompt.ctx.grad = None
    img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
    noisy = torch.zeros(len(x), dtype=torch.bool)
    noisy[:2] = True
    out = ncu.phase_b_losses(
        img,
        ncu.encode_text(model, tok),
        ncu.encode_text(model, tok, prompt),
        model.logit_scale.exp(),
        noisy,
    )
    out["loss"].backward()
    g = _grads(model)
    # the reference trains the token embedding (its freeze sets an attribute on the module)
    assert g["token_embedding.weight"] == (not freeze_token_embedding)
    assert not g["positional_embedding"]
    assert not any(v for n, v in g.items() if n.startswith("transformer.resblocks.0."))
    assert g["transformer.resblocks.1.attn.in_proj_weight"] and any(
        v for n, v in g.items() if n.startswith("visual.")
    )
    assert prompt.ctx.grad is None
    for p in model.parameters():
        p.requires_grad_(True)


@pytest.mark.parametrize(
    ("nc_source", "unlearn_cap", "seen"),
    [("detect", 0.1, 1 / 16), ("detect", None, 2 / 16), ("batch", 0.1, 1 / 16)],
)
def test_finetune_ncu_learns_and_clamps_the_temperature(nc_source, unlearn_cap, seen):
    torch.manual_seed(0)
    clip = models.create("otcurate-tiny")
    x, tok = _batch(clip, 16)
    noisy = np.zeros(16, dtype=bool)
    noisy[[3, 9]] = True
    with torch.no_grad():
        clip.model.logit_scale.fill_(math.log(100) + 1)
    r = ncu.finetune_ncu(
        clip.model,
        x,
        tok,
        ncu.NCUOptions(
            nc_source=nc_source,
            unlearn_cap=unlearn_cap,
            phase_a_fraction=0.3,
            lr_phase_a=1e-3,
            lr_prompt=3e-3,
        ),
        noisy=noisy if nc_source == "detect" else None,
        steps=10,
        batch_size=16,
        lr=1e-3,
        warmup=0,
        weight_decay=0.0,
        seed=0,
    )
    assert r.phase_a_steps == 3 and len(r.losses) == 10
    assert all(math.isfinite(v) for v in r.losses)
    assert float(clip.model.logit_scale) <= math.log(100) + 1e-6
    assert r.losses[-1] < r.losses[r.phase_a_steps]  # phase B loss went down
    # detect with a cap: int(0.1 * 16) = 1 of the 2 flagged rows unlearned, the other dropped
    assert r.noisy_seen == pytest.approx(seen)
    # one schedule over both phases: phase B starts where phase A's cosine left off
    from otcurate.optim import warmup_cosine

    assert r.lrs[3] == pytest.approx(1e-3 * warmup_cosine(4, steps=10, warmup=0))


def test_one_phase_b_step_lowers_the_loss():
    torch.manual_seed(1)
    clip = models.create("otcurate-tiny")
    model = clip.model
    x, tok = _batch(clip, 12)
    prompt = ncu.NegationPrompt(4, model.token_embedding.weight.shape[1])
    ncu.set_phase(model, prompt, "B", frozen_text_blocks=1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.002)
    noisy = torch.zeros(12, dtype=torch.bool)
    noisy[[0, 5]] = True

    def loss():
        img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        return ncu.phase_b_losses(
            img,
            ncu.encode_text(model, tok),
            ncu.encode_text(model, tok, prompt),
            model.logit_scale.exp(),
            noisy,
        )["loss"]

    model.eval()  # no dropout / batchnorm updates between the two evaluations
    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    assert float(loss()) < float(before)


def test_unsupported_text_encoder_is_a_clear_error():
    with pytest.raises(ValueError, match="NCU needs an open_clip text transformer"):
        ncu.encode_text(torch.nn.Linear(2, 2), torch.zeros(1, 4, dtype=torch.long))


def test_batch_rule_among_flags_only_the_given_rows():
    img, txt, _ = _sims(B=10)
    among = torch.zeros(10, dtype=torch.bool)
    among[[2, 5, 8]] = True
    nz = ncu.batch_noisy(img, txt, 10.0, 0.2, among=among)  # int(0.2 * 10) = 2 of the 3
    p = torch.softmax(10.0 * img @ txt.T, 1).diagonal()
    expected = sorted(sorted([2, 5, 8], key=lambda i: float(p[i]))[:2])
    assert torch.nonzero(nz).ravel().tolist() == expected
    assert ncu.batch_noisy(img, txt, 10.0, 0.9, among=among).sum() == 3  # never beyond `among`


def test_augmented_negated_caption_keeps_its_start_and_end_tokens(clip):
    _, tok = _batch(clip, 8)
    a = ncu.augment_tokens(tok, torch.Generator().manual_seed(0))
    b = ncu.augment_tokens(tok, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == tok.shape and not torch.equal(a, tok)
    eot = tok.max()
    for before, after in zip(tok, a, strict=True):
        assert after[0] == before[0] and int((after == eot).sum()) == 1
        n_before, n_after = int(before.argmax()), int(after.argmax())
        body_b, body_a = before[1:n_before].tolist(), after[1:n_after].tolist()
        if n_after == n_before:  # a swap: the same tokens, reordered
            assert sorted(body_a) == sorted(body_b)
        else:  # a deletion: a subsequence, one token shorter here (int(0.1 n) < 1)
            assert n_after == n_before - 1
            it = iter(body_b)
            assert all(t in it for t in body_a)


def test_reference_frozen_blocks_scale_with_depth(clip):
    assert ncu.reference_frozen_blocks(12) == 5 and ncu.reference_frozen_blocks(2) == 1
    assert ncu.text_depth(clip.model) == 2


@pytest.mark.parametrize("train_image_projection", [True, False])
def test_phase_a_of_finetune_ncu_trains_the_image_projection_only_when_asked(
    train_image_projection,
):
    torch.manual_seed(0)
    clip = models.create("otcurate-tiny")
    x, tok = _batch(clip, 16)
    proj = clip.model.visual.attnpool.c_proj.weight
    other = clip.model.visual.attnpool.q_proj.weight
    before, before_other = proj.detach().clone(), other.detach().clone()
    ncu.finetune_ncu(
        clip.model,
        x,
        tok,
        ncu.NCUOptions(
            nc_source="batch", phase_a_fraction=0.9, train_image_projection=train_image_projection
        ),
        noisy=None,
        steps=1,
        batch_size=16,
        lr=1e-3,
        warmup=0,
        weight_decay=0.0,
        seed=0,
    )  # fmt: skip  (steps=1: one phase A step, no phase B)
    assert (not torch.equal(proj.detach(), before)) == train_image_projection
    assert torch.equal(other.detach(), before_other)  # the rest of the image tower: frozen
