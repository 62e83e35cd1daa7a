"""Attention cores, one file per family (importing this package registers them all).

* :mod:`models.cores.base`: :class:`Core` (the interface), :class:`CoreInputs`, :class:`AuxLoss`.
* :mod:`models.cores.softmax`: :class:`SoftmaxCore` (KV cache) and the softmax family.
* :mod:`models.cores.variants`: softmax-family variants (fox, softpick, stick_breaking, diff,
  cog).
* :mod:`models.cores.recurrent`: :class:`RecurrentCore` (fixed-size state) and the linear family.
* :mod:`models.cores.hybrid`: cores with both (Based).
"""

from models.cores.base import AuxLoss, Core, CoreInputs, repeat_kv
from models.cores.hybrid import Based
from models.cores.recurrent import RecurrentCore
from models.cores.softmax import SoftmaxCore
from models.cores.variants import Cog, Diff, FoX, Softpick, StickBreaking  # noqa: F401 (registers)

__all__ = ["AuxLoss", "Based", "Core", "CoreInputs", "RecurrentCore", "SoftmaxCore", "repeat_kv"]
