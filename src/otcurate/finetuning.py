"""Fine-tuning by method name: the dispatcher over `FINETUNE_METHODS`.

It imports every module a registered method lives in, so the static import closure of the
finetune stage (its dvc.yaml deps, tests/test_contract.py) covers the code its methods run,
while pre-training (`otcurate.train`) does not import `ncu` or `filtering` (nor the
detectors `filtering` rescores with).
"""

from __future__ import annotations

from otcurate import filtering, ncu, train  # noqa: F401 - FINETUNE_METHODS runs them
from otcurate import methods as registry
from otcurate.options import FINETUNE_METHODS


def finetune(method: str, model, images, tokens, opts=None, **kw) -> train.TrainResult:
    """Fine-tune by the named method with its options record (None: its defaults)."""
    opts = registry.checked("finetune", FINETUNE_METHODS, method, opts)
    return FINETUNE_METHODS[method].fn(model, images, tokens, opts, **kw)
