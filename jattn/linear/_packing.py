"""``cu_seqlens`` (flash-linear-attention's packed-document convention) for every ``jattn.linear``
sequence function, implemented once on top of ``segment_ids``.

``cu_seqlens`` is an int ``[N + 1]`` array of document offsets into a batch of one sequence
(``B = 1``): document ``n`` is ``x[0, cu_seqlens[n] : cu_seqlens[n + 1]]``. It is data (a
``jnp`` array, traced under ``jit``), so moving the boundaries does not recompile; only ``N``
is static. Documents become ``segment_ids`` (the document index of each token), so every
implementation of the wrapped function (reference, recurrent, chunk, Pallas) serves it.

Per-document states (``initial_state`` / ``final_state`` ``[N, H, K, V]``) ride on extra
tokens inserted around each document, inside its segment (exact, and each implementation
runs unchanged):

* state injection, before the document's first token: ``K`` tokens with key ``e_i`` (the
  unit vector), value ``S0[n, :, i, :]``, zero query, zero gates (decay 1), delta-rule rate
  ``beta = 1``, no low-rank term. From the zero state at the document's start they write
  ``S0[n]`` row by row (the delta rule replaces row ``i`` with the value: the same);
* state read-out, after its last token: ``K`` tokens with query ``e_i`` and every write
  zero (``k = 0``, ``beta = 0``, ``a = b = 0``) and no decay, whose outputs are
  ``scale * S[i, :]``: the final state's rows.

This costs ``K`` steps per document per requested state (nothing when neither state is
asked for, the common training case). The states are fp32: when they are requested, the call
computes in fp32 (low-precision inputs are upcast) so that neither the injected nor the
read-out state is rounded to the inputs' dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jattn.linear._checks import is_traced

# How each per-token input is filled on the inserted tokens (injection, read-out).
KINDS = ("query", "key", "value", "beta", "zero")


def check_cu_seqlens(
    cu_seqlens: Any, B: int, T: int, segment_ids: Any = None, context_axis: Any = None
) -> int:
    """Validate ``cu_seqlens`` (int ``[N + 1]``, ``N >= 1``, with ``B = 1``); return ``N``.

    Concrete values are checked too: start at 0, nondecreasing, end at ``T``. Traced values
    (under ``jit``) cannot be read without a host sync and are not checked.
    """
    dtype = getattr(cu_seqlens, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"cu_seqlens must be an integer array [N + 1] of document offsets, got "
            f"{type(cu_seqlens).__name__} with dtype {dtype}"
        )
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must have shape [N + 1] with N >= 1 documents, got {cu_seqlens.shape}"
        )
    if B != 1:
        raise ValueError(f"cu_seqlens needs a batch of one packed sequence (B = 1), got B = {B}")
    if segment_ids is not None:
        raise ValueError("pass cu_seqlens or segment_ids, not both")
    if context_axis is not None:
        raise NotImplementedError(
            "cu_seqlens with context_axis: the per-device state summaries of context "
            "parallelism do not carry document restarts yet; pass one of them"
        )
    if not is_traced(cu_seqlens):
        with jax.ensure_compile_time_eval():
            cu = jnp.asarray(cu_seqlens)
            if int(cu[0]) != 0:
                raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {int(cu[0])}")
            if bool(jnp.any(cu[1:] < cu[:-1])):
                raise ValueError(f"cu_seqlens must be nondecreasing, got {cu.tolist()}")
            if int(cu[-1]) != T:
                raise ValueError(
                    f"cu_seqlens must end at T = {T} (the packed length), got "
                    f"cu_seqlens[-1] = {int(cu[-1])}"
                )
    return cu_seqlens.shape[0] - 1


def check_document_state(name: str, state: Any, N: int, H: int, K: int, V: int) -> None:
    """A per-document state ``[N, H, K, V]`` (or None)."""
    if state is None:
        return
    dtype = getattr(state, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {dtype}")
    if state.shape != (N, H, K, V):
        raise ValueError(
            f"{name} must have shape [N, H, K, V] = {(N, H, K, V)} (one state per document "
            f"of cu_seqlens), got {state.shape}"
        )


def document_ids(cu_seqlens: jax.Array, T: int) -> jax.Array:
    """``[T]`` int32: the document index of each token (empty documents own no token)."""
    cu = cu_seqlens.astype(jnp.int32)
    return jnp.searchsorted(cu[1:], jnp.arange(T, dtype=jnp.int32), side="right").astype(
        jnp.int32
    )


def _extra_rows(kind: str, x: jax.Array, N: int, K: int, n_inj: int, n_out: int, S0: Any):
    """The inserted tokens' rows of input ``x [1, T, H, ...]``: ``[N * n_inj + N * n_out,
    H, ...]`` (injection rows first, then read-out rows)."""
    H, tail = x.shape[2], x.shape[3:]
    zeros = lambda n: jnp.zeros((n, H) + tail, x.dtype)  # noqa: E731
    eye = jnp.broadcast_to(jnp.eye(K, dtype=x.dtype)[:, None, :], (K, H, K))
    inj, out = zeros(N * n_inj), zeros(N * n_out)
    if kind == "key" and n_inj:
        inj = jnp.tile(eye, (N, 1, 1))
    elif kind == "value" and n_inj:
        inj = jnp.transpose(S0, (0, 2, 1, 3)).reshape(N * K, H, -1).astype(x.dtype)
    elif kind == "beta" and n_inj:
        inj = jnp.ones((N * n_inj, H), x.dtype)
    if kind == "query" and n_out:
        out = jnp.tile(eye, (N, 1, 1))
    return jnp.concatenate([inj, out], axis=0)


def run_documents(
    call: Callable[[dict[str, Any], jax.Array], jax.Array],
    xs: dict[str, Any],
    kinds: dict[str, str],
    cu_seqlens: jax.Array,
    *,
    key_dim: int,
    initial_state: jax.Array | None,
    output_final_state: bool,
    scale: float,
) -> tuple[jax.Array, jax.Array | None]:
    """Run ``call`` on the packed documents of ``cu_seqlens`` (see the module docstring).

    Args:
      call: ``call(inputs, segment_ids [1, T']) -> o [1, T', H, V]``, the wrapped function
        with zero initial state and the given per-token inputs (same names as ``xs``).
      xs: per-token inputs ``[1, T, H, ...]`` (None entries pass through as None).
      kinds: each input's role on the inserted tokens: one of :data:`KINDS`.
      key_dim: ``K``, the state's row count (one inserted token per row).
      initial_state: None or ``[N, H, K, V]``; output_final_state: return ``[N, H, K, V]``.
      scale: the output scale (the read-out divides it back out).

    Returns ``(o [1, T, H, V], final_state [N, H, K, V] fp32 or None)``.
    """
    T = next(x for x in xs.values() if x is not None).shape[1]
    N, K = cu_seqlens.shape[0] - 1, key_dim
    doc = document_ids(cu_seqlens, T)
    n_inj = K if initial_state is not None else 0
    n_out = K if output_final_state else 0
    if not (n_inj or n_out):
        return call(xs, doc[None]), None
    per = n_inj + n_out
    cu = cu_seqlens.astype(jnp.int32)
    n = jnp.arange(N, dtype=jnp.int32)
    t = jnp.arange(T, dtype=jnp.int32)
    pos_real = t + (doc + 1) * n_inj + doc * n_out
    pos_inj = ((cu[:-1] + n * per)[:, None] + jnp.arange(n_inj, dtype=jnp.int32)).reshape(-1)
    pos_out = ((cu[1:] + (n + 1) * n_inj + n * n_out)[:, None]
               + jnp.arange(n_out, dtype=jnp.int32)).reshape(-1)
    T2 = T + N * per
    # Source row of each expanded position in concat([real rows, injection rows, read-out
    # rows]); one gather per input (its gradient is the matching scatter-add).
    src = jnp.zeros((T2,), jnp.int32)
    src = src.at[pos_real].set(t).at[pos_inj].set(T + jnp.arange(N * n_inj, dtype=jnp.int32))
    src = src.at[pos_out].set(T + N * n_inj + jnp.arange(N * n_out, dtype=jnp.int32))
    seg = jnp.zeros((T2,), jnp.int32).at[pos_real].set(doc)
    seg = seg.at[pos_inj].set(jnp.repeat(n, n_inj)).at[pos_out].set(jnp.repeat(n, n_out))
    expanded = {}
    for name, x in xs.items():
        if x is None:
            expanded[name] = None
            continue
        if jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # fp32 states: see above
        rows = _extra_rows(kinds[name], x, N, K, n_inj, n_out, initial_state)
        expanded[name] = jnp.concatenate([x[0], rows], axis=0)[src][None]
    o2 = call(expanded, seg[None])
    o = o2[:, pos_real]
    if not n_out:
        return o, None
    rows = o2[0, pos_out].astype(jnp.float32) / scale  # [N * K, H, V]
    final = jnp.transpose(rows.reshape(N, K, rows.shape[1], rows.shape[2]), (0, 2, 1, 3))
    return o, final
