"""Triton kernels of fastunlearn, installed as ``fastunlearn.kernels`` (never a bare ``kernels``)."""
