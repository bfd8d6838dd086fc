# Helpers for vllm_fusion's CMakeLists.txt.

# Finds the Python interpreter and, when available, the headers for a limited-API module.
# Sets VF_PYTHON_MODE to SABI (CMake >= 3.26 with Development.SABIModule), MODULE (older CMake:
# the abi3 name and Py_LIMITED_API are set by hand) or NOHEADERS (no Python.h on this machine:
# the module init function is then declared without it, see torch_bindings.cpp).
macro(vf_find_python)
  if(CMAKE_VERSION VERSION_GREATER_EQUAL 3.26)
    find_package(Python COMPONENTS Interpreter Development.SABIModule)
    if(Python_Development.SABIModule_FOUND)
      set(VF_PYTHON_MODE SABI)
    endif()
  else()
    find_package(Python COMPONENTS Interpreter Development.Module)
    if(Python_Development.Module_FOUND)
      set(VF_PYTHON_MODE MODULE)
    endif()
  endif()
  if(NOT Python_Interpreter_FOUND)
    message(FATAL_ERROR "Python interpreter not found; pass -DPython_EXECUTABLE=...")
  endif()
  if(NOT VF_PYTHON_MODE)
    set(VF_PYTHON_MODE NOHEADERS)
    message(STATUS "vllm_fusion: no Python development headers found; building the module "
                   "init without Python.h")
  endif()
  message(STATUS "vllm_fusion: Python ${Python_VERSION} (${Python_EXECUTABLE}), module mode "
                 "${VF_PYTHON_MODE}")
endmacro()

# find_package(Torch) through torch.utils.cmake_prefix_path of the Python in use.
macro(vf_find_torch)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
    OUTPUT_VARIABLE VF_TORCH_PREFIX
    OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE VF_TORCH_RC)
  if(NOT VF_TORCH_RC EQUAL 0)
    message(FATAL_ERROR "could not import torch with ${Python_EXECUTABLE}")
  endif()
  list(APPEND CMAKE_PREFIX_PATH "${VF_TORCH_PREFIX}")
  # CUDA 13 from pip wheels (site-packages/nvidia/cu13): torch's config needs its nvrtc, and
  # some headers (cusparse.h ...) exist only there. Harmless when absent.
  if(VF_GPU_LANG STREQUAL "CUDA")
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c
              "import sysconfig,os;d=os.path.join(sysconfig.get_paths()['platlib'],'nvidia','cu13');print(d if os.path.isdir(d) else '')"
      OUTPUT_VARIABLE VF_PIP_CUDA
      OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(VF_PIP_CUDA)
      if(NOT CUDA_nvrtc_LIBRARY AND EXISTS "${VF_PIP_CUDA}/lib/libnvrtc.so.13")
        set(CUDA_nvrtc_LIBRARY "${VF_PIP_CUDA}/lib/libnvrtc.so.13" CACHE FILEPATH "" FORCE)
      endif()
      if(NOT VLLM_FUSION_EXTRA_SYSTEM_INCLUDE AND IS_DIRECTORY "${VF_PIP_CUDA}/include")
        string(APPEND CMAKE_CXX_FLAGS " -isystem ${VF_PIP_CUDA}/include")
        string(APPEND CMAKE_CUDA_FLAGS " -isystem ${VF_PIP_CUDA}/include")
      endif()
      message(STATUS "vllm_fusion: pip CUDA at ${VF_PIP_CUDA}")
    endif()
  endif()
  find_package(Torch REQUIRED)
  message(STATUS "vllm_fusion: torch ${Torch_VERSION} at ${TORCH_INSTALL_PREFIX}")
endmacro()

# Drops the -gencode flags torch's config appended to CMAKE_CUDA_FLAGS: the target sets its own.
macro(vf_strip_torch_gencode)
  string(REGEX REPLACE "-gencode[= ]+arch=[^ ]+" "" CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")
  string(REGEX REPLACE "  +" " " CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")
endmacro()

# OUT = -gencode flags for ARCHES ("8.0;9.0a;10.0a"): SASS for each, plus PTX of the highest
# arch without an a/f suffix so that newer GPUs can JIT it.
function(vf_cuda_gencode_flags OUT ARCHES)
  set(flags "")
  set(ptx_arch "")
  set(ptx_num 0)
  foreach(arch ${ARCHES})
    if(NOT arch MATCHES "^([0-9]+)\\.([0-9]+)([af]?)$")
      message(FATAL_ERROR "bad CUDA arch '${arch}' (expected e.g. 9.0a)")
    endif()
    set(num "${CMAKE_MATCH_1}${CMAKE_MATCH_2}")
    set(code "${num}${CMAKE_MATCH_3}")
    list(APPEND flags "-gencode=arch=compute_${code},code=sm_${code}")
    if(CMAKE_MATCH_3 STREQUAL "" AND num GREATER ptx_num)
      set(ptx_num ${num})
      set(ptx_arch ${code})
    endif()
  endforeach()
  if(ptx_arch)
    list(APPEND flags "-gencode=arch=compute_${ptx_arch},code=compute_${ptx_arch}")
  endif()
  message(STATUS "vllm_fusion: CUDA gencode ${flags}")
  set(${OUT} ${flags} PARENT_SCOPE)
endfunction()

# Copies SRC_DIR to DST_DIR and hipifies it there (cmake/hipify.py); OUT = the files to compile
# (.cu renamed .hip). Adds the target vf_hipify.
function(vf_hipify_sources OUT SRC_DIR DST_DIR)
  set(sources ${ARGN})
  set(outputs "")
  foreach(src ${sources})
    get_filename_component(name "${src}" NAME)
    string(REGEX REPLACE "\\.cu$" ".hip" name "${name}")
    list(APPEND outputs "${DST_DIR}/${name}")
  endforeach()
  file(GLOB_RECURSE all_inputs "${SRC_DIR}/*")
  add_custom_command(
    OUTPUT ${outputs}
    COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/hipify.py"
            --src "${SRC_DIR}" --dst "${DST_DIR}"
    DEPENDS ${all_inputs} "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/hipify.py"
    COMMENT "hipify ${SRC_DIR} -> ${DST_DIR}")
  add_custom_target(vf_hipify DEPENDS ${outputs})
  foreach(out ${outputs})
    if(out MATCHES "\\.hip$")
      set_source_files_properties("${out}" PROPERTIES LANGUAGE HIP GENERATED TRUE)
    else()
      set_source_files_properties("${out}" PROPERTIES GENERATED TRUE)
    endif()
  endforeach()
  set(${OUT} ${outputs} PARENT_SCOPE)
endfunction()

# A MODULE library named NAME.abi3.so with a PyInit_NAME entry point.
function(vf_add_python_module NAME)
  if(VF_PYTHON_MODE STREQUAL "SABI")
    Python_add_library(${NAME} MODULE USE_SABI 3 WITH_SOABI ${ARGN})
  elseif(VF_PYTHON_MODE STREQUAL "MODULE")
    Python_add_library(${NAME} MODULE ${ARGN})
    target_compile_definitions(${NAME} PRIVATE Py_LIMITED_API=3)
  else()
    add_library(${NAME} MODULE ${ARGN})
    target_compile_definitions(${NAME} PRIVATE VLLM_FUSION_NO_PYTHON_H)
  endif()
  # Same name whichever way it was made: _C.abi3.so.
  set_target_properties(${NAME} PROPERTIES PREFIX "" SUFFIX ".abi3.so")
endfunction()

# Links the few torch libraries the stable C shim lives in, and the GPU runtime. torch is always
# imported first, so these resolve to the already-loaded copies; the RPATH helps otherwise.
function(vf_link_torch NAME)
  set(libdir "${TORCH_INSTALL_PREFIX}/lib")
  find_library(VF_TORCH_CPU torch_cpu PATHS "${libdir}" NO_DEFAULT_PATH REQUIRED)
  set(libs ${VF_TORCH_CPU})
  if(VF_GPU_LANG STREQUAL "CUDA")
    find_library(VF_TORCH_CUDA torch_cuda PATHS "${libdir}" NO_DEFAULT_PATH REQUIRED)
    find_package(CUDAToolkit REQUIRED)
    list(APPEND libs ${VF_TORCH_CUDA} CUDA::cudart)
  else()
    find_library(VF_TORCH_HIP torch_hip PATHS "${libdir}" NO_DEFAULT_PATH REQUIRED)
    list(APPEND libs ${VF_TORCH_HIP})
    # Use the HIP runtime bundled with torch when it has one: two HIP runtimes in one process
    # corrupt device state.
    find_library(VF_AMDHIP amdhip64 PATHS "${libdir}" NO_DEFAULT_PATH)
    if(VF_AMDHIP)
      list(APPEND libs ${VF_AMDHIP})
    else()
      find_package(hip REQUIRED)
      list(APPEND libs hip::host)
    endif()
  endif()
  # A compiler without a shared libstdc++ (some self-built GCCs) would link its static one into
  # the module: a second C++ runtime whose iostream/locale state is never initialized, which
  # crashes the first time an error message is formatted. Link the shared libstdc++ the Python
  # process already uses (torch's) instead.
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    execute_process(
      COMMAND "${CMAKE_CXX_COMPILER}" -print-file-name=libstdc++.so
      OUTPUT_VARIABLE VF_LIBSTDCXX OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(NOT IS_ABSOLUTE "${VF_LIBSTDCXX}")
      execute_process(
        COMMAND "${Python_EXECUTABLE}" -c
                "import torch;print(next((l.split()[-1] for l in open('/proc/self/maps') if '/libstdc++.so' in l),''))"
        OUTPUT_VARIABLE VF_LIBSTDCXX OUTPUT_STRIP_TRAILING_WHITESPACE)
      if(VF_LIBSTDCXX)
        message(STATUS "vllm_fusion: ${CMAKE_CXX_COMPILER} has no shared libstdc++; linking "
                       "${VF_LIBSTDCXX}")
        list(PREPEND libs "${VF_LIBSTDCXX}")
      else()
        message(WARNING "vllm_fusion: no shared libstdc++ found; the module links a static one")
      endif()
    endif()
  endif()
  target_link_libraries(${NAME} PRIVATE ${libs})
  set_target_properties(${NAME} PROPERTIES
    BUILD_WITH_INSTALL_RPATH ON
    INSTALL_RPATH "$ORIGIN/../torch/lib")
endfunction()
