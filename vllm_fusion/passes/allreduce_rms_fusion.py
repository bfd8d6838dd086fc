"""Tensor-parallel all-reduce followed by (residual add +) RMSNorm (+ static FP8 quant) -> one op.

Matches what vLLM 0.26 emits after a row-parallel layer: ``vllm.all_reduce(x, group_name)`` of
the TP group, then the unlowered ``vllm_ir.fused_add_rms_norm`` (or ``rms_norm`` after the
embedding, where the all-reduced value itself becomes the residual), optionally followed by
``QuantFP8`` static per-tensor quant (custom op or native). Each site becomes
``vllm_fusion::fused_all_reduce_rms_norm``, this package's one-shot / two-shot all-reduce over
peer buffers with the norm in its epilogue. Patterns whose residual output is unused (the final
norm of the model) are registered too: the two-output pattern cannot match there.

The pass only runs for compile ranges whose largest message fits the size threshold of the
matrix (per architecture and TP size); its endpoint is added to vLLM's compile ranges.
"""

from __future__ import annotations

import torch
import torch._inductor.pattern_matcher as pm
import vllm.ir.ops
from vllm.config import VllmConfig

from vllm_fusion.config import FusionSettings
from vllm_fusion.logger import init_logger
from vllm_fusion.matrix import AllReduceSizes, load_matrix
from vllm_fusion.ops import allreduce_norm
from vllm_fusion.ops.fused_allreduce import OP_NAME
from vllm_fusion.passes.base import FusionPass, FusionPattern
from vllm_fusion.passes.quant_schemes import FP8_STATIC, EPSILONS, FP8Scheme, fake_value

logger = init_logger(__name__)

FLAG = "fuse_allreduce_rms"
# One-shot limit where only a maximum is given (a platform or TP size the matrix has no row for).
DEFAULT_ONE_SHOT_BYTES = 512 * 1024
_TOKENS, _HIDDEN = 5, 256


def tp_group_name() -> str:
    """vLLM's name of the TP group: the ``group_name`` its ``all_reduce`` nodes carry."""
    from vllm.distributed import get_tp_group

    return get_tp_group().unique_name


def message_sizes(platform: str, tp: int,
                  override_mib: float | None = None) -> AllReduceSizes | None:
    """The fused path's size limits for this platform and TP size (None: not measured there).
    ``override_mib`` (pass_config.fi_allreduce_fusion_max_size_mb) replaces the maximum."""
    sizes = load_matrix()[FLAG].message_sizes.get(platform, {}).get(tp)
    if sizes is None:
        if override_mib is None:
            return None
        max_bytes = int(override_mib * 2**20)
        return AllReduceSizes(max_bytes, min(DEFAULT_ONE_SHOT_BYTES, max_bytes), "user limit")
    if override_mib is not None:
        max_bytes = int(override_mib * 2**20)
        # A limit below the measured lower bound: the user's range is all fused.
        min_bytes = sizes.min_bytes if sizes.min_bytes < max_bytes else 0
        one_shot = min(sizes.one_shot_bytes, max_bytes)
        return AllReduceSizes(max_bytes, one_shot, sizes.measured, min_bytes,
                              min(sizes.push_bytes, one_shot))
    return sizes


def _all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.ops.vllm.all_reduce.default(x, group_name=group_name)


def _with_inputs(body, fused_add: bool, quant: bool):
    """``body`` as a function of exactly the pattern's inputs, by name (the matcher binds a
    pattern's and its replacement's inputs by their parameter names)."""
    if fused_add and quant:
        def fn(x, weight, residual, scale):
            return body(x, weight, residual, scale)
    elif fused_add:
        def fn(x, weight, residual):
            return body(x, weight, residual)
    elif quant:
        def fn(x, weight, scale):
            return body(x, weight, scale=scale)
    else:
        def fn(x, weight):
            return body(x, weight)
    return fn


def site_variants(flag: str, settings: FusionSettings):
    """(epsilon, scheme, fused_add, residual_out) of every all-reduce + norm site form, larger
    patterns first: quant before plain, fused-add before the first norm."""
    schemes = [FP8_STATIC] if settings.fuses_scheme(flag, FP8_STATIC.family) else []
    for epsilon in EPSILONS:
        for scheme in [*schemes, None]:
            for fused_add, residual_out in ((True, True), (True, False), (False, True)):
                yield epsilon, scheme, fused_add, residual_out


class AllReduceNormSite(FusionPattern):
    """The matched side: all_reduce -> ``fused_add_rms_norm`` (``fused_add``) or ``rms_norm``
    [-> static quant], what a row-parallel layer and the next norm emit. Subclasses give the
    replacement.

    ``residual_out=False``: the fused-add form whose residual output is unused (the final
    norm)."""

    def __init__(self, epsilon: float, dtype: torch.dtype, group_name: str, fused_add: bool,
                 scheme: FP8Scheme | None, residual_out: bool = True):
        self.epsilon = epsilon
        self.dtype = dtype
        self.group_name = group_name
        self.fused_add = fused_add
        self.scheme = scheme
        self.quant = scheme.matcher() if scheme is not None else None
        self.residual_out = residual_out

    def describe_site(self) -> str:
        add = "fused_add_" if self.fused_add else ""
        quant = f"+{self.scheme}" if self.scheme is not None else ""
        last = "" if self.residual_out else "/norm-only"
        return f"all_reduce[{self.group_name}]+{add}rms_norm{quant}{last}@eps={self.epsilon}"

    def get_inputs(self) -> list[torch.Tensor]:
        x = torch.empty(_TOKENS, _HIDDEN, dtype=self.dtype, device="cuda")
        weight = torch.empty(_HIDDEN, dtype=self.dtype, device="cuda")
        inputs = [x, weight]
        if self.fused_add:
            inputs.append(torch.empty_like(x))
        if self.scheme is not None:
            inputs.append(torch.empty(1, 1, dtype=torch.float32, device="cuda"))
        return inputs

    def _quantize(self, y, scale):
        return y if self.scheme is None else self.scheme.quantize(self.quant, y, scale)[0]

    def _signature(self, body):
        """``body(x, weight, residual=None, scale=None)`` with this site's exact inputs."""
        return _with_inputs(body, self.fused_add, self.scheme is not None)

    @property
    def pattern(self):
        eps, name, quantize = self.epsilon, self.group_name, self._quantize
        fused_add, residual_out = self.fused_add, self.residual_out

        def body(x, weight, residual=None, scale=None):
            reduced = _all_reduce(x, name)
            if fused_add:
                y, res = vllm.ir.ops.fused_add_rms_norm(reduced, residual, weight, eps)
            else:
                y, res = vllm.ir.ops.rms_norm(reduced, weight, eps), reduced
            out = quantize(y, scale)
            return (out, res) if residual_out else out

        return self._signature(body)


class AllReduceRMSNormPattern(AllReduceNormSite):
    """The site -> this package's fused all-reduce + norm op."""

    def __init__(self, epsilon: float, dtype: torch.dtype, group_name: str,
                 sizes: AllReduceSizes, fused_add: bool, scheme: FP8Scheme | None,
                 residual_out: bool = True):
        super().__init__(epsilon, dtype, group_name, fused_add, scheme, residual_out)
        self.sizes = sizes

    def describe(self) -> str:
        return (f"{self.describe_site()}/max={self.sizes.max_bytes}"
                f"/one_shot={self.sizes.one_shot_bytes}/push={self.sizes.push_bytes}")

    def extra_check(self, match: pm.Match) -> bool:
        """Only what the kernel takes: 16-bit activations, hidden a multiple of 8 up to 16384."""
        x, weight = fake_value(match, "x"), fake_value(match, "weight")
        if x is None or weight is None or x.dtype != weight.dtype:
            return False
        if x.dtype not in (torch.bfloat16, torch.float16) or x.dim() < 1:
            return False
        hidden = x.shape[-1]
        if not isinstance(hidden, int) or hidden % allreduce_norm.VECTOR or \
                hidden > allreduce_norm.MAX_HIDDEN:
            return False
        if self.fused_add:
            residual = fake_value(match, "residual")
            if residual is None or residual.dtype != x.dtype:
                return False
        return True

    @property
    def replacement(self):
        eps, name, sizes = self.epsilon, self.group_name, self.sizes
        residual_out = self.residual_out
        op = getattr(torch.ops.vllm_fusion, OP_NAME)

        def body(x, weight, residual=None, scale=None):
            out, res = op(x, residual, weight, eps, scale, name, sizes.max_bytes,
                          sizes.one_shot_bytes, sizes.push_bytes)
            return (out, res) if residual_out else out

        return self._signature(body)


class AllReduceFusionPass(FusionPass):
    """``fuse_allreduce_rms``: TP all-reduce + (add +) RMSNorm (+ static FP8) -> one op."""

    flag = FLAG
    name = "allreduce_rms_fusion_pass"

    def __init__(self, config: VllmConfig, settings: FusionSettings):
        super().__init__(config, settings)
        self.tp_size = config.parallel_config.tensor_parallel_size
        self.min_tokens = self.max_tokens = 0
        if self.tp_size < 2:
            logger.debug("vllm_fusion: %s needs TP > 1; nothing to fuse", self.flag)
            return
        override = getattr(config.compilation_config.pass_config,
                           "fi_allreduce_fusion_max_size_mb", None)
        self.sizes = message_sizes(settings.platform, self.tp_size, override)
        if self.sizes is None:  # the resolver keeps the flag off there; be safe anyway
            return
        self.min_tokens, self.max_tokens = token_bounds(config, self.sizes)
        dtype = self.pattern_dtype()
        group_name = tp_group_name()
        for epsilon, scheme, fused_add, residual_out in site_variants(self.flag, settings):
            self.register(AllReduceRMSNormPattern(
                epsilon, dtype, group_name, self.sizes, fused_add, scheme, residual_out))
        self.dump_patterns(config, self.pm_pass)

    def is_applicable_for_range(self, compile_range) -> bool:
        """Only ranges whose messages all lie where the fused kernel measured faster."""
        return (self.max_tokens > 0 and self.min_tokens <= compile_range.start
                and compile_range.end <= self.max_tokens
                and super().is_applicable_for_range(compile_range))


def token_bounds(config: VllmConfig, sizes: AllReduceSizes) -> tuple[int, int]:
    """(smallest, largest) token count whose message lies in ``sizes`` for this model."""
    model = config.model_config
    row_bytes = model.get_hidden_size() * model.dtype.itemsize
    return -(-sizes.min_bytes // row_bytes), sizes.max_bytes // row_bytes
