"""Builds stnpadim_ext._C from csrc/: CPU kernels always, CUDA kernels when a GPU is visible or asked.

Environment switches:
  STNPADIM_NO_EXT=1      install the pure-Python package (reference ops only)
  STNPADIM_FORCE_CUDA=1  compile the CUDA kernels without a visible GPU (CI, wheels)
  STNPADIM_NO_CUDA=1     CPU kernels only (fast local builds)
  TORCH_CUDA_ARCH_LIST   CUDA archs; default: the visible GPUs plus PTX, else Turing to Hopper plus PTX
  DEBUG=1                -O0 -g
"""
import glob
import os
import shutil
import site
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# CUDA 13 dropped Volta, so Turing is the oldest arch nvcc 13 can target.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "0") == "1"


def _want_cuda(torch, cuda_home):
    # torchvision's convention: a toolkit alone is not enough (a CPU-only machine with nvcc
    # would spend many minutes compiling kernels it cannot run); a visible GPU or the switch is.
    if _flag("STNPADIM_NO_CUDA"):
        return False
    if _flag("STNPADIM_FORCE_CUDA"):
        if cuda_home is None:
            sys.exit("STNPADIM_FORCE_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        return True
    return torch.cuda.is_available() and cuda_home is not None


def _visible_archs(torch):
    """The visible GPUs' compute capabilities as TORCH_CUDA_ARCH_LIST, the newest with +PTX."""
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join("{}.{}".format(*cap) for cap in caps) + "+PTX"


def _pip_cuda_include_dirs():
    # ATen's CUDA headers include cusparse.h / cublas_v2.h, which the pip CUDA wheels ship.
    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
        dirs += glob.glob(os.path.join(sp, "nvidia", "*", "include"))
    return sorted({str(Path(d).resolve()) for d in dirs})


def _locate_cuda_home():
    # torch guesses CUDA_HOME as the parent of `which nvcc`'s folder; a wrapper script in
    # /usr/local/bin makes that /usr/local, which has no CUDA runtime. Pick a real toolkit.
    if "CUDA_HOME" in os.environ or "CUDA_PATH" in os.environ:
        return
    nvcc = shutil.which("nvcc")
    candidates = ([Path(nvcc).resolve().parent.parent] if nvcc else []) + [Path("/usr/local/cuda")]
    for home in candidates:
        if (home / "include" / "cuda_runtime.h").is_file():
            os.environ["CUDA_HOME"] = str(home)
            return


def extension_modules():
    if _flag("STNPADIM_NO_EXT"):
        return [], {}
    _locate_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    use_cuda = _want_cuda(torch, CUDA_HOME)
    debug = _flag("DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # setuptools wants source paths relative to setup.py's folder (pip runs us from there).
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cpp"))
    define_macros = []  # torch adds Py_LIMITED_API itself when py_limited_api=True
    # -fno-trapping-math: GCC will not if-convert (so not vectorise) a loop whose selects
    # guard float operations that might raise an FP exception flag; we never read those
    # flags, and the values (NaN and Inf included) are the same.
    extra = {"cxx": opt + ["-fno-trapping-math", "-fopenmp", "-fdiagnostics-color=always"]}
    kwargs = dict(include_dirs=[str(CSRC)], extra_link_args=["-fopenmp"], py_limited_api=True)
    if use_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            # A visible GPU: build for it (torch's own default), plus PTX of the newest arch
            # so that the build still runs, JIT-compiled, on a newer GPU; none: the wide default.
            os.environ["TORCH_CUDA_ARCH_LIST"] = (
                _visible_archs(torch) if torch.cuda.is_available() else DEFAULT_CUDA_ARCHS)
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cu"))
        # Shell-safe token (no quotes, ';' or spaces); init.cpp stringifies it.
        arch_token = "_".join(archs.replace(";", " ").split())
        define_macros += [("STNPADIM_WITH_CUDA", None), ("STNPADIM_CUDA_ARCHS", arch_token)]
        # No --use_fast_math: it turns the coordinate divisions into approximate reciprocals,
        # and nearest sampling at exact half-pixels must round as torch's kernels do.
        extra["nvcc"] = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["include_dirs"] += _pip_cuda_include_dirs()
        ext = CUDAExtension("stnpadim_ext._C", sources, define_macros=define_macros,
                            extra_compile_args=extra, **kwargs)
    else:
        ext = CppExtension("stnpadim_ext._C", sources, define_macros=define_macros,
                           extra_compile_args=extra, **kwargs)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
