"""Pruning: ``prune_(model, Config(...), calib)``.

Unstructured / N:M (zeros inside dense matrices): magnitude, Wanda, SparseGPT.
Structured (matrices physically shrink): attention heads, FFN neurons, whole decoder layers,
embedding width (hidden size).
Saving: ``lmslim.modelio.save_model`` (bitmask-compressed sparse weights, non-uniform shapes).
"""

from lmslim.compress.prune.api import PRUNERS, prune_
from lmslim.compress.prune.magnitude import MagnitudeConfig
from lmslim.compress.prune.sparsegpt import SparseGPTConfig
from lmslim.compress.prune.structured import HeadsConfig, LayersConfig, NeuronsConfig
from lmslim.compress.prune.wanda import WandaConfig
from lmslim.compress.prune.width import WidthConfig

__all__ = ["PRUNERS", "prune_", "MagnitudeConfig", "WandaConfig", "SparseGPTConfig", "HeadsConfig", "NeuronsConfig",
           "LayersConfig", "WidthConfig"]
