"""Argument validation and implementation dispatch shared by the ``jattn.linear`` mechanisms.

Every check raises at trace time with a message that names the argument and the shape it
should have; nothing is silently broadcast.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels._input_checks import check_log_decay_values, is_traced

IMPLEMENTATIONS = ("reference", "recurrent", "chunk", "xla", "pallas")


def check_float(name: str, x: Any) -> None:
    """Raise TypeError unless ``x`` is an array-like of a floating dtype."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array, got {type(x).__name__} with dtype {dtype}"
        )


def check_qkv(q: Any, k: Any, v: Any) -> tuple[int, int, int, int, int]:
    """Validate ``q, k [B, T, H, K]`` and ``v [B, T, H, V]``; return ``(B, T, H, K, V)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape [B, T, H, D], got shape {x.shape}")
    B, T, H, K = q.shape
    if K == 0:  # B, T, H or V = 0 give empty outputs; a 0-dim key space has no scale 1/sqrt(K)
        raise ValueError(f"q and k must have a head dim K >= 1, got shape {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q [B, T, H, K] = {q.shape}, got {k.shape}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(
            f"v must have shape [B, T, H, V] = {(B, T, H, 'V')} matching q {q.shape}, got {v.shape}"
        )
    return B, T, H, K, v.shape[3]


def check_cross_qkv(q: Any, k: Any, v: Any, *, gqa: bool = True) -> tuple[int, int]:
    """Validate ``q [B, Tq, Hq, K]``, ``k [B, Tk, Hkv, K]``, ``v [B, Tk, Hkv, V]`` (any
    ``Tq``, ``Tk``; ``Hq`` a multiple of ``Hkv`` with ``gqa``, else equal); return
    ``(Tq, Tk)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape [B, T, H, D], got shape {x.shape}")
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    heads_ok = hkv > 0 and hq % hkv == 0 if gqa else hkv == hq
    if k.shape[0] != b or k.shape[3] != d or not heads_ok:
        heads = f"Hq={hq} a multiple of Hkv" if gqa else f"Hkv = Hq = {hq}"
        raise ValueError(f"k must have shape [B, Tk, Hkv, K] with B={b}, K={d} and {heads}, "
                         f"got {k.shape}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape [B, Tk, Hkv, V] = {k.shape[:3] + ('V',)}, "
                         f"got {v.shape}")
    return tq, k.shape[1]


def check_gate(name: str, g: Any, B: int, T: int, H: int, K: int) -> bool:
    """Validate a log-decay gate ``[B, T, H]`` or ``[B, T, H, K]``; return True if per-channel."""
    check_float(name, g)
    if g.shape not in ((B, T, H, K), (B, T, H)):
        raise ValueError(
            f"{name} must have shape [B, T, H] = {(B, T, H)} (scalar decay per head) "
            f"or [B, T, H, K] = {(B, T, H, K)} (per key channel), got {g.shape}"
        )
    check_log_decay_values(name, g)
    return g.shape == (B, T, H, K)


def check_beta(beta: Any, B: int, T: int, H: int) -> None:
    check_float("beta", beta)
    if beta.shape != (B, T, H):
        raise ValueError(f"beta must have shape [B, T, H] = {(B, T, H)}, got {beta.shape}")


class UnstableDeltaRuleWarning(RuntimeWarning):
    """The delta rule's ``beta_t |k_t|^2`` left ``[0, 2]``: the state can grow without bound."""


def warn_if_unstable(k: Any, beta: Any, l2norm_eps: float | None, stacklevel: int = 3) -> None:
    """Warn (:class:`UnstableDeltaRuleWarning`) when concrete ``k [..., K]``, ``beta [...]``
    violate the delta rule's stability bound ``0 <= beta |k|^2 <= 2``.

    The transition ``I - beta k^T k`` has eigenvalue ``1 - beta |k|^2`` along ``k`` (1
    elsewhere); outside the bound its magnitude exceeds 1 and the state grows geometrically
    (NaN after a few hundred steps in fp32). ``l2norm_eps``: the keys are L2-normalized first
    (``|k|^2 / (|k|^2 + eps)``), or None. Traced inputs are not checked.
    """
    if is_traced(k) or is_traced(beta):
        return
    with jax.ensure_compile_time_eval():  # concrete values inside a jit trace too
        sq = jnp.sum(jnp.square(jnp.asarray(k, jnp.float32)), axis=-1)
        if l2norm_eps is not None:
            sq = sq / (sq + l2norm_eps)
        rate = jnp.asarray(beta, jnp.float32) * sq
        # 1e-5: exactly unit keys in fp32 with beta = 2 sit on the bound, not past it
        num_bad = int(jnp.sum(~((rate >= 0) & (rate <= 2.0 * (1 + 1e-5)))))
        if num_bad:
            warnings.warn(
                f"delta rule: beta * |k|^2 is outside the stable range [0, 2] at {num_bad} of "
                f"{rate.size} steps (range [{float(jnp.min(rate)):.4g}, "
                f"{float(jnp.max(rate)):.4g}]): the state grows without bound (NaN on long "
                "sequences). Normalize the keys (use_qk_l2norm=True) and keep beta in [0, 2].",
                UnstableDeltaRuleWarning,
                stacklevel=stacklevel,
            )


def check_state(name: str, state: Any, B: int, H: int, K: int, V: int) -> None:
    if state is None:
        return
    check_float(name, state)
    if state.shape != (B, H, K, V):
        raise ValueError(f"{name} must have shape [B, H, K, V] = {(B, H, K, V)}, got {state.shape}")


def check_chunk_size(chunk_size: Any) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def check_implementation(implementation: Any) -> None:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}"
        )


def default_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def out_dtype(*xs: Any) -> Any:
    return jnp.result_type(*[x.dtype for x in xs])


def on_accelerator() -> bool:
    return jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")


def pallas_kernel(name: str) -> Callable[..., Any] | None:
    """``pallas_kernels.<name>`` if the kernel package provides it, else None (lazy import)."""
    try:
        import pallas_kernels
    except ImportError:
        return None
    return getattr(pallas_kernels, name, None)


def pick(implementation: str | None) -> str:
    """Resolve ``None``/``"xla"`` to a concrete path: ``"pallas?"`` means try pallas, else chunk."""
    if implementation is None:
        return "pallas?" if on_accelerator() else "chunk"
    if implementation == "xla":
        return "chunk"
    return implementation


def call_pallas(name: str, explicit: bool, *args: Any, **kwargs: Any) -> Any:
    """Call ``pallas_kernels.<name>``; return None (meaning: fall back) when it cannot serve.

    With ``explicit=True`` (the caller asked for ``implementation="pallas"``) a missing kernel
    or an unsupported combination raises ``NotImplementedError`` instead.
    """
    fn = pallas_kernel(name)
    if fn is None:
        if explicit:
            raise NotImplementedError(
                f"implementation='pallas': pallas_kernels.{name} is not available"
            )
        return None
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        if explicit:
            raise
        return None


def check_segment_ids(segment_ids: Any, B: int, T: int) -> None:
    """Validate packed-sequence ids: an integer (or bool) array ``[B, T]``, or None."""
    if segment_ids is None:
        return
    dtype = getattr(segment_ids, "dtype", None)
    if dtype is None or not (
        jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)
    ):
        raise TypeError(
            f"segment_ids must be an integer array [B, T] = {(B, T)}, got "
            f"{type(segment_ids).__name__} with dtype {dtype}"
        )
    if segment_ids.shape != (B, T):
        raise ValueError(f"segment_ids must have shape [B, T] = {(B, T)}, got {segment_ids.shape}")


def no_segments_with_context(segment_ids: Any, context_axis: Any) -> None:
    if segment_ids is not None and context_axis is not None:
        raise NotImplementedError(
            "segment_ids with context_axis: the per-device state summaries of context "
            "parallelism do not carry segment restarts yet; pass one of them"
        )


def dispatch(
    implementation: str | None,
    call_kernel: Callable[[bool], Any],
    call_xla: Callable[[str], Any],
) -> Any:
    """Run the Pallas kernel when ``implementation`` picks it and it can serve, else the XLA
    form.

    ``call_kernel(explicit)`` calls :func:`call_pallas` (None means: fall back);
    ``call_xla(impl)`` runs ``impl`` in ``{"chunk", "recurrent", ...}``.
    """
    impl = pick(implementation)
    if impl in ("pallas", "pallas?"):
        res = call_kernel(impl == "pallas")
        if res is not None:
            return res
        impl = "chunk"
    return call_xla(impl)


def check_run_options(
    shape: tuple[int, int, int, int, int],
    initial_state: Any,
    segment_ids: Any,
    chunk_size: Any,
    implementation: Any,
    scale: float | None,
    context_axis: Any = None,
    *,
    cu_seqlens: Any = None,
) -> tuple[int, float]:
    """The checks every chunked public function runs after its own inputs' (``shape`` is
    ``(B, T, H, K, V)``); returns ``(chunk_size, scale)`` as used. With ``cu_seqlens`` the
    call packs documents: ``initial_state`` is per document, ``[N, H, K, V]``."""
    B, T, H, K, V = shape
    if cu_seqlens is not None:
        from jattn.linear import _packing  # it imports this module

        N = _packing.check_cu_seqlens(cu_seqlens, B, T, segment_ids, context_axis)
        _packing.check_document_state("initial_state", initial_state, N, H, K, V)
    else:
        check_state("initial_state", initial_state, B, H, K, V)
        check_segment_ids(segment_ids, B, T)
        no_segments_with_context(segment_ids, context_axis)
    chunk_size = check_chunk_size(chunk_size)
    check_implementation(implementation)
    return chunk_size, float(default_scale(scale, K))
