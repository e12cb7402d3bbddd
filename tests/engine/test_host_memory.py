"""The pinned host pool that offloading asks XLA for: sized from the experts' bytes before the backend starts,
never over a value the user set."""

import jax._src.xla_bridge as xla_bridge

from moejax.engine import host_memory as hm


def test_the_pool_holds_the_experts_twice_while_they_are_stacked(monkeypatch):
    monkeypatch.delenv(hm.PINNED_POOL_ENV, raising=False)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setattr(hm, "total_host_memory", lambda: 1024 * hm.GIB)
    assert hm.pinned_pool_bytes() == 64 * hm.GIB  # XLA's default without the variable
    host = 60 * hm.GIB
    gib = hm.size_pinned_pool(host)
    assert gib * hm.GIB >= host * 2 and gib <= 123
    assert hm.pinned_pool_bytes() == gib * hm.GIB
    monkeypatch.setenv(hm.PINNED_POOL_ENV, "500")  # the user's value stays
    assert hm.size_pinned_pool(host) is None and hm.pinned_pool_bytes() == 500 * hm.GIB


def test_the_pool_is_capped_at_ram_and_left_alone_once_jax_started(monkeypatch):
    monkeypatch.delenv(hm.PINNED_POOL_ENV, raising=False)
    monkeypatch.setattr(hm, "total_host_memory", lambda: 100 * hm.GIB)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    assert hm.size_pinned_pool(90 * hm.GIB) is None
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    assert hm.size_pinned_pool(90 * hm.GIB) == 100
