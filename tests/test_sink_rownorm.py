"""Gu et al.'s Sink metric on unnormalized (sigmoid) attention: their evaluation row-normalizes
the weights first (``p / (sum_j p + 1e-8)``); jattn.analysis.sink_score(normalize=True)."""

import numpy as np

from jattn import analysis


def test_raw_sigmoid_weights_clear_the_threshold_but_normalized_ones_do_not():
    # sigmoid(0) = 0.5 on every visible key (an untrained sigmoid head, causal, T = 16): the
    # raw weights put 0.5 > 0.3 on token 0 in every head; row-normalized they are uniform
    # causal weights, alpha_0 = H_16 / 16 = 0.21 < 0.3.
    t = 16
    p = 0.5 * np.tril(np.ones((t, t), np.float32))
    w = np.broadcast_to(p, (2, 3, t, t))
    assert float(analysis.sink_score(w)) == 100.0
    assert float(analysis.sink_score(w, normalize=True)) == 0.0
    # rows that already sum to one are unchanged by normalize
    u = p / p.sum(-1, keepdims=True)
    np.testing.assert_allclose(analysis.sink_importance(np.broadcast_to(u, (1, 2, t, t)),
                                                        normalize=True),
                               analysis.sink_importance(np.broadcast_to(u, (1, 2, t, t))),
                               rtol=1e-6)
