"""Shared check for the He et al. (2025) ICL-regression pattern metrics of an ideal model
(``KQ_h = omega_h I``, ``OV_h`` zero but for ``mu_h`` at ``[-1, -1]``, zero-sum heads)."""

from __future__ import annotations

import numpy as np


def assert_ideal_patterns(
    pat, omega, mu, *, zero_sum_atol: float = 1e-7, omega_rtol: float = 1e-6
) -> None:
    """``pat`` (``jattn.analysis.icl_patterns`` output) is the ideal model's: ratios 1, zero-sum
    0, and ``omega`` / ``mu`` as constructed."""
    np.testing.assert_allclose(pat["kq_diagonal_ratio"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(pat["kq_homogeneity"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(pat["ov_last_entry_ratio"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(pat["ov_zero_sum_ratio"], 0.0, atol=zero_sum_atol)
    np.testing.assert_allclose(pat["omega"], omega, rtol=omega_rtol)
    np.testing.assert_allclose(pat["mu"], mu, rtol=1e-6)
