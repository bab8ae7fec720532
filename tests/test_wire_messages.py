"""Codec, data models, tensors and the token validator (pure)."""

from __future__ import annotations

import enum
import typing
from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_stable.wire import messages as m
from exo_stable.wire.tensors import ActivationAssembler, TensorError, chunk_activation
from exo_stable.wire.validation import TokenTransferValidator

ALL_TYPES: tuple[type[m.WireMessage], ...] = typing.get_args(m.Message)


def _strategy(info: msgspec.inspect.Type) -> st.SearchStrategy[typing.Any]:
    i = msgspec.inspect
    match info:
        case i.StrType():
            return st.text(max_size=40)
        case i.BoolType():
            return st.booleans()
        case i.IntType():
            return st.integers(min_value=-(2**63), max_value=2**64 - 1)
        case i.FloatType():
            return st.floats(allow_nan=False)
        case i.BytesType():
            return st.binary(max_size=200)
        case i.DateTimeType():
            return st.datetimes(min_value=datetime(1900, 1, 1), timezones=st.just(UTC))
        case i.NoneType():
            return st.none()
        case i.EnumType():
            return st.sampled_from(list(typing.cast(type[enum.Enum], info.cls)))
        case i.UnionType():
            return st.one_of(*[_strategy(t) for t in info.types])
        case i.VarTupleType():
            return st.lists(_strategy(info.item_type), max_size=5).map(tuple)
        case i.TupleType():
            return st.tuples(*[_strategy(t) for t in info.item_types])
        case i.StructType():  # a nested struct (e.g. StageRange inside a plan)
            nested = info.cls
            return st.fixed_dictionaries({f.name: _strategy(f.type) for f in info.fields}).map(lambda kw: nested(**kw))
    raise AssertionError(f"no strategy for {info}")


def _message_strategy(cls: type[m.WireMessage]) -> st.SearchStrategy[m.WireMessage]:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return st.fixed_dictionaries({f.name: _strategy(f.type) for f in info.fields}).map(lambda kw: cls(**kw))


any_message = st.one_of(*[_message_strategy(cls) for cls in ALL_TYPES])


@settings(max_examples=300)
@given(any_message)
def test_any_message_round_trips(msg: m.WireMessage) -> None:
    data = m.CODEC.encode(typing.cast(m.Message, msg))
    back = m.CODEC.decode(data)
    assert type(back) is type(msg)
    assert back == msg


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


def test_every_message_class_is_in_the_union_with_a_unique_tag() -> None:
    assert _subclasses(m.WireMessage) == set(ALL_TYPES)
    tags = [msgspec.inspect.type_info(c).tag for c in ALL_TYPES]  # type: ignore[attr-defined]
    assert len(tags) == len(set(tags))


def test_garbage_does_not_decode() -> None:
    with pytest.raises(msgspec.DecodeError):
        m.CODEC.decode(b"\xc1garbage")
    with pytest.raises(msgspec.ValidationError):
        m.CODEC.decode(msgspec.msgpack.encode({"t": "no-such-message"}))


def test_schema_evolution_new_field_with_default_both_ways() -> None:
    class ResendTokensV2(msgspec.Struct, frozen=True, kw_only=True, tag_field="t", tag="resend"):
        request_id: str
        positions: tuple[int, ...]
        priority: int = 3  # a field a newer peer added

    new_bytes = msgspec.msgpack.encode(ResendTokensV2(request_id="r", positions=(5,), priority=9))
    assert m.CODEC.decode(new_bytes) == m.ResendTokens(request_id="r", positions=(5,))  # old peer ignores it
    old_bytes = m.CODEC.encode(m.ResendTokens(request_id="r", positions=(5,)))
    assert msgspec.msgpack.decode(old_bytes, type=ResendTokensV2).priority == 3  # new peer fills the default


def test_token_chunk_carries_the_seed_fields() -> None:
    chunk = m.TokenChunk(request_id="r", sequence_position=3, token_id=42, source_device_rank=1)
    assert chunk.validation_status is m.ValidationStatus.UNCHECKED
    assert chunk.generation_timestamp.tzinfo is not None
    assert m.CODEC.decode(m.CODEC.encode(chunk)) == chunk


def test_tensor_payload_verifies_size_and_checksum() -> None:
    t = m.TensorPayload.from_bytes("float16", (2, 3), bytes(range(12)))
    assert t.verify()
    assert not msgspec.structs.replace(t, data=bytes(12)).verify()
    assert not msgspec.structs.replace(t, shape=(3, 3)).verify()
    assert not msgspec.structs.replace(t, dtype="nope").verify()
    with pytest.raises(ValueError, match="needs 12 bytes"):
        m.TensorPayload.from_bytes("float16", (2, 3), b"123")


@given(st.integers(min_value=0, max_value=5000), st.integers(min_value=1, max_value=1024), st.randoms())
def test_activation_chunks_reassemble_in_any_order(nbytes: int, chunk_bytes: int, rnd: typing.Any) -> None:
    data = rnd.randbytes(nbytes)
    t = m.TensorPayload.from_bytes("uint8", (nbytes,), data, name="h")
    chunks = chunk_activation(t, request_id="r", step=7, chunk_bytes=chunk_bytes)
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    rnd.shuffle(chunks)
    asm = ActivationAssembler()
    results = [asm.add(c) for c in chunks + chunks[:1]]  # with a duplicate at the end
    done = [r for r in results if r is not None]
    assert done == [t]
    assert asm.pending == 0
    assert asm.duplicates == 1


def test_activation_assembler_refuses_bad_chunks() -> None:
    t = m.TensorPayload.from_bytes("uint8", (10,), bytes(range(10)))
    c0, c1 = chunk_activation(t, request_id="r", step=0, chunk_bytes=5)
    asm = ActivationAssembler(max_pending=1)
    with pytest.raises(TensorError, match="checksum"):
        asm.add(msgspec.structs.replace(c0, data=b"xxxxx"))
    with pytest.raises(TensorError, match="refused"):
        asm.add(msgspec.structs.replace(c0, total_nbytes=11))
    asm.add(c0)
    with pytest.raises(TensorError, match="more than 1"):
        asm.add(msgspec.structs.replace(c1, step=1))
    bad_whole = msgspec.structs.replace(c1, tensor_checksum=c0.tensor_checksum + 1)
    with pytest.raises(TensorError, match="disagree"):
        asm.add(bad_whole)


def test_token_transfer_validator() -> None:
    v = TokenTransferValidator()
    chunk = v.seal(m.TokenChunk(request_id="req", sequence_position=0, token_id=17, source_device_rank=2))
    assert len(chunk.checksum) == 8
    assert v.validate_token(chunk).is_valid
    marked, result = v.mark(chunk)
    assert result.is_valid and marked.validation_status is m.ValidationStatus.VALID
    received = m.CODEC.decode(m.CODEC.encode(chunk))
    assert isinstance(received, m.TokenChunk)
    assert v.validate_transfer(chunk, received)
    altered = msgspec.structs.replace(chunk, token_id=18)
    bad = v.validate_token(altered)
    assert not bad.is_valid and bad.error_type is m.ValidationError.CHECKSUM_MISMATCH
    assert bad.suggested_action is m.RecoveryAction.REGENERATE
    assert not v.validate_transfer(chunk, altered)
    assert v.mark(altered)[0].validation_status is m.ValidationStatus.INVALID
    negative = v.seal(msgspec.structs.replace(chunk, sequence_position=-1))
    assert v.validate_token(negative).error_type is m.ValidationError.BAD_FIELD
