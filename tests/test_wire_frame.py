"""Frames: round trip, and every single corrupted byte is detected (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_stable.wire.frame import (
    OVERHEAD,
    BadHeader,
    ChecksumMismatch,
    ChecksumRequired,
    FrameCodec,
    FrameError,
    FrameKind,
    FrameTooLarge,
    TruncatedFrame,
    decode_ping,
    encode_ping,
)

CODEC = FrameCodec(max_frame_bytes=1 << 16)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
frames = st.tuples(st.sampled_from(list(FrameKind)), st.binary(max_size=2000), u64, u64, u64)


@given(frames)
def test_frame_round_trips(f: tuple[FrameKind, bytes, int, int, int]) -> None:
    kind, payload, seq, ack, sack = f
    frame = CODEC.decode(CODEC.encode(kind, payload, seq=seq, ack=ack, sack=sack))
    assert (frame.kind, frame.payload, frame.seq, frame.ack, frame.sack) == f


@settings(max_examples=500)
@given(frames, st.data())
def test_any_single_corrupted_byte_is_detected(f: tuple[FrameKind, bytes, int, int, int], data: st.DataObject) -> None:
    kind, payload, seq, ack, sack = f
    raw = bytearray(CODEC.encode(kind, payload, seq=seq, ack=ack, sack=sack))
    pos = data.draw(st.integers(min_value=0, max_value=len(raw) - 1), label="position")
    flip = data.draw(st.integers(min_value=1, max_value=255), label="xor")
    raw[pos] ^= flip
    with pytest.raises(FrameError):
        CODEC.decode(bytes(raw))


def test_every_position_and_every_flip_of_a_small_frame() -> None:
    raw = CODEC.encode(FrameKind.DATA, b"hello", seq=7, ack=3, sack=5)
    for pos in range(len(raw)):
        for flip in range(1, 256):
            buf = bytearray(raw)
            buf[pos] ^= flip
            with pytest.raises((ChecksumMismatch, ChecksumRequired)):
                CODEC.decode(bytes(buf))


def test_truncated_oversized_and_garbage_frames_are_refused() -> None:
    with pytest.raises(TruncatedFrame):
        CODEC.decode(b"garbage")
    with pytest.raises(ChecksumMismatch):
        CODEC.decode(b"x" * 100)
    with pytest.raises(FrameTooLarge):
        CODEC.decode(b"x" * ((1 << 16) + 1))
    with pytest.raises(FrameTooLarge):
        CODEC.encode(FrameKind.DATA, b"x" * (1 << 16))
    assert CODEC.max_payload_bytes == (1 << 16) - OVERHEAD
    CODEC.encode(FrameKind.DATA, b"x" * CODEC.max_payload_bytes)


def test_unchecked_frames_only_where_checksums_are_off() -> None:
    plain = FrameCodec(max_frame_bytes=1 << 16, checksum=False)
    raw = plain.encode(FrameKind.DATA, b"abc", seq=1)
    assert plain.decode(raw).payload == b"abc"
    with pytest.raises(ChecksumRequired):
        CODEC.decode(raw)


def test_ping_payload() -> None:
    assert decode_ping(encode_ping(9, 1.5)) == (9, 1.5)
    with pytest.raises(BadHeader):
        decode_ping(b"short")
