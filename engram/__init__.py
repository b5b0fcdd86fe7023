"""Engram: persistent, learnable trace memory for the mHC backbone, behind a feature flag.

"Engram" here is a read/write memory of *reasoning traces*: at the end of a segment the writer
pools its hidden states into a trace (key, token-level values, text) that a learned salience
gate may keep; in later sessions, readers at chosen layers retrieve the top-k traces of the
allowed scope and cross-attend over them. It is *not* DeepSeek's hashed N-gram lookup table.

Off by default (``EngramConfig.enabled=False``; ``ENGRAM_ENABLED=1`` turns it on): with the
module absent the model is exactly the mHC model.

Modules: ``config`` (flag, ``EngramConfig``), ``write`` (pooling, salience, write policies),
``read`` (the memory reader), ``backends`` (``TensorMemory``), ``store_memory``
(``StoreMemory`` on ``memory_store``), ``model`` (``EngramModel``).
"""

from engram.config import EngramConfig
from engram.model import EngramModel

__all__ = ["EngramConfig", "EngramModel"]
