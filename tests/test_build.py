"""A build that matches the torch present: amp_fused builds amp_fused._C on first use where it is missing or was
built for another torch (amp_fused/_extension.py, amp_fused/_build.py), and falls back where it cannot.

Every check runs a fresh interpreter on a copy of the package without binaries, laid out as an installed wheel
(the sources in amp_fused/_csrc, as pyproject.toml ships them), with a build cache of its own
(AMP_FUSED_BUILD_DIR). One real build (about a minute of compiling here) is shared by the module; the tests that
need it are marked slow.
"""
from __future__ import annotations

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

from amp_fused import _build

REPO = Path(__file__).resolve().parents[1]
TORCH_TAG = _build.torch_tag()
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
BUILD_LINE = f"amp_fused: building the C++ CPU kernels for torch {torch.__version__} (first use; cached in "

# What a user's first use does: pick the backend for CPU tensors, then run one op on it and on foreach.
# An editable install's finder (setuptools) would find the checkout's amp_fused._C for the copy: off.
NO_EDITABLE = ("import sys\n"
               "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in str(getattr(f, '__module__', ''))]\n")

SCRIPT = NO_EDITABLE + textwrap.dedent("""
    import json, sys, warnings
    import torch
    import amp_fused
    info = {"file": amp_fused.__file__, "extension_at_import": "amp_fused._C" in sys.modules}
    from amp_fused import _extension, backends, functional
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info["auto"] = backends.resolve("auto", "cpu").NAME
    info["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    info["cuda_looked_at"] = "cuda" in _extension.loaded  # the CUDA extension is for whoever asks about cuda
    info["loaded"] = _extension.loaded["cpu"]
    info["available"] = amp_fused.available_backends("cpu")
    info["reason"] = backends.unavailable_reason("cpu")
    if info["reason"] is None:
        info["build_info_torch"] = amp_fused._C.build_info()["torch_version"]
        torch.manual_seed(0)
        params = [torch.randn(70000), torch.randn(3, 7, dtype=torch.float64), torch.randn(5).bfloat16()]
        grads = [torch.randn_like(p) for p in params]
        results = {}
        for name in ("cpu", "foreach"):
            p, b = [t.clone() for t in params], [torch.empty_like(t) for t in params]
            norms = functional.perturb_(p, grads, b, 0.5, 1.0, True, True, backend=name)
            functional.restore_(p, b, backend=name)
            results[name] = (functional.perturb_(p, grads, b, 0.5, 1.0, False, True, backend=name), p, b)
        (n_cpu, p_cpu, b_cpu), (n_ref, p_ref, b_ref) = results["cpu"], results["foreach"]
        info["norms_close"] = torch.allclose(n_cpu, n_ref, rtol=1e-5)
        info["params_close"] = all(torch.allclose(a.double(), b.double(), rtol=1e-2 if a.dtype == torch.bfloat16
                                                  else 1e-5, atol=1e-6) for a, b in zip(p_cpu, p_ref))
        info["backups_equal"] = all(torch.equal(a, b) for a, b in zip(b_cpu, b_ref))
    print(json.dumps(info))
""")


def run_first_use(package: Path, cache: Path, **env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("AMP_FUSED_BUILD", "PYTHONPATH")}
    env.update(PYTHONPATH=str(package), AMP_FUSED_BUILD_DIR=str(cache), **env_overrides)
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=package, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(info["file"]).resolve().is_relative_to(package.resolve())  # the copy, not the checkout
    info["build_lines"] = [line for line in done.stderr.splitlines() if line.startswith("amp_fused: building")]
    info["stderr"] = done.stderr
    return info


def assert_cpu_backend_works(info):
    assert info["reason"] is None, info["reason"]
    assert info["auto"] == "cpu" and "cpu" in info["available"] and info["warnings"] == []
    assert info["build_info_torch"] == TORCH_TAG
    assert info["norms_close"] and info["params_close"] and info["backups_equal"]
    assert not info["extension_at_import"] and not info["cuda_looked_at"]


def retag(library: Path, version: str) -> bytes:
    """The bytes of ``library`` with its build tag naming torch ``version`` (same length: the ELF stays valid)."""
    data = library.read_bytes()
    old = _build.BUILD_TAG + TORCH_TAG.encode() + b";"
    new = _build.BUILD_TAG + version.encode() + b";"
    assert data.count(old) == 1 and len(new) <= len(old)
    return data.replace(old, new + b"\0" * (len(old) - len(new)))


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """A copy of amp_fused without binaries, laid out as an installed wheel (csrc as amp_fused/_csrc)."""
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(REPO / "amp_fused", root / "amp_fused",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "_build_cache", "_csrc"))
    shutil.copytree(REPO / "csrc", root / "amp_fused" / "_csrc")
    return root


@pytest.fixture(scope="module")
def first_use(package, tmp_path_factory):
    """The one real build: the first use of the cpu backend in a process, on an empty cache."""
    cache = tmp_path_factory.mktemp("cache")
    return cache, run_first_use(package, cache)


def test_sources_are_found_in_a_checkout_and_in_a_wheel(package):
    assert _build.find_csrc(REPO / "amp_fused") == REPO / "csrc"
    assert _build.find_csrc(package / "amp_fused") == package / "amp_fused" / "_csrc"
    assert _build.find_csrc(package / "nowhere") is None


@pytest.mark.slow
def test_first_use_builds_it_saying_so_in_one_line_and_the_cpu_backend_runs(first_use):
    cache, info = first_use
    assert len(info["build_lines"]) == 1, info["stderr"]
    assert info["build_lines"][0].startswith(BUILD_LINE + str(cache)), info["build_lines"]
    assert info["stderr"].strip() == info["build_lines"][0], info["stderr"]  # nothing else on the way
    assert info["loaded"]["from"] == "built"
    assert any("amp_fused._C is not built" in note for note in info["loaded"]["notes"])
    assert_cpu_backend_works(info)


@pytest.mark.slow
def test_a_second_process_reuses_the_build(first_use, package):
    cache, first = first_use
    info = run_first_use(package, cache)
    assert info["build_lines"] == [] and info["loaded"]["from"] == "cache", info["stderr"]
    assert info["loaded"]["file"] == first["loaded"]["file"]
    assert_cpu_backend_works(info)


@pytest.mark.slow
def test_a_build_for_another_torch_is_never_loaded_but_rebuilt(first_use, package):
    cache, first = first_use
    cached = Path(first["loaded"]["file"])
    # The package holds a binary tagged "built for torch 0.0" (it would load: it is a real build), and so does the
    # cache: neither is loaded, the cache's is rebuilt.
    stale = package / "amp_fused" / f"_C{EXT_SUFFIX}"
    stale.write_bytes(retag(cached, "0.0"))
    cached.write_bytes(retag(cached, "0.0"))
    assert _build.read_torch_tag(stale) == _build.read_torch_tag(cached) == "0.0"
    try:
        info = run_first_use(package, cache)
    finally:
        stale.unlink()
    assert len(info["build_lines"]) == 1, info["stderr"]
    assert info["loaded"]["from"] == "built"
    assert any(f"was built for torch 0.0, not this torch {torch.__version__}: not loaded" in note
               for note in info["loaded"]["notes"]), info["loaded"]
    assert _build.read_torch_tag(cached) == TORCH_TAG
    assert_cpu_backend_works(info)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc) to make a library with an undefined "
                                                        "symbol")
def test_an_undefined_symbol_counts_as_built_for_another_torch(first_use, package, tmp_path):
    cache, _ = first_use
    source = tmp_path / "other_torch.c"
    # Tagged for this torch, so the import is tried: it fails as a build against another torch's ABI does.
    source.write_text(textwrap.dedent(f"""
        __attribute__((used)) static const char tag[] = "amp_fused-build-tag:torch={TORCH_TAG};";
        extern void *symbol_of_another_torch(void);
        void *PyInit__C(void) {{ return symbol_of_another_torch(); }}
    """))
    stale = package / "amp_fused" / f"_C{EXT_SUFFIX}"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(stale), str(source)], check=True)
    try:
        info = run_first_use(package, cache)
    finally:
        stale.unlink()
    assert info["build_lines"] == [] and info["loaded"]["from"] == "cache", info["stderr"]
    assert any("amp_fused._C failed to import" in note and "undefined symbol" in note
               for note in info["loaded"]["notes"]), info["loaded"]
    assert_cpu_backend_works(info)


def test_without_a_compiler_auto_falls_back_and_the_reason_names_the_build_failure(package, tmp_path):
    info = run_first_use(package, tmp_path / "cache", CXX="/nonexistent")
    assert len(info["build_lines"]) == 1, info["stderr"]
    assert info["loaded"]["from"] is None and "cpu" not in info["available"]
    assert info["auto"] == "foreach"
    reason = info["reason"]
    assert "building amp_fused._C at run time failed" in reason and "/nonexistent" in reason, reason
    assert info["warnings"] == [f"amp_fused: backend='auto' uses 'foreach' for cpu tensors because 'cpu' is "
                                f"unavailable: {reason}"]
    # A second process does not try again while nothing changed, and says why.
    again = run_first_use(package, tmp_path / "cache", CXX="/nonexistent")
    assert again["build_lines"] == [] and again["auto"] == "foreach"
    assert "failed before" in again["reason"] and "/nonexistent" in again["reason"], again["reason"]


def test_import_amp_fused_loads_and_builds_nothing(package, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("AMP_FUSED_BUILD", "PYTHONPATH")}
    env.update(PYTHONPATH=str(package), AMP_FUSED_BUILD_DIR=str(tmp_path))
    script = NO_EDITABLE + ("import amp_fused; from amp_fused import AMP, functional; "
                            "print(sorted(m for m in sys.modules if m.startswith('amp_fused._')))")
    done = subprocess.run([sys.executable, "-c", script], cwd=package, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    loaded = done.stdout.strip()
    assert "amp_fused._C" not in loaded and "amp_fused._extension" not in loaded, loaded
    assert list(tmp_path.iterdir()) == []
