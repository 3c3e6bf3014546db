"""Loads the compiled extension, or explains why the reference ops are used instead.

`import stnpadim_ext` must never fail because `_C` is missing or broken: the ops then
dispatch to their pure-PyTorch references and `backend_info()` says why.
"""
import functools
import importlib.metadata
import os
import warnings
from pathlib import Path

import torch

_fallback_reason = None


def _load():
    global _fallback_reason
    if os.environ.get("STNPADIM_NO_EXT", "0") == "1":
        _fallback_reason = "disabled by STNPADIM_NO_EXT=1"
        return False
    try:
        from . import _C  # noqa: F401  (registers torch.ops.stnpadim.*)
    except Exception as exc:  # ImportError, OSError (bad .so), undefined symbols...
        first_line = (str(exc).splitlines() or [""])[0]
        _fallback_reason = f"stnpadim_ext._C failed to load: {type(exc).__name__}: {first_line}"
        installed = _shadowed_install()
        if installed is not None:
            _fallback_reason = (f"stnpadim_ext was imported from the source checkout "
                                f"{Path(__file__).parent}, which has no compiled kernels, instead of "
                                f"the installed package in {installed}: run from outside the "
                                "checkout, or install with `pip install --no-build-isolation -e .`")
        warnings.warn(f"{_fallback_reason}; using the pure-PyTorch reference ops (slower)",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


def _shadowed_install() -> Path | None:
    """The installed (non-editable) package's folder when this import comes from a source
    checkout instead (Python puts the working directory first on sys.path); else None."""
    here = Path(__file__).resolve().parent
    if not (here.parent / "setup.py").is_file():
        return None
    try:
        files = importlib.metadata.distribution("stnpadim").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:  # an editable install lists no package files: never shadowed
        if file.parts == ("stnpadim_ext", "__init__.py"):
            installed = Path(file.locate()).resolve().parent
            return installed if installed != here else None
    return None


HAS_EXT = _load()


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, device_type: str) -> bool:
    """True when the extension registered `stnpadim::op` for this device type."""
    if not HAS_EXT or device_type not in ("cpu", "cuda"):
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"stnpadim::{op}", device_type.upper())
    except RuntimeError:  # op not defined in this build
        return False


def use_extension(op: str, *tensors: torch.Tensor) -> bool:
    """Whether an op call on these tensors goes to the compiled kernel."""
    return bool(tensors) and has_kernel(op, tensors[0].device.type)


def cpu_capabilities() -> list[str]:
    """The CPU kernel variants this CPU can run with this build, worst first (["default"]
    without the extension: the reference ops have no variants)."""
    if not (HAS_EXT and hasattr(torch.ops.stnpadim, "_cpu_capabilities")):
        return ["default"]
    return torch.ops.stnpadim._cpu_capabilities().split(",")


def backend_info() -> dict:
    """How the ops run: extension loaded, CUDA kernels compiled and for which archs, threads,
    and the CPU kernel variant in use.

    ``cpu_capability`` is "default", "avx2" or "avx512": the best variant this CPU runs, or
    the one that ``STNPADIM_CPU_CAPABILITY`` forces ("default" without the extension).
    ``cpu_capabilities`` lists every variant this CPU can run. A forced variant the CPU
    cannot run (or an unknown name) raises RuntimeError here and in every CPU op call.
    """
    info = {
        "extension": HAS_EXT,
        "cuda_compiled": False,
        "cuda_archs": [],
        "openmp": False,
        "openmp_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "fallback_reason": _fallback_reason,
        "torch": torch.__version__,
    }
    if HAS_EXT:
        fields = dict(kv.split("=", 1) for kv in torch.ops.stnpadim._build_info().split(";"))
        archs = fields.get("cuda_archs", "")
        info["cuda_archs"] = [a for a in archs.split("_") if a]
        info["openmp"] = fields.get("openmp") == "1"
        info["cuda_compiled"] = fields.get("cuda") == "1"
    has_variants = HAS_EXT and hasattr(torch.ops.stnpadim, "_cpu_capability")
    info["cpu_capability"] = torch.ops.stnpadim._cpu_capability() if has_variants else "default"
    info["cpu_capabilities"] = cpu_capabilities()
    return info
