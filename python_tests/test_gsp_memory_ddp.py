"""The warm-up memory under DistributedDataParallel (two CPU processes, gloo): every rank stores
every rank's pooled embeddings (the ranks' batches differ in size), so all pick the same
prototypes; the warm-up forwards leave no parameter unused (DDP without find_unused_parameters
would fail on the next step)."""

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_gloo_ranks
from torch import nn

from gsp_kernels.nn import GSP, kcenter_indices

WORLD_SIZE = 2
STEPS = 3  # two warm-up steps fill the memory (2 + 3 samples per step; the second overflows 8 rows), the third pools
BATCH_SIZES = (2, 3)  # per rank

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


def _fresh_layer():
    torch.manual_seed(0)
    return GSP(6, 5, num_prototypes=3, memory_size=8, pooling_method="gem", backend="reference").double()


def _batches():
    """``batches[step][rank]``: ``[B_rank, C, H, W]``."""
    generator = torch.Generator().manual_seed(1)
    return [[torch.randn(size, 6, 3, 3, generator=generator, dtype=torch.float64) for size in BATCH_SIZES] for _ in range(STEPS)]


def _rank_steps(rank: int, result_path: str) -> None:
    """One rank's STEPS training steps under DDP; saves its prototypes, memory and attributes."""
    layer = _fresh_layer()
    model = nn.parallel.DistributedDataParallel(layer)
    batches = _batches()
    attributes = []
    for step in range(STEPS):
        out = model(batches[step][rank])
        (out.embedding.square().mean() + out.attributes.square().mean()).backward()
        attributes.append(out.attributes.detach())
    torch.save({"prototypes": layer.prototypes.detach(), "memory": layer.memory, "attributes": attributes}, f"{result_path}.{rank}")


def test_memory_fills_with_every_ranks_embeddings_and_all_ranks_agree(tmp_path):
    result_path = str(tmp_path / "result")
    spawn_gloo_ranks(_rank_steps, WORLD_SIZE, tmp_path, result_path)
    results = [torch.load(f"{result_path}.{rank}") for rank in range(WORLD_SIZE)]

    layer = _fresh_layer()
    weight, bias = layer.projection.weight.detach(), layer.projection.bias.detach()
    batches = _batches()
    pooled = [torch.cat([batches[step][rank].mean(dim=(2, 3)) @ weight.T + bias for rank in range(WORLD_SIZE)]) for step in range(2)]
    pooled = torch.cat([pooled[0][:3], pooled[1]])  # the second step's 5 rows overflow rows 5-7: they fill rows 3-7
    expected_memory = pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1.0)  # lipschitz-normalized, rank order
    expected_prototypes = expected_memory[3:][kcenter_indices(expected_memory[3:], 3, covered=expected_memory[:3])]
    for result in results:
        torch.testing.assert_close(result["memory"], expected_memory)
        torch.testing.assert_close(result["prototypes"], expected_prototypes)
        assert not result["attributes"][0].any() and not result["attributes"][1].any()  # warm-up: zeros
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["attributes"][2].sum(1), torch.ones(BATCH_SIZES[rank], dtype=torch.float64))  # GSP from step 3
