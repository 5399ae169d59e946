"""Loads amp_fused's compiled extensions on first use, building them when needed, and registers the ops' fake
implementations.

``amp_fused._C`` defines the ops (``torch.ops.amp_fused.*``, csrc/ops.cpp) and their CPU kernels (csrc/cpu);
``amp_fused._C_cuda``, when built, adds the CUDA kernels. Nothing is loaded when this module is imported: the
first read of ``cpu_error`` (or ``fake_error``) loads ``amp_fused._C``, the first read of ``cuda_error`` loads
``amp_fused._C_cuda`` (the backends read them when they are first asked about). Neither ever raises: what went
wrong is recorded for the backends to report.

Which binary, for each extension (see :mod:`amp_fused._build` for the sources, flags and the build tag):

1. the one in the package (setup.py's build: a wheel's, or the in-place one of a checkout), when its build tag
   names this torch (the tag is what ``amp_fused._C.build_info()["torch_version"]`` reports, read from the
   file) and it imports. One built for another torch (or without a tag) is never loaded: it may well load and
   register its ops, and then no fresh build could be loaded in this process. An ImportError (such as an
   undefined symbol: another torch's ABI) counts as "needs a build" too;
2. else a run-time build in the cache (``$AMP_FUSED_BUILD_DIR``, else torch's extension cache
   ``~/.cache/torch_extensions/amp_fused``, else ``<package>/_build_cache``), when its stamp matches the sources,
   flags and torch and its build tag names this torch;
3. else a new build there with ``torch.utils.cpp_extension.load``, announced by one line on stderr. The CUDA
   extension is built only when torch is a CUDA build, nvcc is found and a CUDA device is visible.
   ``AMP_FUSED_BUILD=0`` turns building at run time off (a current build in the cache is still used).

The module that was loaded is ``amp_fused._C`` / ``amp_fused._C_cuda`` in ``sys.modules`` whichever it was.

``cpu_error``: ``None`` when ``amp_fused._C`` is loaded and has CPU kernels for all three ops, else why not.
``cuda_error``: ``None`` when ``amp_fused._C_cuda`` is loaded and has CUDA kernels for all three ops, else why not.
``fake_error``: ``None`` when the fake implementations are registered (torch.compile can trace the ops),
else why not.
``loaded``: for "cpu" and "cuda", once looked at: where the binary came from (``"package"``, ``"cache"``,
``"built"`` or ``None``), its ``file``, and ``notes`` on the candidates passed over.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from pathlib import Path

import torch

from . import _build, checks

OPS = ("perturb_", "restore_", "restore_sgd_", "norms", "restore_orthogonal_", "add_orthogonal_")
_PACKAGE_DIR = Path(__file__).resolve().parent
_MODULES = {"cpu": "amp_fused._C", "cuda": "amp_fused._C_cuda"}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_WHAT = {"cpu": "the C++ CPU kernels", "cuda": "the CUDA kernels"}
_BUILD_HINTS = {
    "amp_fused._C": "`python setup.py build_ext --inplace` or reinstalling amp_fused builds it ahead of time",
    "amp_fused._C_cuda": "setup.py builds it when torch is a CUDA build and nvcc is found; AMP_FUSED_CUDA=1 makes "
                         "a failure to build it an error",
}
_lock = threading.RLock()
loaded: dict = {}


def __getattr__(name):  # the lazy attributes: cpu_error, fake_error, cuda_error
    if name in ("cpu_error", "fake_error"):
        _ensure_cpu()
        return globals()[name]
    if name == "cuda_error":
        _ensure_cuda()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _op_exists(name: str) -> bool:
    return hasattr(torch.ops.amp_fused, name)


def _missing_kernels(dispatch_key: str) -> list[str]:
    return [name for name in OPS
            if not (_op_exists(name)
                    and torch._C._dispatch_has_kernel_for_dispatch_key(f"amp_fused::{name}", dispatch_key))]


def _kernels_error(kind: str, origin: str) -> str | None:
    module, key = _MODULES[kind], _DISPATCH_KEYS[kind]
    try:
        missing = _missing_kernels(key)
    except Exception as exc:  # noqa: BLE001
        return f"{module} is loaded ({origin}) but its {key} kernels could not be looked up: {exc!r}"
    if missing:
        return (f"{module} is loaded ({origin}) but has no {key} kernel for "
                f"{', '.join('amp_fused::' + name for name in missing)}")
    return None


def _building_allowed() -> bool:
    return os.environ.get("AMP_FUSED_BUILD", "").strip().lower() not in ("0", "false", "no", "off")


def _last_lines(text: str, count: int = 12, width: int = 240) -> str:
    """The last lines of a build's error (each cut to ``width``: the echoed compiler commands are long)."""
    lines = [line.rstrip() for line in str(text).strip().splitlines() if line.strip()]
    return "\n".join(line if len(line) <= width else line[:width - 3] + "..." for line in lines[-count:])


def _from_package(kind: str, notes: list) -> str | None:
    """Imports setup.py's build from the package when it is for this torch: "package" on success, else None
    (with why in ``notes``)."""
    module = _MODULES[kind]
    try:
        spec = importlib.util.find_spec(module)
    except Exception as exc:  # noqa: BLE001 - an import hook or a broken package: a reason, not a crash
        notes.append(f"{module} failed to import: {exc!r}")
        return None
    if spec is None:
        notes.append(f"the extension {module} is not built ({_BUILD_HINTS[module]})")
        return None
    if spec.origin and os.path.isfile(spec.origin):
        built_for = _build.read_torch_tag(spec.origin)
        if built_for is None:
            notes.append(f"{module} ({spec.origin}) has no build tag, so the torch it was built for is unknown: "
                         "not loaded")
            return None
        if built_for != _build.torch_tag():
            notes.append(f"{module} ({spec.origin}) was built for torch {built_for}, not this torch "
                         f"{torch.__version__}: not loaded")
            return None
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - e.g. an undefined symbol: built for another torch's ABI
        notes.append(f"{module} failed to import: {exc!r}")
        return None
    loaded[kind]["file"] = spec.origin
    return "package"


def _already_loaded(kind: str, notes: list) -> str | None:
    """"package" when the extension was imported before the loader looked (directly, or by a failed import that
    got as far as registering the ops): then no other build may be loaded in this process (a second definition of
    the ops would abort it). None otherwise, or when that module is unusable (why in ``notes``)."""
    module = _MODULES[kind]
    existing = sys.modules.get(module)
    if existing is None and not (kind == "cpu" and any(_op_exists(name) for name in OPS)):
        return None
    path = getattr(existing, "__file__", None)
    loaded[kind]["file"] = path
    built_for = _build.read_torch_tag(path) if path else None
    if existing is None:
        notes.append(f"the amp_fused ops were defined before amp_fused loaded {module} (by another copy of it?), "
                     "so no build of it can be loaded in this process")
    elif built_for is not None and built_for != _build.torch_tag():
        notes.append(f"{module} ({path}) was imported before amp_fused looked at it, but it was built for torch "
                     f"{built_for}, not this torch {torch.__version__}")
    else:
        return "package"
    raise _Blocked


class _Blocked(Exception):
    """Nothing may be loaded (see _already_loaded)."""


def _from_cache_or_build(kind: str, notes: list, why_no_build) -> str | None:
    """Loads the run-time build (building it first when the cache has none that is current): "cache" or "built"
    on success, else None (with why in ``notes``). ``why_no_build``: why a new build must not be started, or
    None."""
    module = _MODULES[kind]
    if kind == "cpu" and any(_op_exists(name) for name in OPS):  # a failed import that registered the ops
        notes.append(f"the amp_fused ops are defined although {module} did not load, so no build of it can be "
                     "loaded in this process")
        return None
    csrc = _build.find_csrc(_PACKAGE_DIR)
    if csrc is None:
        notes.append(f"{module} cannot be built at run time: its sources are not there (neither "
                     f"{_PACKAGE_DIR / '_csrc'} nor {_PACKAGE_DIR.parent / 'csrc'} holds amp_fused.cpp)")
        return None
    try:
        if kind == "cpu":
            arch, _ = _build.cpu_arch()
            flags = _build.cpu_flags(arch)
        else:
            flags = _build.cuda_flags()
        folder = _build.build_dir(kind, _PACKAGE_DIR, csrc)
        key = _build.build_key(kind, csrc, flags)
    except Exception as exc:  # noqa: BLE001 - a bad AMP_FUSED_CPU_ARCH, no writable folder...
        notes.append(f"{module} cannot be built at run time: {exc}")
        return None
    library = _build.cached_build(kind, folder, key)
    if library is not None:
        try:
            ext = _build.import_library(kind, library)
        except Exception as exc:  # noqa: BLE001 - a failed dlopen registers nothing: build it again
            notes.append(f"{module} built in {folder} failed to import: {exc!r}")
        else:
            return _adopt(kind, ext, library, "cache")
    if not _building_allowed():
        notes.append(f"building {module} at run time is off (AMP_FUSED_BUILD=0)")
        return None
    if why_no_build is not None:
        notes.append(f"{module} is not built at run time: {why_no_build}")
        return None
    failure = _build.failed_build(folder, key)
    if failure is not None:
        notes.append(f"building {module} at run time failed before, with the same sources, flags, torch and "
                     f"compiler (delete {folder / 'amp_fused_build_failed.json'} to try again):\n{failure}")
        return None
    print(f"amp_fused: building {_WHAT[kind]} for torch {torch.__version__} (first use; cached in {folder})",
          file=sys.stderr, flush=True)
    try:
        ext = _build.jit_build(kind, csrc, folder, key, flags)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a compile error...
        error = _last_lines(exc)
        _build.record_failure(folder, key, error)
        notes.append(f"building {module} at run time failed (torch.utils.cpp_extension.load in {folder}):\n"
                     f"{error}")
        return None
    return _adopt(kind, ext, getattr(ext, "__file__", _build.library_path(kind, folder)), "built")


def _adopt(kind: str, ext, path, origin: str) -> str:
    """A run-time build stands in for the package's module, so `import amp_fused._C` gets this one."""
    module = _MODULES[kind]
    sys.modules[module] = ext
    package = sys.modules.get("amp_fused")
    if package is not None:
        setattr(package, module.rsplit(".", 1)[1], ext)
    loaded[kind]["file"] = str(path)
    return origin


def _load(kind: str, why_no_build=None) -> str | None:
    """Loads the extension ``kind``; None when its kernels are registered, else why not."""
    module = _MODULES[kind]
    notes: list = []
    loaded[kind] = {"from": None, "file": None, "notes": notes}
    try:
        origin = (_already_loaded(kind, notes) or _from_package(kind, notes)
                  or _from_cache_or_build(kind, notes, why_no_build))
    except _Blocked:
        origin = None
    except Exception as exc:  # noqa: BLE001 - never raise out of a backend's availability check
        notes.append(f"loading {module} failed: {exc!r}")
        origin = None
    loaded[kind]["from"] = origin
    if origin is None:
        return "; ".join(notes)
    return _kernels_error(kind, origin)


def _ensure_cpu() -> None:
    with _lock:
        if "cpu_error" in globals():
            return
        error = _load("cpu")
        globals()["fake_error"] = _register_fakes()
        globals()["cpu_error"] = error


def _cuda_unbuildable() -> str | None:
    """Why the CUDA extension must not be built here and now, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (it is built on first use on a machine with one)"
    if _build.cpp_extension().CUDA_HOME is None:
        return "nvcc not found (set CUDA_HOME)"
    return None


def _ensure_cuda() -> None:
    with _lock:
        if "cuda_error" in globals():
            return
        _ensure_cpu()
        if globals()["cpu_error"] is not None:
            error = f"amp_fused._C_cuda needs amp_fused._C, which is not loaded: {globals()['cpu_error']}"
        else:
            try:
                why_not = _cuda_unbuildable()
            except Exception as exc:  # noqa: BLE001
                why_not = f"the CUDA build could not be checked: {exc!r}"
            error = _load("cuda", why_not)
        globals()["cuda_error"] = error


# -- fake implementations: shapes, dtypes and devices only, for FakeTensor / meta tracing ---------------------
# They check the op's argument contract (amp_fused.checks, the one Python definition of what the kernels check),
# so a traced call fails where an eager one would; without the memory-overlap part, as traced tensors have no
# memory.
def _fake_perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first, surface=False, eta=None):
    checks.check_perturb(params, grads, backups, epsilon, inner_lr, first=first, eta=eta, overlap=False)
    device = params[0].device if params else torch.device("cpu")
    return torch.empty(len(params) + 1, dtype=torch.float32, device=device)


def _fake_restore_(params, backups):
    checks.check_restore(params, backups, overlap=False)


def _fake_restore_sgd_(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
                       maximize, first_step):
    checks.check_restore_sgd(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                             overlap=False)


def _fake_norms(tensors):
    checks.check_norms(tensors, overlap=False)
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.empty(len(tensors) + 1, dtype=torch.float32, device=device)


def _fake_restore_orthogonal_(params, backups, grads, orthogonals, per_tensor):
    checks.check_restore_orthogonal(params, backups, grads, orthogonals, overlap=False)


def _fake_add_orthogonal_(grads, orthogonals, alpha, per_tensor):
    checks.check_add_orthogonal(grads, orthogonals, alpha, overlap=False)


def _register_fakes() -> str | None:
    if not all(_op_exists(name) for name in OPS):
        return "the ops are not defined (amp_fused._C is not loaded)"
    try:
        for name, fake in (("perturb_", _fake_perturb_), ("restore_", _fake_restore_),
                           ("restore_sgd_", _fake_restore_sgd_), ("norms", _fake_norms),
                           ("restore_orthogonal_", _fake_restore_orthogonal_),
                           ("add_orthogonal_", _fake_add_orthogonal_)):
            torch.library.register_fake(f"amp_fused::{name}", fake)
    except Exception as exc:  # noqa: BLE001
        return f"registering the fake implementations failed: {exc!r}"
    return None

