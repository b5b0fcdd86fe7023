"""Routing ops for mHC: selection (gating), permutation, grouped expert matmuls.

Import the public functions from ``kernels.routing.ops``; the torch reference of each is in
``kernels.routing.reference`` with the same signature.
"""

from kernels.routing.reference import GateSpec

__all__ = ["GateSpec"]
