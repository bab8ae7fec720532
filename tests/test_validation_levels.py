"""Validation levels, pure parts: the level order, the seeded spot-check choice, delta checks per level,
adaptive strictness (both ways, table-driven and with hypothesis), the stage fault injector, and what
``off`` skips in the token and activation validators."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_stable.pipeline.levels import (
    LIGHT_OUTPUT_EVERY,
    OUTPUT_WINDOW,
    AdaptiveConfig,
    AdaptiveStrictness,
    DeltaChecker,
    IntegrityCounters,
    OutputWatch,
    ValidationLevel,
    parse_level,
    spot_check_chosen,
)
from exo_stable.pipeline.stagefaults import StageFaultConfig, StageFaults
from exo_stable.pipeline.validators import TokenValidator
from exo_stable.wire.messages import TensorPayload, TokenChunk, ValidationError
from exo_stable.wire.tensors import ActivationAssembler, TensorError, chunk_activation
from exo_stable.wire.validation import TokenTransferValidator

OFF, LIGHT, STRICT = ValidationLevel.OFF, ValidationLevel.LIGHT, ValidationLevel.STRICT

# ------------------------------------------------------------------------------------------------ levels


def test_levels_parse_and_order() -> None:
    assert parse_level(" Strict ") is STRICT
    assert [parse_level(x) for x in ("off", "light", "strict")] == [OFF, LIGHT, STRICT]
    with pytest.raises(ValueError, match="off, light or strict"):
        parse_level("paranoid")
    assert OFF.raised() is LIGHT and LIGHT.raised() is STRICT and STRICT.raised() is STRICT
    assert STRICT.lowered() is LIGHT and OFF.lowered() is OFF
    assert STRICT.at_least(LIGHT) and not OFF.at_least(LIGHT)


# ------------------------------------------------------------------------------------------ spot checks


def test_spot_check_fraction_edges_and_rate() -> None:
    assert not any(spot_check_chosen(0.0, 1, "r", step, 0) for step in range(200))
    assert all(spot_check_chosen(1.0, 1, "r", step, 0) for step in range(200))
    chosen = sum(spot_check_chosen(0.1, 7, "req-a", step, 1) for step in range(20_000))
    assert 1_700 < chosen < 2_300  # 10% of 20000, within about 5 standard deviations


@given(st.floats(0.0, 1.0), st.integers(0, 2**64), st.text(max_size=12), st.integers(0, 10**6), st.integers(0, 8))
def test_spot_check_choice_is_reproducible(fraction: float, seed: int, rid: str, step: int, stage: int) -> None:
    assert spot_check_chosen(fraction, seed, rid, step, stage) == spot_check_chosen(fraction, seed, rid, step, stage)


def test_spot_check_choice_depends_on_seed_and_request() -> None:
    a = [spot_check_chosen(0.5, 1, "r1", s, 0) for s in range(64)]
    assert a != [spot_check_chosen(0.5, 2, "r1", s, 0) for s in range(64)]
    assert a != [spot_check_chosen(0.5, 1, "r2", s, 0) for s in range(64)]


# ------------------------------------------------------------------------------------------ text deltas

LONE_SURROGATE = "ok \ud800 no"
DELTAS: list[tuple[str, str, ValidationLevel, bool | None]] = [
    # (name, text, level, expected: None = passes, True = fatal, False = suspicious only)
    ("clean ascii off", "Hello, world.\n", OFF, None),
    ("clean ascii light", "Hello, world.\n", LIGHT, None),
    ("clean multilingual strict", "Grüße, 東京, Привет, 👋🏽\tok", STRICT, None),
    ("code strict", "def f(x):\r\n    return x  # ok", STRICT, None),
    ("lone surrogate off", LONE_SURROGATE, OFF, None),
    ("lone surrogate light", LONE_SURROGATE, LIGHT, True),
    ("lone surrogate strict", LONE_SURROGATE, STRICT, True),
    ("replacement char light", "bro\ufffdken", LIGHT, None),
    ("replacement char strict", "bro\ufffdken", STRICT, False),
    ("control char light", "bell\x07", LIGHT, None),
    ("control char strict", "bell\x07", STRICT, False),
    ("C1 control strict", "x\x85y", STRICT, False),
]


@pytest.mark.parametrize(("name", "text", "level", "expected"), DELTAS, ids=[d[0] for d in DELTAS])
def test_delta_checks_per_level(name: str, text: str, level: ValidationLevel, expected: bool | None) -> None:
    checker = DeltaChecker(level)
    found = checker.check(text)
    if expected is None:
        assert found is None, found
    else:
        assert found is not None
        assert found.fatal is expected
        assert found.result.error_type is ValidationError.BAD_ENCODING
    assert checker.invalid_utf8 == (1 if expected is True else 0)
    assert checker.suspicious == (1 if expected is False else 0)
    assert checker.checked == (0 if level is OFF else 1)


# ---------------------------------------------------------------------------------- adaptive strictness


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def adaptive(base: ValidationLevel = LIGHT, **config: float | int | bool) -> tuple[AdaptiveStrictness, Clock]:
    clock = Clock()
    policy = AdaptiveStrictness(base, AdaptiveConfig(**config), clock=clock)  # type: ignore[arg-type]
    policy.observe(IntegrityCounters())
    return policy, clock


def test_adaptive_rises_on_corruption_and_falls_back_after_a_clean_window() -> None:
    policy, clock = adaptive(LIGHT, clean_window_s=60.0)
    assert policy.effective() is LIGHT and policy.effective(OFF) is OFF
    clock.now = 1.0
    assert policy.observe(IntegrityCounters(corruptions=1)) is STRICT
    assert policy.effective() is STRICT and policy.effective(OFF) is STRICT
    assert policy.raises == 1 and "corruption" in policy.last_reason
    clock.now = 30.0
    assert policy.observe(IntegrityCounters(corruptions=1)) is STRICT  # nothing new, window not over
    clock.now = 61.5
    assert policy.observe(IntegrityCounters(corruptions=1)) is OFF  # one step down reaches the base: raise over
    assert policy.effective() is LIGHT and policy.effective(OFF) is OFF
    assert policy.lowers == 1


def test_adaptive_from_off_climbs_one_step_at_a_time_and_descends_the_same_way() -> None:
    policy, clock = adaptive(OFF, min_raise_interval_s=5.0, clean_window_s=60.0)
    clock.now = 1.0
    assert policy.observe(IntegrityCounters(corruptions=1)) is LIGHT
    clock.now = 2.0  # within min_raise_interval_s: a second burst does not climb yet
    assert policy.observe(IntegrityCounters(corruptions=2)) is LIGHT
    clock.now = 8.0
    assert policy.observe(IntegrityCounters(corruptions=3)) is STRICT
    clock.now = 8.0 + 60.0
    assert policy.observe(IntegrityCounters(corruptions=3)) is LIGHT
    clock.now = 8.0 + 90.0  # the next step down needs another whole clean window
    assert policy.observe(IntegrityCounters(corruptions=3)) is LIGHT
    clock.now = 8.0 + 120.0
    assert policy.observe(IntegrityCounters(corruptions=3)) is OFF
    assert policy.effective() is OFF


def test_adaptive_rises_on_retransmits_in_the_window_only() -> None:
    policy, clock = adaptive(LIGHT, window_s=30.0, raise_retransmits=50)
    clock.now = 10.0
    assert policy.observe(IntegrityCounters(retransmits=49)) is OFF
    clock.now = 50.0  # 49 old retransmits fell out of the window; 30 new ones are not enough
    assert policy.observe(IntegrityCounters(retransmits=79)) is OFF
    clock.now = 55.0
    assert policy.observe(IntegrityCounters(retransmits=130)) is STRICT
    assert "retransmits" in policy.last_reason


def test_adaptive_never_lowers_what_was_asked_and_can_be_disabled() -> None:
    policy, clock = adaptive(STRICT)
    clock.now = 1.0
    assert policy.observe(IntegrityCounters(corruptions=5)) is OFF  # nothing above strict
    assert policy.raises == 0 and policy.effective() is STRICT
    off, clock = adaptive(LIGHT, enabled=False)
    clock.now = 1.0
    assert off.observe(IntegrityCounters(corruptions=5, retransmits=10_000)) is OFF
    assert off.effective() is LIGHT and off.snapshot()["enabled"] is False


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(list(ValidationLevel)),
    st.lists(st.tuples(st.floats(0.0, 50.0), st.integers(0, 3), st.integers(0, 80)), max_size=40),
    st.sampled_from([None, *ValidationLevel]),
)
def test_adaptive_properties(
    base: ValidationLevel, steps: list[tuple[float, int, int]], requested: ValidationLevel | None
) -> None:
    """Whatever happens: the effective level is never below what was asked; counters only move up; and a
    long enough clean period always brings the floor back to ``off`` (no raise)."""
    clock = Clock()
    policy = AdaptiveStrictness(base, AdaptiveConfig(clean_window_s=60.0), clock=clock)
    corruptions = retransmits = 0
    for dt, new_c, new_r in steps:
        clock.now += dt
        corruptions += new_c
        retransmits += new_r
        policy.observe(IntegrityCounters(corruptions, retransmits))
        asked = base if requested is None else requested
        assert policy.effective(requested).at_least(asked)
        assert policy.floor is OFF or policy.floor.rank > base.rank
    for _ in range(3):
        clock.now += 61.0
        policy.observe(IntegrityCounters(corruptions, retransmits + 0))
    # Retransmits seen in the last window may still count: one more clean window after they age out.
    clock.now += 61.0
    policy.observe(IntegrityCounters(corruptions, retransmits))
    assert policy.floor is OFF
    assert policy.effective(requested) is (base if requested is None else requested)


# ------------------------------------------------------------------------------------------ stage faults


def test_stage_fault_config_parse_and_env() -> None:
    cfg = StageFaultConfig.parse("act_memory=1, stage=0, skip=2, limit=1, seed=9")
    assert cfg == StageFaultConfig(act_memory=1.0, stage=0, skip=2, limit=1, seed=9)
    assert cfg.applies_to(0) and not cfg.applies_to(1)
    assert StageFaultConfig.from_env({}) is None
    assert StageFaultConfig.from_env({"EXO_STABLE_INTEGRITY_FAULTS": "token=0.5"}) == StageFaultConfig(token=0.5)
    assert not StageFaultConfig().active
    with pytest.raises(ValueError, match="bad stage fault item"):
        StageFaultConfig.parse("flip=1")
    with pytest.raises(ValueError, match="within"):
        StageFaultConfig(token=2.0)


def test_stage_faults_skip_limit_and_what_they_change() -> None:
    data = bytes(range(64))
    faults = StageFaults(StageFaultConfig(act_memory=1.0, skip=2, limit=1), stage=3)
    assert faults.memory("float32", data) == data
    assert faults.memory("float32", data) == data
    hit = faults.memory("float32", data)
    diff = [i for i in range(64) if hit[i] != data[i]]
    assert len(diff) == 1 and diff[0] % 4 == 3 and hit[diff[0]] ^ data[diff[0]] == 0x40
    assert faults.memory("float32", data) == data  # the limit is spent
    assert faults.counts.as_dict() == {"act_compute": 0, "act_memory": 1, "token": 0}
    token = StageFaults(StageFaultConfig(token=1.0), stage=0)
    assert token.token(100) == 101 and token.token(7) == 6
    other = StageFaults(StageFaultConfig(act_compute=1.0, stage=1), stage=0)
    assert not other.enabled and other.compute("bfloat16", data) == data


def test_stage_faults_are_seeded() -> None:
    data = bytes(4096)
    a = StageFaults(StageFaultConfig(act_compute=0.5, seed=3), stage=1)
    b = StageFaults(StageFaultConfig(act_compute=0.5, seed=3), stage=1)
    assert [a.compute("float16", data) for _ in range(20)] == [b.compute("float16", data) for _ in range(20)]
    assert 0 < a.counts.act_compute < 20


# ------------------------------------------------------------------------ what ``off`` skips, and keeps


def test_token_validator_off_skips_the_checksum_only() -> None:
    sealed = TokenTransferValidator().seal(
        TokenChunk(request_id="r", sequence_position=3, token_id=40, source_device_rank=1)
    )
    altered = msgspec.structs.replace(sealed, token_id=41)
    light = TokenValidator(100, request_id="r")
    off = TokenValidator(100, request_id="r", verify_checksum=False)
    assert light.validate_token(altered).error_type is ValidationError.CHECKSUM_MISMATCH
    assert off.validate_token(altered).is_valid
    # What off keeps: the request id and the vocabulary range (needed to route and decode at all).
    assert not off.validate_token(msgspec.structs.replace(altered, request_id="x")).is_valid
    assert not off.validate_token(msgspec.structs.replace(altered, token_id=100)).is_valid


def test_activation_assembler_off_skips_crcs_but_not_layout() -> None:
    payload = TensorPayload.from_bytes("float32", (1, 1, 4), bytes(range(16)))
    (chunk,) = chunk_activation(payload, request_id="r", step=1)
    corrupt = msgspec.structs.replace(chunk, data=b"\xff" + chunk.data[1:])
    with pytest.raises(TensorError, match="checksum"):
        ActivationAssembler().add(corrupt)
    tensor = ActivationAssembler().add(corrupt, verify=False)
    assert tensor is not None and tensor.data[0] == 0xFF
    with pytest.raises(TensorError):
        ActivationAssembler().add(msgspec.structs.replace(chunk, data=chunk.data[:8]), verify=False)


def _feed(watch: OutputWatch, text: str, size: int = 4) -> list[str]:
    return [f.kind.value for i in range(0, len(text), size) for f in watch.feed(text[i : i + size])]


MOJIBAKE = "The cafÃ© was openâ€”and the naÃ¯ve rÃ©sumÃ© said so. "


def test_the_corruption_detector_reads_the_answer_at_strict_and_reports_each_kind_once() -> None:
    watch = OutputWatch(ValidationLevel.STRICT)
    assert _feed(watch, MOJIBAKE) == ["mojibake"]
    assert watch.analysed == len(range(0, len(MOJIBAKE), 4))  # after every delta
    assert _feed(watch, "Paris is nice. " * 40, size=15) == ["degenerate_repetition"]
    clean = OutputWatch(ValidationLevel.STRICT)
    assert _feed(clean, "The capital of France is Paris. It is known for the Eiffel Tower and its museums.") == []


def test_the_corruption_detector_samples_at_light_and_sleeps_at_off() -> None:
    light = OutputWatch(ValidationLevel.LIGHT)
    deltas = len(range(0, len(MOJIBAKE), 4))
    assert deltas < LIGHT_OUTPUT_EVERY
    assert _feed(light, MOJIBAKE) == [] and light.analysed == 0  # not read yet
    assert _feed(light, MOJIBAKE * 3) == ["mojibake"]
    assert light.analysed == (deltas + len(range(0, 3 * len(MOJIBAKE), 4))) // LIGHT_OUTPUT_EVERY
    off = OutputWatch(ValidationLevel.OFF)
    assert _feed(off, MOJIBAKE * 4) == [] and off.analysed == 0


def test_the_corruption_detector_reads_a_bounded_window() -> None:
    watch = OutputWatch(ValidationLevel.STRICT)
    _feed(watch, "word " * 1000)
    assert len(watch._tail) == OUTPUT_WINDOW
