"""Ray Train's fixed-size scaling policy for a cluster without an autoscaler (the embedded one).

Ray Train 2.60's policies ask an autoscaler for the workers' resources through an ``_AutoscalingCoordinatorActor``,
which the controller creates (a process importing Ray Train and Ray Data, ~2 CPU-seconds) and waits for before it
starts the first worker group (~1.7 s of every launch on a 2-core machine). An embedded cluster has no autoscaler:
there is nothing to ask. The elastic policy keeps it: it sizes the worker group from what the coordinator reserved.
Unpickled by the controller, so this module imports neither torch nor raylm's per-rank code.
"""

from __future__ import annotations

try:
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
except ImportError:  # a Ray (pyproject allows >= 2.50) that keeps it elsewhere: its own policy stays
    FixedScalingPolicy = None
else:
    class _FixedWithoutAutoscaler(FixedScalingPolicy):
        def after_controller_start(self, train_run_context) -> None:
            pass  # Ray's registers the workers' resources with the coordinator, creating it

        def _maybe_send_resource_request(self) -> None:
            pass


def without_autoscaler(policy):
    """``policy`` less its requests to an autoscaler, where it is Ray's fixed-size one; any other as it is."""
    if FixedScalingPolicy is None or type(policy) is not FixedScalingPolicy:
        return policy
    return _FixedWithoutAutoscaler(policy.scaling_config)
