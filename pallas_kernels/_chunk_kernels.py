"""The chunked linear-attention backbone as one custom VJP over the Pallas passes (private;
see ``chunk.py`` and, for the math and the kernels, ``_chunk_common``).

``backbone`` runs ``states_fwd`` then ``output_fwd``; its backward runs ``dlocal_bwd`` (delta
rule), ``states_bwd`` and ``grads_bwd``. ``wy`` (the delta rule's UT transform) and
``Config`` are re-exported for ``chunk.py``.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels._chunk_common import F32, Config
from pallas_kernels._chunk_output import dlocal_bwd, grads_bwd, output_fwd
from pallas_kernels._chunk_state import states_bwd, states_fwd
from pallas_kernels._chunk_wy import wy

__all__ = ["Config", "backbone", "wy"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def backbone(q, k, u, w, g, h0, seg, cfg):
    """(o [BH, T, V], h_T [BH, V, K] fp32); see the module docstring. ``seg``: None or the
    packed-sequence counts [BH, T, 1] fp32 (see ``_chunk_common``; no gradient)."""
    hs, h_t, d = states_fwd(cfg, k, u, w, g, h0, seg)
    return output_fwd(cfg, q, k, d, g, hs, seg), h_t


def _backbone_fwd(q, k, u, w, g, h0, seg, cfg):
    hs, h_t, d = states_fwd(cfg, k, u, w, g, h0, seg)
    o = output_fwd(cfg, q, k, d, g, hs, seg)
    return (o, h_t), (q, k, w, g, h0, seg, hs, d)


def _backbone_bwd(cfg, res, cts):
    q, k, w, g, h0, seg, hs, d = res
    do, dh_t = cts
    do = do.astype(q.dtype)
    dh_t = dh_t.astype(F32)
    if w is None:
        dhs, dh0, _ = states_bwd(cfg, q, g, do, dh_t, seg=seg)
        dq, dk, du, dg, dw = grads_bwd(cfg, q, k, d, g, do, hs, dhs, seg=seg)
    else:
        dloc = dlocal_bwd(cfg, q, k, g, do, seg)
        dhs, dh0, dd = states_bwd(cfg, q, g, do, dh_t, k=k, w=w, dloc=dloc, seg=seg)
        dq, dk, du, dg, dw = grads_bwd(cfg, q, k, d, g, do, hs, dhs, dd_full=dd, seg=seg)
        dw = dw.astype(w.dtype)
    return (
        dq.astype(q.dtype),
        dk.astype(k.dtype),
        du.astype(d.dtype),
        dw,
        dg,
        dh0.astype(h0.dtype),
        None,
    )


backbone.defvjp(_backbone_fwd, _backbone_bwd)
