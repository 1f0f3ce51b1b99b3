"""snsm: memory-lean adaptive optimizers for PyTorch.

Subset-Norm (one adaptive step size per subset of coordinates) and
Subspace-Momentum (momentum in a rank-r subspace, SGD in its complement),
from "Efficient Adaptive Optimization via Subset-Norm and Subspace-Momentum"
(Nguyen & Nguyen, arXiv 2411.07120, ICML 2025).
"""
import logging

from .adago import AdaGO
from .batch_size import AdaptiveBatchSize
from .grouping import param_groups
from .loft import LoFTAdamW
from .metastorm import MetaSTORM
from .norm import AdaGradNorm, RMSpropNorm
from .optimizer import Rules, SubsetNormOptimizer
from .variants import AdaGradSN, AdaGradSNSM, AdamWSN, AdamWSNSM, RMSpropSN, SGDSM

__all__ = [
    "AdamWSN",
    "AdamWSNSM",
    "AdaGradSN",
    "AdaGradSNSM",
    "RMSpropSN",
    "SGDSM",
    "AdaGradNorm",
    "RMSpropNorm",
    "AdaGO",
    "LoFTAdamW",
    "MetaSTORM",
    "AdaptiveBatchSize",
    "SubsetNormOptimizer",
    "Rules",
    "param_groups",
]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
