"""Synthetic request streams for workload=e2e."""

from hstu_exp.data.synthetic import KINDS, Request, SyntheticStream, make_request

__all__ = ["KINDS", "Request", "SyntheticStream", "make_request"]
