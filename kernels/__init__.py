"""Routing kernels for the mHC backbone: Triton kernels plus a pure-torch reference of each.

"mHC" in this project means Mixture-of-Hierarchical-Components (a two-level mixture of
experts), not DeepSeek's Manifold-Constrained Hyper-Connections.

Every op lives in four layers (as in Liger-Kernel): a private ``@triton.jit`` kernel, its
launcher, a ``torch.library`` custom op with a fake implementation and registered autograd
(``kernels.routing.triton_ops``, namespace ``mhc``: ``torch.compile(fullgraph=True)`` traces
through it), and the public function in ``kernels.routing.ops``. The torch reference in
``kernels.routing.reference`` has the same signatures and is the ground truth for tests and
benchmarks. The expert matmul (``kernels.routing.grouped``, ``mhc::grouped_mm``) is one op
for both implementations: ``torch._grouped_mm`` on CUDA bf16, the reference loop elsewhere.
No op synchronizes with the host on CUDA, so a training step can be captured in a CUDA graph.

One switch picks the routing implementation, read once per process:
``MHC_KERNELS=auto|triton|torch`` (``auto``: Triton when a CUDA GPU and triton are present,
else torch). ``set_backend`` changes it at run time (tests, benchmarks).

Shape legend used by all routing code (tensor names end in their shape):
    T  tokens (batch × sequence, flattened)
    D  model dim
    G  domains (level-1 groups)
    C  components per domain (level-2)
    E  experts, E = G·C; expert id e = g·C + c
    R  router outputs: G + E for two-level routing, E for flat / group-limited
    K  picks per token (k1·k2);  K1 level-1 picks (k1)
    N  routed rows, N = T·K (expert-sorted order)
    F  expert hidden dim
"""

from __future__ import annotations

import os

_VALID = ("auto", "triton", "torch")
_backend: str | None = None


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_usable() -> bool:
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or interpreting()


def resolve(choice: str) -> str:
    """Map ``auto|triton|torch`` to the implementation that will run (``triton`` or ``torch``)."""
    if choice not in _VALID:
        raise ValueError(f"MHC_KERNELS must be one of {_VALID}, got {choice!r}")
    if choice == "auto":
        try:
            import torch

            return "triton" if torch.cuda.is_available() and _triton_usable() else "torch"
        except ImportError:
            return "torch"
    if choice == "triton" and not _triton_usable():
        raise RuntimeError(
            "MHC_KERNELS=triton needs triton and a CUDA GPU (or TRITON_INTERPRET=1 on CPU)"
        )
    return choice


def backend() -> str:
    """The implementation in use: ``"triton"`` or ``"torch"`` (resolved once, then cached)."""
    global _backend
    if _backend is None:
        _backend = resolve(os.environ.get("MHC_KERNELS", "auto"))
    return _backend


def set_backend(choice: str) -> str:
    """Switch implementation for this process; returns the resolved one."""
    global _backend
    _backend = resolve(choice)
    return _backend
