"""Attention cores, one file per family (importing this package registers them all).

* :mod:`models.cores.base`: :class:`Core` (the interface), :class:`CoreInputs`, :class:`AuxLoss`.
* :mod:`models.cores.softmax`: :class:`SoftmaxCore` (KV cache) and the softmax family.
* :mod:`models.cores.recurrent`: :class:`RecurrentCore` (fixed-size state) and the linear family.
* :mod:`models.cores.hybrid`: cores with both (Based).
* :mod:`models.cores.sparse`: routed sparse attention (MoBA, DSA).
"""

from models.cores.base import AuxLoss, Core, CoreInputs, repeat_kv
from models.cores.hybrid import Based
from models.cores.recurrent import RecurrentCore
from models.cores.softmax import SoftmaxCore
from models.cores.sparse import DSA, MoBA

__all__ = ["DSA", "AuxLoss", "Based", "Core", "CoreInputs", "MoBA", "RecurrentCore", "SoftmaxCore",
           "repeat_kv"]
