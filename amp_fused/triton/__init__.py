"""Triton kernels for the AMP ops: every pass over a parameter list is one kernel launch.

**Launches.** A kernel reaches all tensors of a list through device-side tables instead of arguments:
an int64 pointer table per tensor list (``data_ptr()`` of each tensor, cast to a typed pointer in the
kernel), the numel of every tensor, and a program map: every tensor is cut into chunks of
``metadata.CHUNK`` elements, one program per chunk, and program ``pid`` looks up its tensor and
offset. So the launch count does not depend on how many tensors there are: per optimizer step (one
ascent, base optimizer torch.optim.SGD), ``perturb_`` launches 3 kernels (per-program sums of squares;
one program that reduces them per tensor in a fixed order into the norms, the global norm and the
projection scales, all on device, no float atomics; the apply pass) and ``restore_sgd_`` 1, 4 in all
(``restore_`` is 1 launch, for other base optimizers). The kernels are specialised on the
storage dtype, so a list mixing dtypes is split into dtype groups: the per-tensor passes then launch
once per group (the scale pass stays one launch, so the global norm still covers every tensor).

**Metadata cache.** Tables and program map are built once per parameter list and cached
(:mod:`amp_fused.triton.metadata`): the program map is keyed by each tensor's (dtype, shape, stride),
each pointer table by the tensors' addresses. The optimizer passes the same lists every step, so a
step only builds those keys; a table is rebuilt when a tensor is replaced (one small host-to-device
copy), the program map when a shape or dtype changes.

CUDA tensors run the compiled kernels. With ``TRITON_INTERPRET=1`` (set before triton is imported) CPU
tensors run them in Triton's interpreter, which is how the tests exercise them without a GPU; CUDA
tensors are then copied to the host around each op, as the interpreter does with kernel arguments.
"""
