"""Guarded fallbacks for the torch versions amp_fused supports (2.4 on) where a newer torch has a better API."""
from __future__ import annotations

import torch

_list_increment_version = True


def increment_version(tensors) -> None:
    """``torch.autograd.graph.increment_version`` on a list of tensors: one call from torch 2.5, one per tensor
    before (2.4 takes a single tensor). Inference tensors have no version counter and are left alone, as the
    list form does."""
    global _list_increment_version
    if _list_increment_version:
        try:
            torch.autograd.graph.increment_version(tensors)
            return
        except TypeError:  # torch 2.4: a tensor only
            _list_increment_version = False
    for t in tensors:
        if not t.is_inference():
            torch.autograd.graph.increment_version(t)
