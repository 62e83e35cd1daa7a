"""Attention cores, one file per family (importing this package registers them all).

* :mod:`models.cores.base`: :class:`Core` (the interface), :class:`CoreInputs`, :class:`AuxLoss`.
* :mod:`models.cores.softmax`: :class:`SoftmaxCore` (KV cache) and the softmax family.
* :mod:`models.cores.variants`: softmax-family variants (fox, softpick, stick_breaking, diff,
  cog, top_theta, dual_triangle).
* :mod:`models.cores.score_map`: weights from several query-key pairs (mta, gpsa).
* :mod:`models.cores.recurrent`: :class:`RecurrentCore` (fixed-size state) and the linear family.
* :mod:`models.cores.rwkv7`: RWKV-7 time mixing on the DPLR delta rule.
* :mod:`models.cores.hybrid`: cores with both (Based).
* :mod:`models.cores.sparse`: routed sparse attention (MoBA, DSA).
* :mod:`models.cores.loglinear`: log-linear GLA / Mamba-2 (a Fenwick stack of states).
* :mod:`models.cores.mamba2`: the full Mamba-2 layer (conv, dt, A_log, D, gated RMSNorm).
* :mod:`models.cores.agent_flow`: agent attention and Flowformer (full sequence only).
"""

from models.cores.agent_flow import Agent, Flowformer
from models.cores.base import AuxLoss, Core, CoreInputs, repeat_kv
from models.cores.hybrid import Based
from models.cores.loglinear import LogLinearGLA, LogLinearMamba2
from models.cores.mamba2 import Mamba2
from models.cores.recurrent import RecurrentCore
from models.cores.rwkv7 import RWKV7  # noqa: F401 (registers)
from models.cores.score_map import GPSA, MTA  # noqa: F401 (registers)
from models.cores.softmax import SoftmaxCore
from models.cores.sparse import DSA, MoBA
from models.cores.variants import (  # noqa: F401 (registers)
    Cog,
    Diff,
    DualTriangle,
    FoX,
    Softpick,
    StickBreaking,
    TopTheta,
)

__all__ = ["DSA", "Agent", "AuxLoss", "Based", "Core", "CoreInputs", "Flowformer",
           "LogLinearGLA", "LogLinearMamba2", "Mamba2", "MoBA", "RecurrentCore", "SoftmaxCore",
           "repeat_kv"]
