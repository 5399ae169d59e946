"""Builds amp_fused and its compiled extensions.

* ``amp_fused._C``: the C++ CPU kernels (always built). ``AMP_FUSED_CPU_ARCH=avx2`` compiles them for
  AVX2 (+FMA, F16C), ``AMP_FUSED_CPU_ARCH=default`` for baseline x86-64 / any CPU; unset picks avx2 when
  the build machine has it. The binary then needs those instructions: build with ``default`` for
  machines other than the build machine.
* ``amp_fused._C_cuda``: the CUDA kernels, built when torch is a CUDA build and nvcc is found.
  ``AMP_FUSED_CUDA=1`` makes it mandatory (any compile or link error fails the build),
  ``AMP_FUSED_CUDA=0`` skips it. Without the variable a failed CUDA build is reported and the
  install goes on with the CPU part, so a broken toolkit never blocks CPU users.
  ``AMP_FUSED_NVCC_FLAGS``: extra nvcc flags, split into words like a shell command line (``shlex``) and
  appended after the defaults, e.g. ``AMP_FUSED_NVCC_FLAGS="-Xptxas -v"`` for ptxas's register and spill
  report (``tools/gpu_check.sh`` builds so).

The sources and compiler flags come from ``amp_fused/_build.py``, which the run-time loader
(``amp_fused/_extension.py``) shares: where an extension is not built here, or was built for another torch,
amp_fused builds it on first use, from csrc (shipped in the wheel as ``amp_fused/_csrc``, pyproject.toml).
"""
import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    """amp_fused/_build.py, by path (the package itself is not importable yet): the sources and compiler flags,
    shared with the run-time loader, which builds the extensions on first use where they are missing."""
    spec = importlib.util.spec_from_file_location("_amp_fused_build", os.path.join(ROOT, "amp_fused", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _load_build_module()


def _cuda_request():
    value = os.environ.get("AMP_FUSED_CUDA", "").strip()
    if value not in ("", "0", "1"):
        sys.exit(f"AMP_FUSED_CUDA must be '0', '1' or unset, got {value!r}")
    return {"": None, "0": False, "1": True}[value]


def _relative(paths):
    return [os.path.relpath(p, ROOT) for p in paths]


def _extensions():
    import torch
    from torch.utils import cpp_extension

    csrc = os.path.join(ROOT, "csrc")
    try:
        cpu_arch, why = _build.cpu_arch()
    except _build.BuildConfigError as exc:
        sys.exit(str(exc))
    print(f"amp_fused: CPU kernels for {cpu_arch!r} ({why})")
    cpu_flags = _build.cpu_flags(cpu_arch)
    exts = [
        cpp_extension.CppExtension(
            "amp_fused._C",
            _relative(_build.cpu_sources(csrc)),
            include_dirs=[csrc],
            extra_compile_args={"cxx": cpu_flags["cxx"]},
            extra_link_args=cpu_flags["ldflags"],
        )
    ]

    request = _cuda_request()
    cuda_sources = _relative(_build.cuda_sources(csrc))
    if request is False:
        print("amp_fused: AMP_FUSED_CUDA=0, not building the CUDA extension")
        return exts, False
    reasons = []
    if not cuda_sources:
        reasons.append("no CUDA sources under csrc/cuda")
    if torch.version.cuda is None:
        reasons.append("torch is not a CUDA build")
    if cpp_extension.CUDA_HOME is None:
        reasons.append("nvcc not found (set CUDA_HOME)")
    if reasons:
        if request:
            sys.exit("amp_fused: AMP_FUSED_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(reasons))
        print("amp_fused: not building the CUDA extension: " + "; ".join(reasons))
        return exts, False

    # A GPU-less build machine has no arch to detect: build for the common data-centre and workstation GPUs,
    # with PTX for newer ones (TORCH_CUDA_ARCH_LIST overrides; the Makefile uses 9.0+PTX to keep CI builds short).
    # (A build at run time, on first use, targets the GPUs it sees.)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "7.5;8.0;8.6;8.9;9.0+PTX")
    cuda_flags = _build.cuda_flags()
    exts.append(
        cpp_extension.CUDAExtension(
            "amp_fused._C_cuda",
            cuda_sources,
            include_dirs=[csrc] + cuda_flags["include_dirs"],
            library_dirs=cuda_flags["library_dirs"],
            extra_compile_args={"cxx": cuda_flags["cxx"], "nvcc": cuda_flags["nvcc"]},
        )
    )
    return exts, not request


def _build_ext_class(optional_cuda):
    from torch.utils.cpp_extension import BuildExtension

    class AmpBuildExt(BuildExtension):
        failed = ()

        def build_extension(self, ext):
            if ext.name != "amp_fused._C_cuda" or not optional_cuda:
                return super().build_extension(ext)
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any toolchain failure
                print(f"amp_fused: WARNING: the CUDA extension failed to build ({exc}); "
                      "installed with the CPU kernels only. Set AMP_FUSED_CUDA=1 to make this an error.")
                self.failed = (*self.failed, ext.name)

        def build_extensions(self):
            super().build_extensions()
            # what failed has no binary to copy or install
            self.extensions = [ext for ext in self.extensions if ext.name not in self.failed]

    return AmpBuildExt.with_options(use_ninja=True)


ext_modules, optional_cuda = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": _build_ext_class(optional_cuda)})
