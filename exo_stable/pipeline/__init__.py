"""A request's life on a pipeline: what a stage does, what a request's owner does, and how it recovers.

Owns, pure logic first: placement planning (``placement``), token validation (``validators``, ``levels``,
``corruption``), stream assembly (``assembler``), barriers (``barrier``), recovery decisions and deadlines
(``recovery``), traces (``trace``), the sampler's parameters to and from the wire (``sampling``); then the
actors' state and IO: a stage (``stage``, ``stagestate``, ``stagefaults``), a request's owner (``owner``,
``ownerstate``), the single-node fallback (``fallback``), the API's backend contract with its single-device
implementation (``service``), and the node's typed statistics snapshot that ``/health``, ``/metrics`` and
``/v1/cluster`` read (``statistics``).

May import :mod:`exo_stable.engine`, :mod:`exo_stable.wire`, :mod:`exo_stable.tokenizer`. Never the cluster,
the API or the node.
"""
