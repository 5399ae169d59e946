"""Count what one piece of code asks of the device: dispatched aten ops and host synchronisations."""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that copy a device value to the host and so make the host wait for the device.
_SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal")


class DispatchCounter(TorchDispatchMode):
    """``with DispatchCounter() as c: ...`` then ``c.ops`` (total), ``c.syncs`` and ``c.by_name``.

    Counts each aten op once at the dispatcher, as PyTorch sees it from Python: a ``_foreach_*`` op over 300
    tensors is one op, a Python loop over 300 tensors is 300.
    """

    def __init__(self):
        super().__init__()
        self.by_name = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_name[func._schema.name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def ops(self) -> int:
        return sum(self.by_name.values())

    @property
    def syncs(self) -> int:
        return sum(self.by_name[name] for name in _SYNC_OPS)
