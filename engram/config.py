"""``EngramConfig`` and the feature flag.

Engram is off by default. ``enabled`` decides whether the memory module exists at all (off:
the model *is* the plain mHC model, same parameters, same logits); ``read`` decides whether an
existing module reads (``trained-off``: present, trained, but reads nothing). The environment
variable ``ENGRAM_ENABLED=1`` / ``=0`` overrides ``enabled``; the CLI's
``--memory on|off|trained-off`` sets both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

MEMORY_MODES = ("on", "off", "trained-off")
# budget: the learned gate's top fraction of a session's segments; threshold: σ(salience) above
# write_threshold; random: as many as budget, chosen at random (the gate's baseline); all.
WRITE_POLICIES = ("budget", "threshold", "random", "all")


@dataclass
class EngramConfig:
    enabled: bool = False
    read: bool = True
    read_layers: list[int] = field(default_factory=lambda: [-2])  # negative: from the end
    top_k: int = 4  # traces retrieved per query token
    key_dim: int = 64  # retrieval and token-attention key width
    value_dim: int = 128  # memory value width before the output projection
    heads: int = 4
    write_policy: str = "budget"
    write_budget: float = 0.3  # fraction of segments written (budget policy)
    write_threshold: float = 0.5  # salience above which a segment is written (threshold)
    salience_target: float = 0.3  # training pulls the mean salience towards this
    salience_coef: float = 0.1
    # write distillation (training): within a session, the write gate's softmax over its
    # segments pulled towards the attention mass their traces got from the step's reads
    write_distill_coef: float = 0.0
    # the gate's logit also enters reading: log σ(salience) as a retrieval prior and σ as the
    # scale of a trace's values. False keeps reading free of it (ranking by relevance alone),
    # so only the write distillation trains the gate (measured: docs/results.md, issue 9)
    salience_in_read: bool = True
    retrieval_coef: float = 1.0  # weight of the retrieval distillation loss (training)
    recency: str = "absolute"  # absolute | off: a learned logit slope per session of age
    null_kv: bool = True
    gate_init: float = 0.1  # initial value of the (tanh) read gate
    temperature_init: float = 20.0  # initial scale of the cosine token attention
    retrieval_scale_init: float = 1.0  # initial weight of the trace-level cosine in the logits
    max_trace_tokens: int = 64  # tokens kept per trace (the segment's last ones)

    def __post_init__(self) -> None:
        own = "EngramConfig"
        for name in ("top_k", "key_dim", "value_dim", "heads", "max_trace_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{own}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.key_dim % self.heads or self.value_dim % self.heads:
            raise ValueError(f"{own}.heads: key_dim={self.key_dim} and value_dim="
                             f"{self.value_dim} must be divisible by heads={self.heads}")
        if self.write_policy not in WRITE_POLICIES:
            raise ValueError(f"{own}.write_policy: {self.write_policy!r} not in {WRITE_POLICIES}")
        for name in ("write_budget", "write_threshold", "salience_target"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{own}.{name}: must be in [0, 1], got {getattr(self, name)}")
        if not -1.0 < self.gate_init < 1.0:
            raise ValueError(f"{own}.gate_init: must be in (-1, 1) (a tanh gate)")
        if self.recency not in ("absolute", "off"):
            raise ValueError(f"{own}.recency: absolute or off, got {self.recency!r}")
        for name in ("retrieval_coef", "salience_coef", "write_distill_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{own}.{name}: must be >= 0, got {getattr(self, name)}")
        if not self.salience_in_read and not self.write_distill_coef \
                and self.write_policy in ("budget", "threshold"):
            raise ValueError(f"{own}.salience_in_read: false leaves the {self.write_policy} "
                             "write gate untrained; set write_distill_coef > 0")
        if self.temperature_init <= 0:
            raise ValueError(f"{own}.temperature_init: must be > 0")
        if self.retrieval_scale_init < 0:
            raise ValueError(f"{own}.retrieval_scale_init: must be >= 0")
        if not self.read_layers:
            raise ValueError(f"{own}.read_layers: at least one layer must read")

    def layers(self, n_layers: int) -> list[int]:
        """Read layers as non-negative indices, validated against the model depth."""
        out = []
        for i in self.read_layers:
            j = i + n_layers if i < 0 else i
            if not 0 <= j < n_layers:
                raise ValueError(f"EngramConfig.read_layers: layer {i} out of range for "
                                 f"{n_layers} layers")
            out.append(j)
        return sorted(set(out))


def env_enabled(default: bool) -> bool:
    """``ENGRAM_ENABLED=1|0`` (also true/false, on/off) overrides the configured flag."""
    raw = os.environ.get("ENGRAM_ENABLED")
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"ENGRAM_ENABLED must be 1 or 0, got {raw!r}")


def resolve(cfg: EngramConfig, memory: str | None = None) -> EngramConfig:
    """Apply the CLI's ``--memory`` (wins) or else the environment flag."""
    if memory is not None:
        if memory not in MEMORY_MODES:
            raise ValueError(f"--memory must be one of {MEMORY_MODES}, got {memory!r}")
        return replace(cfg, enabled=memory != "off", read=memory == "on")
    return replace(cfg, enabled=env_enabled(cfg.enabled))
