"""Graceful fallback: a missing or broken compiled extension never breaks `import amp_fused`.

amp_fused builds a missing or broken extension on first use (tests/test_build.py): these processes turn that
off (AMP_FUSED_BUILD=0) and get an empty build cache, so the simulated failure stands."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys, warnings
    class Broken:
        # stands in for a missing or unloadable amp_fused._C
        def find_spec(self, name, path=None, target=None):
            if name == "amp_fused._C":
                raise ImportError("simulated: undefined symbol in _C.so")
    sys.meta_path.insert(0, Broken())

    import torch
    import amp_fused
    from amp_fused import AMP, available_backends, backends
    print("available", available_backends())
    print("reason", backends.unavailable_reason("cpu"))
    model = torch.nn.Linear(4, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = AMP(model.parameters(), lr=0.1, epsilon=0.1)
        for _ in range(3):
            opt.step(lambda: model(torch.ones(3, 4)).sum().backward() or model(torch.ones(3, 4)).sum())
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    print("warnings", len(messages))
    for m in messages:
        print("warning", m)
    try:
        AMP(model.parameters(), lr=0.1, epsilon=0.1, backend="cpu")
    except ValueError as exc:
        print("explicit", exc)
""")


@pytest.fixture(scope="module")
def fallback_output(tmp_path_factory):
    env = dict(os.environ, AMP_FUSED_BUILD="0", AMP_FUSED_BUILD_DIR=str(tmp_path_factory.mktemp("empty_cache")))
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "amp_fused: building" not in done.stderr
    return done.stdout


def test_import_works_and_the_backend_is_reported_missing(fallback_output):
    assert "available ['reference', 'foreach']" in fallback_output
    assert "reason amp_fused._C failed to import: ImportError('simulated: undefined symbol in _C.so')" in fallback_output
    assert "building amp_fused._C at run time is off (AMP_FUSED_BUILD=0)" in fallback_output


def test_auto_falls_back_to_foreach_with_one_warning_that_says_why(fallback_output):
    assert "warnings 1\n" in fallback_output
    assert ("warning amp_fused: backend='auto' uses 'foreach' for cpu tensors because 'cpu' is unavailable: "
            "amp_fused._C failed to import") in fallback_output


def test_asking_for_the_missing_backend_explains(fallback_output):
    assert "explicit backend 'cpu' is not available on this machine (amp_fused._C failed to import" in fallback_output


def test_with_the_extension_present_there_is_no_warning():
    script = SCRIPT.replace("sys.meta_path.insert(0, Broken())", "")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "'cpu'" in done.stdout.splitlines()[0] and "warnings 0\n" in done.stdout
