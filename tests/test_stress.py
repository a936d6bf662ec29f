"""The soak's bounded form: `make stress`'s code path and checks (bench/stress.py), for 60 s instead of 600, with
max_requests lowered so that workers are recycled under load here too."""

from conftest import ROOT

from bench.stress import run


def test_soak_holds_under_mixed_load_with_a_rollout():
    """Mixed load at 48 connections with a rollout midway: no 5xx, no failed request, memory bounded, no descriptor
    or Redis connection leak, no secret in the logs (p99 stability is reported; only make stress's one-minute windows
    judge it)."""
    summary = run(60, connections=48, out=ROOT / "test-artifacts" / "stress.json", max_requests=5000)
    failed = [f"{c['check']}: {c['detail']}" for c in summary["checks"] if not c["ok"]]
    assert not failed, "\n".join(failed)
    assert summary["worker_restarts"] > 0  # max_requests recycled a worker under load
