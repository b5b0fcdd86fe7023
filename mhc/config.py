"""Configuration dataclasses for the mHC backbone, validated at construction.

Every check raises ``ValueError`` naming the offending field (``FFNConfig.k2`` ...), so a bad
YAML file or ``key=value`` override fails before any tensor is allocated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

FFN_KINDS = ("dense", "flat_moe", "group_limited", "hierarchical", "progressive")
SHARING_MODES = ("none", "base", "lowrank")
PARALLEL_MODES = ("ddp", "fsdp", "ep")  # sessions.distributed
DATA_KINDS = ("shakespeare", "synthetic", "mixed", "domains")  # sessions.data.build_streams


def _fail(owner: str, name: str, message: str) -> None:
    raise ValueError(f"{owner}.{name}: {message}")


@dataclass
class FFNConfig:
    """The feed-forward layer of every block.

    kind: ``dense`` | ``flat_moe`` (top-k1·k2 of E experts) | ``group_limited`` (DeepSeek-V3:
      top-k1 groups, then top-k1·k2 experts inside them) | ``hierarchical`` (per token: top-k1
      domains, then top-k2 components in each) | ``progressive`` (domains chosen once per
      segment by a tiny causal encoder, shared by all layers; components per token per layer).
    E = n_domains · n_components experts; each expert is a SwiGLU MLP of width ``hidden``.
    For ``dense`` the width is ``hidden`` · k1 · k2, so all kinds have equal active parameters.
    sharing: ``none`` | ``base`` (component c of every domain shares its gate/up projections;
      down projections stay per expert) | ``lowrank`` (shared base + per-expert rank-r delta).
    """

    kind: str = "hierarchical"
    hidden: int = 256
    n_domains: int = 4
    n_components: int = 4
    k1: int = 1
    k2: int = 2
    sharing: str = "none"
    lowrank_rank: int = 8
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3
    # progressive routing: the level-1 encoder
    segment_len: int = 64
    encoder_dim: int = 32
    domain_label_coef: float = 0.1
    domain_distill_coef: float = 0.0

    def __post_init__(self) -> None:
        own = "FFNConfig"
        if self.kind not in FFN_KINDS:
            _fail(own, "kind", f"unknown FFN kind {self.kind!r}; expected one of {FFN_KINDS}")
        if self.sharing not in SHARING_MODES:
            _fail(own, "sharing", f"unknown sharing {self.sharing!r}; one of {SHARING_MODES}")
        for name in ("hidden", "n_domains", "n_components", "k1", "k2", "segment_len",
                     "encoder_dim", "lowrank_rank"):
            if getattr(self, name) < 1:
                _fail(own, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "domain_label_coef",
                     "domain_distill_coef"):
            if getattr(self, name) < 0:
                _fail(own, name, f"must be >= 0, got {getattr(self, name)}")
        if self.kind == "dense":
            return
        if self.k1 > self.n_domains:
            _fail(own, "k1", f"k1={self.k1} is larger than n_domains={self.n_domains}")
        if self.kind in ("hierarchical", "progressive") and self.k2 > self.n_components:
            _fail(own, "k2", f"k2={self.k2} is larger than n_components={self.n_components}")
        if self.top_k > self.k1 * self.n_components:
            _fail(own, "k2", f"k1*k2={self.top_k} is larger than the {self.k1 * self.n_components}"
                  " experts in the k1 selectable groups")
        if self.sharing == "lowrank" and self.lowrank_rank >= self.hidden:
            _fail(own, "lowrank_rank", f"must be < hidden={self.hidden}")

    @property
    def is_moe(self) -> bool:
        return self.kind != "dense"

    @property
    def n_experts(self) -> int:
        return self.n_domains * self.n_components

    @property
    def top_k(self) -> int:
        return self.k1 * self.k2

    @property
    def two_level(self) -> bool:
        return self.kind in ("hierarchical", "progressive")


@dataclass
class ModelConfig:
    """A decoder-only byte-level transformer (RoPE, RMSNorm, causal SDPA) with an mHC FFN."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 128
    tie_weights: bool = True
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    ffn: FFNConfig = field(default_factory=FFNConfig)

    def __post_init__(self) -> None:
        if isinstance(self.ffn, dict):
            self.ffn = FFNConfig(**self.ffn)
        own = "ModelConfig"
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len"):
            if getattr(self, name) < 1:
                _fail(own, name, f"must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            _fail(own, "d_model", f"d_model={self.d_model} is not divisible by "
                  f"n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            _fail(own, "n_heads", f"head dim {self.d_model // self.n_heads} must be even (RoPE)")
        if self.ffn.kind == "progressive" and self.seq_len % self.ffn.segment_len:
            _fail(own, "seq_len", f"seq_len={self.seq_len} must be a multiple of "
                  f"ffn.segment_len={self.ffn.segment_len} for progressive routing")
        if self.rope_base <= 0:
            _fail(own, "rope_base", "must be > 0")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class TrainConfig:
    """Optimisation and run settings (``engram train``)."""

    steps: int = 2000  # length of the LR schedule
    stop_after: int = 0  # > 0: stop (and checkpoint) after this step; resume later
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1337
    data: str = "shakespeare"  # shakespeare | synthetic | mixed | domains
    eval_every: int = 250
    eval_batches: int = 20
    log_every: int = 10
    checkpoint_every: int = 500
    max_minutes: float = 0.0  # > 0: before training, time a few steps and set `steps` to fit
    compile: bool = False  # torch.compile the model (CUDA; see docs/benchmarks.md)
    # capture the whole step (forward, backward, clip, AdamW, router biases, statistics) once
    # in a CUDA graph and replay it: no per-step host overhead. CUDA only, and only for
    # objectives with fixed batch shapes (text streams, not episodes): sessions/graph_step.py
    cuda_graph: bool = False
    # the optimizer keeps the experts' bf16 compute copies and updates them from their bf16
    # gradients in one kernel (sessions/optimizer.py); applies on CUDA to one process with
    # an objective of one forward a step (language modelling), else ignored. false: casts
    # in the forward, fp32 gradients, torch AdamW
    expert_copies: bool = True
    # under torchrun (WORLD_SIZE > 1): ddp replicates the model and averages gradients; fsdp
    # shards parameters, gradients and optimizer state per block (FSDP2 fully_shard) for a
    # model that does not fit one GPU; ep places every MoE layer's experts on the ranks
    # (all-to-all) and replicates the rest (DDP). Ignored in one process. docs/distributed.md
    parallel: str = "ddp"
    out_dir: str = "runs/default"
    device: str = "auto"
    threads: int = 0  # 0 = torch default

    def __post_init__(self) -> None:
        own = "TrainConfig"
        for name in ("steps", "batch_size", "eval_batches", "log_every", "eval_every",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                _fail(own, name, f"must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            _fail(own, "lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail(own, "min_lr_ratio", "must be in [0, 1]")
        if self.stop_after < 0:
            _fail(own, "stop_after", "must be >= 0 (0 runs all steps)")
        if self.warmup_steps < 0:
            _fail(own, "warmup_steps", "must be >= 0")
        if self.grad_clip < 0:
            _fail(own, "grad_clip", "must be >= 0 (0 disables clipping)")
        if self.data not in DATA_KINDS:
            _fail(own, "data", f"unknown data {self.data!r}; one of {'|'.join(DATA_KINDS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            _fail(own, "device", f"unknown device {self.device!r}; one of auto|cpu|cuda")
        if self.parallel not in PARALLEL_MODES:
            _fail(own, "parallel", f"unknown parallel {self.parallel!r}; one of "
                  f"{'|'.join(PARALLEL_MODES)}")
        if self.cuda_graph and self.device == "cpu":
            _fail(own, "cuda_graph", "a CUDA graph needs a CUDA GPU, but device=cpu")


@dataclass
class RunConfig:
    """A whole run: the model and its training. YAML files in ``configs/`` map onto this."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)

    def to_dict(self) -> dict:
        return asdict(self)


def config_from_dict(cls, data: dict):
    """Build a (nested) config dataclass from a dict, rejecting unknown keys by name."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**data)
