"""Which implementation serves a call: one explicit choice, shared by jattn's public functions.

A public function takes ``implementation=None`` or a name from its own tuple (attention:
``reference / xla / pallas``; ``jattn.linear``: ``reference / recurrent / chunk / xla /
pallas``). :func:`choose` resolves that to a :class:`Choice`: the name that runs, whether the
caller asked for it, and for ``None`` why the accelerator kernel was not picked. The rules:

* a named implementation runs as asked (``aliases`` may rename it, e.g. linear's ``xla`` ->
  ``chunk``); asking for the kernel when ``unsupported`` gives a reason raises
  ``NotImplementedError`` with that reason;
* ``None`` picks the kernel on GPU/TPU when ``unsupported`` finds no reason, else the fallback.

Some limits are known only to the kernel itself (it raises ``NotImplementedError``): :func:`run`
then falls back when the kernel was picked by default and re-raises when it was asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TypeVar

import jax

__all__ = ["KERNEL", "Choice", "on_accelerator", "choose", "run"]

KERNEL = "pallas"  # the accelerator kernels' implementation name, in every public function

T = TypeVar("T")


def on_accelerator() -> bool:
    """Whether the default backend is a GPU or TPU (where the Pallas kernels compile)."""
    return jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")


@dataclasses.dataclass(frozen=True)
class Choice:
    """A resolved implementation.

    Attributes:
      name: the implementation that runs (after aliases).
      requested: what the caller passed (``None`` = "pick for me").
      fallback: what runs instead if the kernel, picked by default, turns the call down.
      reason: for ``requested=None`` when the kernel was not picked: why (no accelerator, or
        the feature the kernel lacks); otherwise None.
    """

    name: str
    requested: str | None
    fallback: str
    reason: str | None = None

    @property
    def explicit(self) -> bool:
        """True when the caller named the implementation: its failures must not fall back."""
        return self.requested is not None

    def fall_back(self, reason: str) -> Choice:
        """The fallback choice, recording why."""
        return dataclasses.replace(self, name=self.fallback, reason=reason)


def choose(implementation: str | None, implementations: tuple[str, ...], *, fallback: str,
           aliases: Mapping[str, str] | None = None,
           unsupported: Callable[[], str | None] | None = None,
           accelerator: bool | None = None) -> Choice:
    """Resolve ``implementation`` (None or one of ``implementations``) to a :class:`Choice`.

    Args:
      implementation: the caller's request.
      implementations: the valid names (a ValueError names them otherwise).
      fallback: the implementation ``None`` resolves to when the kernel is not used.
      aliases: renames applied to a requested name (e.g. ``{"xla": "chunk"}``).
      unsupported: returns why the kernel cannot serve this call (None if it can); called only
        when the kernel is a candidate.
      accelerator: whether the kernel may be picked by default (default: :func:`on_accelerator`).

    Raises:
      ValueError: unknown ``implementation``.
      NotImplementedError: ``implementation == "pallas"`` and ``unsupported()`` gives a reason.
    """
    if implementation is not None and implementation not in implementations:
        raise ValueError(f"implementation must be None or one of {implementations}, "
                         f"got {implementation!r}")
    why_not = unsupported or (lambda: None)
    if implementation is None:
        if not (on_accelerator() if accelerator is None else accelerator):
            return Choice(fallback, None, fallback,
                          f"no accelerator (default backend {jax.default_backend()!r})")
        reason = why_not()
        if reason is not None:
            return Choice(fallback, None, fallback, reason)
        return Choice(KERNEL, None, fallback)
    name = (aliases or {}).get(implementation, implementation)
    if name == KERNEL and (reason := why_not()) is not None:
        raise NotImplementedError(reason)
    return Choice(name, implementation, fallback)


def run(choice: Choice, kernel: Callable[[], T], other: Callable[[Choice], T]) -> T:
    """Call ``kernel()`` if the choice is the kernel, else ``other(choice)``.

    A kernel picked by default that raises ``NotImplementedError`` falls back:
    ``other(choice.fall_back(message))``; one the caller asked for re-raises.
    """
    if choice.name != KERNEL:
        return other(choice)
    try:
        return kernel()
    except NotImplementedError as e:
        if choice.explicit:
            raise
        return other(choice.fall_back(str(e)))
