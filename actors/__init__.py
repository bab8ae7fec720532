"""actors: a small supervised asyncio actor runtime with Erlang/OTP semantics.

Generic (no MLX, no HTTP, no exo-stable imports; standard library only):

- :class:`Actor` with lifecycle hooks and a typed ``receive``; :class:`ActorRef` (``tell``, ``ask``,
  ``stop``) is the only handle on a running actor; mailboxes are bounded.
- :class:`Supervisor` with one_for_one / one_for_all / rest_for_one, permanent / transient / temporary
  children, restart intensity escalating to the parent, ordered start and reverse stop.
- Monitoring: ``Actor.watch(ref)`` delivers :class:`Down` with the exit reason.
- :class:`ActorSystem` is the root; leaving its ``async with`` block stops everything.
- ``statistics()`` snapshots for health pages.
"""

from actors.actor import Actor
from actors.errors import (
    ActorDead,
    ActorError,
    AskTimeout,
    MailboxFull,
    RestartIntensityExceeded,
    StartFailed,
)
from actors.intensity import RestartIntensity, restart_allowed
from actors.monitor import NORMAL, SHUTDOWN, Down, ExitReason, Normal, Shutdown, is_abnormal
from actors.ref import ActorRef
from actors.stats import ActorState, ActorStats
from actors.supervisor import (
    ChildInfo,
    ChildSpec,
    ChildStats,
    Restart,
    Strategy,
    Supervisor,
    SupervisorStats,
    should_restart,
)
from actors.system import ActorSystem, Failure

__all__ = [
    "NORMAL",
    "SHUTDOWN",
    "Actor",
    "ActorDead",
    "ActorError",
    "ActorRef",
    "ActorState",
    "ActorStats",
    "ActorSystem",
    "AskTimeout",
    "ChildInfo",
    "ChildSpec",
    "ChildStats",
    "Down",
    "ExitReason",
    "Failure",
    "MailboxFull",
    "Normal",
    "Restart",
    "RestartIntensity",
    "RestartIntensityExceeded",
    "Shutdown",
    "StartFailed",
    "Strategy",
    "Supervisor",
    "SupervisorStats",
    "is_abnormal",
    "restart_allowed",
    "should_restart",
]
