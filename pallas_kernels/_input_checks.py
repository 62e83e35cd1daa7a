"""Value checks on inputs that the kernels and `jattn.linear` share (jax only, no jattn).

`jattn.linear._checks` imports these, so a public `jattn.linear` function and the kernel it
dispatches to reject the same inputs with the same message."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def is_traced(x: Any) -> bool:
    """True when the values of ``x`` cannot be read here: a JAX tracer (under jit / grad /
    vmap), or an array spread over several hosts (not fully addressable)."""
    return isinstance(x, jax.core.Tracer) or not getattr(x, "is_fully_addressable", True)


def check_log_decay_values(name: str, g: Any) -> None:
    """Reject a concrete log-decay gate with an entry > 0 or NaN (``-inf``, a full reset, is
    valid). Traced gates cannot be inspected without a host sync inside the trace, so they are
    not checked: positive values there are undefined behaviour (implementations disagree)."""
    if is_traced(g):
        return
    with jax.ensure_compile_time_eval():  # concrete values inside a jit trace too
        num_bad = int(jnp.sum(~(jnp.asarray(g) <= 0)))  # NaN fails `<= 0` too
        if num_bad:
            raise ValueError(
                f"{name} is a log-decay and must be <= 0 everywhere (-inf: full reset), got "
                f"{num_bad} {'entry' if num_bad == 1 else 'entries'} > 0 or NaN "
                f"(max {float(jnp.max(g))}); a decay exp({name}) > 1 would grow the state"
            )
