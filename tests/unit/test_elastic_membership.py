"""A torchrun worker names the setting that nodes joining a running job need (the join and the leave
themselves, with real nodes: tests/e2e/test_elastic_membership.py)."""

from __future__ import annotations

from distvision.parallel.launch import PRIVATE_STORE_VARIABLE, warn_if_store_is_shared


def test_a_worker_of_torchrun_with_a_shared_store_warns_once(monkeypatch, capsys):
    """Rank 0 names the torchrun setting that the elastic paths need, on its first start only."""
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    warn_if_store_is_shared()
    assert f"{PRIVATE_STORE_VARIABLE}=1" in capsys.readouterr().err
    later = [("TORCHELASTIC_RESTART_COUNT", "1"), ("RANK", "1"), ("TORCHELASTIC_USE_AGENT_STORE", "False")]
    for variable, value in later:
        monkeypatch.setenv(variable, value)
        warn_if_store_is_shared()
        assert capsys.readouterr().err == ""
