"""The extension loads and reports truthfully; without it the package falls back, never fails."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

import stnpadim_ext as sp
from stnpadim_ext import _backend

PKG_DIR = Path(sp.__file__).resolve().parent
NO_EXT = os.environ.get("STNPADIM_NO_EXT") == "1"

# Runs the ops through whatever backend loaded and checks them against torch itself.
OPS_SMOKE = textwrap.dedent("""
    import json, warnings
    import torch, torch.nn.functional as F
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import stnpadim_ext as sp
        sp.backend_info  # the backend loads with the first name used (lazy exports)
    x, theta = torch.rand(2, 3, 9, 7), torch.randn(2, 2, 3) * 0.3
    want = F.grid_sample(x, F.affine_grid(theta, (2, 3, 9, 7), align_corners=False), align_corners=False)
    assert torch.allclose(sp.affine_sample(x, theta), want, atol=1e-5)
    emb = torch.randn(40, 4, 6)
    g = sp.GaussianStats(6, 4).update(emb).finalize()
    assert sp.mahalanobis(emb[:3], g).shape == (3, 6)
    print(json.dumps({"info": sp.backend_info(), "warnings": [str(w.message) for w in caught]}))
""")


def _run_python(code, no_ext=False, pythonpath=None):
    """Runs code in a fresh interpreter (the backend is chosen at import) and returns its JSON."""
    env = {k: v for k, v in os.environ.items() if k != "STNPADIM_NO_EXT"}
    if no_ext:
        env["STNPADIM_NO_EXT"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=pythonpath or os.getcwd(), timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_backend_info_keys_and_types():
    info = sp.backend_info()
    assert isinstance(info["extension"], bool)
    assert isinstance(info["cuda_compiled"], bool)
    assert isinstance(info["cuda_archs"], list) and all(isinstance(a, str) for a in info["cuda_archs"])
    assert isinstance(info["openmp_threads"], int) and info["openmp_threads"] >= 1
    assert info["fallback_reason"] is None or isinstance(info["fallback_reason"], str)


def test_extension_loaded_in_test_environment():
    info = sp.backend_info()
    if NO_EXT:
        assert not info["extension"] and "STNPADIM_NO_EXT" in info["fallback_reason"]
        return
    assert info["extension"], info["fallback_reason"]
    assert info["fallback_reason"] is None
    assert info["openmp"], "the CPU kernels were built without OpenMP"
    for op in ("affine_sample", "mahalanobis"):
        assert _backend.has_kernel(op, "cpu"), f"stnpadim::{op} has no CPU kernel"


def test_cuda_compiled_is_truthful():
    info = sp.backend_info()
    if not info["extension"]:
        assert not info["cuda_compiled"]
        return
    registered = [_backend.has_kernel(op, "cuda") for op in ("affine_sample", "mahalanobis")]
    # cuda_compiled must agree with what the dispatcher actually holds.
    assert all(registered) == info["cuda_compiled"] == any(registered)
    assert bool(info["cuda_archs"]) == info["cuda_compiled"]
    # The build switches hold for the tests too (.ci/run exports STNPADIM_FORCE_CUDA=1 for
    # the README command, which builds and then tests): what they asked for must be built.
    if os.environ.get("STNPADIM_FORCE_CUDA") == "1":
        assert info["cuda_compiled"], "built with STNPADIM_FORCE_CUDA=1 but no CUDA kernels loaded"
    if os.environ.get("STNPADIM_NO_CUDA") == "1":
        assert not info["cuda_compiled"], "built with STNPADIM_NO_CUDA=1 but CUDA kernels loaded"


def test_no_ext_env_uses_reference_ops():
    result = _run_python(OPS_SMOKE, no_ext=True)
    info = result["info"]
    assert info["extension"] is False and info["cuda_compiled"] is False
    assert "STNPADIM_NO_EXT" in info["fallback_reason"]


def test_broken_extension_warns_and_falls_back(tmp_path):
    if not list(PKG_DIR.glob("_C*.so")):
        pytest.skip("no compiled _C in this checkout to break")
    copy = tmp_path / "stnpadim_ext"
    shutil.copytree(PKG_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for so in copy.glob("_C*.so"):
        so.write_bytes(b"\x7fELF this is not a shared library")
    result = _run_python(OPS_SMOKE, pythonpath=tmp_path)
    info = result["info"]
    assert info["extension"] is False
    assert "failed to load" in info["fallback_reason"]
    assert any("reference ops" in w for w in result["warnings"]), result["warnings"]


def test_dispatch_follows_device_and_env():
    x = torch.rand(1, 1, 2, 2)
    assert _backend.use_extension("affine_sample", x) == (sp.backend_info()["extension"])
    assert not _backend.use_extension("affine_sample")


def test_source_checkout_shadowing_an_installed_package_says_so(tmp_path):
    """`python` run inside a clone imports ./stnpadim_ext (no kernels) before a non-editable
    install: the fallback reason names both places and what to do."""
    checkout, site = tmp_path / "checkout", tmp_path / "site"
    for root in (checkout, site):
        shutil.copytree(PKG_DIR, root / "stnpadim_ext",
                        ignore=shutil.ignore_patterns("__pycache__", *([] if root == site else ["_C*.so"])))
    (checkout / "setup.py").write_text("# the checkout's build script\n")
    record = site / "stnpadim-0.1.0.dist-info"
    record.mkdir()
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: stnpadim\nVersion: 0.1.0\n")
    (record / "RECORD").write_text("stnpadim_ext/__init__.py,,\nstnpadim-0.1.0.dist-info/METADATA,,\n")
    env = {k: v for k, v in os.environ.items() if k != "STNPADIM_NO_EXT"}
    # -S: no .pth files, so an editable install of this checkout (the test venv's) cannot
    # hand the missing _C over from elsewhere; torch comes from site-packages by path.
    env["PYTHONPATH"] = os.pathsep.join([str(checkout), str(site), sysconfig.get_paths()["purelib"],
                                         sysconfig.get_paths()["platlib"]])
    out = subprocess.run([sys.executable, "-S", "-c", OPS_SMOKE], env=env, capture_output=True,
                         text=True, cwd=checkout, timeout=300)
    assert out.returncode == 0, out.stderr
    reason = json.loads(out.stdout.strip().splitlines()[-1])["info"]["fallback_reason"]
    assert f"source checkout {checkout / 'stnpadim_ext'}" in reason, reason
    assert str(site / "stnpadim_ext") in reason and "pip install --no-build-isolation -e ." in reason
