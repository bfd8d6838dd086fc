"""vllm_fusion.testing's paged KV cache, which the GPU tests and kernel benchmarks share."""

import pytest
import torch

from vllm_fusion.testing import paged_kv_cache


@pytest.mark.parametrize("context_lens, block_size, spare", [
    ([37], 16, 0), ([300, 17, 1000], 16, 3), ([1, 64, 65], 32, 1)])
def test_each_sequence_owns_its_own_shuffled_blocks(context_lens, block_size, spare):
    torch.manual_seed(0)
    k, v, table = paged_kv_cache(context_lens, 2, 64, torch.bfloat16, block_size=block_size,
                                 spare_blocks=spare, device="cpu")
    needed = [-(-n // block_size) for n in context_lens]
    assert k.shape == v.shape == (sum(needed) + spare, block_size, 2, 64)
    assert k.dtype == torch.bfloat16 and not torch.equal(k, v) and k.float().std() > 0.5
    assert table.shape == (len(context_lens), max(needed)) and table.dtype == torch.int32
    used = [table[i, :n].tolist() for i, n in enumerate(needed)]
    flat = [b for row in used for b in row]
    assert len(set(flat)) == len(flat) == sum(needed)  # no block shared between sequences
    assert all(0 <= b < k.shape[0] for b in flat)
    if len(flat) > 8:
        assert flat != sorted(flat)  # shuffled, as after many allocations
