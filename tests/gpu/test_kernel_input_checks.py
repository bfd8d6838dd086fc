"""The kernels reject bad inputs with the message their fake impl gives (the fakes are
tested on CPU in tests/cpu/test_kernel_input_checks.py with the same table)."""

from __future__ import annotations

import pytest

from tests.gpu import require_cuda_kernels

require_cuda_kernels()

import torch  # noqa: E402

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from tests.kernel_input_cases import BAD_CALLS, VALID_CALLS  # noqa: E402


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c.id for c in BAD_CALLS])
def test_kernel_and_fake_reject_alike(case):
    op = getattr(torch.ops.vllm_fusion, case.op)
    with pytest.raises(RuntimeError) as kernel_error:
        op(*case.args("cuda"))
    kernel_message = str(kernel_error.value)
    assert f"vllm_fusion::{case.op}: " in kernel_message
    assert case.message in kernel_message
    with FakeTensorMode(), pytest.raises(RuntimeError) as fake_error:
        op(*case.args("cuda"))
    assert case.message in str(fake_error.value)
    torch.cuda.synchronize()  # a rejected call launched nothing that could fail later


@pytest.mark.parametrize("name", list(VALID_CALLS))
def test_valid_call_runs(name):
    out = getattr(torch.ops.vllm_fusion, name)(*VALID_CALLS[name]("cuda"))
    torch.cuda.synchronize()
    outs = out if isinstance(out, tuple) else (out,)
    assert all(t.is_cuda for t in outs)
