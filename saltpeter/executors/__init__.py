"""Executors: how a run reaches its machines. One interface, one implementation per way.

- ``local.LocalExecutor`` (``--local``): this host only, wrapper started as a subprocess.
- ``salt.SaltExecutor``: Salt minions through ``salt.client.LocalClient``.
"""

from typing import Dict, List, Optional, Tuple


class ExecutorError(RuntimeError):
    """The executor cannot work at all (for example the Salt master is unreachable)."""


class Executor:
    """What a per-run worker needs from the layer that reaches machines."""

    def resolve_targets(self, job) -> Tuple[List[str], List[str]]:
        """The machines that ``job`` targets, as (responding, not_responding)."""
        raise NotImplementedError

    def launch(self, job, instance: str, machines: List[str],
               wrapper_env: Dict[str, str]) -> Dict[str, Optional[str]]:
        """Start the wrapper on each machine with ``wrapper_env`` (the ``SP_*`` variables
        common to all machines; the executor adds ``SP_MACHINE_ID``). Must return within
        seconds whatever the job's length. Returns ``{machine: None}`` for a started
        wrapper, ``{machine: "reason"}`` for one that could not be started."""
        raise NotImplementedError

    def run_legacy(self, job, instance: str, machines: List[str], on_result) -> None:
        """Legacy path (``--legacy`` or ``use_wrapper: false``): run the command itself on
        the machines and call ``on_result(machine, retcode, output)`` as each finishes.
        ``should_stop()`` style cancellation goes through ``kill_legacy``."""
        raise NotImplementedError

    def kill_legacy(self, instance: str, machines: List[str]) -> None:
        """Stop legacy-path commands of ``instance`` on ``machines``."""
        raise NotImplementedError
