"""Package names that load on first use (PEP 562): `stnpadim --help` and argument errors
answer without importing torch, and `import stnpadim_ext` alone costs nothing."""
from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """(__getattr__, __dir__) for `package`, whose name N is loaded from module exports[N]
    (relative to the package) when first asked for."""
    namespace = vars(sys.modules[package])

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
