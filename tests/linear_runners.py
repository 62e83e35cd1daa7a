"""The ``jattn.linear`` sequence functions behind one call shape, for the packing tests:
``run(x, S0, segment_ids, implementation, *, chunk_size) -> (o, final state)`` where ``x`` is
the dict of token inputs (``q, k, v, a, b, beta, g``) and ``S0`` the ``[B, H, K, V]`` state."""

from __future__ import annotations

import jax.numpy as jnp

import jattn.linear as L


def run_gla(x, S0, seg, impl, *, chunk_size):
    return L.gla(x["q"], x["k"], x["v"], x["g"], initial_state=S0, output_final_state=True,
                 segment_ids=seg, implementation=impl, chunk_size=chunk_size)


def run_delta(x, S0, seg, impl, *, chunk_size):
    return L.delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x["g"], initial_state=S0,
                        output_final_state=True, segment_ids=seg, implementation=impl,
                        chunk_size=chunk_size)


def run_dplr(x, S0, seg, impl, *, chunk_size):
    return L.dplr_delta_rule(x["q"], x["k"], x["v"], x["a"], x["b"], g=x["g"], initial_state=S0,
                             output_final_state=True, segment_ids=seg, implementation=impl,
                             chunk_size=chunk_size)


def run_linear(x, S0, seg, impl, *, chunk_size):
    """ReLU linear attention; ``S0`` becomes the state's ``S``, its normalizer ``|S0[..., 0]|``."""
    state = None if S0 is None else L.LinearAttentionState(S0, jnp.abs(S0[..., 0]))
    return L.linear_attention(x["q"], x["k"], x["v"], feature_map="relu", initial_state=state,
                              output_final_state=True, segment_ids=seg, implementation=impl,
                              chunk_size=chunk_size)


def runners(chunk_size: int):
    """``(gla, delta, dplr, linear)`` with ``chunk_size`` bound."""
    return tuple(lambda *a, f=f: f(*a, chunk_size=chunk_size)
                 for f in (run_gla, run_delta, run_dplr, run_linear))
