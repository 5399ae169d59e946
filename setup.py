"""Builds amp_fused and its compiled extensions.

* ``amp_fused._C``: the C++ CPU kernels (always built).
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


def _extensions():
    import torch
    from torch.utils import cpp_extension

    cxx_flags = ["-O3", "-fopenmp"]
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

    # A GPU-less build machine has no arch to detect: give cpp_extension one.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    include_dirs, library_dirs = [os.path.join(ROOT, "csrc")], []
    # torch's headers include cusparse.h etc.; the pip nvidia/cu13 package carries them when the
    # system toolkit lacks them.
    try:
        import nvidia.cu13 as cu13  # type: ignore

        base = os.path.dirname(cu13.__file__)
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
        def build_extension(self, ext):
            if ext.name != "amp_fused._C_cuda" or not optional_cuda:
                return super().build_extension(ext)
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any toolchain failure
                print(f"amp_fused: WARNING: the CUDA extension failed to build ({exc}); "
                      "installed with the CPU kernels only. Set AMP_FUSED_CUDA=1 to make this an error.")

    return AmpBuildExt.with_options(use_ninja=True)


ext_modules, optional_cuda = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": _build_ext_class(optional_cuda)})
