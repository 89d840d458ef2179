"""Stages of a run as one Ray Train run (TorchTrainer, Ray Train V2 API)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import List

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raylm import storage
from raylm.cluster.backend import WorkersOnlyConfig
from raylm.cluster.scaling import for_raylm
from raylm.configs.schema import RunConfig
from raylm.errors import Stopped
from raylm.launcher.ray_entry import train_loop_per_worker


_STOPPING = (signal.SIGINT, signal.SIGTERM)


class _RaylmTrainer(TorchTrainer):
    """Ray's TorchTrainer with raylm's Ctrl-C, less three actors a raylm run has no use for (Ray 2.60's hooks; where a
    Ray version lacks one, Ray's behaviour stays).

    Ctrl-C (and SIGTERM: ``kill``, a scheduler's preemption, a Ray Job's stop) aborts the run as Ray Train's own
    Ctrl-C handler does (the controller stops the worker group), then raises ``Stopped`` in the driver, which says
    how to resume and exits 128 + the signal. Ray's handler left ``fit()`` through ``sys.exit``, which ended
    ``raylm launch`` with status 1 and no word, and SIGTERM met Ray's C++ handler, which printed a stack dump. Each
    fit's handlers go with it: Ray's stayed installed, holding the controller's handle, so in a process that fits
    again (the tests) a finished controller's actor lived on.

    The actors, each a process that imports Ray Train and Ray Data (2-4 CPU-seconds of a launch):

    - the DatasetManager Ray Train starts with every worker group, datasets or not: raylm hands it none;
    - on a cluster without Ray's dashboard (the embedded one), the PlacementGroupCleaner, a detached actor that asks
      the State API every second whether the controller lives so as to free its placement group if it died: without
      a dashboard every ask fails (a warning a second in its log), so it could never act;
    - on a cluster without an autoscaler (the embedded one), the fixed-size policy's ``_AutoscalingCoordinatorActor``,
      which the controller waits for before the first worker group (``raylm.cluster.scaling``).

    An elastic run's policy sizes the worker group from the nodes as they are, not as Ray's coordinator saw them
    up to 20 s before (``raylm.cluster.scaling``).
    """

    def __init__(self, *args, embedded: bool, **kwargs):
        self._embedded = embedded  # started by raylm without a dashboard (no State API) and without an autoscaler
        super().__init__(*args, **kwargs)

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if "scaling_policy" in controller_init_kwargs:
            controller_init_kwargs["scaling_policy"] = for_raylm(controller_init_kwargs["scaling_policy"], self._embedded)
        return super()._initialize_and_run_controller(**controller_init_kwargs)

    def fit(self):
        previous = {signum: signal.getsignal(signum) for signum in _STOPPING}
        self._stopped_by = signal.SIGINT
        try:
            return super().fit()
        except KeyboardInterrupt:
            # Raised by the handler inside ray.get, which hands on a KeyboardInterrupt of its own: the signal is here.
            raise Stopped(self._stopped_by) from None
        finally:
            if threading.current_thread() is threading.main_thread():
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

    def _register_sigint_handler(self, controller) -> None:
        def stop(signum, frame):
            for each in _STOPPING:
                signal.signal(each, signal.default_int_handler)  # a second signal stops waiting for the abort
            try:
                ray.get(controller.abort.remote())
            except ray.exceptions.RayActorError:
                pass  # the controller had already ended
            self._stopped_by = signum
            raise KeyboardInterrupt

        for signum in _STOPPING:
            signal.signal(signum, stop)

    def _create_default_callbacks(self):
        unused = set() if self.datasets else {"DatasetsCallback"}
        if self._embedded:
            unused.add("PlacementGroupCleanerCallback")
        return [cb for cb in super()._create_default_callbacks() if type(cb).__name__ not in unused]


def fit_trainer(run_dir: Path, run: RunConfig, stage_indices: List[int], cfg: RunConfig, use_gpu: bool, relay,
                embedded: bool) -> TorchTrainer:
    """One Ray Train run for the stages ``stage_indices``, which share ``cfg.cluster`` and ``cfg.fault`` (``cfg`` is
    the first one's resolved config), on the embedded cluster (started without a dashboard) or one given by address.
    ``run_dir`` is visible to every node, or the driver's view of a run in object storage (then Ray Train writes
    checkpoints to the store and workers fetch from it)."""
    store = storage.store_of(run_dir)
    c = cfg.cluster
    # Ray Train hands this to the run's controller; after a node is lost its
    # first restart may still count the node's resources and wait this long.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(c.placement_timeout_s)
    resources = {"CPU": c.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    backend = "nccl" if use_gpu else "gloo"
    # Ray Train's run directory is raylm's: a checkpoint named <stage>/step_N lands in the stage's directory.
    parent, name = (store.root.rsplit("/", 1) if store else (str(run_dir.parent), run_dir.name))
    return _RaylmTrainer(
        train_loop_per_worker,
        train_loop_config={"run_dir": str(run_dir), "run_uri": store.uri if store else None, "stage_indices": stage_indices,
                           "backend": backend, "relay": relay},
        torch_config=WorkersOnlyConfig(backend=backend),
        embedded=embedded,
        scaling_config=ScalingConfig(
            # Elastic: Ray starts as many workers as the cluster holds between the bounds, on every (re)start.
            num_workers=(c.min_workers, c.num_workers) if c.min_workers is not None else c.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy="PACK",
            elastic_resize_monitor_interval_s=c.elastic_check_s,
        ),
        run_config=RayRunConfig(
            name=name,
            storage_path=parent,
            storage_filesystem=store.fs if store else None,
            failure_config=FailureConfig(max_failures=cfg.fault.max_failures),
            # raylm prunes checkpoints itself (RaySession.commit): after a resume from an older checkpoint Ray would
            # register a redone step twice under one directory name and, pruning, delete the new one.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
