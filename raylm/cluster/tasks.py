"""Run a function over many inputs as Ray tasks, one task per input, on whatever cluster is connected.

This is raylm's offline work on the cluster (tokenizing a corpus, one task per
input file); Ray Data is not used because its ``read_text`` makes one row per
line, not per document.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence, Tuple

from raylm.environment import environment
from raylm.errors import UserError

TASK_ENV = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
"""One core per task: the tasks themselves are the parallelism (HF tokenizers would
otherwise start a thread per core in every task). Set in the task's process while it
runs, not as a Ray ``runtime_env``: a runtime_env of its own keeps Ray from using the
workers it has already started and costs a fresh worker per slot (4.5-6.5 s more
before the first shard on the 2-core benchmark machine). ``TOKENIZERS_PARALLELISM``
is read at every ``encode_batch`` call, so ``false`` makes it serial whenever set."""


def _on_one_core(fn: Callable[[Any], Any], item: Any) -> Any:
    """``fn(item)`` with TASK_ENV in the environment, which is restored afterwards (the worker may run other work)."""
    with environment(TASK_ENV):
        return fn(item)


def map_unordered(fn: Callable[[Any], Any], items: Sequence[Any], max_in_flight: int) -> Iterator[Tuple[int, Any]]:
    """(index, fn(item)) as each task finishes, at most ``max_in_flight`` tasks at a time.

    A ``UserError`` raised in a task is raised here (the other tasks are
    cancelled): a bad input file stops the whole job with its one-line message.
    """
    import ray

    remote = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=False)(_on_one_core)
    pending = {}
    next_item = 0
    try:
        while pending or next_item < len(items):
            while next_item < len(items) and len(pending) < max_in_flight:
                pending[remote.remote(fn, items[next_item])] = next_item
                next_item += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, UserError):
                    raise UserError(str(err.cause)) from None
                raise
            yield index, result
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
