"""Several processes: jaxllm starts ``jax.distributed`` itself, before any JAX backend exists.

Where the settings come from, first match wins:

1. explicit arguments (``LLM(coordinator_address=, num_processes=, process_id=)``);
2. the environment: ``JAXLLM_COORDINATOR_ADDRESS``, ``JAXLLM_NUM_PROCESSES``, ``JAXLLM_PROCESS_ID``
   (what ``jaxllm launch`` sets for each process it starts);
3. a launcher that started several tasks: Slurm (an ``srun`` step with ``SLURM_NTASKS`` > 1) or
   Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1). jaxllm only decides *whether* to start; the address,
   count and rank come from ``jax.distributed.initialize()``'s own cluster detection;
4. none of these: one process, nothing to start.

``num_processes=1`` (or ``JAXLLM_NUM_PROCESSES=1``) means one process even under a launcher. A
program that already called ``jax.distributed.initialize`` itself keeps its set-up: nothing here
runs again.
"""

from __future__ import annotations

import os

ENV_VARS = {
    "coordinator_address": "JAXLLM_COORDINATOR_ADDRESS",
    "num_processes": "JAXLLM_NUM_PROCESSES",
    "process_id": "JAXLLM_PROCESS_ID",
}


def _check_address(name: str, value) -> str:
    host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not (sep and host and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{name} must be 'HOST:PORT' with a port in [1, 65535], got {value!r}")
    return value


def _check_count(name: str, value, low: int, high: int | None = None, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if high is None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}]{why}, got {value}")
    return value


def _from_env(key: str, environ) -> str | int | None:
    var = ENV_VARS[key]
    raw = environ.get(var)
    if raw is None or raw.strip() == "":
        return None
    if key == "coordinator_address":
        return _check_address(var, raw.strip())
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{var} must be an integer, got {raw!r}") from None


def _launcher_tasks(environ) -> tuple[str, int] | None:
    """(launcher, task count) when Slurm or Open MPI started this process as one of several tasks."""
    def count(var):
        try:
            return int(environ.get(var, "1"))
        except ValueError:
            return 1

    # inside an srun step (JAX's Slurm detection needs SLURM_STEP_NODELIST too); a batch script
    # itself is one task even with --ntasks=N, so it stays a single process
    if count("SLURM_NTASKS") > 1 and "SLURM_STEP_NODELIST" in environ:
        return "Slurm", count("SLURM_NTASKS")
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI", count("OMPI_COMM_WORLD_SIZE")
    return None


def resolve(coordinator_address=None, num_processes=None, process_id=None, environ=None) -> dict | None:
    """The keyword arguments for ``jax.distributed.initialize`` (those known; under a launcher JAX
    detects the rest), or None for a single process. Raises on a bad or incomplete setting."""
    environ = os.environ if environ is None else environ
    if coordinator_address is not None:
        _check_address("coordinator_address", coordinator_address)
    if num_processes is not None:
        _check_count("num_processes", num_processes, 1)
    if process_id is not None:
        _check_count("process_id", process_id, 0)
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    for key, value in given.items():
        if value is None:
            given[key] = _from_env(key, environ)
    num, pid = given["num_processes"], given["process_id"]
    if num is not None:
        _check_count(_name("num_processes", num_processes), num, 1)
    if num is not None and pid is not None:
        _check_count(_name("process_id", process_id), pid, 0, num - 1,
                     f" ({_name('num_processes', num_processes)} is {num})")
    elif pid is not None:
        _check_count(_name("process_id", process_id), pid, 0)
    if num == 1:
        return None
    launcher = _launcher_tasks(environ)
    if all(v is None for v in given.values()):
        return {} if launcher else None
    missing = [k for k, v in given.items() if v is None]
    if missing and launcher is None:
        what = " and ".join(f"{k} (LLM({k}=...) or {ENV_VARS[k]})" for k in missing)
        raise ValueError(
            f"several processes need {what} too: set all three of coordinator_address, num_processes "
            "and process_id, or start the program with srun / mpirun / jaxllm launch"
        )
    return {k: v for k, v in given.items() if v is not None}


def _name(arg: str, explicit) -> str:
    return arg if explicit is not None else ENV_VARS[arg]


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a JAX without it: initialize() raises its own error
        return False


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Start ``jax.distributed`` when the arguments, the environment or a launcher ask for several
    processes; True if this call started it. Must run before anything touches a JAX backend
    (a computation, ``jax.devices()``, ``jax.device_put``...)."""
    import jax

    if jax.distributed.is_initialized():
        return False
    kwargs = resolve(coordinator_address, num_processes, process_id)
    if kwargs is None:
        return False
    if _backends_started():
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "detected from " + _launcher_tasks(os.environ)[0]
        raise RuntimeError(
            f"several processes were asked for ({shown}), but JAX is already running on this process "
            "alone: create LLM(...) before any other JAX call (computation, jax.devices(), "
            "jax.device_put), or call jaxllm.sharding.distributed.maybe_initialize() first"
        )
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:
        if len(kwargs) == len(ENV_VARS):
            raise
        # JAX's cluster detection did not recognise the launcher that started several tasks
        launcher = _launcher_tasks(os.environ)
        raise RuntimeError(
            f"{launcher[0] if launcher else 'a launcher'} started several tasks, but JAX could not detect "
            f"its cluster ({e}); set {', '.join(ENV_VARS.values())} instead"
        ) from e
    return True
