"""A node among its peers: finding them (``discovery``, ``addresses``, ``exposure``), linking to them
(``peers``: the PeerManager, ``security``), telling them who else is there (``gossip``), agreeing on a plan
(``coordinator``, ``planstate``), holding this node's stage of it (``stagehost``), and handing each peer message
to its receiver by type behind the role checks (``router``, ``roles``).

May import :mod:`exo_stable.pipeline`, :mod:`exo_stable.engine`, :mod:`exo_stable.wire` and below. Never the
API or the node.
"""
