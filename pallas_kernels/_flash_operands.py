"""The flash kernel's operand plumbing: score_mod operands (validated and padded to whole
blocks) and the padding helpers the drivers share."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _flash_kernels as fk


def pl_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


MOD_AXES = ("q", "kv", "whole", "const")


def check_mod_operands(score_mod, operands, axes, b: int, hq: int, tq: int, tk: int,
                        backend: str):
    """Validate the score_mod operands; ``(operands, axes, lens)`` with float ones in fp32."""
    operands, axes = tuple(operands), tuple(axes)
    if len(operands) != len(axes) or any(a not in MOD_AXES for a in axes):
        raise ValueError(f"score_mod_axes must name one of {MOD_AXES} per score_mod operand; "
                         f"got {len(operands)} operands and axes {axes}")
    if operands and score_mod is None:
        raise ValueError("score_mod_operands need a score_mod that reads them")
    out, lens = [], []
    for n, (x, a) in enumerate(zip(operands, axes, strict=True)):
        x = jnp.asarray(x)
        if a == "const":
            out.append(x)
            lens.append(0)
            continue
        length = {"q": tq, "kv": tk}.get(a)
        want = f"[B|1={b}, Hq|1={hq}, {'L' if length is None else length}]"
        if (x.ndim != 3 or x.shape[0] not in (1, b) or x.shape[1] not in (1, hq)
                or (length is not None and x.shape[2] != length)
                or not jnp.issubdtype(x.dtype, jnp.floating)):
            raise ValueError(f"score_mod_operands[{n}] (axis {a!r}) must be a float array "
                             f"{want}, got {x.dtype}{tuple(x.shape)}")
        out.append(x.astype(jnp.float32))
        lens.append(x.shape[2])
    return tuple(out), axes, tuple(lens)


def pad_mod_operand(x, axis: str, cfg, backend: str):
    """Pad a score_mod operand's position axis to whole blocks (a ``whole`` table to a lane
    multiple on TPU, a power of two on GPU); outside the custom VJP, so autodiff slices the
    gradient back."""
    if axis == "q":
        return pad_axis(x, 2, cfg.q_pad)
    if axis == "kv":
        return pad_axis(x, 2, cfg.kv_pad)
    if axis == "whole":
        n = x.shape[2]
        return pad_axis(x, 2, -(-n // fk.LANES) * fk.LANES if backend == "tpu" else gpu_dim(n))
    return x


def pad_axis(x, axis, size, value=0):
    """Pad ``x`` along ``axis`` up to ``size`` with ``value``."""
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def gpu_dim(n):
    """A GPU block dimension: a power of two, at least 16 (Triton's dot minimum)."""
    return max(16, pl_next_pow2(n))
