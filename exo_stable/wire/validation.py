"""TokenTransferValidator: end-to-end checksums for token chunks, beyond the link's frame checksum. Pure.

A token's checksum covers what makes it that token at that place: request, position, token id, source
rank and plan epoch. The link already drops corrupted frames; this check catches a token altered anywhere
between the sampler and the assembler (a bug, a bad buffer), and a token sent twice with different ids.
"""

from __future__ import annotations

import struct
import zlib

import msgspec

from exo_stable.wire.messages import (
    RecoveryAction,
    TokenChunk,
    ValidationError,
    ValidationResult,
    ValidationStatus,
)

_FIELDS = struct.Struct("<qqqq")


def token_bytes(chunk: TokenChunk) -> bytes:
    """The canonical bytes a token's checksum covers."""
    return (
        chunk.request_id.encode()
        + b"\0"
        + _FIELDS.pack(chunk.sequence_position, chunk.token_id, chunk.source_device_rank, chunk.plan_epoch)
    )


class TokenTransferValidator:
    """Seals token chunks with a checksum and validates them on arrival."""

    def compute_checksum(self, token_data: bytes) -> str:
        """CRC32 of ``token_data`` as 8 hex digits."""
        return f"{zlib.crc32(token_data):08x}"

    def seal(self, chunk: TokenChunk) -> TokenChunk:
        """A copy of ``chunk`` with its checksum set (the sender does this once, at sampling)."""
        return msgspec.structs.replace(chunk, checksum=self.compute_checksum(token_bytes(chunk)))

    def validate_token(self, chunk: TokenChunk) -> ValidationResult:
        if chunk.sequence_position < 0 or chunk.token_id < 0 or chunk.source_device_rank < 0:
            return ValidationResult(
                is_valid=False,
                error_type=ValidationError.BAD_FIELD,
                confidence_score=1.0,
                suggested_action=RecoveryAction.REGENERATE,
                detail="negative position, token id or rank",
            )
        if chunk.checksum != self.compute_checksum(token_bytes(chunk)):
            return ValidationResult(
                is_valid=False,
                error_type=ValidationError.CHECKSUM_MISMATCH,
                confidence_score=1.0,
                suggested_action=RecoveryAction.REGENERATE,
                detail=f"token at position {chunk.sequence_position} fails its checksum",
            )
        return ValidationResult(is_valid=True)

    def mark(self, chunk: TokenChunk) -> tuple[TokenChunk, ValidationResult]:
        """Validate and return the chunk with ``validation_status`` filled in."""
        result = self.validate_token(chunk)
        status = ValidationStatus.VALID if result.is_valid else ValidationStatus.INVALID
        return msgspec.structs.replace(chunk, validation_status=status), result

    def validate_transfer(self, original: TokenChunk, received: TokenChunk) -> bool:
        """True when ``received`` is ``original`` (identity fields and checksum) and its checksum holds."""
        return (
            token_bytes(original) == token_bytes(received)
            and original.checksum == received.checksum
            and self.validate_token(received).is_valid
        )
