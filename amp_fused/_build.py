"""How amp_fused's compiled extensions are built, in one place for both builders: setup.py (ahead of time) and
the run-time loader (:mod:`amp_fused._extension`, on first use, with ``torch.utils.cpp_extension.load``) take
the sources and compiler flags from here.

setup.py loads this file by path, before amp_fused is importable: standard library only at module level, no
relative imports (torch is imported inside the functions that need it).

The binaries carry a build tag (``csrc/amp_fused.cpp``, ``csrc/cuda/module.cpp``): the version of the torch they
were compiled against, readable from the file without loading it (:func:`read_torch_tag`). A library built for
another torch must never be loaded: it may load without error and register its ops, and a registration can
not be undone in that process, so no fresh build could be loaded after it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import platform
import shlex
import shutil
import sys
from pathlib import Path

CPU_ARCHES = ("avx2", "default")
# What the binaries embed before the torch version, up to a ';' (see csrc/amp_fused.cpp).
BUILD_TAG = b"amp_fused-build-tag:torch="
# The names of the extensions when built at run time (torch.utils.cpp_extension.load); setup.py builds them as
# amp_fused._C and amp_fused._C_cuda. The sources name their Python module TORCH_EXTENSION_NAME.
JIT_NAMES = {"cpu": "amp_fused_C", "cuda": "amp_fused_C_cuda"}


class BuildConfigError(ValueError):
    """An environment variable that configures the build has a value it does not take."""


# -- the sources ---------------------------------------------------------------------------------------------------
def find_csrc(package_dir) -> Path | None:
    """The C++/CUDA source folder for the package in ``package_dir``: ``<package>/_csrc`` in an installed wheel
    (pyproject.toml ships it), ``<package>/../csrc`` in a checkout (editable or in-place build)."""
    package_dir = Path(package_dir)
    for candidate in (package_dir / "_csrc", package_dir.parent / "csrc"):
        if (candidate / "amp_fused.cpp").is_file():
            return candidate
    return None


def cpu_sources(csrc) -> list[Path]:
    csrc = Path(csrc)
    return sorted(list(csrc.glob("*.cpp")) + list((csrc / "cpu").glob("*.cpp")))


def cuda_sources(csrc) -> list[Path]:
    csrc = Path(csrc)
    return sorted(list((csrc / "cuda").glob("*.cu")) + list((csrc / "cuda").glob("*.cpp")))


def _source_files(csrc) -> list[Path]:
    """Every file a build of either extension may read from ``csrc`` (sources and headers)."""
    suffixes = {".cpp", ".h", ".cu", ".cuh", ".hpp"}
    return sorted(p for p in Path(csrc).rglob("*") if p.is_file() and p.suffix in suffixes)


# -- the CPU kernels' flags ----------------------------------------------------------------------------------------
def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def machine_has_avx2() -> bool:
    """Whether this machine runs AVX2, FMA and F16C, the instructions ATen's AVX2 vector code uses."""
    if not is_x86_64():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        return {"avx2", "fma", "f16c"}.issubset(flags)
    except OSError:  # no /proc (macOS, Windows): ask torch's cpuinfo
        import torch

        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def cpu_arch() -> tuple[str, str]:
    """(arch, why): the CPU kernels' target, from ``AMP_FUSED_CPU_ARCH`` or this (the building) machine."""
    value = os.environ.get("AMP_FUSED_CPU_ARCH", "").strip()
    if value not in ("",) + CPU_ARCHES:
        raise BuildConfigError(f"AMP_FUSED_CPU_ARCH must be one of {', '.join(map(repr, CPU_ARCHES))} or unset, "
                               f"got {value!r}")
    if value == "avx2" and not is_x86_64():
        raise BuildConfigError("AMP_FUSED_CPU_ARCH=avx2 needs an x86-64 build machine; use 'default' or leave it "
                               "unset")
    if value:
        return value, "set by AMP_FUSED_CPU_ARCH"
    if machine_has_avx2():
        return "avx2", "the build machine has AVX2, FMA and F16C"
    return "default", "the build machine lacks AVX2, FMA or F16C"


def cpu_arch_flags(arch: str) -> list[str]:
    """ATen's at::vec::Vectorized picks its AVX2 implementation when CPU_CAPABILITY_AVX2 is defined (and names its
    inline namespace after CPU_CAPABILITY), and that code uses AVX2, FMA and F16C (fp16 conversion) intrinsics."""
    if arch == "default":
        return []
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def cpu_flags(arch: str) -> dict:
    """The compiler and linker flags of amp_fused._C (besides csrc as an include dir and torch's own)."""
    return {"cxx": ["-O3", "-fopenmp"] + cpu_arch_flags(arch), "ldflags": ["-fopenmp"]}


# -- the CUDA kernels' flags ---------------------------------------------------------------------------------------
def extra_nvcc_flags() -> list[str]:
    """The words of ``AMP_FUSED_NVCC_FLAGS`` (split like a shell command line), appended to the nvcc flags."""
    return shlex.split(os.environ.get("AMP_FUSED_NVCC_FLAGS", ""))


def cuda_flags() -> dict:
    """The compiler flags and the include and library dirs of amp_fused._C_cuda (besides csrc and torch's own).
    torch's headers include cusparse.h etc.: the pip nvidia/cu13 package carries them when the system toolkit
    lacks them."""
    flags = {"cxx": ["-O3"], "nvcc": ["-O3"] + extra_nvcc_flags(), "include_dirs": [], "library_dirs": []}
    try:
        import nvidia.cu13 as cu13  # type: ignore
    except ImportError:
        return flags
    base = list(cu13.__path__)[0]  # a namespace package: no __file__
    flags["include_dirs"].append(os.path.join(base, "include"))
    flags["library_dirs"].append(os.path.join(base, "lib"))
    return flags


# -- the build tag -------------------------------------------------------------------------------------------------
def torch_tag(version: str | None = None) -> str:
    """What a binary built against this torch carries in its build tag: the C++ headers' TORCH_VERSION, which is
    ``torch.__version__`` without its local part (``2.14.1+cu130`` -> ``2.14.1``)."""
    if version is None:
        import torch

        version = torch.__version__
    return str(version).split("+", 1)[0]


def read_torch_tag(path) -> str | None:
    """The torch version in the build tag of the binary at ``path``, read without loading it; ``None`` when it
    has none (or cannot be read)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start = data.find(BUILD_TAG)
            if start < 0:
                return None
            start += len(BUILD_TAG)
            end = data.find(b";", start, start + 64)
            return data[start:end].decode("ascii", "replace") if end > 0 else None
    except (OSError, ValueError):
        return None


# -- building at run time ------------------------------------------------------------------------------------------
def _default_cache_root() -> Path:
    """torch's extension cache (``TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    return Path(cpp_extension().get_default_build_root())


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        return True
    except OSError:
        return False


def build_dir(kind: str, package_dir, csrc) -> Path:
    """Where the run-time build of ``kind`` ("cpu" or "cuda") lives: ``$AMP_FUSED_BUILD_DIR``, else torch's
    extension cache, else ``<package>/_build_cache`` (the first writable one), then a folder per Python, torch
    and source checkout: ``amp_fused/py311-torch2.14.1+cu130-<hash of the csrc path>/cpu``."""
    import torch

    tag = (f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-"
           f"{hashlib.sha256(str(Path(csrc).resolve()).encode()).hexdigest()[:8]}")
    explicit = os.environ.get("AMP_FUSED_BUILD_DIR")
    if explicit:
        roots = [Path(explicit)]
    else:
        roots = []
        with contextlib.suppress(Exception):
            roots.append(_default_cache_root() / "amp_fused")
        roots.append(Path(package_dir) / "_build_cache")
    for root in roots:
        if _writable(root / tag / kind):
            return root / tag / kind
    raise OSError(f"no writable folder for the build among {', '.join(str(r) for r in roots)} "
                  "(set AMP_FUSED_BUILD_DIR)")


def build_key(kind: str, csrc, flags: dict) -> str:
    """A digest of everything the run-time build of ``kind`` depends on: the source files' contents, the flags,
    torch, Python, the compilers named in the environment (and for CUDA the target architectures)."""
    import torch

    digest = hashlib.sha256()
    facts = {
        "kind": kind, "flags": flags, "torch": torch.__version__, "git": getattr(torch.version, "git_version", ""),
        "cuda": torch.version.cuda, "python": sys.version, "executable": sys.executable,
        "env": {k: os.environ.get(k) for k in ("CXX", "CC", "CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST")},
        # which compilers those are, so that installing one counts as a change (a failed build is not retried
        # while nothing changed: see failed_build)
        "compilers": [shutil.which(os.environ.get("CXX") or "c++"), shutil.which("nvcc") if kind == "cuda" else None],
    }
    if kind == "cuda":
        with contextlib.suppress(Exception):
            facts["gpus"] = [list(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
    digest.update(json.dumps(facts, sort_keys=True, default=str).encode())
    for path in _source_files(csrc):
        digest.update(str(path.relative_to(csrc)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def library_path(kind: str, folder) -> Path:
    return Path(folder) / (JIT_NAMES[kind] + (".pyd" if os.name == "nt" else ".so"))  # as torch names it


def cached_build(kind: str, folder, key: str) -> Path | None:
    """The library of a finished run-time build in ``folder`` with this ``key`` and torch's build tag, or None."""
    library = library_path(kind, folder)
    try:
        stamp = json.loads((Path(folder) / "amp_fused_build.json").read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("key") != key or not library.is_file() or read_torch_tag(library) != torch_tag():
        return None
    return library


_FAILED = "amp_fused_build_failed.json"


def failed_build(folder, key: str) -> str | None:
    """The error of an earlier run-time build in ``folder`` that failed with this ``key``, or None: a build that
    failed is not tried again until something it depends on changes (or the record is deleted)."""
    try:
        record = json.loads((Path(folder) / _FAILED).read_text())
    except (OSError, ValueError):
        return None
    return str(record.get("error")) if record.get("key") == key else None


def record_failure(folder, key: str, error: str) -> Path:
    path = Path(folder) / _FAILED
    with contextlib.suppress(OSError):
        _write_atomic(path, json.dumps({"key": key, "error": error}))
    return path


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


@contextlib.contextmanager
def _ninja_on_path():
    """torch's builder runs `ninja` from PATH: add the folders where pip puts it (this interpreter's, the ninja
    package's), which an unactivated virtual environment leaves out."""
    folders = [os.path.dirname(sys.executable)]
    with contextlib.suppress(Exception):
        import ninja  # type: ignore

        folders.insert(0, ninja.BIN_DIR)
    old = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join(folders + ([old] if old else []))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


@contextlib.contextmanager
def _quiet_cpp_extension():
    """torch.utils.cpp_extension logs warnings on import (CUDA_HOME without a GPU) and while building (a compiler
    it does not recognise): a build at run time says one line, and a failure is in the exception it raises."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def cpp_extension():
    """torch.utils.cpp_extension, imported quietly."""
    with _quiet_cpp_extension():
        from torch.utils import cpp_extension as module
    return module


def jit_build(kind: str, csrc, folder, key: str, flags: dict):
    """Compiles the extension ``kind`` into ``folder`` with ``torch.utils.cpp_extension.load`` and returns the
    loaded module; raises what the build raised (its message ends with the compiler's output)."""
    csrc = Path(csrc)
    folder = Path(folder)
    load = cpp_extension().load
    # A stale library must go: ninja would take its newer time stamp for up to date.
    for stale in (library_path(kind, folder), folder / "amp_fused_build.json", folder / _FAILED):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    if kind == "cpu":
        args = dict(sources=[str(p) for p in cpu_sources(csrc)], extra_cflags=flags["cxx"],
                    extra_ldflags=flags["ldflags"], extra_include_paths=[str(csrc)], with_cuda=False)
    else:
        args = dict(sources=[str(p) for p in cuda_sources(csrc)], extra_cflags=flags["cxx"],
                    extra_cuda_cflags=flags["nvcc"], extra_include_paths=[str(csrc)] + flags["include_dirs"],
                    extra_ldflags=[f"-L{d}" for d in flags["library_dirs"]], with_cuda=True)
    with _ninja_on_path(), _quiet_cpp_extension():
        module = load(name=JIT_NAMES[kind], build_directory=str(folder), verbose=False,
                                    is_python_module=True, **args)
    _write_atomic(folder / "amp_fused_build.json",
                  json.dumps({"key": key, "torch": torch_tag(), "library": library_path(kind, folder).name}))
    return module


def import_library(kind: str, path):
    """Imports a run-time build's library (the Python module TORCH_EXTENSION_NAME = JIT_NAMES[kind])."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(JIT_NAMES[kind], str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
