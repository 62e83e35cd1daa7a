"""Context parallelism for linear attention: the sequence split over a mesh axis (LASP-2 style).

Every recurrence in :mod:`jattn.linear` is affine in the state it starts from. With the sequence
``T`` split into ``n`` contiguous shards of ``L = T / n`` steps (shard ``i`` on the ``i``-th
device of the mesh axis), shard ``i`` maps its incoming state ``S_i`` to

    S_{i+1} = A_i S_i + B_i,        o_t = o_t^0 + Q_t S_i   (t in shard i)

where ``B_i`` and ``o^0`` are the end state and outputs of the shard run from a zero state, and
``A_i [K, K]`` / ``Q_t [K]`` are the shard's linear transition and read-out maps:

* GLA (scalar or per-channel gate): ``A_i = diag(exp(sum_t g_t))`` (kept as the log-decay
  vector), ``Q_t = scale * q_t * exp(G_t)`` with ``G_t`` the cumulative gate inside the shard.
* Delta rule (DeltaNet, Gated DeltaNet, KDA): ``A_i = prod_t (I - beta_t k_t^T k_t) diag(exp g_t)``
  (latest step on the left), ``Q_t = scale * q_t prod_{s<=t} (...)``. Both come out of ONE local
  run: the state's columns evolve independently, so appending ``K`` value columns that are zero,
  with the identity as their initial state, makes the extra output columns ``Q_t`` and the extra
  final-state columns ``A_i``. Cost: the value-side work of the local chunk form grows by a
  factor ``(V + K) / V``; the key-side work (``A^kk``, the triangular inverse) is shared.
* Kernelized linear attention: no decay, the state is ``[sum phi(k)^T v | sum phi(k)]``
  (the GLA case with a zero gate and a ones column appended to ``v``); non-causal: a ``psum``.

Algorithm (Sun et al. 2025, "LASP-2: Rethinking Sequence Parallelism for Linear Attention and
Its Hybrid"): each device runs its shard with the local implementation (the chunk form on CPU,
Pallas on GPU/TPU) from a zero state, all-gathers the ``n`` summaries ``(A_j, B_j)`` along the
axis, combines them with a local prefix scan over ``j`` (``S_{j+1} = A_j S_j + B_j`` from the
global ``initial_state``), and corrects its outputs with its incoming state ``S_i``. Every
device computes the same final state ``S_n``. Communication per layer is one all-gather of
``n (K V + K)`` (GLA) or ``n (K V + K K)`` (delta rule) numbers per batch and head, independent
of ``T``; memory per device is ``O(T / n)``. Gradients flow through the local implementation,
the all-gather (transpose: reduce-scatter) and the scan, including to ``initial_state``.

The shard_map is manual over the context axis only; other mesh axes (data, fsdp, tensor) stay
under the compiler's automatic sharding, so a batch sharded over ``data`` stays sharded.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

f32 = jnp.float32


def context_axis_size(context_axis: Any, seq_len: int) -> tuple[tuple[Hashable, ...], int]:
    """Validate ``context_axis`` against the current mesh; return ``(axis names, axis size)``.

    ``context_axis`` is one mesh axis name or a tuple of names (their product splits ``T``).
    Raises ``ValueError`` (naming the argument, the mesh and what to change) when no mesh is
    set, an axis is not in the mesh, or ``seq_len`` is not divisible by the axis size.
    """
    names = tuple(context_axis) if isinstance(context_axis, (tuple, list)) else (context_axis,)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError(
            f"context_axis={context_axis!r} needs a device mesh: call under "
            "`with jax.set_mesh(mesh):` with a mesh that has this axis, or pass context_axis=None"
        )
    missing = [a for a in names if a not in mesh.axis_names]
    if missing or not names or len(set(names)) != len(names):
        raise ValueError(
            f"context_axis={context_axis!r} must name distinct axes of the current mesh "
            f"{dict(mesh.shape)}; {missing or names} not usable: pick one of {mesh.axis_names}"
        )
    n = 1
    for a in names:
        n *= mesh.shape[a]
    if seq_len % n:
        raise ValueError(
            f"context_axis={context_axis!r} splits the sequence over {n} devices, but q/k/v have "
            f"T={seq_len}, not divisible by {n}: pad T to a multiple of {n} (e.g. "
            f"{-(-seq_len // n) * n}) or use a context axis whose size divides {seq_len}"
        )
    return names, n


def _shard_map(body: Callable, names: tuple, in_specs: Any, out_specs: Any) -> Callable:
    """``jax.shard_map`` manual over ``names`` only (other mesh axes stay automatic).

    ``check_vma=False``: the local implementations are not all typed for varying manual axes
    (``pallas_call`` needs a ``manual_axis_type`` on its out shapes; the chunk form's scans start
    from invariant carries). Without the check, shard_map's transpose psums the cotangents of
    replicated inputs (``initial_state``) over the axis, which is the gradient we want; the
    outputs here are all split along the axis, so no replicated output is ever assumed.
    Wrapped in ``jax.jit``: called eagerly, a partial-manual shard_map rejects its own
    out_specs (jax 0.10); under an outer jit the inner one is inlined.
    """
    return jax.jit(jax.shard_map(
        body, in_specs=in_specs, out_specs=out_specs, axis_names=set(names), check_vma=False
    ))


def _prefix_combine(
    A: jax.Array, B: jax.Array, S0: jax.Array, names: tuple, apply: Callable
) -> tuple[jax.Array, jax.Array]:
    """All-gather this device's summary ``(A, B)`` and scan ``S_{j+1} = apply(A_j, S_j) + B_j``.

    Returns ``(S_i, S_n)``: the state entering this device's shard and the state after the last
    shard (the same on every device). ``S0`` is the global initial state.
    """
    A_all = lax.all_gather(A, names)  # [n, ...]
    B_all = lax.all_gather(B, names)

    def step(S, AB):
        return apply(AB[0], S) + AB[1], S

    S_n, S_in = lax.scan(step, S0, (A_all, B_all))
    return S_in[lax.axis_index(names)], S_n


def _apply_decay(log_decay: jax.Array, S: jax.Array) -> jax.Array:
    """``diag(exp(log_decay)) S`` for ``log_decay [B, H, K or 1]``, ``S [B, H, K, V]``."""
    return jnp.exp(log_decay)[..., None] * S


def _apply_matrix(A: jax.Array, S: jax.Array) -> jax.Array:
    """``A S`` for ``A [B, H, K, K]``, ``S [B, H, K, V]``."""
    return jnp.einsum("bhkl,bhlv->bhkv", A, S)


def _seq_specs(xs: dict, names: tuple) -> dict:
    """PartitionSpecs for ``[B, T, ...]`` arrays: T split over the context axis."""
    return {key: P(None, names) for key in xs}


def _final_state(S_n_per_device: jax.Array) -> jax.Array:
    """The final state from the ``[n, ...]`` stack of identical per-device copies."""
    return S_n_per_device[0]


def _run_state_passing(body: Callable, xs: dict, initial_state, names: tuple):
    """Runs ``body(xs, S0) -> (o, S_T[None])`` per device on the sequence-sharded inputs ``xs``
    (``initial_state`` replicated); returns ``(o, S_T)`` (every device holds the same S_T)."""
    specs = _seq_specs(xs, names)
    o, S_n = _shard_map(body, names, (specs, P()), (P(None, names), P(names)))(xs, initial_state)
    return o, _final_state(S_n)


@partial(jax.jit, static_argnames=("scale", "chunk_size", "implementation", "names"))
def _gla_cp(q, k, v, g, initial_state, *, scale, chunk_size, implementation, names):
    from jattn.linear.gla import gla  # the local (unsplit) call; lazy: gla imports this module

    def body(xs, S0):
        q, g, v = xs["q"], xs["g"], xs["v"]
        o0, B = gla(
            q,
            xs["k"],
            v,
            g,
            scale=scale,
            output_final_state=True,
            chunk_size=chunk_size,
            implementation=implementation,
        )
        G = jnp.cumsum(g.astype(f32), axis=1)  # [B, L, H] or [B, L, H, K]
        if G.ndim == 3:
            G = G[..., None]
        S_in, S_n = _prefix_combine(G[:, -1], B, S0, names, _apply_decay)
        q_dec = q.astype(f32) * jnp.exp(G)
        o = o0.astype(f32) + scale * jnp.einsum("bthk,bhkv->bthv", q_dec, S_in)
        return o.astype(o0.dtype), S_n[None]

    return _run_state_passing(body, {"q": q, "k": k, "v": v, "g": g}, initial_state, names)


def gla_context_parallel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    *,
    scale: float,
    initial_state: jax.Array | None,
    output_final_state: bool,
    chunk_size: int,
    implementation: str | None,
    context_axis: Any,
) -> tuple[jax.Array, jax.Array | None]:
    """:func:`jattn.linear.gla` with ``T`` split over the mesh axis ``context_axis``.

    Inputs already validated by ``gla`` (global shapes ``[B, T, H, ...]``); see the module
    docstring for the math. Returns ``(o [B, T, H, V] sharded like q, final_state or None)``.
    """
    B, T, H, K = q.shape
    names, _ = context_axis_size(context_axis, T)
    S0 = _zero_or(initial_state, (B, H, K, v.shape[-1]))
    o, S = _gla_cp(
        q,
        k,
        v,
        g,
        S0,
        scale=scale,
        chunk_size=chunk_size,
        implementation=implementation,
        names=names,
    )
    return o, (S if output_final_state else None)


@partial(
    jax.jit, static_argnames=("scale", "chunk_size", "implementation", "use_qk_l2norm", "names")
)
def _delta_cp(xs, initial_state, *, scale, chunk_size, implementation, use_qk_l2norm, names):
    from jattn.linear.delta import delta_rule  # the local (unsplit) call; lazy (import cycle)

    def body(xs, S0):
        q, v = xs["q"], xs["v"]
        Bsz, L, H, K = q.shape
        V = v.shape[-1]
        # K extra value columns, zero values, identity initial state: they carry the shard's
        # linear maps (read-out Q_t in the outputs, transition A in the final state).
        v_aug = jnp.concatenate([v, jnp.zeros((Bsz, L, H, K), v.dtype)], axis=-1)
        eye = jnp.broadcast_to(jnp.eye(K, dtype=f32), (Bsz, H, K, K))
        S_aug0 = jnp.concatenate([jnp.zeros((Bsz, H, K, V), f32), eye], axis=-1)
        o_aug, S_aug = delta_rule(
            q, xs["k"], v_aug, xs["beta"], g=xs.get("g"), scale=scale, initial_state=S_aug0,
            output_final_state=True, use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size,
            implementation=implementation)
        S_in, S_n = _prefix_combine(S_aug[..., V:], S_aug[..., :V], S0, names, _apply_matrix)
        read_out = o_aug[..., V:].astype(f32)  # scale * q_t P_t, [B, L, H, K]
        o = o_aug[..., :V].astype(f32) + jnp.einsum("bthk,bhkv->bthv", read_out, S_in)
        return o.astype(o_aug.dtype), S_n[None]

    return _run_state_passing(body, xs, initial_state, names)


def delta_rule_context_parallel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    g: jax.Array | None,
    scale: float,
    initial_state: jax.Array | None,
    output_final_state: bool,
    use_qk_l2norm: bool,
    chunk_size: int,
    implementation: str | None,
    context_axis: Any,
) -> tuple[jax.Array, jax.Array | None]:
    """:func:`jattn.linear.delta_rule` with ``T`` split over the mesh axis ``context_axis``.

    The shard transition ``A = prod_t (I - beta_t k_t^T k_t) diag(exp g_t)`` ``[K, K]`` and the
    read-out maps come from one local run with ``K`` identity state columns appended (module
    docstring). Communication: all-gather of ``n (K V + K K)`` per batch and head.
    """
    B, T, H, K = q.shape
    names, _ = context_axis_size(context_axis, T)
    S0 = _zero_or(initial_state, (B, H, K, v.shape[-1]))
    xs = {"q": q, "k": k, "v": v, "beta": beta}
    if g is not None:
        xs["g"] = g
    o, S = _delta_cp(
        xs,
        S0,
        scale=scale,
        chunk_size=chunk_size,
        implementation=implementation,
        use_qk_l2norm=use_qk_l2norm,
        names=names,
    )
    return o, (S if output_final_state else None)


@partial(jax.jit, static_argnames=("normalize", "scale", "names"))
def _linear_noncausal_cp(fq, fk, v, kv0, z0, *, normalize, scale, names):
    from jattn.linear.kernelized import _ratio

    def body(fq, fk, v, kv0, z0):
        kv = kv0 + lax.psum(jnp.einsum("bthf,bthv->bhfv", fk, v.astype(f32)), names)
        z = z0 + lax.psum(fk.sum(1), names)
        num = jnp.einsum("bthf,bhfv->bthv", fq, kv)
        den = jnp.einsum("bthf,bhf->bth", fq, z)
        return _ratio(num, den, normalize, scale), kv[None], z[None]

    seq = P(None, names)
    o, kv, z = _shard_map(body, names, (seq, seq, seq, P(), P()), (seq, P(names), P(names)))(
        fq, fk, v, kv0, z0
    )
    return o, (_final_state(kv), _final_state(z))


def linear_attention_context_parallel(
    fq: jax.Array,
    fk: jax.Array,
    v: jax.Array,
    kv0: jax.Array,
    z0: jax.Array,
    *,
    causal: bool,
    normalize: bool,
    scale: float,
    chunk_size: int,
    implementation: str | None,
    context_axis: Any,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """:func:`jattn.linear.linear_attention` on feature-mapped ``fq, fk [B, T, H, F]`` (fp32)
    with ``T`` split over ``context_axis``; returns ``(o fp32, (kv, z))``.

    Causal: the GLA combine with a zero gate on ``[v | 1]`` (state ``[kv | z]``), then the
    ratio. Non-causal: ``kv = kv0 + psum(phi(k)^T v)``, ``z = z0 + psum(phi(k))``.
    """
    from jattn.linear.kernelized import _ratio

    B, T, H, F = fq.shape
    V = v.shape[-1]
    names, _ = context_axis_size(context_axis, T)
    if not causal:
        if implementation == "pallas":
            raise NotImplementedError(
                "implementation='pallas': linear_attention with causal=False has no kernel; "
                "use 'chunk'"
            )
        return _linear_noncausal_cp(
            fq, fk, v, kv0, z0, normalize=normalize, scale=scale, names=names
        )
    v_aug = jnp.concatenate([v.astype(f32), jnp.ones((B, T, H, 1), f32)], axis=-1)
    S0 = jnp.concatenate([kv0, z0[..., None]], axis=-1)
    o_aug, S = _gla_cp(
        fq,
        fk,
        v_aug,
        jnp.zeros((B, T, H), f32),
        S0,
        scale=1.0,
        chunk_size=chunk_size,
        implementation=implementation,
        names=names,
    )
    o = _ratio(o_aug[..., :V].astype(f32), o_aug[..., V].astype(f32), normalize, scale)
    return o, (S[..., :V], S[..., V])


def _zero_or(state: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    return jnp.zeros(shape, f32) if state is None else state.astype(f32)
