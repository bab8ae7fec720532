"""Large tensors on the wire: split into checksummed ActivationChunks, reassembled and verified. Pure."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

from exo_stable.wire.messages import ActivationChunk, TensorPayload, expected_nbytes, tensor_checksum

DEFAULT_CHUNK_BYTES: Final = 1 << 20


class TensorError(ValueError):
    """A chunk or reassembled tensor that must not be used."""


def chunk_activation(
    tensor: TensorPayload,
    *,
    request_id: str,
    step: int,
    plan_epoch: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    position: int = 0,
    final: bool = True,
    source_checksum: int = -1,
) -> list[ActivationChunk]:
    """Split ``tensor`` into chunks of at most ``chunk_bytes`` (one chunk for an empty tensor).

    ``source_checksum``: the sender's own checksum of the tensor, taken where it was computed (strict
    validation), carried unchanged in every chunk."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    data = tensor.data
    total = len(data)
    count = max(1, -(-total // chunk_bytes))
    view = memoryview(data)
    chunks = []
    for i in range(count):
        piece = bytes(view[i * chunk_bytes : (i + 1) * chunk_bytes])
        chunks.append(
            ActivationChunk(
                request_id=request_id,
                step=step,
                chunk_index=i,
                chunk_count=count,
                offset=i * chunk_bytes,
                dtype=tensor.dtype,
                shape=tensor.shape,
                total_nbytes=total,
                data=piece,
                checksum=tensor_checksum(piece),
                tensor_checksum=tensor.checksum,
                plan_epoch=plan_epoch,
                tensor_name=tensor.name,
                position=position,
                final=final,
                source_checksum=source_checksum,
            )
        )
    return chunks


_Key = tuple[str, int, int, str]


@dataclass(slots=True)
class _Partial:
    first: ActivationChunk
    pieces: dict[int, ActivationChunk] = field(default_factory=dict)
    nbytes: int = 0


class ActivationAssembler:
    """Collects chunks per (request, step, epoch, name); yields the verified tensor when complete.

    Bounded: at most ``max_pending`` tensors in assembly and ``max_tensor_bytes`` per tensor. The last
    ``remember_done`` completed tensors are remembered so that a late duplicate chunk is ignored.
    """

    def __init__(self, *, max_tensor_bytes: int = 1 << 30, max_pending: int = 64, remember_done: int = 1024) -> None:
        self.max_tensor_bytes = max_tensor_bytes
        self.max_pending = max_pending
        self.remember_done = remember_done
        self.duplicates = 0
        self._partial: dict[_Key, _Partial] = {}
        self._done: OrderedDict[_Key, None] = OrderedDict()

    @property
    def pending(self) -> int:
        return len(self._partial)

    def discard(self, request_id: str) -> int:
        """Free every partial tensor of ``request_id`` (finish, cancel); returns how many."""
        keys = [k for k in self._partial if k[0] == request_id]
        for k in keys:
            del self._partial[k]
        for k in [k for k in self._done if k[0] == request_id]:
            del self._done[k]
        return len(keys)

    def add(self, chunk: ActivationChunk, *, verify: bool = True) -> TensorPayload | None:
        """Take one chunk; the whole tensor once its last chunk is in.

        ``verify`` False (validation level ``off``) skips the chunk and tensor CRC32s; sizes, offsets and
        layout are checked always (they guard memory, not integrity)."""
        if verify and tensor_checksum(chunk.data) != chunk.checksum:
            raise TensorError(f"chunk {chunk.chunk_index} of {chunk.request_id}/{chunk.step} fails its checksum")
        try:
            want = expected_nbytes(chunk.dtype, chunk.shape)
        except ValueError as exc:
            raise TensorError(str(exc)) from exc
        if want != chunk.total_nbytes or want > self.max_tensor_bytes:
            raise TensorError(f"tensor of {chunk.total_nbytes} bytes (shape needs {want}) refused")
        if not 0 <= chunk.chunk_index < chunk.chunk_count or chunk.offset + len(chunk.data) > want:
            raise TensorError("chunk index or offset out of range")
        key = (chunk.request_id, chunk.step, chunk.plan_epoch, chunk.tensor_name)
        if key in self._done:
            self.duplicates += 1
            return None
        part = self._partial.get(key)
        if part is None:
            if len(self._partial) >= self.max_pending:
                raise TensorError(f"more than {self.max_pending} tensors in assembly")
            part = self._partial[key] = _Partial(first=chunk)
        f = part.first
        if (f.chunk_count, f.dtype, f.shape, f.total_nbytes, f.tensor_checksum) != (
            chunk.chunk_count,
            chunk.dtype,
            chunk.shape,
            chunk.total_nbytes,
            chunk.tensor_checksum,
        ):
            del self._partial[key]
            raise TensorError("chunks of one tensor disagree on its layout")
        if chunk.chunk_index in part.pieces:
            self.duplicates += 1
            return None
        part.pieces[chunk.chunk_index] = chunk
        part.nbytes += len(chunk.data)
        if len(part.pieces) < chunk.chunk_count:
            return None
        del self._partial[key]
        self._done[key] = None
        if len(self._done) > self.remember_done:
            self._done.popitem(last=False)
        ordered = sorted(part.pieces.values(), key=lambda c: c.offset)
        data = b"".join(c.data for c in ordered)
        if len(data) != want or (verify and tensor_checksum(data) != f.tensor_checksum):
            raise TensorError(f"reassembled tensor {key} fails its checksum")
        return TensorPayload(dtype=f.dtype, shape=f.shape, data=data, checksum=f.tensor_checksum, name=f.tensor_name)
