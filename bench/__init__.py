"""Benchmarks of amp_fused: ``python -m bench`` (``--help`` for the options).

Sections: ``machine`` (what ran it), ``optimizer_step`` (the optimizer-side AMP step per backend against the
memory-bandwidth floor, :mod:`bench.optimizer_step`), ``train_step`` (whole training steps of ERM vs AMP,
:mod:`bench.train_step`).
"""
