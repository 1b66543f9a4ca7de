"""Fine-tune a tiny model on synthetic pairs, one process or one torchrun worker; rank 0 saves.

Used by tests/unit/test_parallel.py: `python tests/ddp_worker.py OUT METHOD BATCH` alone
or under `torchrun --nproc-per-node 2`, then the two weight files are compared.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from safetensors.torch import save_file

from otcurate import models, parallel
from otcurate.finetuning import finetune
from otcurate.ncu import NCUOptions
from otcurate.runtime import make_reproducible


def main(out: str, method: str, batch_size: int) -> None:
    device = parallel.init(torch.device("cpu"))
    rank, size = parallel.world()
    make_reproducible(0, 1, device)
    clip = models.create("otcurate-tiny")
    if size > 1:
        parallel.global_batchnorm(clip.model)
    g = torch.Generator().manual_seed(1)
    n = 48
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 400, (n, 16), generator=g)
    noisy = np.arange(n) % 5 == 0
    opts = NCUOptions(n_ctx=2, phase_a_fraction=0.5) if method == "ncu" else None
    res = finetune(
        method, clip.model, images, tokens, opts, noisy=noisy, steps=4, batch_size=batch_size,
        lr=1e-3, warmup=1, weight_decay=0.1, seed=0,
    )  # fmt: skip
    parallel.shutdown()
    if rank == 0:
        state = {k: v.detach().contiguous() for k, v in clip.model.state_dict().items()}
        save_file(state, f"{out}.safetensors")
        with open(f"{out}.json", "w") as f:
            json.dump({"losses": res.losses, "world_size": size}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
