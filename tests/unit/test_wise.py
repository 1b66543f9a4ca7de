"""WiSE-FT weight interpolation, against the reference's formula (mlfoundations/wise-ft
`_merge`: (1 - alpha) * theta_0 + alpha * theta_1 for every key)."""

from __future__ import annotations

import pytest
import torch

from otcurate import wise


def _states():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    ft = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    base["ids"] = torch.arange(5)
    ft["ids"] = torch.arange(5) + 1
    return base, ft


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_interpolation_is_the_reference_merge(alpha):
    base, ft = _states()
    got = wise.interpolate(base, ft, alpha)
    for k in ("w", "b"):
        torch.testing.assert_close(got[k], (1 - alpha) * base[k] + alpha * ft[k])
    assert torch.equal(got["ids"], ft["ids"])  # integer buffers: the fine-tuned model's
    if alpha == 0.0:
        torch.testing.assert_close(got["w"], base["w"], rtol=0, atol=0)
    if alpha == 1.0:
        torch.testing.assert_close(got["w"], ft["w"], rtol=0, atol=0)


def test_interpolation_refuses_other_architectures_and_alphas():
    base, ft = _states()
    with pytest.raises(ValueError, match="alpha must be in"):
        wise.interpolate(base, ft, 1.5)
    with pytest.raises(ValueError, match="not one architecture"):
        wise.interpolate({**base, "w": torch.zeros(2, 2)}, ft, 0.5)
    with pytest.raises(ValueError, match="differ in their weights"):
        wise.interpolate({"w": base["w"]}, ft, 0.5)


def test_choose_alpha_takes_the_best_and_breaks_ties_toward_the_base():
    best, scores = wise.choose_alpha(lambda a: 1 - (a - 0.5) ** 2)
    assert best == 0.5 and set(scores) == set(wise.ALPHAS)
    best, _ = wise.choose_alpha(lambda a: 1.0 if a >= 0.5 else 0.0)
    assert best == 0.5
