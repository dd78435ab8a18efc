# Torch's include and library paths, taken from the Python that builds fastpeft.
#
# find_package(Torch) is not used on purpose: with a CUDA build of torch it aborts
# when no CUDA toolkit is around (a CPU-only build of fastpeft must still work),
# and on machines with a partial toolkit it needs the cuBLAS libraries that only the
# nvidia-* wheels carry. The paths below are all fastpeft needs.

function(fastpeft_python_query OUT CODE)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "${CODE}"
    OUTPUT_VARIABLE _out
    RESULT_VARIABLE _rc
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "fastpeft: asking Python for torch's paths failed (${_rc}): ${CODE}")
  endif()
  set(${OUT} "${_out}" PARENT_SCOPE)
endfunction()

fastpeft_python_query(TORCH_INCLUDE_DIRS
  "from torch.utils.cpp_extension import include_paths; print(';'.join(include_paths()))")
fastpeft_python_query(TORCH_LIBRARY_DIR
  "from torch.utils.cpp_extension import library_paths; print(library_paths()[0])")
fastpeft_python_query(TORCH_CXX11_ABI
  "import torch; print(int(torch.compiled_with_cxx11_abi()))")
fastpeft_python_query(TORCH_VERSION_STRING "import torch; print(torch.__version__)")
# The CUDA math-library headers (cuBLAS, cuSPARSE, ...) shipped in the nvidia-* wheels.
fastpeft_python_query(NVIDIA_WHEEL_INCLUDE_DIRS
  "import glob, os, site; print(';'.join(sorted({d for p in site.getsitepackages() for d in glob.glob(os.path.join(p, 'nvidia', 'cu[0-9]*', 'include'))})))")

function(fastpeft_torch_library OUT NAME)
  find_library(_lib_${NAME} NAMES ${NAME} PATHS "${TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)
  set(${OUT} "${_lib_${NAME}}" PARENT_SCOPE)
endfunction()

fastpeft_torch_library(TORCH_LIB torch)
fastpeft_torch_library(TORCH_CPU_LIB torch_cpu)
fastpeft_torch_library(C10_LIB c10)
set(TORCH_CPU_LIBRARIES ${TORCH_LIB} ${TORCH_CPU_LIB} ${C10_LIB})
if(FASTPEFT_CUDA)
  fastpeft_torch_library(TORCH_CUDA_LIB torch_cuda)
  fastpeft_torch_library(C10_CUDA_LIB c10_cuda)
  set(TORCH_CUDA_LIBRARIES ${TORCH_CUDA_LIB} ${C10_CUDA_LIB})
endif()
