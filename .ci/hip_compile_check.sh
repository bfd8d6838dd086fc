#!/usr/bin/env bash
# Compiles every kernel file of csrc/ for AMD GPUs, device code only, down to AMDGPU object
# code, from the same hipified sources the CMake ROCm build compiles. Needs no GPU, no ROCm
# build of torch (the stable-ABI headers of any torch 2.11 wheel serve) and no CMake HIP setup:
# only a HIP-capable clang and the ROCm headers (HIP, rocThrust, rocPRIM: torch's headers pull
# in thrust/complex.h under HIP).
#
#   ROCM_PATH=/opt/rocm .ci/hip_compile_check.sh [gfx90a gfx942 gfx950]
#
# CLANG defaults to $ROCM_PATH/llvm/bin/clang++. With ROCm's device libraries present
# ($ROCM_PATH/amdgcn/bitcode) each file becomes a linked code object; without them the device
# code is compiled with -fgpu-rdc and lowered to a relocatable object whose device-library
# calls (__ocml_*, __ockl_*) stay unresolved. .ci/run does not run this: no package registry
# reachable from CI ships the HIP headers it needs (docs/rocm.md).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
rocm=${ROCM_PATH:-/opt/rocm}
clang=${CLANG:-$rocm/llvm/bin/clang++}
py=${PYTHON:-python3}
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(gfx90a gfx942 gfx950)

[ -f "$rocm/include/hip/hip_fp8.h" ] || { echo "no HIP headers with hip_fp8.h under $rocm/include"; exit 1; }
command -v "$clang" >/dev/null || { echo "no clang at $clang (set CLANG)"; exit 1; }
torch_inc=$("$py" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
resource_dir=$("$clang" -print-resource-dir)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

"$py" cmake/hipify.py --src "$root/csrc" --dst "$out/csrc" > /dev/null

# The defines and flags of CMakeLists.txt's ROCm branch.
flags=(-x hip -std=c++17 -O3 --cuda-device-only -nogpuinc
       -isystem "$rocm/include" -isystem "$resource_dir" -isystem "$torch_inc"
       -include __clang_hip_runtime_wrapper.h -D__HIP_PLATFORM_AMD__=1
       -DUSE_ROCM -DUSE_CUDA -DENABLE_FP8 -DTORCH_TARGET_VERSION=0x020B000000000000ULL
       -U__HIP_NO_HALF_CONVERSIONS__ -U__HIP_NO_HALF_OPERATORS__)
if [ -d "$rocm/amdgcn/bitcode" ]; then
  link=(--rocm-device-lib-path="$rocm/amdgcn/bitcode")
else
  link=()
fi

status=0
for arch in "${archs[@]}"; do
  for src in "$out"/csrc/*.hip; do
    name=$(basename "$src" .hip)
    obj=$out/$name.$arch.o
    if [ ${#link[@]} -gt 0 ]; then
      "$clang" "${flags[@]}" "${link[@]}" --offload-arch="$arch" -fno-gpu-rdc -c "$src" -o "$obj" || { status=1; continue; }
    else
      "$clang" "${flags[@]}" -nogpulib --offload-arch="$arch" -fgpu-rdc -c "$src" -o "$obj.bc" &&
        "$clang" --target=amdgcn-amd-amdhsa -mcpu="$arch" -nogpulib -O3 -c "$obj.bc" -o "$obj" ||
        { status=1; continue; }
    fi
    echo "$arch $name: $(wc -c < "$obj") bytes of device code"
  done
done
exit $status
