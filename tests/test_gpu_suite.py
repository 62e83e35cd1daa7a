"""``benchmarks/gpu_suite.py`` on CPU: the ``--smoke`` run walks every part (correctness vs the
fp32 reference, flash and chunk timing, crossover) at tiny sizes in interpret mode, so the one
GPU call of issues 21/22 does not die on a Python error; peers that need a GPU are recorded as
skipped with a reason; the budget skips what it cannot afford; the crossover interpolates."""

from __future__ import annotations

import json
import math
import types

import pytest

from benchmarks import gpu_suite


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "smoke.json"
    gpu_suite.main(["--smoke", "--seed", "3", "--out", str(out)])
    return json.loads(out.read_text())


def test_smoke_checks_pass_and_cover_both_families(smoke):
    checks = [r for r in smoke["rows"] if r["part"] == "check"]
    assert {r["family"] for r in checks} == {"flash", "chunk"}
    for r in checks:
        assert r["status"] == "ok", r
        assert r["max_rel_err"] <= r["tol"]
    flash = next(r for r in checks if r["family"] == "flash")
    assert {"o", "lse", "dq", "dk", "dv", "dsinks"} <= set(flash["errors"])  # fwd + every grad
    chunk = next(r for r in checks if r["family"] == "chunk")
    assert {"o", "state", "dq", "dk", "dv", "dg", "dbeta", "dinitial_state"} <= set(
        chunk["errors"])
    assert smoke["seed"] == 3 and smoke["machine"]["platform"] == "cpu"


def test_smoke_timing_rows_measure_or_say_why(smoke):
    timed = [r for r in smoke["rows"] if r["part"] == "time"]
    assert {r["family"] for r in timed} == {"flash", "chunk"}
    for r in timed:
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["tflops"] > 0 and r["compile_s"] > 0
        else:
            assert r["status"] == "skipped" and r["reason"], r
    by = {(r["case"], r["impl"]): r for r in timed}
    assert by[("2 documents", "cudnn")]["reason"] == "needs a CUDA GPU"
    assert by[("2 documents", "jattn pallas")]["status"] == "ok"
    assert by[("2 documents", "jax mha")]["status"] == "ok"
    assert by[("chunk T=64", "Gated DeltaNet pallas")]["status"] == "ok"
    crossings = [r for r in smoke["rows"] if r["part"] == "crossover"]
    assert crossings and all(r["status"] == "skipped" for r in crossings)  # no cuDNN here


def test_spent_budget_skips_everything_with_the_reason(tmp_path):
    out = tmp_path / "none.json"
    gpu_suite.main(["--smoke", "--budget", "0", "--part", "check", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["status"] == "skipped" and "budget" in r["reason"] for r in rows)


def test_density_matches_the_standard_counts():
    assert gpu_suite._density("causal", 4, None, None) == 10 / 16
    assert gpu_suite._density("window", 4, 2, None) == 7 / 16
    seg = [[0, 0, 1, 1]]  # two causal documents of 2: 3 + 3 visible pairs
    assert gpu_suite._density("documents", 4, 2, seg) == 6 / 16


def test_crossover_interpolates_where_the_ratio_crosses_one():
    run = types.SimpleNamespace(rows=[])
    run.row = lambda **f: run.rows.append(f) or f
    for t, ratio in ((4096, 2.0), (16384, 0.5), (65536, 0.25)):
        run.rows.append(dict(impl="GLA pallas", mode="fwd+bwd", case=f"chunk T={t}",
                             **{"vs_softmax cudnn": ratio}))
    for t, ratio in ((4096, 0.9), (16384, 0.5)):
        run.rows.append(dict(impl="KDA pallas", mode="fwd+bwd", case=f"chunk T={t}",
                             **{"vs_softmax cudnn": ratio}))
    gpu_suite.crossover(run)
    got = {r["impl"]: r for r in run.rows if r.get("part") == "crossover"}
    # ratio 2 -> 0.5 over 4K -> 16K (log-linear): crosses 1 halfway, at 8K
    assert math.isclose(got["GLA pallas"]["crossover_T"], 8192.0, rel_tol=1e-9)
    assert got["KDA pallas"]["crossover_T"] == "<= 4096"
    assert got["Gated DeltaNet pallas"]["status"] == "skipped"


def test_a_wrong_kernel_fails_its_check(tmp_path, monkeypatch):
    """The checks can fail: kernels whose outputs are 5% off are reported ``failed`` with
    their errors (a check comparing a kernel with itself would pass them)."""
    from benchmarks import gpu_suite_checks as checks

    attend, chunk_call = checks._attend, checks.chunk_call

    def off(call, impl):
        if impl == "reference":
            return call
        return lambda **a: {n: x * 1.05 for n, x in call(**a).items()}

    monkeypatch.setattr(checks, "_attend", lambda impl, kw: off(attend(impl, kw), impl))
    monkeypatch.setattr(checks, "chunk_call", lambda kind, impl: off(chunk_call(kind, impl),
                                                                      impl))
    out = tmp_path / "broken.json"
    gpu_suite.main(["--smoke", "--seed", "3", "--part", "check", "--out", str(out)])
    rows = [r for r in json.loads(out.read_text())["rows"] if r["part"] == "check"]
    assert {r["family"] for r in rows} == {"flash", "chunk"}
    for r in rows:
        assert r["status"] == "failed" and r["max_rel_err"] > r["tol"], r
