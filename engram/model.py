"""``EngramModel``: the mHC backbone plus, when enabled, the Engram memory module.

* disabled (the default): no memory parameters exist and ``forward`` is the backbone's, so
  logits are bit-identical to a plain ``MHCModel`` with the same weights;
* enabled, ``read=False`` (``trained-off``): the module exists but reads nothing;
* enabled, ``read=True`` (``on``): the readers at ``read_layers`` attend over retrieved traces.

Traces are written from the hidden states of the first read layer, computed by the backbone
alone (no memory read during the write pass), so a trace is a pure function of its text and
the backbone weights: ``reindex`` can recompute it after the model changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engram.backends import Candidates
from engram.config import EngramConfig
from engram.read import MemoryReader, ReadStats
from engram.write import TraceWriter, WrittenTraces
from mhc.config import ModelConfig
from mhc.model import MHCModel, ModelOutput


@dataclass
class EngramOutput:
    out: ModelOutput
    reads: dict[int, ReadStats] = field(default_factory=dict)
    candidates: dict[int, Candidates] = field(default_factory=dict)  # what each layer retrieved


class EngramModel(nn.Module):
    def __init__(self, model_cfg: ModelConfig, cfg: EngramConfig | None = None):
        super().__init__()
        self.cfg = cfg or EngramConfig()
        self.backbone = MHCModel(model_cfg)  # built first: same init as a plain MHCModel
        self.read_layers: list[int] = []
        if self.cfg.enabled:
            self.read_layers = self.cfg.layers(model_cfg.n_layers)
            self.writer = TraceWriter(model_cfg.d_model, self.cfg)
            self.readers = nn.ModuleDict(
                {str(i): MemoryReader(model_cfg.d_model, self.cfg) for i in self.read_layers})

    @property
    def memory_enabled(self) -> bool:
        return self.cfg.enabled

    @property
    def write_layer(self) -> int:
        if not self.read_layers:
            raise RuntimeError("Engram is disabled: there is no memory layer")
        return self.read_layers[0]

    def encode_traces(self, idx_NS: torch.Tensor, mask_NS: torch.Tensor | None = None,
                      backbone_grad: bool = True, write_pass=None) -> WrittenTraces:
        """Run the backbone up to the memory layer and make one trace per segment
        (``backbone_grad=False``: the backbone part runs without autograd; ``write_pass``,
        a callable ``idx_NS -> hidden_NSD`` computing that part the same way, e.g. replayed
        from a CUDA graph, replaces it then).

        Pad segments on the right (``mask_NS`` a prefix of each row): the model is causal, so
        a segment's states — and its trace — do not depend on the padding after it, and
        ``engram traces reindex`` recomputes exactly what was written."""
        grad = backbone_grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            hidden = write_pass(idx_NS) if write_pass is not None and not grad else \
                self.backbone(idx_NS, stop_after_layer=self.write_layer).hidden
        mask = torch.ones_like(idx_NS, dtype=torch.bool) if mask_NS is None else mask_NS
        return self.writer(hidden, mask, idx_NS)

    def forward(
        self,
        idx_BS: torch.Tensor,
        targets_BS: torch.Tensor | None = None,
        memory=None,
        session: int = 0,
        top_k: int | None = None,
        **backbone_kwargs,
    ) -> EngramOutput:
        """``memory``: a ``MemoryBackend`` (``TensorMemory`` / ``StoreMemory``) holding this
        batch's traces; ``session``: the readers' session, an int or one per row (they see
        traces of earlier sessions); ``top_k``: traces per token (default ``cfg.top_k``)."""
        k = top_k or self.cfg.top_k
        reads: dict[int, ReadStats] = {}
        candidates: dict[int, Candidates] = {}
        hook = None
        if self.cfg.enabled and self.cfg.read and memory is not None:
            def hook(i: int, h: torch.Tensor) -> torch.Tensor:
                if str(i) not in self.readers:
                    return h
                reader = self.readers[str(i)]
                q = reader.query(h)
                cand: Candidates = memory.retrieve(q, session, k)
                h, reads[i] = reader(h, q, cand)
                candidates[i] = cand
                return h

        out = self.backbone(idx_BS, targets_BS, layer_hook=hook, **backbone_kwargs)
        return EngramOutput(out, reads, candidates)


def model_version(model: EngramModel) -> str:
    """A short content hash of the weights that make traces (backbone + writer): traces made
    by different weights have different versions (their keys are stale for the other)."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(("backbone.", "writer.")):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]
