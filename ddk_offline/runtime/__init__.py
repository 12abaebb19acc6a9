"""Plumbing with no knowledge of either phase: devices and dtypes, atomic files and checksums, torch.distributed.

Both phases and the format import from here; nothing here imports ``format``, ``dump`` or ``distill``.
"""
