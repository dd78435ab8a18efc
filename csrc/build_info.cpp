// The Python module fastpeft._C: loading it registers the ops (torch_bindings.cpp,
// cuda/*.cu); its one Python function says how it was built.
#include <pybind11/pybind11.h>

#include <sstream>
#include <string>

namespace py = pybind11;

namespace {

py::list cuda_archs() {
  py::list archs;
  std::istringstream words(FASTPEFT_CUDA_ARCHS);
  std::string arch;
  while (words >> arch) archs.append(arch);
  return archs;
}

py::dict build_info() {
  py::dict info;
  info["torch_version"] = FASTPEFT_TORCH_VERSION;
#ifdef FASTPEFT_WITH_CUDA
  info["cuda_kernels"] = true;
#else
  info["cuda_kernels"] = false;
#endif
  info["cuda_archs"] = cuda_archs();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastpeft's compiled kernels (the ops register under torch.ops.fastpeft)";
  m.def("build_info", &build_info, "How this extension was compiled.");
}
