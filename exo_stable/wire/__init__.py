"""The wire: typed msgspec messages, checksummed frames, reliable ordered links over aiohttp websockets.

Modules, pure logic first:

- ``messages``: every peer message in one tagged union; the msgpack :class:`Codec`.
- ``frame``: link frames (seq, ack, sack, CRC32); pure encode/verify.
- ``reliable``: send/receive windows (ack, selective ack, retransmit timers, dedupe, reorder).
- ``faults``: the seeded fault injector (``EXO_STABLE_FAULTS``).
- ``health``: ``NetworkHealthMonitor`` (RTT, loss, corruption; slow versus dead; timeouts).
- ``handshake``: identity, version and HMAC challenge-response over the cluster secret.
- ``validation``: ``TokenTransferValidator``: token checksums and transfer checks.
- ``tensors``: chunking large activations and reassembling them, verified.
- ``linkconfig`` / ``connection``: a link's settings and statistics; one connection's state and timers.
- ``wsio``: handshake frames over a websocket and closing one with a deadline.
- ``peerlink`` / ``server``: the IO: ``PeerLink`` per peer and the accepting ``WireServer``.

The design's ``ReliableMessageTransport`` (a node's links behind one send/receive API, with checksums and
retries) is :class:`exo_stable.cluster.peers.PeerManager`: it holds the ``WireServer`` and one ``PeerLink`` per
peer, and routes a node's messages over them. It lives in ``cluster/`` because it also dials the addresses peers
gossip. Checksums and retransmission are per frame in each link (``frame``, ``reliable``); the end-to-end
checks the design puts on ``send_with_validation``/``receive_with_validation`` run where a message is used:
token chunks by the owner's ``TokenValidator``, activation chunks and tensors by the receiving stage.
"""
