"""Glue from ``jattn.attention(..., implementation="pallas")`` to :mod:`pallas_kernels.flash`.

Which implementation serves a call is decided in :mod:`jattn._dispatch` (from
:func:`unsupported_reason` here); this module only translates the call for the kernel.

The kernel takes plain arrays and functions: a block map (built here from the
:class:`~jattn.masks.Mask` at the kernel's block sizes, evaluated at trace time so the TPU grid
only spans non-empty blocks) and ``mask.index_fn(Tq, Tk)``. Features the kernel does not have
raise ``NotImplementedError`` naming them.

A ``score_mod`` reaches the kernel as a function of its tile plus operands
(:func:`kernel_score_mod`): the arrays a library score_mod declares in its
:class:`jattn.score_mods.KernelForm` (per query / key position, sliced per block; small per-head
tables), plus whatever the function still closes over, passed whole when small.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jattn.masks import Mask
from jattn.score_mods import check_elementwise
from pallas_kernels import flash as flash_lib

# Arrays a score_mod closes over (without a KernelForm) are passed whole to every program, and
# every dq program writes a gradient partial of that size: only small tables qualify.
MAX_WHOLE_CAPTURE = 4096
# In-kernel indexing of a whole array by a traced index: interpret mode runs it; Mosaic and
# Triton do not lower gathers, so a compiled kernel refuses them (declare a KernelForm).
_GATHERS = frozenset({"gather", "dynamic_slice", "scatter-add", "scatter_add", "scatter"})

__all__ = ["attention_pallas", "pallas_supported", "unsupported_reason"]

# Normalizers the flash kernel computes (stick-breaking stays on xla: see pallas_kernels.flash).
KERNEL_NORMALIZERS = flash_lib.NORMALIZERS

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_KV = 128


def _closes_over_array(mask: Mask) -> bool:
    """True if the mask tree holds an array (``from_array``): its index_fn cannot run in-kernel."""
    if not dataclasses.is_dataclass(mask):
        return False
    for field in dataclasses.fields(mask):
        val = getattr(mask, field.name)
        vals = val if isinstance(val, tuple) else (val,)
        for x in vals:
            if isinstance(x, Mask) and _closes_over_array(x):
                return True
            if isinstance(x, np.ndarray | jax.Array):
                return True
    return False


def kernel_block_sizes(q_len: int, kv_len: int) -> tuple[int, int]:
    """The kernel's ``(block_q, block_kv)`` for these lengths (where a ``block_mask`` lives)."""
    return flash_lib.block_sizes(q_len, kv_len, DEFAULT_BLOCK_Q, DEFAULT_BLOCK_KV)


def unsupported_reason(*, mask=None, dense_mask=None, bias=None, normalizer="softmax",
                       **_unused) -> str | None:
    """Why the Pallas kernel cannot serve this call (None if it can)."""
    if bias is not None:
        return "bias (additive score bias) is not supported by the Pallas flash kernel"
    if normalizer not in KERNEL_NORMALIZERS:
        return (f"normalizer={normalizer!r} is not supported by the Pallas flash kernel "
                f"(only {', '.join(KERNEL_NORMALIZERS)})")
    if dense_mask is not None:
        return ("dense bool-array masks are not supported by the Pallas flash kernel; "
                "use a jattn.masks.Mask (or segment_ids for per-batch document masks)")
    if mask is not None:
        if not isinstance(mask, Mask):
            return f"mask of type {type(mask).__name__} is not supported by the Pallas kernel"
        if _closes_over_array(mask):
            return ("masks.from_array masks (an index_fn closing over an array) are not "
                    "supported by the Pallas flash kernel")
    return None


def pallas_supported(q=None, k=None, v=None, **kwargs) -> bool:
    """Whether :func:`attention_pallas` can serve a call with these keyword arguments."""
    return unsupported_reason(**kwargs) is None


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _uses(jaxpr, names) -> str | None:
    """The first primitive of ``names`` in ``jaxpr`` (sub-jaxprs included)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            return eqn.primitive.name
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns") and (found := _uses(sub, names)) is not None:
                    return found
    return None


def _form_operands(form, batch: int, hq: int, tq: int, tk: int, name: str):
    """The KernelForm's operands, checked against the call's shapes (NotImplementedError
    naming the mismatch: the xla path then serves, or reports, the call)."""
    ops = []
    for n, (x, axis) in enumerate(zip(form.operands, form.axes, strict=True)):
        length = {"q": tq, "kv": tk}.get(axis)
        x = jax.numpy.asarray(x)
        if (x.ndim != 3 or x.shape[0] not in (1, batch) or x.shape[1] not in (1, hq)
                or (length is not None and x.shape[2] != length)):
            raise NotImplementedError(
                f"score_mod {name}: its kernel operand {n} ({axis!r}) has shape {x.shape}, "
                f"expected [B|1={batch}, Hq|1={hq}, {length or 'L'}] for this call")
        ops.append(x)
    return ops


def kernel_score_mod(score_mod, batch: int, hq: int, tq: int, tk: int, block_q: int,
                     block_kv: int, compiled: bool):
    """``(fn, operands, axes)`` for :func:`pallas_kernels.flash_attention`.

    Arrays come from ``score_mod.kernel_form`` when it has one (sliced per block); anything the
    function (or its kernel form) still closes over is found by tracing it at the tile shape
    and passed whole as a ``"const"`` operand when small (at most ``MAX_WHOLE_CAPTURE``
    elements in all). Raises NotImplementedError naming why otherwise (a large capture, or a
    gather from a capture in a compiled kernel); TypeError for a non-elementwise function.
    """
    f32, i32 = jax.numpy.float32, jax.numpy.int32
    name = _name(score_mod)
    tile = jax.ShapeDtypeStruct((block_q, block_kv), f32)
    scalar = jax.ShapeDtypeStruct((), i32)
    idx = jax.ShapeDtypeStruct((block_q, block_kv), i32)
    check_elementwise(score_mod, tile, scalar, scalar, idx, idx)
    out = jax.eval_shape(score_mod, tile, scalar, scalar, idx, idx)
    if getattr(out, "shape", None) != tile.shape:
        raise TypeError(f"score_mod {name} must be elementwise: on a [{block_q}, {block_kv}] "
                        f"tile it returned {out}")
    form = getattr(score_mod, "kernel_form", None)
    if form is None:
        fn, ops, axes = score_mod, [], []
    else:
        fn, ops, axes = form.fn, _form_operands(form, batch, hq, tq, tk, name), list(form.axes)
    blocks = []
    for x, axis in zip(ops, axes, strict=True):
        if axis == "whole":
            blocks.append(tuple(jax.ShapeDtypeStruct((1, 1), f32) for _ in range(x.shape[2])))
        else:
            blocks.append(jax.ShapeDtypeStruct((block_q, 1) if axis == "q" else (1, block_kv),
                                               f32))
    closed = jax.make_jaxpr(fn)(tile, scalar, scalar, idx, idx, *blocks)
    consts = list(closed.consts)
    if not consts:
        return fn, ops, axes
    size = sum(int(np.size(c)) for c in consts)
    if size > MAX_WHOLE_CAPTURE:
        shapes = ", ".join(str(tuple(np.shape(c))) for c in consts)
        raise NotImplementedError(
            f"score_mod {name} closes over arrays of shapes {shapes} ({size} elements): the "
            f"Pallas kernel passes captured arrays whole to every program only up to "
            f"{MAX_WHOLE_CAPTURE} elements; give it a jattn.score_mods.KernelForm (per-position "
            f"arrays sliced per block) or use implementation='xla'")
    if compiled and (prim := _uses(closed.jaxpr, _GATHERS)) is not None:
        raise NotImplementedError(
            f"score_mod {name} indexes an array it closes over ({prim!r}), which the compiled "
            f"Pallas kernel cannot lower; give it a jattn.score_mods.KernelForm or use "
            f"implementation='xla'")
    n_blocks = len(ops)

    def with_consts(s, b, h, q_idx, kv_idx, *rest):
        flat = jax.tree.leaves(tuple(rest[:n_blocks]))  # as make_jaxpr flattened them
        return jax.core.eval_jaxpr(closed.jaxpr, list(rest[n_blocks:]), s, b, h, q_idx,
                                   kv_idx, *flat)[0]

    return with_consts, ops + consts, axes + ["const"] * len(consts)


def attention_pallas(q, k, v, *, mask, dense_mask, bias, scale, normalizer, sinks,
                     logits_soft_cap, segment_ids, return_lse, block_q=None, block_kv=None,
                     interpret=None, backend=None, score_mod=None, block_mask=None):
    """Softmax or softpick attention through :func:`pallas_kernels.flash_attention`.

    ``mask`` is a :class:`jattn.masks.Mask` or None; ``dense_mask``/``bias`` must be None and
    ``normalizer`` one of ``KERNEL_NORMALIZERS`` (else ``NotImplementedError``). Shapes as in
    :func:`jattn.attention`. ``score_mod``'s arrays become kernel operands
    (:func:`kernel_score_mod`; NotImplementedError when it cannot). ``block_mask``: bool
    ``[B|1, Hq|1, nq, nk]`` at the kernel's block sizes (see :func:`kernel_block_sizes`),
    ANDed with the mask's static map into the kernel's per-(batch, head) block map.
    """
    reason = unsupported_reason(mask=mask, dense_mask=dense_mask, bias=bias,
                                normalizer=normalizer)
    if reason is not None:
        raise NotImplementedError(reason)
    tq, hq = q.shape[1], q.shape[2]
    tk = k.shape[1]
    bq, bk = flash_lib.block_sizes(tq, tk, block_q or DEFAULT_BLOCK_Q,
                                   block_kv or DEFAULT_BLOCK_KV, backend)
    mod_fn, mod_ops, mod_axes = score_mod, (), ()
    if score_mod is not None and q.shape[0] > 0 and tq > 0 and tk > 0:
        interpreted = (jax.default_backend() == "cpu") if interpret is None else interpret
        mod_fn, mod_ops, mod_axes = kernel_score_mod(score_mod, q.shape[0], hq, tq, tk, bq, bk,
                                                     compiled=not interpreted)
    block_map = mask_fn = None
    if mask is not None:
        if mask.num_heads is not None and mask.num_heads not in (1, hq):
            raise ValueError(f"per-head mask has {mask.num_heads} heads; expected Hq={hq}")
        if tq > 0 and tk > 0:  # an empty sequence has no blocks (the kernel launches nothing)
            with jax.ensure_compile_time_eval():  # static block map: the grid skips empty blocks
                block_map = mask.block_map(tq, tk, bq, bk)
            mask_fn = mask.index_fn(tq, tk)
    if block_mask is not None:
        if block_q is not None or block_kv is not None:
            raise ValueError("block_mask is defined at the kernel's default block sizes")
        codes = jax.numpy.where(block_mask, 2, 0).astype(jax.numpy.int32)  # full / empty
        if block_map is not None:  # [nq, nk] or [H, nq, nk] -> [1, H|1, nq, nk]
            static = np.asarray(block_map, np.int32)
            codes = jax.numpy.minimum(codes, static.reshape((1,) * (4 - static.ndim)
                                                            + static.shape))
        block_map = codes
    return flash_lib.flash_attention(
        q, k, v, block_map=block_map, mask_fn=mask_fn, scale=scale, sinks=sinks,
        logits_soft_cap=logits_soft_cap, segment_ids=segment_ids, block_q=bq, block_kv=bk,
        return_lse=return_lse, interpret=interpret, backend=backend, score_mod=mod_fn,
        score_mod_operands=tuple(mod_ops), score_mod_axes=tuple(mod_axes), normalizer=normalizer)
