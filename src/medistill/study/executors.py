"""Executors map a run function over a study's tasks and yield each outcome as it finishes.

They never write results: the driver stores what they yield (the run function itself writes
only its run's scratch folder, `DIR/work/<key>/`, see `study.runner`). Registered by name
(`local`, `ray`); a new backend is one class with `map(function, tasks, env)` and `register_executor`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from medistill.errors import ConfigError
from medistill.registry import Registry
from medistill.study.spec import Task
from medistill.study.store import new_outcome, record_failure

RunFunction = Callable[[Any, Any], dict[str, Any]]


class Executor(Protocol):
    def map(self, function: RunFunction, tasks: Sequence[Task], env: Any) -> Iterator[dict[str, Any]]:
        """Call `function(task.spec, env)` for every task; yield the outcomes as they complete."""
        ...


EXECUTORS: Registry[Callable[..., Executor]] = Registry("executor")
register_executor = EXECUTORS.decorator  # class decorator: @register_executor(name)
list_executors = EXECUTORS.names


def create_executor(name: str, **options: Any) -> Executor:
    """An executor by name, with its options (e.g. `address` for ray)."""
    return EXECUTORS.get(name)(**options)


@register_executor("local")
class LocalExecutor:
    """One run after another in this process; Ctrl-C keeps the stored runs, and the run in flight continues
    from its last checkpoint on the next call."""

    def map(self, function: RunFunction, tasks: Sequence[Task], env: Any) -> Iterator[dict[str, Any]]:
        for task in tasks:
            yield function(task.spec, env)


@register_executor("ray")
class RayExecutor:
    """Each run a Ray task with the task's fractional `num_cpus`/`num_gpus`.

    With no address a local Ray instance is started (and stopped afterwards); with an address
    (`auto`, `ray://head:10001`, `head:6379`) the runs go to that cluster. A Ray session this
    process already holds is used as it is. Workers need medistill installed and the data
    (data root, npz paths, the study folder for simulation sets) at the same paths. The study
    folder must be the same (shared) folder on every node for a second reason: a worker writes
    its run's checkpoints to `DIR/work/<key>/` there, which a rerun on any node resumes and the
    driver removes once the run is stored. Without a shared folder runs still finish, but a
    killed run starts over and its scratch is left behind on the worker's node.
    """

    def __init__(self, address: str | None = None, **init_options: Any) -> None:
        self.address = address
        self.init_options = init_options

    def map(self, function: RunFunction, tasks: Sequence[Task], env: Any) -> Iterator[dict[str, Any]]:
        ray = _import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            try:
                ray.init(address=self.address, include_dashboard=False, **self.init_options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                raise ConfigError(
                    f"cannot start or reach {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                ) from None
        try:
            _check_resources(ray.cluster_resources(), tasks)
            remote = ray.remote(function)
            submitted = {
                remote.options(num_cpus=t.num_cpus, num_gpus=t.num_gpus, max_retries=0).remote(t.spec, env): t for t in tasks
            }
            pending = list(submitted)
            try:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    for ref in done:
                        yield _result(ray, ref, submitted[ref])
            finally:
                for ref in pending:
                    ray.cancel(ref, force=True)
        finally:
            if started_here:
                ray.shutdown()


def _result(ray: Any, ref: Any, task: Task) -> dict[str, Any]:
    """The task's outcome; a Ray-level failure (worker died, out of memory) becomes a failed run."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        spec = task.spec
        return record_failure(new_outcome(spec.key, spec.to_dict(), spec.dataset_label), exc)


def _check_resources(available: dict[str, float], tasks: Sequence[Task]) -> None:
    """Refuse tasks the cluster can never schedule (Ray would wait for them forever)."""
    for resource, attr in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need = max(getattr(t, attr) for t in tasks)
        have = available.get(resource, 0.0)
        if need > have:
            raise ConfigError(
                f"each run asks for {need:g} {resource} but the Ray cluster has {have:g}; "
                f"lower executor.resources.{attr} in the study config"
            )


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray executor needs Ray: pip install 'medistill[ray]'") from None
    return ray
