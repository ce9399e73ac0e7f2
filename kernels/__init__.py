"""Triton kernels and their thin launchers, installed as ``solo_fast.kernels``.

Only :mod:`solo_fast.ops` imports from here (DESIGN.md §4).
"""
