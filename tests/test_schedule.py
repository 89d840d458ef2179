from raylm.configs.schema import OptimConfig
from raylm.trainer.schedule import lr_factor


def test_warmup_then_cosine_to_min_ratio():
    optim = OptimConfig(warmup_steps=4, min_lr_ratio=0.1)
    factors = [lr_factor(s, optim, 20) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert abs(lr_factor(20, optim, 20) - 0.1) < 1e-12
    assert lr_factor(100, optim, 20) == lr_factor(20, optim, 20)


def test_no_warmup_starts_at_peak():
    assert lr_factor(0, OptimConfig(warmup_steps=0), 10) == 1.0
