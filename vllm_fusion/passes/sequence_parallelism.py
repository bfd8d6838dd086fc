"""Sequence parallelism (``enable_sp``): TP all-reduce -> reduce-scatter + local norm + all-gather.

Each site the all-reduce fusion matches (``vllm.all_reduce`` after a row-parallel layer, then
``vllm_ir.fused_add_rms_norm``, or ``rms_norm`` after the embedding, optionally followed by static
FP8 quant) becomes::

    rs  = vllm.reduce_scatter(x, dim=0)            # this rank's 1/TP of the tokens, reduced
    y, residual = norm(rs, residual[rank slice])   # the norm on 1/TP of the tokens
    out = vllm.all_gather(quant(y), dim=0)         # every token again, for the next GEMM

The residual stream stays sharded between sites, so the norms (and the quant) do 1/TP of the
work, and the reduce-scatter / all-gather pair moves what the all-reduce moved. The gain comes
from the GEMM + collective overlap that ``fuse_gemm_comms`` builds on these collectives.

The residual slice each replacement inserts is correct when inserted: the pattern matcher walks
the graph from its end, so the layer before is still unreplaced and its residual full-size. Once
that layer is replaced too, its residual output is already the shard and the slice is a no-op;
vLLM's ``NoOpEliminationPass`` removes it (by the recorded shapes) before the graph compiles.

It needs the whole forward in one graph (the sharded residual cannot cross a piecewise split)
and token counts that are multiples of the TP size (vLLM 0.26 pads them when ``enable_sp`` is
on). It runs only for compile ranges from ``sp_min_token_num`` tokens up: below that the split
collectives cost more than the one all-reduce.
"""

from __future__ import annotations

import torch
import vllm.ir.ops
from vllm.config import VllmConfig

from vllm_fusion.config import FusionSettings
from vllm_fusion.logger import init_logger
from vllm_fusion.matrix import load_matrix
from vllm_fusion.passes.allreduce_rms_fusion import (
    AllReduceNormSite,
    site_variants,
    tp_group_name,
)
from vllm_fusion.passes.base import FusionPass
from vllm_fusion.passes.quant_schemes import FP8Scheme

logger = init_logger(__name__)

FLAG = "enable_sp"


def tp_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


def reduce_scatter(x: torch.Tensor, tp_size: int, group_name: str) -> torch.Tensor:
    return torch.ops.vllm.reduce_scatter.default(x, dim=0, world_size=tp_size,
                                                 group_name=group_name)


def all_gather(x: torch.Tensor, tp_size: int, group_name: str) -> torch.Tensor:
    return torch.ops.vllm.all_gather.default(x, dim=0, world_size=tp_size,
                                             group_name=group_name)


def sp_min_token_num(config: VllmConfig, platform: str) -> int | None:
    """The smallest token count SP runs at: ``pass_config.sp_min_token_num`` when set (vLLM
    0.26 fills it from its own table), else the matrix's threshold for this platform. None: not
    for this model here (hidden size below the platform's minimum, or no threshold)."""
    explicit = getattr(config.compilation_config.pass_config, "sp_min_token_num", None)
    if explicit is not None:
        return int(explicit)
    row = load_matrix()[FLAG].sp_thresholds.get(platform)
    model = config.model_config
    if row is None or model is None:
        return None
    hidden = model.get_hidden_size()
    if hidden < row.min_hidden:
        return None
    tp = config.parallel_config.tensor_parallel_size
    return row.per_gpu_bytes * tp // (hidden * model.dtype.itemsize)


class SequenceParallelPattern(AllReduceNormSite):
    """The site -> reduce-scatter, the same norm (and quant) on this rank's shard, all-gather."""

    def __init__(self, epsilon: float, dtype: torch.dtype, group_name: str, tp_size: int,
                 rank: int, fused_add: bool, scheme: FP8Scheme | None,
                 residual_out: bool = True):
        super().__init__(epsilon, dtype, group_name, fused_add, scheme, residual_out)
        self.tp_size = tp_size
        self.rank = rank

    def describe(self) -> str:
        return f"{self.describe_site()}/sp{self.tp_size}@rank{self.rank}"

    @property
    def replacement(self):
        eps, name, quantize = self.epsilon, self.group_name, self._quantize
        tp, rank = self.tp_size, self.rank
        fused_add, residual_out = self.fused_add, self.residual_out

        def body(x, weight, residual=None, scale=None):
            shard = reduce_scatter(x, tp, name)
            if fused_add:
                rows = shard.size(0)
                # This rank's rows of the full residual (a no-op once the site before is
                # replaced as well; see the module docstring).
                local = residual[rank * rows:(rank + 1) * rows]
                y, res = vllm.ir.ops.fused_add_rms_norm(shard, local, weight, eps)
            else:
                y, res = vllm.ir.ops.rms_norm(shard, weight, eps), shard
            out = all_gather(quantize(y, scale), tp, name)
            return (out, res) if residual_out else out

        return self._signature(body)


class SequenceParallelismPass(FusionPass):
    """``enable_sp``: every all-reduce + norm site -> reduce-scatter + norm + all-gather."""

    flag = FLAG
    name = "sequence_parallelism_pass"

    def __init__(self, config: VllmConfig, settings: FusionSettings):
        super().__init__(config, settings)
        from vllm.compilation.passes.utility.noop_elimination import NoOpEliminationPass

        self.tp_size = config.parallel_config.tensor_parallel_size
        self.full_graph = needs_no_split(config)
        self.min_tokens = None
        if self.tp_size < 2:
            logger.debug("vllm_fusion: %s needs TP > 1; nothing to split", self.flag)
            return
        self.min_tokens = sp_min_token_num(config, settings.platform)
        if self.min_tokens is None:
            logger.warning_once(
                "vllm_fusion: %s is off for this model on %s: no threshold (hidden size below "
                "the platform's minimum, or none measured); set pass_config.sp_min_token_num "
                "to force it", self.flag, settings.platform)
            return
        warn_decode_cost(settings.platform)
        max_batched = config.scheduler_config.max_num_batched_tokens
        if max_batched is not None:
            self.min_tokens = min(self.min_tokens, max_batched)
        self.noop_cleanup = NoOpEliminationPass(config)
        self.noop_cleanup.pass_name = f"{self.name}.{self.noop_cleanup.pass_name}"
        dtype, group_name, rank = self.pattern_dtype(), tp_group_name(), tp_rank()
        for epsilon, scheme, fused_add, residual_out in site_variants(self.flag, settings):
            self.register(SequenceParallelPattern(epsilon, dtype, group_name, self.tp_size, rank,
                                                  fused_add, scheme, residual_out))
        self.dump_patterns(config, self.pm_pass)

    def is_applicable_for_range(self, compile_range) -> bool:
        """Whole-graph compiles of at least ``min_tokens`` tokens only."""
        if not self.full_graph:
            logger.warning_once("vllm_fusion: %s needs the whole forward in one graph "
                                "(splitting_ops=[] or use_inductor_graph_partition); not "
                                "applied", self.flag)
            return False
        return (self.min_tokens is not None and compile_range.start >= self.min_tokens
                and super().is_applicable_for_range(compile_range))

    def rewrite(self, graph: torch.fx.Graph) -> int:
        matched = super().rewrite(graph)
        if matched:  # inside the rewrite: a failure here puts the graph back too
            self.noop_cleanup(graph)
        return matched


def warn_decode_cost(platform: str) -> None:
    """SP changes how vLLM runs every batch, not only those it splits: say what that measured."""
    row = load_matrix()[FLAG].sp_thresholds.get(platform)
    if row is not None and row.decode_cost:
        logger.warning_once(
            "vllm_fusion: %s splits batches from the threshold up, but vLLM's configuration "
            "for it applies to every batch; measured on %s: %s", FLAG, platform, row.decode_cost)


def needs_no_split(config: VllmConfig) -> bool:
    """Whether the compiled graph is the whole forward (what SP's sharded residual needs)."""
    compilation = config.compilation_config
    return bool(compilation.use_inductor_graph_partition or not compilation.splitting_ops)


def vllm_async_tp_passes(config: VllmConfig) -> list:
    """vLLM 0.26's ``AsyncTPPass`` (``fuse_gemm_comms``), which vLLM only builds beside its own
    SP pass: it fuses the GEMMs around this pass's reduce-scatters and all-gathers."""
    if not getattr(config.compilation_config.pass_config, "fuse_gemm_comms", False):
        return []
    try:
        from vllm.compilation.passes.fusion.collective_fusion import AsyncTPPass
    except ImportError:  # vLLM 0.33 removed it
        return []
    return [AsyncTPPass(config)]
