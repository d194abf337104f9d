"""Running on several processes: who is who and the collectives (``processes``), and ZeRO-3
parameter partitions (``partitions``).

``from zorefine import distributed; distributed.current()`` is the process group a run is in
(one process unless started by a launcher).
"""

from zorefine.distributed.processes import Processes, current, launched_distributed

__all__ = ["Processes", "current", "launched_distributed"]
