"""``exo-stable verify``: checks end to end that a split model answers token for token like one device.

Owns: the run (``run``: :class:`DistributedInferenceValidator`), what it compares (``targets``: the
single-device reference and the clusters) and the pure comparison and reports (``results``).

May import every layer, the node included; only the command line imports it.
"""
