"""Builds amp_fused and its compiled extensions.

* ``amp_fused._C``: the C++ CPU kernels (always built). ``AMP_FUSED_CPU_ARCH=avx2`` compiles them for
  AVX2 (+FMA, F16C), ``AMP_FUSED_CPU_ARCH=default`` for baseline x86-64 / any CPU; unset picks avx2 when
  the build machine has it. The binary then needs those instructions: build with ``default`` for
  machines other than the build machine.
* ``amp_fused._C_cuda``: the CUDA kernels, built when torch is a CUDA build and nvcc is found.
  ``AMP_FUSED_CUDA=1`` makes it mandatory (any compile or link error fails the build),
  ``AMP_FUSED_CUDA=0`` skips it. Without the variable a failed CUDA build is reported and the
  install goes on with the CPU part, so a broken toolkit never blocks CPU users.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_request():
    value = os.environ.get("AMP_FUSED_CUDA", "").strip()
    if value not in ("", "0", "1"):
        sys.exit(f"AMP_FUSED_CUDA must be '0', '1' or unset, got {value!r}")
    return {"": None, "0": False, "1": True}[value]


CPU_ARCHES = ("avx2", "default")


def _is_x86_64():
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


def _build_machine_has_avx2():
    """Whether this machine runs AVX2, FMA and F16C, the instructions ATen's AVX2 vector code uses."""
    if not _is_x86_64():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        return {"avx2", "fma", "f16c"}.issubset(flags)
    except OSError:  # no /proc (macOS, Windows): ask torch's cpuinfo
        import torch

        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _cpu_arch():
    value = os.environ.get("AMP_FUSED_CPU_ARCH", "").strip()
    if value not in ("",) + CPU_ARCHES:
        sys.exit(f"AMP_FUSED_CPU_ARCH must be one of {', '.join(map(repr, CPU_ARCHES))} or unset, got {value!r}")
    if value == "avx2" and not _is_x86_64():
        sys.exit("AMP_FUSED_CPU_ARCH=avx2 needs an x86-64 build machine; use 'default' or leave it unset")
    if value:
        return value, "set by AMP_FUSED_CPU_ARCH"
    if _build_machine_has_avx2():
        return "avx2", "the build machine has AVX2, FMA and F16C"
    return "default", "the build machine lacks AVX2, FMA or F16C"


def _cpu_arch_flags(arch):
    """Compiler flags for the CPU kernels. ATen's at::vec::Vectorized picks its AVX2 implementation when
    CPU_CAPABILITY_AVX2 is defined (and names its inline namespace after CPU_CAPABILITY), and that code uses
    AVX2, FMA and F16C (fp16 conversion) intrinsics."""
    if arch == "default":
        return []
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def _extensions():
    import torch
    from torch.utils import cpp_extension

    cpu_arch, why = _cpu_arch()
    print(f"amp_fused: CPU kernels for {cpu_arch!r} ({why})")
    cxx_flags = ["-O3", "-fopenmp"] + _cpu_arch_flags(cpu_arch)
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    exts = [
        cpp_extension.CppExtension(
            "amp_fused._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]

    request = _cuda_request()
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
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
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "7.5;8.0;8.6;8.9;9.0+PTX")
    include_dirs, library_dirs = [os.path.join(ROOT, "csrc")], []
    # torch's headers include cusparse.h etc.; the pip nvidia/cu13 package carries them when the
    # system toolkit lacks them.
    try:
        import nvidia.cu13 as cu13  # type: ignore

        base = list(cu13.__path__)[0]  # a namespace package: no __file__
        include_dirs.append(os.path.join(base, "include"))
        library_dirs.append(os.path.join(base, "lib"))
    except ImportError:
        pass
    exts.append(
        cpp_extension.CUDAExtension(
            "amp_fused._C_cuda",
            cuda_sources,
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
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
