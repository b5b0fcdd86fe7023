"""mHC backbone: a decoder-only transformer whose FFN is a Mixture of Hierarchical Components.

"mHC" here means Mixture-of-Hierarchical-Components — a two-level mixture of experts (domains,
then components within a domain) whose component j shares base parameters across domains. It is
*not* DeepSeek's Manifold-Constrained Hyper-Connections.

Modules: ``config`` (dataclasses), ``presets`` (tiny/small/debug, YAML, overrides),
``attention``, ``router``, ``experts``, ``moe`` (the FFN layer), ``model``, ``params``
(total/active accounting), ``stats`` (balance statistics), ``tokenizer`` (bytes).
"""

from mhc.config import FFNConfig, ModelConfig, RunConfig, TrainConfig
from mhc.model import MHCModel, ModelOutput

__all__ = ["FFNConfig", "ModelConfig", "RunConfig", "TrainConfig", "MHCModel", "ModelOutput"]
