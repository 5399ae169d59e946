"""The kernels build for a real GPU, not only in the interpreter.

The interpreter accepts things Triton's compiler rejects (and never shows register spills or vector
widths), and this machine may have no GPU. So every kernel specialisation the ops launch in a
representative run is compiled ahead of time for sm_90 by Triton's compiler, in a child process
without the interpreter (compiling needs no GPU), down to a cubin.
"""
import importlib.util
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
import triton.language as tl

import amp_fused
from amp_fused.backends import triton as triton_backend
from amp_fused.triton import ops
from amp_fused.triton.metadata import CHUNK
from triton_cases import DTYPES, MIXED_DTYPE_CASE, SIZES, make_lists, recorded_launches

# The one-program reductions over per-program partials: no per-tensor chunk, so no vector loads to look for.
SCALE_KERNELS = ("perturb_scale_kernel", "pair_scale_kernel")
POINTER_TYPES = {torch.int64: "*i64", torch.float32: "*fp32", torch.float64: "*fp64"}

# Runs in the child: compiles each specification and reports local memory use and vector accesses.
COMPILER = r"""
import json, re, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from amp_fused.triton import kernels

DTYPES = {t.name: t for t in (tl.float32, tl.float16, tl.bfloat16, tl.float64, tl.int16, tl.int32, tl.int64)}
for spec in json.loads(sys.stdin.read()):
    kernel = getattr(kernels, spec["kernel"])
    constexprs = {k: DTYPES[v["dtype"]] if isinstance(v, dict) else v for k, v in spec["constexprs"].items()}
    compiled = triton.compile(ASTSource(kernel, spec["signature"], constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": spec["num_warps"]})
    ptx = compiled.asm["ptx"]
    print(json.dumps({"spec": spec, "cubin_bytes": len(compiled.asm["cubin"]), "local_memory": ".local" in ptx,
                      "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx))}))
"""


def _encode(value):
    return {"dtype": value.name} if isinstance(value, tl.dtype) else value


def _specification(name, bound, options):
    kernel = getattr(ops.kernels(), name)
    signature, constexprs = {}, {}
    for pname, param in inspect.signature(kernel.fn).parameters.items():
        value = bound[pname]
        if param.annotation is tl.constexpr:
            signature[pname] = "constexpr"
            constexprs[pname] = _encode(value)
        elif isinstance(value, torch.Tensor):
            signature[pname] = POINTER_TYPES[value.dtype]
        elif isinstance(value, float):
            signature[pname] = param.annotation.name  # floats are declared fp64
        else:
            assert isinstance(value, int) and not isinstance(value, bool), (name, pname, value)
            signature[pname] = "i32" if -2**31 <= value < 2**31 else "i64"
    return {"kernel": name, "signature": signature, "constexprs": constexprs, "num_warps": options["num_warps"]}


def _launched_specifications():
    with recorded_launches() as launches:
        for dtype in DTYPES:
            for per_tensor in (True, False):
                params, grads, backups = make_lists(SIZES, dtype)
                triton_backend.perturb_(params, grads, backups, 1.0, 1.0, per_tensor, True)
                triton_backend.perturb_(params, grads, backups, 1.0, 1.0, per_tensor, False)
            buffers = [torch.empty_like(p) for p in params]
            triton_backend.restore_sgd_(params, backups, grads, buffers, 0.1, 0.9, 0.0, 0.1, True, True, True)
            triton_backend.restore_sgd_(params, backups, grads, buffers, 0.1, 0.9, 0.1, 0.0, False, False, False)
            triton_backend.restore_sgd_(params, backups, grads, [], 0.1, 0.0, 0.0, 0.0, False, False, False)
            triton_backend.restore_(params, backups)
        mixed = [make_lists([size], dtype)[0][0] for dtype, size in MIXED_DTYPE_CASE]
        storage = torch.randn(2 * CHUNK + 8)
        unaligned = [storage[1:CHUNK + 2], storage[CHUNK + 3:2 * CHUNK + 6]]  # views at 4-byte offsets
        for params in (mixed, unaligned):
            grads, backups = [torch.randn_like(p) for p in params], [torch.empty_like(p) for p in params]
            triton_backend.perturb_(params, grads, backups, 1.0, 1.0, False, True)
    specs = {json.dumps(_specification(name, bound, options), sort_keys=True) for name, bound, options, _ in launches}
    return [json.loads(s) for s in sorted(specs)]



@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="this triton install has no NVIDIA backend to compile for")
def test_every_launched_specialisation_compiles_for_sm90(tmp_path):
    specs = _launched_specifications()
    kernels_seen = {s["kernel"] for s in specs}
    assert kernels_seen == {"perturb_sumsq_kernel", "perturb_scale_kernel", "perturb_apply_kernel",
                            "restore_sgd_kernel", "copy_kernel"}
    assert_compiles_for_sm90(specs, tmp_path)


def assert_compiles_for_sm90(specs, tmp_path):
    """Compile every specification for sm_90 in a process without the interpreter: each builds, none spills to
    local memory, and every per-tensor kernel holds the path of aligned tensors (16-byte vector loads, chosen
    per tensor at run time)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    root = os.path.dirname(os.path.dirname(os.path.abspath(amp_fused.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    child = subprocess.run([sys.executable, "-c", COMPILER], input=json.dumps(specs), capture_output=True, text=True,
                           env=env, cwd=root, timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]
    results = [json.loads(line) for line in child.stdout.splitlines()]
    assert [r["spec"] for r in results] == specs
    for r in results:
        assert r["cubin_bytes"] > 0
        assert not r["local_memory"], f"{r['spec']} spills to local memory"
        if r["spec"]["kernel"] not in SCALE_KERNELS:
            assert r["vector_loads"] > 0, f"{r['spec']}: full aligned chunks should use 16-byte vector loads"
