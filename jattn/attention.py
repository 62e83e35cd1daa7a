"""Softmax-family attention: one public function, three implementations.

``attention(q, k, v, ...)`` computes, per query ``i`` and query head ``h`` (kv head
``h // (Hq // Hkv)``)::

    s_ij = scale * q_i . k_j (+ bias_ij)          scale defaults to 1 / sqrt(Dk)
    s_ij <- score_mod(s_ij, b, h, i, j)           if given (jattn.score_mods; FlexAttention)
    s_ij <- c * tanh(s_ij / c)                    if logits_soft_cap = c (Gemma 2)
    p_ij = normalizer(s_i)_j  over visible j      mask & segment ids & bool mask
    o_i  = sum_j p_ij v_j

Normalizers (``jattn.normalizers``): ``softmax`` (optionally with a per-head ``sinks`` logit in
the denominator, "attend to nothing", as in gpt-oss and Xiao et al.'s StreamingLLM),
``sigmoid`` (unnormalized; Gu et al. 2024), ``relu`` (``relu(s) / n_visible``; Guo et al.
2024), ``softpick`` (``relu(e^s - 1) / (sum |e^s - 1| + eps)``; Zuhri et al. 2025) and
``stick_breaking`` (Tan et al. 2024). A query row with no visible key returns 0, with finite
gradients, in every implementation.

Implementations: ``"reference"`` materializes fp32 scores (the oracle); ``"xla"`` is the blocked,
memory-efficient, block-sparse form (:mod:`jattn._blocked`); ``"pallas"`` calls
:func:`pallas_kernels.flash_attention`. ``None`` picks pallas on GPU/TPU when the call is
supported there, else xla.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn import _block_mask, _blocked, _dispatch, _flash_bias, _pallas_dispatch, _reference
from jattn import masks as masks_lib
from jattn import normalizers as normalizers_lib
from jattn._attention_inputs import (
    IMPLEMENTATIONS,
    _check_mask,
    _check_qkv,
    _prepare,
    _static_float,
)
from jattn._common import merge_heads
from jattn.masks import Mask

__all__ = ["attention", "attention_weights", "IMPLEMENTATIONS"]


Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def _convenience_mask(q, k, mask, is_causal: bool, local_window_size):
    """``mask`` ANDed with ``is_causal`` / ``local_window_size`` (jax.nn.dot_product_attention's
    spellings, mapped onto :mod:`jattn.masks`); ``mask`` itself when neither is given."""
    if not isinstance(is_causal, bool | np.bool_):
        raise TypeError(f"is_causal must be a Python bool, got {type(is_causal).__name__}")
    structural = masks_lib.causal() if is_causal else None
    if local_window_size is not None:
        if isinstance(local_window_size, int | np.integer) and not isinstance(
                local_window_size, bool | np.bool_):
            left = right = local_window_size
        elif (isinstance(local_window_size, tuple | list) and len(local_window_size) == 2
              and all(isinstance(w, int | np.integer) and not isinstance(w, bool | np.bool_)
                      for w in local_window_size)):
            left, right = local_window_size
        else:
            raise TypeError("local_window_size must be an int or a pair of ints (left, right), "
                            f"got {local_window_size!r}")
        if left < 0 or right < 0:
            raise ValueError(f"local_window_size must be >= 0, got {local_window_size!r}")
        window = masks_lib.local(int(left), int(right))
        structural = window if structural is None else structural & window
    if structural is None:
        return mask
    if mask is None:
        return structural
    if isinstance(mask, Mask):
        return mask & structural
    # A dense bool mask (e.g. from flax's MultiHeadAttention): AND the structural mask densely.
    _check_qkv(q, k, k)
    b, tq, hq, _ = q.shape
    tk = k.shape[1]
    _, dense = _check_mask(mask, b, hq, tq, tk)
    return dense & structural.dense(tq, tk)


def _flax_keywords(q, k, v, mask, *, dropout_rate, deterministic, dtype, module):
    """Accept what ``flax.nnx.MultiHeadAttention`` passes to its ``attention_fn``; jattn has no
    dropout and sows no weights, so those requests are errors rather than silently ignored."""
    if deterministic is not None and mask is not None and not isinstance(mask, Mask):
        # flax always passes `deterministic`; its masks are float 0/1 arrays by convention
        # (nnx.make_attention_mask), read as `jnp.where(mask, ...)`: nonzero = visible. Without
        # flax's keywords a float mask stays a TypeError (it may be meant as an additive bias).
        if hasattr(mask, "dtype") and mask.dtype != jnp.bool_:
            mask = jnp.asarray(mask) != 0
    if dropout_rate and not deterministic:
        raise ValueError(f"jattn.attention has no attention dropout: got dropout_rate="
                         f"{dropout_rate} with deterministic={deterministic!r}; use "
                         "dropout_rate=0.0 or deterministic=True")
    if module is not None:
        raise NotImplementedError("jattn.attention does not sow attention weights "
                                  "(MultiHeadAttention(sow_weights=True)); call "
                                  "jattn.attention_weights on the same q, k instead")
    if dtype is not None:  # flax's computation dtype: inputs are cast to it, as flax does
        q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    return q, k, v, mask


def _with_bias_factors(q, k, v, bias_factors, *, scale, bias, normalizer, score_mod,
                       implementation):
    """``bias_factors`` folded into q/k (or a dense/tiled bias): see :mod:`jattn._flash_bias`."""
    _check_qkv(q, k, v)
    normalizers_lib.get(normalizer)  # an unknown name is reported as usual
    scale = None if scale is None else _static_float(scale, "scale")
    return _flash_bias.apply(q, k, v, bias_factors, scale=scale, bias=bias,
                             normalizer=normalizer, score_mod=score_mod,
                             implementation=implementation)


def attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    mask: Mask | ArrayLike | None = None,
    bias: ArrayLike | None = None,
    scale: float | None = None,
    normalizer: str = "softmax",
    sinks: ArrayLike | None = None,
    logits_soft_cap: float | None = None,
    segment_ids: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
    context_axis: str | None = None,
    context_strategy: str = "ring",
    score_mod: Callable[..., Array] | None = None,
    block_mask: ArrayLike | None = None,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    broadcast_dropout: bool = True,
    deterministic: bool | None = None,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    bias_factors: tuple[ArrayLike, ArrayLike] | None = None,
) -> Array | tuple[Array, Array]:
    """Scaled dot-product attention with masks, sinks, soft-capping and other normalizers.

    Args:
      q: ``[B, Tq, Hq, Dk]``. k: ``[B, Tk, Hkv, Dk]``. v: ``[B, Tk, Hkv, Dv]``; ``Hq % Hkv == 0``.
      mask: a :class:`jattn.masks.Mask`, or a bool array broadcastable to ``[B, Hq, Tq, Tk]``
        (True = visible); anything else (e.g. the string ``"causal"``) is a TypeError.
      bias: float, broadcastable to ``[B, Hq, Tq, Tk]``; added to the scaled scores.
      scale: static finite float (a Python or NumPy scalar), default ``1 / sqrt(Dk)``. NaN/inf
        are a ValueError; a traced value cannot be checked and is a TypeError.
      normalizer: ``"softmax"``, ``"sigmoid"``, ``"relu"``, ``"softpick"``,
        ``"stick_breaking"`` or any registered name.
      sinks: float ``[Hq]`` per-head sink logits (softmax only), differentiable.
      logits_soft_cap: ``c`` for ``s <- c tanh(s / c)``: static, finite and positive (checked
        like ``scale``).
      segment_ids: int ``[B, T]`` or a pair ``([B, Tq], [B, Tk])``: keys are visible only within
        the query's segment (packed documents).
      return_lse: also return the log-sum-exp ``[B, Hq, Tq]`` (softmax only; -inf for empty rows,
        including the sink term when sinks are given).
      implementation: ``None``, ``"reference"``, ``"xla"`` or ``"pallas"``.
      context_axis: a mesh axis of the current mesh (``jax.set_mesh``) splitting ``T``: context
        parallelism, see :func:`jattn.context_parallel.attention` (zigzag load balance inside).
      context_strategy: ``"ring"`` (K/V rotate, O(T / n) memory) or ``"allgather"``.
      is_causal: as in ``jax.nn.dot_product_attention``: ANDs :func:`jattn.masks.causal` with
        ``mask``. jattn's causal mask is end-aligned (``j <= i + Tk - Tq``, what decoding with a
        KV cache needs); for ``Tq == Tk`` it is JAX's.
      local_window_size: ``(left, right)`` or ``w`` for ``(w, w)``, as in
        ``jax.nn.dot_product_attention``: ANDs ``jattn.masks.local(left, right)`` with ``mask``
        (query ``i`` sees keys ``i - left .. i + right``, end-aligned like ``is_causal``).
      dropout_rng, dropout_rate, broadcast_dropout, deterministic, dtype, precision, module: what
        ``flax.nnx.MultiHeadAttention`` passes to its ``attention_fn``, so that
        ``nnx.MultiHeadAttention(..., attention_fn=jattn.attention)`` works. jattn has no
        dropout: ``dropout_rate > 0`` without ``deterministic=True`` is a ValueError (the rng
        and ``broadcast_dropout`` are then unused). ``dtype`` casts q, k, v (flax's computation
        dtype); ``precision`` is ignored (scores accumulate in fp32); a ``module`` (flax's
        ``sow_weights=True``) is a NotImplementedError: use :func:`attention_weights`.
      score_mod: ``score_mod(s, b, h, q_idx, kv_idx) -> s'``, elementwise jnp code on
        scalars-as-arrays (fp32 ``s``; int32 batch, query head, query and key positions),
        applied after ``scale * q.k + bias`` and before the soft-cap, mask and normalizer (see
        :mod:`jattn.score_mods`). Arrays it closes over receive gradients, deterministically,
        in every implementation. It is traced once on scalars; a wrong output shape/dtype or a
        non-elementwise function is a TypeError naming it. In the Pallas kernel the captured
        arrays are kernel operands (per-position arrays sliced per block, small tables whole;
        see :class:`jattn.score_mods.KernelForm`); a capture it cannot take (a large array with
        no KernelForm) is a NotImplementedError naming it, and ``None`` falls back to xla.
        Not yet with ``context_axis`` (NotImplementedError).
      block_mask: bool (or 0/1 int) ``[B|1, Hq|1, nq, nk]``, run-time block sparsity at the
        block sizes ``jattn.attention_block_sizes(Tq, Tk, implementation)``: query block ``i``
        of ``(b, h)`` sees key block ``j`` only where it is True (ANDed with ``mask``). May be
        traced (no recompilation when it changes); empty blocks are skipped (their K/V,
        even NaN, never reach the output or gradients). See :mod:`jattn._block_mask`.
      bias_factors: ``(u, w)``, a low-rank bias ``bias = u @ w^T`` (FlashBias, Wu et al. 2025)
        added like ``bias``: u float ``[B|1, Hq|1, Tq, R]``, w float ``[B|1, Hq|Hkv|1, Tk,
        R]``. Folded exactly into q and k as ``R`` extra feature columns
        (``q' = [scale q, u]``, ``k' = [k, w]``, then ``scale = 1``), so every implementation,
        the Pallas kernel included, serves it without a ``[Tq, Tk]`` array; ``reference``
        materializes it. Differentiable in u and w. See :mod:`jattn._flash_bias`.

    Returns:
      ``[B, Tq, Hq, Dv]`` in q's dtype (accumulated in fp32), and ``lse`` if requested. Empty
      sizes are allowed in every implementation: ``B``, ``Tq`` or ``Tk`` = 0 give correctly
      shaped (empty or zero) outputs with zero gradients; ``Tk = 0`` means no query sees a key
      (output 0, ``lse`` = the sink or -inf). Heads and head dims must be >= 1.
    """
    del dropout_rng, broadcast_dropout, precision  # see the docstring: no dropout, fp32 scores
    q, k, v, mask = _flax_keywords(q, k, v, mask, dropout_rate=dropout_rate,
                                   deterministic=deterministic, dtype=dtype, module=module)
    mask = _convenience_mask(q, k, mask, is_causal, local_window_size)
    if bias_factors is not None:
        q, k, v, scale, bias, score_mod = _with_bias_factors(
            q, k, v, bias_factors, scale=scale, bias=bias, normalizer=normalizer,
            score_mod=score_mod, implementation=implementation)
    if context_axis is not None:
        if block_mask is not None:
            raise NotImplementedError("block_mask with context_axis is not supported yet")
        if score_mod is not None:
            raise NotImplementedError("score_mod with context_axis is not supported yet")
        from jattn import context_parallel

        return context_parallel.attention(
            q, k, v, axis=context_axis, strategy=context_strategy, mask=mask, bias=bias,
            scale=scale, normalizer=normalizer, sinks=sinks, logits_soft_cap=logits_soft_cap,
            segment_ids=segment_ids, return_lse=return_lse, implementation=implementation)
    spec, bias4, sinks, dense, seg_q, seg_k = _prepare(
        q, k, v, mask=mask, bias=bias, scale=scale, normalizer=normalizer, sinks=sinks,
        logits_soft_cap=logits_soft_cap, segment_ids=segment_ids, return_lse=return_lse,
        implementation=implementation, score_mod=score_mod)
    bq = bk = None  # run-time block sparsity: at the documented block sizes on every path
    if block_mask is not None:
        bq, bk = _block_mask.attention_block_sizes(spec.q_len, spec.kv_len, implementation)
        block_mask = _block_mask.check(block_mask, q.shape[0], q.shape[2], spec.q_len,
                                       spec.kv_len, bq, bk)
    choice = _dispatch.choose(
        implementation, IMPLEMENTATIONS, fallback="xla",
        unsupported=lambda: _pallas_dispatch.unsupported_reason(
            mask=spec.mask, dense_mask=dense, bias=bias4, normalizer=spec.normalizer.name,
            block_mask=block_mask, batch=q.shape[0], segment_ids=segment_ids,
            score_mod=spec.score_mod))

    def pallas():
        return _pallas_dispatch.attention_pallas(
            q, k, v, mask=spec.mask, dense_mask=dense, bias=bias4, scale=spec.scale,
            normalizer=spec.normalizer.name, sinks=sinks, logits_soft_cap=spec.soft_cap,
            segment_ids=segment_ids, return_lse=return_lse, score_mod=spec.score_mod,
            block_mask=block_mask)

    def xla_or_reference(choice):
        args = (spec, q, k, v, bias4, sinks, dense, seg_q, seg_k)
        if block_mask is None:
            impl = _reference if choice.name == "reference" else _blocked
            out, stat = impl.attention(*args)
        elif choice.name == "reference":
            args = args[:6] + (_block_mask.with_dense(dense, block_mask, spec.q_len, spec.kv_len,
                                                      bq, bk),) + args[7:]
            out, stat = _reference.attention(*args)
        else:
            out, stat = _blocked.attention(*args, block_q=bq, block_kv=bk, block_mask=block_mask)
        out = out.astype(q.dtype)
        return (out, stat) if return_lse else out

    return _dispatch.run(choice, pallas, xla_or_reference)


def attention_weights(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike | None = None,
    *,
    mask: Mask | ArrayLike | None = None,
    bias: ArrayLike | None = None,
    scale: float | None = None,
    normalizer: str = "softmax",
    sinks: ArrayLike | None = None,
    logits_soft_cap: float | None = None,
    segment_ids: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
    score_mod: Callable[..., Array] | None = None,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    bias_factors: tuple[ArrayLike, ArrayLike] | None = None,
) -> Array:
    """The normalized weights ``p [B, Hq, Tq, Tk]`` (fp32, reference path), for analysis.

    Takes the same arguments as :func:`attention` (``score_mod``, ``is_causal``,
    ``local_window_size`` and ``bias_factors`` included); ``v`` (only its shape matters) and
    ``implementation``/``return_lse`` are accepted for symmetry and ignored.
    With sinks, a row sums to less than one: the remainder went to the sink.
    """
    if v is None:
        v = k
    mask = _convenience_mask(q, k, mask, is_causal, local_window_size)
    if bias_factors is not None:  # the reference path: u @ w^T joins the dense bias
        q, k, v, scale, bias, score_mod = _with_bias_factors(
            q, k, v, bias_factors, scale=scale, bias=bias, normalizer=normalizer,
            score_mod=score_mod, implementation="reference")
    spec, bias4, sinks, dense, seg_q, seg_k = _prepare(
        q, k, v, mask=mask, bias=bias, scale=scale, normalizer=normalizer, sinks=sinks,
        logits_soft_cap=logits_soft_cap, segment_ids=segment_ids, return_lse=False,
        implementation=None, score_mod=score_mod)
    p, _ = _reference.weights(spec, q, k, bias4, sinks, dense, seg_q, seg_k)
    return merge_heads(p)
