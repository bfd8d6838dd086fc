"""Small models built from vLLM's own layers, shaped like a Llama decoder's
norm / quant / MLP sites, for pattern-matching tests."""

from __future__ import annotations

import torch

# Quantization schemes by name: (static, group shape name, column-major scales)
SCHEMES = {
    "fp8-static": (True, "PER_TENSOR", False),
    "fp8-per-token": (False, "PER_TOKEN", False),
    "fp8-group128": (False, (1, 128), False),
    "fp8-group128-colmajor": (False, (1, 128), True),
    "fp8-group64": (False, (1, 64), False),
    "fp8-group64-colmajor": (False, (1, 64), True),
    # NVFP4 linear layers: vllm._custom_ops.scaled_fp4_quant with a global scale.
    "nvfp4": (False, None, False),
}


def make_quant(scheme: str):
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape

    static, shape, column_major = SCHEMES[scheme]
    group_shape = getattr(GroupShape, shape) if isinstance(shape, str) else GroupShape(*shape)
    return QuantFP8(
        static=static, group_shape=group_shape, column_major_scales=column_major, use_ue8m0=False
    )


def run_decoder(norms, hidden_states: torch.Tensor, num_layers: int, attention, mlp):
    """A Llama decoder's residual stream: per layer the input norm (plain the first time, the
    reduced value becoming the residual; fused-add after), ``attention``, the post-attention
    fused-add norm and ``mlp``; then the final norm, whose residual output is unused."""
    residual = None
    for layer in range(num_layers):
        norm_in, norm_post = norms[2 * layer], norms[2 * layer + 1]
        if residual is None:
            residual = hidden_states
            hidden_states = norm_in(hidden_states)
        else:
            hidden_states, residual = norm_in(hidden_states, residual)
        hidden_states = attention(hidden_states)
        hidden_states, residual = norm_post(hidden_states, residual)
        hidden_states = mlp(hidden_states)
    hidden_states, _ = norms[-1](hidden_states, residual)
    return hidden_states


class QuantizedDecoderStack(torch.nn.Module):
    """``num_layers`` Llama decoder layers reduced to their fusion sites.

    Per layer: input RMSNorm -> quant -> GEMM (attention stand-in), residual add
    + RMSNorm -> quant -> gate_up GEMM -> SiLU*Mul -> quant -> down GEMM. That is
    two norm+quant sites and one SiLU+quant site per layer. GEMMs are stand-ins
    (dequantize, matmul) because only the sites around them matter here.
    """

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, eps: float,
                 scheme: str, num_layers: int = 2, norm_dtype: torch.dtype | None = None,
                 fp4_pad: int = 0):
        super().__init__()
        from vllm.model_executor.layers.activation import SiluAndMul
        from vllm.model_executor.layers.layernorm import RMSNorm

        self.dtype = dtype
        self.static = SCHEMES[scheme][0]
        self.num_layers = num_layers
        # vLLM's fusions skip norms whose weight dtype differs from the input's.
        self.norms = torch.nn.ModuleList(
            RMSNorm(hidden, eps=eps, dtype=norm_dtype or dtype) for _ in range(2 * num_layers + 1)
        )
        self.nvfp4 = scheme == "nvfp4"
        # NVFP4: quantize into buffers padded by this many columns (scaled_fp4_quant's padded_n).
        self.fp4_pad = fp4_pad
        self.quant = None if self.nvfp4 else make_quant(scheme)
        self.act = SiluAndMul()
        self.w_attn = torch.nn.Parameter(torch.randn(hidden, hidden, dtype=dtype), False)
        self.w_up = torch.nn.Parameter(torch.randn(hidden, 2 * intermediate, dtype=dtype), False)
        self.w_down = torch.nn.Parameter(torch.randn(intermediate, hidden, dtype=dtype), False)
        self.scale = torch.nn.Parameter(torch.rand(1, dtype=torch.float32) + 0.5, False)

    def quantize(self, x: torch.Tensor):
        if self.nvfp4:
            from vllm import _custom_ops as ops

            padded_n = x.shape[-1] + self.fp4_pad if self.fp4_pad else None
            return ops.scaled_fp4_quant(x, self.scale, padded_n=padded_n)
        return self.quant(x, self.scale) if self.static else self.quant(x)

    def gemm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        q, scale = self.quantize(x)
        if self.nvfp4:  # two e2m1 values per byte: the stand-in multiplies the bytes
            weight = weight[: q.shape[-1]]
        return (q.to(self.dtype) @ weight) * scale.to(self.dtype).amax()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return run_decoder(
            self.norms, hidden_states, self.num_layers,
            attention=lambda h: self.gemm(h, self.w_attn),
            mlp=lambda h: self.gemm(self.act(self.gemm(h, self.w_up)), self.w_down))


def init_single_process_parallel() -> None:
    """TP=1 process groups (gloo), which vLLM's parallel linear layers ask for. Call it
    outside fake mode, with the test's config current."""
    import socket

    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if model_parallel_is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel(1, 1)


class AttentionStack(torch.nn.Module):
    """``num_layers`` Llama (or, with ``qk_norm_eps``, Qwen3) self-attention blocks.

    Per layer, as ``LlamaAttention`` / ``Qwen3Attention`` write it: ``QKVParallelLinear`` ->
    split -> (Qwen3: per-head ``RMSNorm`` of q and k) -> ``get_rope`` rotary -> vLLM's
    ``Attention`` (which calls ``unified_kv_cache_update`` then the attention op) -> o_proj
    stand-in GEMM. Call with ``(positions, hidden_states)``. With ``o_proj_fp8``, the o_proj
    input is quantized to FP8 with a static scale first, as an FP8 Llama's o_proj does.
    """

    def __init__(self, *, hidden: int, head_size: int, num_heads: int, num_kv_heads: int,
                 dtype: torch.dtype, cache_config, is_neox: bool = True, rotary_dim=None,
                 qk_norm_eps: float | None = None, num_layers: int = 2, backend: str = "FLASH_ATTN",
                 kv_sharing_last: bool = False, prefix: str = "model.layers",
                 o_proj_fp8: bool = False):
        super().__init__()
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.layers.layernorm import RMSNorm
        from vllm.model_executor.layers.linear import QKVParallelLinear
        from vllm.model_executor.layers.rotary_embedding import get_rope
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        self.head_size, self.num_layers = head_size, num_layers
        self.q_size, self.kv_size = num_heads * head_size, num_kv_heads * head_size
        self.qk_norm = qk_norm_eps is not None
        backend_cls = AttentionBackendEnum[backend].get_class()
        rotary_dim = rotary_dim or head_size
        self.qkv_proj = torch.nn.ModuleList(
            QKVParallelLinear(hidden, head_size, num_heads, num_kv_heads, bias=False,
                              params_dtype=dtype, prefix=f"{prefix}.{i}.self_attn.qkv_proj")
            for i in range(num_layers))
        self.rotary_emb = get_rope(head_size, max_position=4096, is_neox_style=is_neox,
                                   rope_parameters={"rope_theta": 10000.0,
                                                    "partial_rotary_factor": rotary_dim / head_size},
                                   dtype=dtype)
        self.attn = torch.nn.ModuleList(
            Attention(num_heads, head_size, head_size**-0.5, num_kv_heads=num_kv_heads,
                      cache_config=cache_config, prefix=f"{prefix}.{i}.self_attn.attn",
                      attn_backend=backend_cls,
                      kv_sharing_target_layer_name=(
                          f"{prefix}.0.self_attn.attn"
                          if kv_sharing_last and i == num_layers - 1 and i > 0 else None))
            for i in range(num_layers))
        if self.qk_norm:
            self.q_norm = torch.nn.ModuleList(RMSNorm(head_size, eps=qk_norm_eps, dtype=dtype)
                                              for _ in range(num_layers))
            self.k_norm = torch.nn.ModuleList(RMSNorm(head_size, eps=qk_norm_eps, dtype=dtype)
                                              for _ in range(num_layers))
        self.w_o = torch.nn.Parameter(torch.randn(self.q_size, hidden, dtype=dtype), False)
        self.dtype = dtype
        self.o_quant = make_quant("fp8-static") if o_proj_fp8 else None
        self.o_scale = torch.nn.Parameter(torch.rand(1, dtype=torch.float32) + 0.5, False)

    def o_proj(self, attn_out: torch.Tensor) -> torch.Tensor:
        if self.o_quant is None:
            return attn_out @ self.w_o
        # Fp8 linear stand-in: static input quant, then dequantize and multiply.
        q, scale = self.o_quant(attn_out, self.o_scale)
        return (q.to(self.dtype) @ self.w_o) * scale.to(self.dtype)

    def _norm_heads(self, x: torch.Tensor, norm) -> torch.Tensor:
        # Qwen3Attention.forward: RMSNorm over each head.
        by_head = x.view(*x.shape[:-1], x.shape[-1] // self.head_size, self.head_size)
        return norm(by_head).view(x.shape)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        for i in range(self.num_layers):
            qkv, _ = self.qkv_proj[i](hidden_states)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            if self.qk_norm:
                q, k = self._norm_heads(q, self.q_norm[i]), self._norm_heads(k, self.k_norm[i])
            q, k = self.rotary_emb(positions, q, k)
            hidden_states = self.o_proj(self.attn[i](q, k, v))
        return hidden_states


# ---------------------------------------------------------------- tensor parallel

# The TP group name vLLM's collectives carry on these simulated graphs (no TP group on CPU).
GROUP = "tp:0"


def simulate_gpus(count: int) -> None:
    """ParallelConfig checks the world size against the node's GPU count."""
    from vllm.platforms import current_platform

    type(current_platform).device_count = classmethod(lambda cls: count)


def make_tp_config(*, tp: int = 2, dtype=torch.bfloat16, custom_ops=(), pass_config=None,
                   optimization_level: int | None = None, **model_overrides):
    """A VllmConfig of a tiny local model compiled with TP ``tp``."""
    from vllm.config import (
        CompilationConfig,
        CompilationMode,
        ModelConfig,
        ParallelConfig,
        PassConfig,
        VllmConfig,
    )

    from tests.cpu.compile_harness import local_model_dir

    model = local_model_dir(**model_overrides)
    kwargs = {} if optimization_level is None else {"optimization_level": optimization_level}
    return VllmConfig(
        model_config=ModelConfig(model=model, tokenizer=model, dtype=dtype,
                                 skip_tokenizer_init=True),
        compilation_config=CompilationConfig(
            mode=CompilationMode.VLLM_COMPILE, custom_ops=list(custom_ops),
            pass_config=PassConfig(**(pass_config or {}))),
        parallel_config=ParallelConfig(tensor_parallel_size=tp),
        **kwargs,
    )


class AllReduceDecoderStack(torch.nn.Module):
    """``num_layers`` Llama decoder layers under TP reduced to their all-reduce sites.

    The embedding's all-reduce feeds the first input RMSNorm (no residual: the reduced value
    becomes the residual); each row-parallel GEMM stand-in (attention's o_proj, the MLP's
    down_proj) ends in ``vllm.all_reduce`` followed by a fused-add RMSNorm; the final norm's
    residual output is unused. With ``quant``, each norm but the last feeds a static QuantFP8.
    That is 1 + 2 * num_layers sites: one plain, the last without residual output.
    ``column_gemm``: a column-parallel GEMM (qkv_proj, gate_up_proj) before each row-parallel
    one, so the GEMM after a norm and the GEMM before an all-reduce are different nodes.
    """

    def __init__(self, hidden: int, dtype: torch.dtype, eps: float, quant: bool,
                 num_layers: int = 2, column_gemm: bool = False):
        super().__init__()
        from vllm.model_executor.layers.layernorm import RMSNorm

        self.dtype = dtype
        self.num_layers = num_layers
        self.norms = torch.nn.ModuleList(
            RMSNorm(hidden, eps=eps, dtype=dtype) for _ in range(2 * num_layers + 1))
        self.quant = make_quant("fp8-static") if quant else None
        self.w_attn = torch.nn.Parameter(torch.randn(hidden, hidden, dtype=dtype), False)
        self.w_mlp = torch.nn.Parameter(torch.randn(hidden, hidden, dtype=dtype), False)
        self.w_column = torch.nn.Parameter(torch.randn(hidden, hidden, dtype=dtype), False) \
            if column_gemm else None
        self.scale = torch.nn.Parameter(torch.rand(1, dtype=torch.float32) + 0.5, False)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.vllm.all_reduce(x, group_name=GROUP)

    def row_parallel(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            q, scale = self.quant(x, self.scale)
            x = q.to(self.dtype) * scale.to(self.dtype)
        if self.w_column is not None:
            x = x @ self.w_column
        return self.all_reduce(x @ weight)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return run_decoder(
            self.norms, self.all_reduce(embeds), self.num_layers,
            attention=lambda h: self.row_parallel(h, self.w_attn),
            mlp=lambda h: self.row_parallel(h, self.w_mlp))


# ---------------------------------------------------------------- compiled attention stacks

ATTENTION_HIDDEN = 256


def attention_model_args(geometry: dict) -> dict:
    """The model config fields of an attention geometry (head size, q and kv heads)."""
    return {"head_dim": geometry["head_size"], "num_attention_heads": geometry["num_heads"],
            "num_key_value_heads": geometry["num_kv_heads"]}


def compile_attention_stack(config, *, dtype: torch.dtype, tokens: int = 7, **stack_args):
    """Compile an ``AttentionStack(**stack_args)`` (hidden 256) under ``config`` through vLLM's
    post-grad passes; the pass run, with ``.config`` set."""
    from vllm.config import set_current_vllm_config

    from tests.cpu.compile_harness import run_post_grad_passes

    with set_current_vllm_config(config):
        init_single_process_parallel()
    result = run_post_grad_passes(
        lambda: AttentionStack(hidden=ATTENTION_HIDDEN, dtype=dtype,
                               cache_config=config.cache_config, **stack_args),
        lambda: [torch.zeros(tokens, dtype=torch.int64),
                 torch.empty(tokens, ATTENTION_HIDDEN, dtype=dtype)],
        config, dynamic_dims={0: 0, 1: 0})
    result.config = config
    return result
