"""Where a request's sampler meets the wire: the engine's :class:`SamplingParams` and the wire's
:class:`SamplingSpec`, converted in one place.

The two have the same fields, each with the same default. :class:`SamplingParams` is what the sampler runs with
(and it checks its values); :class:`SamplingSpec` is what a ``RequestOpen`` carries to the last stage. They stay
two types because ``wire/`` is independent of ``engine/`` (the layer contract in pyproject.toml): neither may
import the other, and the pipeline, which imports both, converts. ``tests/test_sampling.py`` checks that their
fields stay the same.
"""

from __future__ import annotations

import msgspec

from exo_stable.engine.sampling import SamplingParams
from exo_stable.wire.messages import SamplingSpec

__all__ = ["params_from_wire", "params_to_wire"]


def params_to_wire(params: SamplingParams) -> SamplingSpec:
    """What the owner sends in ``RequestOpen.sampling``."""
    return SamplingSpec(**msgspec.structs.asdict(params))


def params_from_wire(spec: SamplingSpec) -> SamplingParams:
    """What the stage samples with; raises ValueError for values the sampler refuses."""
    return SamplingParams(**msgspec.structs.asdict(spec))
