"""The model and its computation on one device: everything MLX touches, and nothing about other nodes.

Owns: a model's shape (``modelspec``: :class:`ModelSpec`, :class:`ModelFootprint`), finding and reading
weights (``loader``, ``gguf``, ``gguf_file``, ``hub``, ``store``, ``footprint``, ``family``), random-weight
models for tests and benchmarks (``random_model``, ``synthetic``, ``synthetic_stream``), a contiguous layer
range as a module (``model``, ``kvcache``), the MLX thread (``mlx_thread``) and device (``device``,
``platform``), the forward calls of a stage (``stagecompute``) and of the whole model (``single``), token
choice (``sampling``, ``grammar``) and text out (``textstream``).

May import: :mod:`exo_stable.tokenizer`, :mod:`exo_stable.logs`. Never the wire, the pipeline, the cluster,
the API or the node (``make lint`` checks this with import-linter).
"""
