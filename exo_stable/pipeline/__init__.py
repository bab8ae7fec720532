"""The distributed pipeline's pure logic: placement planning, token validation and stream assembly.

Modules (no asyncio, no MLX, no IO):

- ``placement``: ``plan_placement`` splits a model's layers over nodes into a :class:`Plan`.
- ``validators``: ``TokenValidator``, ``SequenceIntegrityChecker`` and ``EncodingValidator`` (the design's
  token integrity validation system; invariants I2 and I3).
- ``assembler``: ``StreamAssembler``, one per request at its owner: validate, dedupe, reorder, detokenize.
"""
