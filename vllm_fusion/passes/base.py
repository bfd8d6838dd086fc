"""Base classes of the package's passes.

``FusionPass`` is vLLM's pattern-matcher pass (match counting, ``match_table``,
graph dumps, timing) with two additions: patterns may carry an ``extra_check``
(the kernel's shape and dtype limits), and ``uuid()`` changes with the package
version, the kernel library and the resolved settings. A pass that raises while
rewriting puts the graph back as it was and logs one warning: the model then
compiles unfused instead of vLLM failing.
"""

from __future__ import annotations

import torch
import torch._inductor.pattern_matcher as pm
from vllm.compilation.passes.inductor_pass import InductorPass, enable_fake_mode
from vllm.compilation.passes.vllm_inductor_pass import (
    VllmFusionPatternMatcherPass,
    VllmInductorPass,
    VllmPatternMatcherPass,
    VllmPatternReplacement,
)
from vllm.config import VllmConfig

from vllm_fusion import _kernels
from vllm_fusion.config import FusionSettings
from vllm_fusion.logger import init_logger
from vllm_fusion.passes import graph_snapshot
from vllm_fusion.passes.quant_schemes import FP8_SCHEMES, NVFP4, FP8Scheme, nvfp4_quant_op
from vllm_fusion.version import __version__

logger = init_logger(__name__)


def package_fingerprint() -> dict[str, str]:
    """What identifies this build of the package in every cache key."""
    return {"version": __version__, "kernels": _kernels.load().library_hash}


class FusionPattern(VllmPatternReplacement):
    """A pattern/replacement pair; ``extra_check`` vetoes matches the kernel can't take."""

    def extra_check(self, match: pm.Match) -> bool:
        return True

    def describe(self) -> str:
        """Stable text naming the pattern's parameters, for the pass uuid."""
        return type(self).__name__


class FusionPass(VllmFusionPatternMatcherPass):
    """A fusion of this package, built by the pass-manager hook."""

    # vLLM's PassConfig flag this pass serves, and the log/match-table name.
    flag: str = ""
    name: str = ""

    def __init__(self, config: VllmConfig, settings: FusionSettings):
        super().__init__(config, self.name)
        self.settings = settings
        self.matched_count = 0
        self._rewrite_errors: set[str] = set()

    def pattern_dtype(self) -> torch.dtype:
        """Activation dtype the patterns are traced with: the model's, if 16-bit."""
        if self.model_dtype in (torch.float16, torch.bfloat16):
            return self.model_dtype
        return torch.bfloat16

    def schemes(self) -> list[FP8Scheme]:
        """The quantization schemes the matrix lets this fusion take on this platform."""
        return [s for s in FP8_SCHEMES if self.settings.fuses_scheme(self.flag, s.family)]

    def fuses_nvfp4(self) -> bool:
        """Whether the matrix lets this fusion take NVFP4 here (SM100 only) and vLLM emits
        NVFP4 quant (``_C.scaled_fp4_quant``) that the patterns can match."""
        return self.settings.fuses_scheme(self.flag, NVFP4) and nvfp4_quant_op() is not None

    def is_applicable_for_range(self, compile_range) -> bool:
        """Only where the matrix says the kernel beats the unfused graph."""
        tokens = self.settings.token_ranges.get(self.flag)
        return tokens is None or tokens[0] <= compile_range.start and compile_range.end <= tokens[1]

    @enable_fake_mode
    def register(self, pr: FusionPattern) -> None:
        pm.register_replacement(
            pr.pattern,
            pr.replacement,
            pr.get_inputs(),
            self._trace_fn,
            self.pm_pass,
            extra_check=pr.extra_check,
            # Native and custom variants of some schemes trace to one graph.
            skip_duplicates=True,
        )
        self._pattern_replacements.append(pr)

    def rewrite(self, graph: torch.fx.Graph) -> int:
        """Apply the patterns; returns the number of replacements."""
        return self.pm_pass.apply(graph)

    @VllmInductorPass.time_and_log
    def __call__(self, graph: torch.fx.Graph) -> None:
        saved = graph_snapshot.snapshot(graph)
        try:
            matched = self.rewrite(graph)
        except Exception as e:  # a broken rewrite must never stop vLLM
            graph_snapshot.restore(graph, saved)
            self.matched_count = 0
            self._warn_rewrite_failed(e)
            return
        self.matched_count = matched
        VllmPatternMatcherPass.match_table[self.pass_name] += self.matched_count
        logger.debug("%s: Replaced %s patterns", self.pass_name, self.matched_count)

    def _warn_rewrite_failed(self, error: Exception) -> None:
        """One warning per distinct error: every piece of a model would repeat it."""
        message = f"{type(error).__name__}: {error}"
        logger.debug("%s failed while rewriting", self.pass_name, exc_info=error)
        if message in self._rewrite_errors:
            return
        self._rewrite_errors.add(message)
        logger.warning(
            "vllm_fusion: %s (%s) failed while rewriting a graph (%s); that graph is "
            "left unfused", self.flag, self.name, message,
        )

    def _pattern_types(self) -> list[type]:
        types = {type(pr) for pr in self._pattern_replacements}
        return sorted(types, key=lambda t: t.__qualname__)

    def uuid(self) -> str:
        return InductorPass.hash_dict(
            {
                "pass": InductorPass.hash_source(self, *self._pattern_types()),
                "patterns": sorted(pr.describe() for pr in self._pattern_replacements),
                "package": package_fingerprint(),
                "settings": self.settings.to_dict(),
            }
        )
