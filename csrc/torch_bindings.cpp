// Op schemas of the vllm_fusion namespace and their CUDA implementations, registered through
// torch's stable ABI (one binary for torch >= 2.11), plus the entry point that makes the library
// importable as the Python module vllm_fusion._C (an empty module: importing it runs the
// registrations below).
#include <torch/csrc/stable/library.h>

#include "ops.h"

// Schemas: functional ops that allocate and return their outputs. Python fakes live in
// vllm_fusion/ops/ and must mirror the shapes, dtypes and strides allocated in csrc/.
STABLE_TORCH_LIBRARY(vllm_fusion, m) {
  m.def(
      "rms_norm_static_fp8_quant(Tensor input, Tensor weight, Tensor scale, float epsilon) "
      "-> Tensor");
  m.def(
      "fused_add_rms_norm_static_fp8_quant(Tensor input, Tensor residual, Tensor weight, "
      "Tensor scale, float epsilon) -> (Tensor, Tensor)");
  m.def(
      "rms_norm_dynamic_fp8_quant(Tensor input, Tensor weight, float epsilon, int group_size, "
      "bool scale_transposed, bool scale_ue8m0, Tensor? scale_ub) -> (Tensor, Tensor)");
  m.def(
      "fused_add_rms_norm_dynamic_fp8_quant(Tensor input, Tensor residual, Tensor weight, "
      "float epsilon, int group_size, bool scale_transposed, bool scale_ue8m0, "
      "Tensor? scale_ub) -> (Tensor, Tensor, Tensor)");
  m.def("silu_and_mul_static_fp8_quant(Tensor input, Tensor scale) -> Tensor");
  m.def(
      "silu_and_mul_dynamic_fp8_quant(Tensor input, int group_size, bool scale_transposed, "
      "bool scale_ue8m0, Tensor? scale_ub) -> (Tensor, Tensor)");
  m.def("rms_norm_pad(Tensor input, Tensor weight, float epsilon, int padded_hidden) -> Tensor");
  m.def(
      "fused_add_rms_norm_pad(Tensor input, Tensor residual, Tensor weight, float epsilon, "
      "int padded_hidden) -> (Tensor, Tensor)");
  // NVFP4 (SM100+): outputs as vLLM's scaled_fp4_quant with swizzled block scales.
  m.def(
      "rms_norm_nvfp4_quant(Tensor input, Tensor weight, Tensor global_scale, float epsilon) "
      "-> (Tensor, Tensor)");
  m.def(
      "fused_add_rms_norm_nvfp4_quant(Tensor input, Tensor residual, Tensor weight, "
      "Tensor global_scale, float epsilon) -> (Tensor, Tensor, Tensor)");
  m.def("silu_and_mul_nvfp4_quant(Tensor input, Tensor global_scale) -> (Tensor, Tensor)");
  // [per-head RMSNorm of q/k] + RoPE, writing k (post-RoPE) and v into the paged KV cache.
  m.def(
      "qk_norm_rope_kv_cache(Tensor query, Tensor key, Tensor value, Tensor positions, "
      "Tensor cos_sin_cache, bool is_neox, Tensor? q_weight, Tensor? k_weight, float epsilon, "
      "Tensor(a!)? key_cache, Tensor(b!)? value_cache, Tensor? slot_mapping, Tensor? k_scale, "
      "Tensor? v_scale) -> (Tensor, Tensor)");
  // All-reduce over one node's peer buffers + residual add + RMSNorm (+ static FP8 quant).
  m.def("all_reduce_flag_bytes() -> int");
  m.def(
      "all_reduce_rms_norm(Tensor input, Tensor? residual, Tensor weight, float epsilon, "
      "Tensor? scale, int[] buffers, Tensor(a!) counter, int rank, int capacity, bool two_shot, "
      "bool push=False) "
      "-> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(vllm_fusion, CUDA, m) {
  m.impl("rms_norm_static_fp8_quant", TORCH_BOX(&vllm_fusion::rms_norm_static_fp8_quant));
  m.impl("fused_add_rms_norm_static_fp8_quant",
         TORCH_BOX(&vllm_fusion::fused_add_rms_norm_static_fp8_quant));
  m.impl("rms_norm_dynamic_fp8_quant", TORCH_BOX(&vllm_fusion::rms_norm_dynamic_fp8_quant));
  m.impl("fused_add_rms_norm_dynamic_fp8_quant",
         TORCH_BOX(&vllm_fusion::fused_add_rms_norm_dynamic_fp8_quant));
  m.impl("silu_and_mul_static_fp8_quant",
         TORCH_BOX(&vllm_fusion::silu_and_mul_static_fp8_quant));
  m.impl("silu_and_mul_dynamic_fp8_quant",
         TORCH_BOX(&vllm_fusion::silu_and_mul_dynamic_fp8_quant));
  m.impl("rms_norm_pad", TORCH_BOX(&vllm_fusion::rms_norm_pad));
  m.impl("fused_add_rms_norm_pad", TORCH_BOX(&vllm_fusion::fused_add_rms_norm_pad));
  m.impl("rms_norm_nvfp4_quant", TORCH_BOX(&vllm_fusion::rms_norm_nvfp4_quant));
  m.impl("fused_add_rms_norm_nvfp4_quant",
         TORCH_BOX(&vllm_fusion::fused_add_rms_norm_nvfp4_quant));
  m.impl("silu_and_mul_nvfp4_quant", TORCH_BOX(&vllm_fusion::silu_and_mul_nvfp4_quant));
  m.impl("qk_norm_rope_kv_cache", TORCH_BOX(&vllm_fusion::qk_norm_rope_kv_cache));
  m.impl("all_reduce_rms_norm", TORCH_BOX(&vllm_fusion::all_reduce_rms_norm));
}

// Ops without tensor arguments dispatch to no device.
STABLE_TORCH_LIBRARY_IMPL(vllm_fusion, CompositeExplicitAutograd, m) {
  m.impl("all_reduce_flag_bytes", TORCH_BOX(&vllm_fusion::all_reduce_flag_bytes));
}

// ---------------------------------------------------------------- Python module entry point

#define VF_EXPORT extern "C" __attribute__((visibility("default")))

#ifndef VLLM_FUSION_NO_PYTHON_H

  #include <Python.h>

VF_EXPORT PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "vllm_fusion kernels (torch.ops.vllm_fusion)", -1, nullptr};
  return PyModule_Create(&module);
}

#else

// Built where no Python headers are installed: declare the few stable-ABI (abi3) pieces that an
// empty single-phase module needs. Their layout is fixed by the limited API.
extern "C" {
struct VfPyObject {
  intptr_t ob_refcnt;
  void* ob_type;
};
struct VfPyModuleDefBase {
  VfPyObject ob_base;
  VfPyObject* (*m_init)(void);
  intptr_t m_index;
  VfPyObject* m_copy;
};
struct VfPyModuleDef {
  VfPyModuleDefBase m_base;
  const char* m_name;
  const char* m_doc;
  intptr_t m_size;
  void* m_methods;
  void* m_slots;
  void* m_traverse;
  void* m_clear;
  void* m_free;
};
VfPyObject* PyModule_Create2(VfPyModuleDef* def, int module_api_version);
}

VF_EXPORT VfPyObject* PyInit__C(void) {
  // PYTHON_ABI_VERSION (3) is the API version limited-API modules pass.
  static VfPyModuleDef module = {{{1, nullptr}, nullptr, 0, nullptr},
                                 "_C",
                                 "vllm_fusion kernels (torch.ops.vllm_fusion)",
                                 -1,
                                 nullptr,
                                 nullptr,
                                 nullptr,
                                 nullptr,
                                 nullptr};
  return PyModule_Create2(&module, 3);
}

#endif
