"""The fusions this package owns, in the order vLLM 0.26 runs them.

Each entry names vLLM's PassConfig flag, the class names vLLM uses for that
fusion (matched by name: some are only importable on some platforms), and the
package's own pass, once it has one. A fusion without a package pass is left
to vLLM's implementation.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Fusion:
    flag: str
    # vLLM's passes for this fusion; the package's pass replaces all of them.
    vllm_passes: tuple[str, ...]
    # "module:Class" of the package's pass, None while vLLM's is used.
    package_pass: str | None = None
    # "module:function" (config -> list of passes): vLLM's passes under the same flag that the
    # package's pass does not replace; they run right after it.
    companions: str | None = None

    def load_pass_class(self) -> type:
        assert self.package_pass is not None
        module, _, name = self.package_pass.partition(":")
        return getattr(importlib.import_module(module), name)

    def build_companions(self, config) -> list:
        if self.companions is None:
            return []
        module, _, name = self.companions.partition(":")
        return list(getattr(importlib.import_module(module), name)(config))


# Order of PostGradPassManager.configure in vLLM 0.26.
FUSIONS: tuple[Fusion, ...] = (
    Fusion(
        "enable_sp",
        ("SequenceParallelismPass",),
        "vllm_fusion.passes.sequence_parallelism:SequenceParallelismPass",
        # vLLM builds its AsyncTPPass (fuse_gemm_comms) only beside its own SP pass.
        "vllm_fusion.passes.sequence_parallelism:vllm_async_tp_passes",
    ),
    Fusion("fuse_gemm_comms", ("AsyncTPPass",)),
    Fusion(
        "fuse_act_padding",
        ("RocmAiterTritonAddRMSNormPadFusionPass",),
        "vllm_fusion.passes.rms_pad_fusion:RMSNormPadFusionPass",
    ),
    Fusion(
        "fuse_allreduce_rms",
        ("AllReduceFusionPass", "RocmAiterAllReduceFusionPass"),
        "vllm_fusion.passes.allreduce_rms_fusion:AllReduceFusionPass",
    ),
    Fusion(
        "fuse_norm_quant",
        ("RocmAiterRMSNormQuantFusionPass", "RMSNormQuantFusionPass"),
        "vllm_fusion.passes.rms_quant_fusion:RMSNormQuantFusionPass",
    ),
    Fusion(
        "fuse_act_quant",
        ("ActivationQuantFusionPass", "RocmAiterSiluMulFp8GroupQuantFusionPass"),
        "vllm_fusion.passes.act_quant_fusion:ActivationQuantFusionPass",
    ),
    Fusion(
        "fuse_rope_kvcache",
        ("RopeKVCacheFusionPass",),
        "vllm_fusion.passes.rope_kvcache_fusion:RopeKVCacheFusionPass",
    ),
    Fusion(
        "fuse_attn_quant",
        ("AttnQuantFusionPass",),
        "vllm_fusion.passes.attn_quant_fusion:AttnQuantFusionPass",
        # vLLM's MLAAttnQuantFusionPass (same flag) stays for MLA layers.
        "vllm_fusion.passes.attn_quant_fusion:vllm_mla_passes",
    ),
    Fusion(
        "enable_qk_norm_rope_fusion",
        ("QKNormRoPEFusionPass",),
        "vllm_fusion.passes.qk_norm_rope_fusion:QKNormRoPEFusionPass",
    ),
)

FUSION_FLAGS: tuple[str, ...] = tuple(f.flag for f in FUSIONS)


def by_flag(flag: str) -> Fusion:
    for fusion in FUSIONS:
        if fusion.flag == flag:
            return fusion
    raise KeyError(f"unknown fusion {flag!r}; known: {', '.join(FUSION_FLAGS)}")


def ownership(release) -> dict[str, list[str]]:
    """Who runs each fusion with this vLLM ``release``: ``owned`` (this package's pass),
    ``delegated`` (vLLM's pass) and ``unavailable`` (neither has one)."""
    return {
        "owned": [f.flag for f in FUSIONS if f.package_pass],
        "delegated": [f.flag for f in FUSIONS
                      if not f.package_pass and release.has_vllm_pass(f.flag)],
        "unavailable": [f.flag for f in FUSIONS
                        if not f.package_pass and not release.has_vllm_pass(f.flag)],
    }
