// Module entry point and the namespace's one TORCH_LIBRARY block.
// Op schemas live beside each op (ops/<op>.cpp, TORCH_LIBRARY_FRAGMENT); this file only
// makes `import stnpadim_ext._C` load the library and says how it was built.
#include <Python.h>

#include <string>

#include <ATen/Parallel.h>
#include <torch/library.h>

extern "C" {
// No Python bindings: importing the module runs the static op registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

#define STNPADIM_STR_(...) #__VA_ARGS__
#define STNPADIM_STR(...) STNPADIM_STR_(__VA_ARGS__)

namespace stnpadim {
namespace {

// "key=value;..." so Python can report the build without parsing C++ types.
std::string build_info() {
  std::string info = "cuda=";
#ifdef STNPADIM_WITH_CUDA
  info += "1";
#else
  info += "0";
#endif
  info += ";cuda_archs=";
#ifdef STNPADIM_CUDA_ARCHS
  info += STNPADIM_STR(STNPADIM_CUDA_ARCHS);  // archs joined by '_'

#endif
  info += ";openmp=";
#ifdef _OPENMP
  info += "1";
#else
  info += "0";
#endif
  info += ";threads=" + std::to_string(at::get_num_threads());
  return info;
}

}  // namespace

TORCH_LIBRARY(stnpadim, m) {
  m.def("_build_info() -> str", &build_info);
}

}  // namespace stnpadim
