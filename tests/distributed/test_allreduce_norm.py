"""The fused all-reduce + RMSNorm kernel on 2 and 4 GPUs, one spawned process per GPU.

Every rank's output is compared with NCCL's all-reduce followed by the torch reference, and with
the reference of the kernel's own math (fp32 sum in rank order): residual_out exactly, the
normalized output within bf16/fp16 rounding, FP8 within one FP8 step. Also: CUDA graph replay,
two tensor-parallel groups running different call sequences at once (TP+DP), a pipeline of two
TP groups (TP+PP), ranks that disagree about the workspace, and a rank that never joins a call.
"""

from __future__ import annotations

import os
import socket
import time
import traceback

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs at least 2 CUDA GPUs", allow_module_level=True)

from tests.gpu import require_cuda_kernels  # noqa: E402

require_cuda_kernels()

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from tests.gpu.conftest import check_fp8_close  # noqa: E402
from vllm_fusion.ops import allreduce_workspace  # noqa: E402
from vllm_fusion.ops.allreduce_norm import all_reduce_ref, all_reduce_rms_norm_ref  # noqa: E402

TOKENS = (0, 1, 7, 64, 512, 4096)
HIDDEN = (4096, 8192, 2880)
CAPACITY = 4096 * 8192 * 2  # 64 MiB: the largest message above
EPS = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> torch.device:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=torch.device("cuda", rank))
    return torch.device("cuda", rank)


def _run(worker, world: int, *args) -> None:
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    mp.spawn(_wrapped, args=(worker, world, _free_port(), args), nprocs=world, join=True)


def _wrapped(rank, worker, world, port, args):
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    device = _init(rank, world, port)
    try:
        worker(rank, world, device, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        allreduce_workspace.release_workspaces()
        dist.destroy_process_group()


def _workspace(key, group, device, cpu_group):
    ws = allreduce_workspace.get_workspace(key, group, CAPACITY, device, cpu_group)
    assert ws is not None, "no workspace"
    return ws


# The kernel's algorithms: True/False for two_shot (as the graph op picks), or PUSH.
PUSH = "push"
ALGORITHMS = (False, PUSH, True)


def _fused(ws, x, residual, weight, scale, two_shot):
    push = two_shot == PUSH
    return torch.ops.vllm_fusion.all_reduce_rms_norm(
        x, residual, weight, EPS, scale, ws.buffers, ws.counter, ws.rank, ws.capacity,
        bool(two_shot) and not push, push)


def _fits(ws, x, two_shot) -> bool:
    return two_shot != PUSH or ws.fits_push(x)


def _gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def _check_case(ws, group, device, tokens, hidden, dtype, residual_on, quant, two_shot, gen,
                exact_inputs=False):
    what = (f"rank {ws.rank}: tokens={tokens} hidden={hidden} {dtype} residual={residual_on} "
            f"quant={quant} two_shot={two_shot} exact_inputs={exact_inputs}")
    if exact_inputs:  # k/64 with |k| < 64: every order of summation is exact
        x = (torch.randint(-63, 64, (tokens, hidden), generator=gen, device=device) / 64).to(dtype)
    else:
        x = torch.randn(tokens, hidden, generator=gen, device=device, dtype=torch.float32).to(dtype)
    # Every rank shares residual, weight and scale (seeded alike), as in a TP layer.
    shared = torch.Generator(device).manual_seed(tokens * 7919 + hidden)
    residual = (torch.randn(tokens, hidden, generator=shared, device=device).to(dtype)
                if residual_on else None)
    weight = (1 + 0.1 * torch.randn(hidden, generator=shared, device=device)).to(dtype)
    scale = torch.tensor([0.02], device=device) if quant else None

    if not _fits(ws, x, two_shot):
        return
    out, residual_out = _fused(ws, x, residual, weight, scale, two_shot)
    inputs = _gather(x, group)
    ref_out, ref_residual = all_reduce_rms_norm_ref(inputs, residual, weight, EPS, scale)
    # The kernel's own math: the reduction and the residual are exact.
    assert torch.equal(residual_out, ref_residual), f"{what}: residual_out differs"
    if quant:
        check_fp8_close(out, scale, ref_out, scale, what=what)
    else:
        torch.testing.assert_close(out, ref_out, rtol=1e-2, atol=1e-2, msg=what)
    # Against NCCL's all-reduce (+ the torch reference): bf16 relative error <= 1e-2.
    nccl = x.clone()
    dist.all_reduce(nccl, group=group)
    nccl_out, nccl_residual = all_reduce_rms_norm_ref([nccl], residual, weight, EPS, scale)
    if exact_inputs or dist.get_world_size(group) == 2:
        assert torch.equal(residual_out, nccl_residual), f"{what}: residual_out != NCCL's"
    else:
        # NCCL's ring rounds every partial sum to bf16/fp16: compare as relative error.
        _check_relative_error(residual_out, nccl_residual, what)
    if not quant:
        _check_relative_error(out, nccl_out, what)


def _check_relative_error(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """||a - b|| / ||b|| <= 1e-2 (the bf16 relative error of a whole output)."""
    if b.numel() == 0:
        return
    err = (a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)
    assert err <= 1e-2, f"{what}: relative error {err.item():.3g} vs NCCL"


def _correctness_worker(rank, world, device, dtype):
    cpu = dist.new_group(backend="gloo")
    ws = _workspace("world", dist.group.WORLD, device, cpu)
    gen = torch.Generator(device).manual_seed(1000 + rank)
    for hidden in HIDDEN:
        for tokens in TOKENS:
            for residual_on in (True, False):
                for quant in (False, True):
                    for two_shot in ALGORITHMS:
                        _check_case(ws, dist.group.WORLD, device, tokens, hidden, dtype,
                                    residual_on, quant, two_shot, gen)
    for tokens in (1, 64, 4096):
        for two_shot in ALGORITHMS:
            _check_case(ws, dist.group.WORLD, device, tokens, 4096, dtype, True, False, two_shot,
                        gen, exact_inputs=True)
    torch.cuda.synchronize()


WORLDS = pytest.mark.parametrize("world", [2, 4], ids=["tp2", "tp4"])


@WORLDS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_matches_nccl_and_reference(world, dtype):
    _run(_correctness_worker, world, dtype)


def _graph_worker(rank, world, device):
    """Four calls (one-shot, two-shot, push, one-shot again) captured once and replayed with
    fresh inputs: the call counter and buffer halves advance on the device."""
    cpu = dist.new_group(backend="gloo")
    ws = _workspace("world", dist.group.WORLD, device, cpu)
    hidden, sizes = 4096, (5, 300, 17, 33)
    xs = [torch.zeros(t, hidden, device=device, dtype=torch.bfloat16) for t in sizes]
    residuals = [torch.zeros_like(x) for x in xs]
    weight = torch.randn(hidden, device=device, dtype=torch.bfloat16)
    shots = (False, True, PUSH, False)
    _fused(ws, xs[0], residuals[0], weight, None, False)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [_fused(ws, x, r, weight, None, s) for x, r, s in zip(xs, residuals, shots)]
    gen = torch.Generator(device).manual_seed(rank)
    for step in range(20):
        for x, r in zip(xs, residuals):
            x.copy_(torch.randn(x.shape, generator=gen, device=device))
            r.copy_(torch.full(r.shape, float(step), device=device))
        graph.replay()
        for x, r, (out, res_out) in zip(xs, residuals, outs):
            ref_out, ref_res = all_reduce_rms_norm_ref(_gather(x, dist.group.WORLD), r, weight,
                                                       EPS)
            assert torch.equal(res_out, ref_res), f"rank {rank} replay {step}: residual_out"
            torch.testing.assert_close(out, ref_out, rtol=1e-2, atol=1e-2)
    torch.cuda.synchronize()


@WORLDS
def test_cuda_graph_replay(world):
    _run(_graph_worker, world)


def _subgroups(world: int, size: int):
    """Every rank creates every group (torch requires it); returns this rank's pair."""
    rank = dist.get_rank()
    mine = None
    for start in range(0, world, size):
        ranks = list(range(start, start + size))
        nccl, gloo = dist.new_group(ranks), dist.new_group(ranks, backend="gloo")
        if rank in ranks:
            mine = (start // size, nccl, gloo)
    return mine


def _tp_dp_worker(rank, world, device):
    """Two TP groups of 2 (data parallel replicas) run different numbers of calls of different
    sizes at the same time, each on its own workspace."""
    replica, group, cpu = _subgroups(world, 2)
    ws = _workspace(f"tp{replica}", group, device, cpu)
    gen = torch.Generator(device).manual_seed(rank)
    calls = 25 if replica == 0 else 11
    for i in range(calls):
        tokens = (1 + 37 * i) % 700 + 1 if replica == 0 else 2048 - 100 * i
        _check_case(ws, group, device, tokens, 4096, torch.bfloat16, i % 2 == 0, i % 3 == 0,
                    i % 4 == 1, gen)
    torch.cuda.synchronize()
    dist.barrier()


def _tp_pp_worker(rank, world, device):
    """Pipeline stage 0 (TP group {0, 1}) hands its residual stream to stage 1 ({2, 3}), which
    all-reduces again: both stages' workspaces live in one job without interfering."""
    stage, group, cpu = _subgroups(world, 2)
    ws = _workspace(f"pp{stage}", group, device, cpu)
    hidden, weight = 4096, torch.ones(4096, device=device, dtype=torch.bfloat16)
    gen = torch.Generator(device).manual_seed(rank)
    for step in range(6):
        tokens = 16 * (step + 1)
        x = torch.randn(tokens, hidden, generator=gen, device=device).to(torch.bfloat16)
        if stage == 0:
            out, residual_out = _fused(ws, x, None, weight, None, step % 2 == 1)
            ref_out, ref_res = all_reduce_rms_norm_ref(_gather(x, group), None, weight, EPS)
            assert torch.equal(residual_out, ref_res)
            dist.send(residual_out, dst=rank + 2)
        else:
            residual = torch.empty(tokens, hidden, device=device, dtype=torch.bfloat16)
            dist.recv(residual, src=rank - 2)
            out, residual_out = _fused(ws, x, residual, weight, None, step % 2 == 0)
            _, ref_res = all_reduce_rms_norm_ref(_gather(x, group), residual, weight, EPS)
            assert torch.equal(residual_out, ref_res)
    torch.cuda.synchronize()
    dist.barrier()


def test_tp_dp_groups_run_independently():
    _run(_tp_dp_worker, 4)


def test_tp_pp_stages():
    _run(_tp_pp_worker, 4)


def _disagree_worker(rank, world, device):
    """Rank 1 fails to allocate: every rank gets no workspace (none is left waiting)."""
    cpu = dist.new_group(backend="gloo")
    if rank == 1:
        def broken(*args, **kwargs):
            raise RuntimeError("injected allocation failure")

        allreduce_workspace._allocate = broken
    ws = allreduce_workspace.get_workspace("world", dist.group.WORLD, CAPACITY, device, cpu)
    assert ws is None, f"rank {rank} got a workspace although rank 1 failed"
    # Asked again: the outcome is remembered, no second collective.
    assert allreduce_workspace.get_workspace("world", dist.group.WORLD, CAPACITY, device,
                                             cpu) is None


def test_ranks_agree_when_one_cannot_allocate():
    _run(_disagree_worker, 2)


def _reduce_only_worker(rank, world, device):
    """all_reduce_ref (rank-order fp32 sum) equals NCCL's sum for 2 ranks, bit for bit."""
    x = torch.randn(257, 512, device=device).to(torch.bfloat16)
    nccl = x.clone()
    dist.all_reduce(nccl)
    assert torch.equal(all_reduce_ref(_gather(x, dist.group.WORLD)), nccl)


def test_reference_sum_equals_nccl_at_tp2():
    _run(_reduce_only_worker, 2)


PEER_TIMEOUT_S = 2.0


def _missing_peer_job(rank, port, out_dir):
    """Rank 1 makes the workspace but never calls the kernel: rank 0's call must stop after
    VLLM_FUSION_ALLREDUCE_TIMEOUT_S with the kernel's message, not hang. The trapped CUDA context
    cannot shut down cleanly, so both ranks leave through os._exit."""
    os.environ["VLLM_FUSION_ALLREDUCE_TIMEOUT_S"] = str(PEER_TIMEOUT_S)
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    device = _init(rank, 2, port)
    ws = _workspace("world", dist.group.WORLD, device, dist.new_group(backend="gloo"))
    done = os.path.join(out_dir, "outcome.txt")
    if rank == 1:
        deadline = time.monotonic() + 120
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.2)
        os._exit(0)
    x = torch.randn(64, 4096, device=device).to(torch.bfloat16)
    weight = torch.ones(4096, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    # The kernel's printf goes to this process's stdout: keep it in a file.
    log = os.open(os.path.join(out_dir, "rank0.log"), os.O_WRONLY | os.O_CREAT)
    os.dup2(log, 1)
    start = time.monotonic()
    try:
        _fused(ws, x, None, weight, None, False)
        torch.cuda.synchronize()
        outcome = "returned"
    except RuntimeError as e:
        outcome = f"raised {type(e).__name__}: {e}"
    elapsed = time.monotonic() - start
    with open(done + ".tmp", "w") as f:
        f.write(f"{elapsed:.3f}\n{outcome}\n")
    os.replace(done + ".tmp", done)
    os._exit(0)


def test_missing_peer_stops_the_kernel_with_a_message(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    mp.spawn(_missing_peer_job, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    elapsed, outcome = (tmp_path / "outcome.txt").read_text().split("\n", 1)
    assert outcome.startswith("raised"), f"the call did not fail: {outcome}"
    assert PEER_TIMEOUT_S <= float(elapsed) < PEER_TIMEOUT_S + 60, elapsed
    message = (tmp_path / "rank0.log").read_text()
    expected = "waited longer than VLLM_FUSION_ALLREDUCE_TIMEOUT_S for rank 1 to join call 1"
    assert expected in message, message
