"""Optional dependencies, imported lazily, with an error that names the extra to install.

``fusionloader demo`` without the ``[demo]`` extra used to die deep inside with ``No module named
'sklearn'``; :func:`require` turns that into ``fusionloader demo needs scikit-learn: pip install
'fusionloader[demo]'`` before any work starts.
"""

from __future__ import annotations

import importlib

__all__ = ["MissingExtraError", "require"]

# import name -> the name pip knows it by (where they differ)
_PACKAGES = {"sklearn": "scikit-learn", "faiss": "faiss-cpu", "nvidia.dali": "nvidia-dali-cuda120"}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the fusionloader extra that brings it."""


def require(module: str, feature: str, extra: str):
    """Import and return ``module``; if it is missing, raise :class:`MissingExtraError` saying that
    ``feature`` needs it and ``pip install 'fusionloader[extra]'`` installs it.

    Only a missing ``module`` itself (or its top-level package) is translated: an import error raised
    from inside an installed package is a real error and propagates unchanged."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is None or not (module == e.name or module.startswith(e.name + ".") or e.name == top):
            raise
        package = _PACKAGES.get(module, _PACKAGES.get(top, top))
        raise MissingExtraError(f"{feature} needs {package}: pip install 'fusionloader[{extra}]'", name=module) from e
