"""Argument checking shared by the variants' public functions."""

from __future__ import annotations

from typing import NamedTuple

import jax

from jattn._attention_inputs import _prepare
from jattn._common import Spec

IMPLEMENTATIONS = ("reference", "xla")


class Call(NamedTuple):
    """A checked call: the static spec, ``bias [Bb, Hb, Tq, Tk]`` and a dense bool mask
    ``[Bm, Hm, Tq, Tk]`` (each or None), and the implementation that runs."""

    spec: Spec
    bias: jax.Array | None
    dense_mask: jax.Array | None
    implementation: str


def prepare(name: str, q, k, v, *, mask, bias=None, scale=None, logits_soft_cap=None,
            implementation=None) -> Call:
    """Validate as ``jattn.attention`` does (shapes, GQA ratio, mask, bias, scale, cap).

    ``implementation``: ``None`` (= ``"xla"``), ``"reference"`` or ``"xla"``; the variants have
    no Pallas kernel, so ``"pallas"`` is a NotImplementedError naming the variant.
    """
    if implementation == "pallas":
        raise NotImplementedError(f"{name} has no Pallas kernel; use implementation='xla' "
                                  "(blocked, memory-efficient) or 'reference'")
    if implementation not in (None,) + IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None, 'reference' or 'xla' for {name}, got "
                         f"{implementation!r}")
    spec, bias4, _, dense, _, _ = _prepare(
        q, k, v, mask=mask, bias=bias, scale=scale, normalizer="softmax", sinks=None,
        logits_soft_cap=logits_soft_cap, segment_ids=None, return_lse=False,
        implementation=None)
    return Call(spec, bias4, dense, implementation or "xla")
