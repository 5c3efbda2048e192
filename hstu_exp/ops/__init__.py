"""Attention kernels by name. Each module offers `attention_full` and `attention_paged` with the
signatures of `reference` (the oracle)."""
from importlib import import_module

KERNELS = {"reference": "hstu_exp.ops.reference", "triton": "hstu_exp.ops.triton_attention"}


def attention_ops(name: str):
    return import_module(KERNELS[name])
