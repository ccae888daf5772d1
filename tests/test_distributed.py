"""One process without torchrun (wsi_pipeline.distributed); two ranks in test_training (slow)."""

from __future__ import annotations

import pytest
import torch

from wsi_pipeline.distributed import Distributed, broadcast_flag, distributed, wrap_ddp


def test_single_process_is_rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed("cpu") as d:
        assert d == Distributed() and d.main and d.world == 1
    assert not Distributed(rank=1, world=2).main
    assert broadcast_flag(True, Distributed()) and not broadcast_flag(False, Distributed())
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model, torch.device("cpu"), Distributed()) is model
