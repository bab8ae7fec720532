"""The fault injector: parsing, determinism and counting (pure)."""

from __future__ import annotations

import pytest

from exo_stable.wire.faults import ENV_VAR, FaultConfig, FaultInjector


def test_parse_and_env() -> None:
    spec = "drop=0.02,dup=0.02,reorder=4,corrupt=0.01,cut_every=2000,seed=7"
    cfg = FaultConfig.parse(spec)
    assert cfg == FaultConfig(drop=0.02, dup=0.02, reorder=4, corrupt=0.01, cut_every=2000, seed=7)
    assert cfg.active
    assert FaultConfig.from_env({ENV_VAR: spec}) == cfg
    assert FaultConfig.from_env({}) is None
    assert not FaultConfig().active
    with pytest.raises(ValueError, match="bad fault item"):
        FaultConfig.parse("lose=0.1")
    with pytest.raises(ValueError, match="not within"):
        FaultConfig.parse("drop=2")


def _frame(i: int) -> bytes:
    b = i.to_bytes(4, "little")
    return b + b  # a single flipped byte can never turn one frame into another


def _run(cfg: FaultConfig, n: int = 5000) -> tuple[list[bytes], FaultInjector, int]:
    inj = FaultInjector(cfg, stream="a->b")
    out: list[bytes] = []
    cuts = 0
    for i in range(n):
        o = inj.process(_frame(i))
        out += o.frames
        cuts += o.cut
    out += inj.flush()
    return out, inj, cuts


def test_same_seed_same_faults_and_everything_counted() -> None:
    cfg = FaultConfig(drop=0.05, dup=0.05, reorder=4, corrupt=0.05, delay=0.01, cut_every=1000, seed=3)
    a, inj, cuts = _run(cfg)
    b, _, _ = _run(cfg)
    assert a == b
    c = inj.counts
    assert c.frames == 5000 and cuts == c.cuts == 5
    assert c.dropped > 0 and c.duplicated > 0 and c.corrupted > 0 and c.delayed > 0 and c.reordered > 0
    assert len(a) == 5000 - c.dropped + c.duplicated - c.discarded_on_cut
    originals = {_frame(i) for i in range(5000)}
    assert sum(f not in originals for f in a) == c.corrupted
    other, _, _ = _run(FaultConfig(drop=0.05, dup=0.05, reorder=4, corrupt=0.05, seed=4))
    assert other != a


def test_no_faults_pass_through_in_order() -> None:
    out, inj, cuts = _run(FaultConfig(), 100)
    assert out == [_frame(i) for i in range(100)] and cuts == 0
    assert inj.counts.as_dict()["frames"] == 100


def test_link_config_reads_faults_from_the_environment() -> None:
    from exo_stable.wire.peerlink import LinkConfig

    cfg = LinkConfig.from_env({ENV_VAR: "drop=0.5,seed=2"}, window=8)
    assert cfg.faults == FaultConfig(drop=0.5, seed=2) and cfg.window == 8
    assert LinkConfig.from_env({}).faults is None
