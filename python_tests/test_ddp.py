"""DistributedDataParallel: two CPU processes (gloo) give the same GSP and zero-shot-loss
gradients as one process that averages the two shards' losses."""

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_gloo_ranks
from torch import nn

from gsp_kernels.losses import ZeroShotPredictionLoss
from gsp_kernels.nn import GSP

WORLD_SIZE = 2

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


class Objective(nn.Module):
    """GSP layer + an embedding loss + the zero-shot loss on its attributes."""

    def __init__(self):
        super().__init__()
        self.gsp = GSP(6, 8, num_prototypes=5, backend="reference")
        self.zero_shot = ZeroShotPredictionLoss(4, 3)

    def forward(self, feature_maps, labels):
        out = self.gsp(feature_maps)
        return out.embedding.square().mean() + self.zero_shot(out.attributes, labels)


def _data():
    generator = torch.Generator().manual_seed(0)
    feature_maps = torch.randn(WORLD_SIZE, 6, 6, 3, 3, generator=generator, dtype=torch.float64)  # [rank, B, C, H, W]
    labels = torch.tensor([[0, 0, 1, 2, 3, 3], [1, 1, 2, 2, 0, 3]])  # [rank, B]
    return feature_maps, labels


def _fresh_objective():
    torch.manual_seed(0)
    return Objective().double()  # float64: the two runs differ only by summation order


def _rank_gradients(rank: int, result_path: str) -> None:
    """One rank's DDP step; rank 0 saves the averaged gradients."""
    objective = _fresh_objective()
    model = nn.parallel.DistributedDataParallel(objective)
    feature_maps, labels = _data()
    model(feature_maps[rank], labels[rank]).backward()
    if rank == 0:
        torch.save({name: p.grad.clone() for name, p in objective.named_parameters()}, result_path)


def test_ddp_gradients_match_single_process(tmp_path):
    result_path = str(tmp_path / "grads.pt")
    spawn_gloo_ranks(_rank_gradients, WORLD_SIZE, tmp_path, result_path)
    ddp_grads = torch.load(result_path)

    objective = _fresh_objective()
    feature_maps, labels = _data()
    # DDP averages gradients over ranks: the same as the mean of the per-shard losses.
    loss = sum(objective(feature_maps[rank], labels[rank]) for rank in range(WORLD_SIZE)) / WORLD_SIZE
    loss.backward()
    assert set(ddp_grads) == {name for name, _ in objective.named_parameters()}
    for name, parameter in objective.named_parameters():
        torch.testing.assert_close(ddp_grads[name], parameter.grad, rtol=1e-9, atol=1e-12)
    assert ddp_grads["gsp.prototypes"].abs().sum() > 0
