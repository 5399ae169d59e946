"""What the backend module promises about availability, checked in fresh processes."""
import os
import subprocess
import sys
import textwrap

import torch

import amp_fused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(amp_fused.__file__)))


def _run(script, interpret):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_without_triton_the_backend_reports_why_and_the_rest_works():
    out = _run("""
        import sys
        sys.modules["triton"] = None  # as if triton were not installed: any import of it fails
        import torch
        import amp_fused
        from amp_fused import backends
        print("reason:", backends.unavailable_reason("triton"))
        print("listed:", "triton" in amp_fused.available_backends())
        model = torch.nn.Linear(3, 2)
        opt = amp_fused.AMP(model.parameters(), lr=0.1, epsilon=0.1, backend="foreach")
        opt.step(lambda: model(torch.ones(4, 3)).sum().backward() or model(torch.ones(4, 3)).sum())
        print("stepped")
    """, interpret=True)
    assert "reason: triton cannot be imported (ModuleNotFoundError(" in out
    assert "listed: False" in out and "stepped" in out


def test_device_types_follow_the_interpreter_switch():
    script = """
        from amp_fused.backends import triton
        print(triton.DEVICE_TYPES, triton.unavailable_reason())
    """
    assert _run(script, interpret=True).split("\n")[0] == "('cuda', 'cpu') None"
    line = _run(script, interpret=False).split("\n")[0]
    assert line.startswith("('cuda',) ")
    if not torch.cuda.is_available():
        assert "no CUDA device is visible and Triton's interpreter is off" in line
