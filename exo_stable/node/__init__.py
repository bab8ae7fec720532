"""One node, assembled: its configuration, the factory that builds its parts, and the cluster's service.

Owns: :class:`~.config.NodeConfig` (what a node is told to be), :class:`~.node.Node` (binds its port, then
``Node.assemble`` builds every part in dependency order into :class:`~.parts.NodeParts`: links, stage host,
coordinator, fallback, request owner, gossip, message router; then runs them) and
:class:`~.cluster_service.ClusterService` (the API's backend on a cluster).

May import every layer below it (api, cluster, pipeline, engine, wire, tokenizer); only the command line
and ``verify`` import it.
"""
