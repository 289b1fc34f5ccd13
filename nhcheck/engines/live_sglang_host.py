"""Import stand-ins that let an SGLang release older than 0.5.11 import on a host without CUDA.

The live worker (``engines/live_sglang.py``) runs the installed SGLang's own start-up on the meta
device. From 0.5.11 on, SGLang imports its CUDA packages behind platform checks, so it imports on
any host. Releases 0.5.3.post1 … 0.5.10.post1 import some of them unconditionally at module level:

- ``sgl_kernel`` (the CUDA kernel wheel; ``from sgl_kernel.kvcacheio import …`` in the host KV
  cache, ``from sgl_kernel import silu_and_mul`` …), which cannot load on a CPU build of torch;
- ``cuda`` / ``cutlass`` (cuda-python and the CuTe DSL; 0.5.8 - 0.5.9 ``jit_kernel/cutedsl_gdn.py``,
  imported by the hybrid linear-attention backend that ``models/nemotron_h.py`` imports), whose
  kernels are decorated with ``@cute.jit`` at import;
- ``vllm.model_executor.layers.layernorm`` / ``.activation`` (before 0.5.8, the last lines of
  ``layers/layernorm.py`` and ``layers/activation.py`` on a host that is neither CUDA, ROCm, NPU,
  XPU nor an AMX CPU: a kernel library's classes replace SGLang's own).

On a GPU host all of these import (or, for the vLLM fallback, are never reached). Here they are
answered the way a GPU host answers them, without running anything:

- a missing kernel package becomes a package whose every function raises when *called* (imports
  succeed; the build creates parameters in Python and calls no kernel); ``sgl_kernel.scalar_type``
  stays missing, because SGLang builds module-level objects from it and has its own fallback;
- a missing DSL package becomes a permissive stand-in (attributes, calls, subscripts and base
  classes all resolve; a decorator returns the function it decorates);
- the vLLM fallback is answered with the classes SGLang's module defined just above it (what a
  GPU host keeps), and the stand-in ``vllm`` modules are removed again once those two modules
  are imported, so nothing later mistakes them for an installed vLLM.

None of these creates, removes or reshapes a parameter. The worker installs them only when its
plain import of the release fails on one of these packages (``missing_host_package``), and then
in a fresh process: a release that imports without them never sees them, and the release's own
code decides everything else. Each one that took effect is listed in the worker's answer
(``shims``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

#: The packages a release before 0.5.11 imports unconditionally that a CPU host lacks.
HOST_PACKAGES = ("sgl_kernel", "cuda", "cutlass", "vllm")
_KERNELS = "sgl_kernel"
#: Submodules of the kernel package that must keep failing to import (SGLang falls back).
_KERNELS_ABSENT = frozenset({"sgl_kernel.scalar_type"})
_DSL = ("cuda", "cutlass")
#: SGLang's modules whose non-CUDA fallback imports vLLM, and the vLLM module each one asks.
_VLLM_FALLBACKS = {
    "vllm.model_executor.layers.layernorm": "sglang.srt.layers.layernorm",
    "vllm.model_executor.layers.activation": "sglang.srt.layers.activation",
}


def missing_host_package(exc: ModuleNotFoundError) -> bool:
    """Whether an import failed for want of one of the CUDA-host packages (stand-ins would answer it)."""
    return (exc.name or "").split(".")[0] in HOST_PACKAGES


def _importable(pkg: str) -> bool:
    try:
        return importlib.util.find_spec(pkg) is not None
    except (ImportError, ValueError):
        return False


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves every module name ``serves`` accepts as a package made by ``make``."""

    def __init__(self, serves: Callable[[str], bool], make: Callable[[str], types.ModuleType]) -> None:
        self.serves, self.make = serves, make

    def find_spec(self, fullname, path=None, target=None):
        if self.serves(fullname):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = self.make(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


class _Kernels(types.ModuleType):
    """A kernel module: any name is a function that raises if called."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or f"{self.__name__}.{attr}" in _KERNELS_ABSENT:
            raise AttributeError(attr)
        qual = f"{self.__name__}.{attr}"

        def kernel(*args: object, **kwargs: object) -> None:
            raise RuntimeError(f"nhcheck --live: {qual} is a CUDA kernel; none runs on this host")

        kernel.__name__ = kernel.__qualname__ = attr
        kernel.__module__ = self.__name__
        setattr(self, attr, kernel)
        return kernel


class _Anything:
    """Whatever a DSL expression evaluated at import asks for (``cute.jit``, ``cutlass.Float32`` …)."""

    def __init__(self, qual: str) -> None:
        self._qual = qual

    def __getattr__(self, attr: str) -> _Anything:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Anything(f"{self._qual}.{attr}")

    def __call__(self, *args: object, **kwargs: object) -> object:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # a decorator
        return _Anything(f"{self._qual}()")

    def __getitem__(self, key: object) -> _Anything:
        return _Anything(f"{self._qual}[]")

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (object,)

    def __repr__(self) -> str:
        return f"<nhcheck stand-in {self._qual}>"


class _Dsl(types.ModuleType):
    def __getattr__(self, attr: str) -> _Anything:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Anything(f"{self.__name__}.{attr}")


def _kernels_served(name: str) -> bool:
    return name.split(".")[0] == _KERNELS and name not in _KERNELS_ABSENT


def _kernel_package(name: str) -> types.ModuleType:
    module = _Kernels(name)
    if name == _KERNELS:
        module.__dict__["__version__"] = "0+nhcheck-stand-in"
    return module


def _vllm_fallbacks() -> list[str]:
    """Import SGLang's layernorm / activation, answering their vLLM fallback with their own classes."""
    parents = ("vllm", "vllm.model_executor", "vllm.model_executor.layers")
    used: list[str] = []

    def make(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        own = _VLLM_FALLBACKS.get(name)
        if own is not None:
            used.append(own)

            def forward(attr: str, _own: str = own) -> Any:  # PEP 562: the module's own classes
                return getattr(sys.modules[_own], attr)

            module.__dict__["__getattr__"] = forward
        return module

    finder = _Finder(lambda name: name in parents or name in _VLLM_FALLBACKS, make)
    sys.meta_path.insert(0, finder)
    try:
        for own in _VLLM_FALLBACKS.values():
            importlib.import_module(own)
    finally:
        sys.meta_path.remove(finder)
        for name in (*parents, *_VLLM_FALLBACKS):
            sys.modules.pop(name, None)
    return used


def install() -> list[str]:
    """Stand in for the CUDA-host packages this host lacks; what took effect, in words."""
    shims: list[str] = []
    if not _importable(_KERNELS):
        sys.meta_path.append(_Finder(_kernels_served, _kernel_package))
        shims.append(
            f"{_KERNELS} (CUDA kernels, imported at module level by this release) answered by a package whose "
            f"functions raise if called; {sorted(_KERNELS_ABSENT)} still missing"
        )
    dsl = tuple(p for p in _DSL if not _importable(p))
    if dsl:
        sys.meta_path.append(_Finder(lambda name: name.split(".")[0] in dsl, _Dsl))
        shims.append(f"{', '.join(dsl)} (CUDA DSL, imported at module level by a kernel module) answered by stand-ins")
    if not _importable("vllm"):
        for own in _vllm_fallbacks():
            shims.append(f"{own}'s non-CUDA 'from vllm … import' fallback answered with its own classes")
    return shims
