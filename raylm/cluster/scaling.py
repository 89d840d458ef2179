"""Ray Train's scaling policies as raylm runs them.

Ray Train 2.60's policies go through an ``_AutoscalingCoordinatorActor`` (Ray Data's), which the controller creates
(a process importing Ray Train and Ray Data, ~2 CPU-seconds) and which reserves the cluster's nodes to the runs that
ask. Two changes, each where this Ray has the hooks (otherwise Ray's policy stays):

- a fixed-size run on the embedded cluster asks nothing: that cluster has no autoscaler, and creating the coordinator
  cost ~1.7 s of every launch on a 2-core machine;
- an elastic run sizes its worker group from the nodes as they are now. The coordinator refreshes its view of the
  nodes every 20 s (``TICK_INTERVAL_S``): after a node was lost the restart kept trying for the lost node's workers
  (``cluster.placement_timeout_s`` a try, 20 s in all in the elastic test), and a node added was seen up to 20 s late
  (26 s there). Its ``get_reserved_resources(recompute=True)`` refreshes the view first (one ``ray.nodes()``), at
  most once a second while the group restarts and once every ``cluster.elastic_check_s`` while it trains.

Unpickled by the controller, so this module imports neither torch nor raylm's per-rank code.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

try:
    from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import _AutoscalingCoordinatorActor
except ImportError:  # a Ray (pyproject allows >= 2.50) that keeps them elsewhere
    FixedScalingPolicy = ElasticScalingPolicy = _AutoscalingCoordinatorActor = None
else:
    class _FixedWithoutAutoscaler(FixedScalingPolicy):
        def after_controller_start(self, train_run_context) -> None:
            pass  # Ray's registers the workers' resources with the coordinator, creating it

        def _maybe_send_resource_request(self) -> None:
            pass

    class _FreshReservations:
        """``coordinator.get_reserved_resources``, each call against a fresh view of the cluster's nodes."""

        def __init__(self, coordinator):
            self._method = coordinator.get_reserved_resources

        def remote(self, requester_id):
            return self._method.remote(requester_id, recompute=True)

    class _ElasticOnCurrentNodes(ElasticScalingPolicy):
        @property
        def _autoscaling_coordinator(self):
            # Ray's elastic policy calls only get_reserved_resources on it.
            return SimpleNamespace(get_reserved_resources=_FreshReservations(super()._autoscaling_coordinator))


def _recomputes() -> bool:
    return (_AutoscalingCoordinatorActor is not None
            and "recompute" in inspect.signature(_AutoscalingCoordinatorActor.get_reserved_resources).parameters)


def for_raylm(policy, embedded: bool):
    """``policy`` (Ray's, as Ray Train made it) as raylm runs it: on the ``embedded`` cluster a fixed-size one without
    its requests to an autoscaler; on any cluster an elastic one sized from the current nodes; any other as it is."""
    if FixedScalingPolicy is not None and embedded and type(policy) is FixedScalingPolicy:
        return _FixedWithoutAutoscaler(policy.scaling_config)
    if ElasticScalingPolicy is not None and type(policy) is ElasticScalingPolicy and _recomputes():
        return _ElasticOnCurrentNodes(policy.scaling_config)
    return policy
