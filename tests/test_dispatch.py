"""Implementation choice (jattn._dispatch) and its use by jattn.attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jattn
from jattn import _dispatch, _pallas_dispatch
from jattn import masks as M
from jattn.testing import assert_close

IMPLS = ("reference", "xla", "pallas")


def test_choose_resolves_requests_and_says_why_it_fell_back():
    on_cpu = _dispatch.choose(None, IMPLS, fallback="xla", accelerator=False)
    assert (on_cpu.name, on_cpu.explicit) == ("xla", False)
    assert "no accelerator" in on_cpu.reason
    lacking = _dispatch.choose(None, IMPLS, fallback="xla", accelerator=True,
                               unsupported=lambda: "bias is not supported")
    assert (lacking.name, lacking.reason) == ("xla", "bias is not supported")
    kernel = _dispatch.choose(None, IMPLS, fallback="xla", accelerator=True)
    assert (kernel.name, kernel.explicit, kernel.reason) == ("pallas", False, None)
    asked = _dispatch.choose("reference", IMPLS, fallback="xla", accelerator=True,
                             unsupported=lambda: pytest.fail("not a kernel candidate"))
    assert (asked.name, asked.explicit) == ("reference", True)
    with pytest.raises(NotImplementedError, match="bias"):
        _dispatch.choose("pallas", IMPLS, fallback="xla", unsupported=lambda: "bias")
    with pytest.raises(ValueError, match="implementation must be None or one of"):
        _dispatch.choose("cudnn", IMPLS, fallback="xla")
    # jattn.linear's spelling: "xla" is an alias of its chunked path.
    linear = ("reference", "recurrent", "chunk", "xla", "pallas")
    alias = _dispatch.choose("xla", linear, fallback="chunk", aliases={"xla": "chunk"})
    assert (alias.name, alias.requested) == ("chunk", "xla")


def test_run_falls_back_only_when_the_kernel_was_not_requested():
    def kernel():
        raise NotImplementedError("chunk_size 7")

    default = _dispatch.choose(None, IMPLS, fallback="xla", accelerator=True)
    got = _dispatch.run(default, kernel, lambda c: (c.name, c.reason))
    assert got == ("xla", "chunk_size 7")
    asked = _dispatch.choose("pallas", IMPLS, fallback="xla")
    with pytest.raises(NotImplementedError, match="chunk_size 7"):
        _dispatch.run(asked, kernel, lambda c: c.name)
    assert _dispatch.run(asked, lambda: "kernel", lambda c: c.name) == "kernel"


def test_attention_default_on_an_accelerator(monkeypatch):
    # implementation=None on GPU/TPU: supported calls go to the flash kernel (interpret mode
    # here), unsupported ones (relu, bias) to xla without ever calling it.
    calls = []
    real = _pallas_dispatch.attention_pallas

    def spy(*args, **kwargs):
        calls.append(kwargs["normalizer"])
        return real(*args, **kwargs)

    monkeypatch.setattr(_dispatch, "on_accelerator", lambda: True)
    monkeypatch.setattr(_pallas_dispatch, "attention_pallas", spy)
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (1, 16, 2, 16)) for kk in ks)
    want = jattn.attention(q, k, v, mask=M.causal(), implementation="reference")
    assert_close(jattn.attention(q, k, v, mask=M.causal()), want)
    assert calls == ["softmax"]
    jattn.attention(q, k, v, normalizer="relu")
    jattn.attention(q, k, v, bias=jnp.zeros((16, 16)))
    assert calls == ["softmax"]
    monkeypatch.setattr(_dispatch, "on_accelerator", lambda: False)
    jattn.attention(q, k, v, mask=M.causal())
    assert calls == ["softmax"]
