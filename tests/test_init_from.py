"""Starting a stage from raylm or Hugging Face weights (the hand-off's loading side)."""

import pytest
import torch

from raylm.configs.loader import load_config
from raylm.errors import UserError
from raylm.trainer.worker import build_dense_model
from raylm.models.hf import save_hf
from raylm.models.llama import Llama
from raylm.models.weights import save_consolidated

OVERRIDES = ["model.vocab_size=512", "model.max_seq_len=64"]


def _trained_like(cfg):
    torch.manual_seed(99)  # differs from the run's seed, so a silent fresh init would show
    return Llama(cfg.model)


@pytest.mark.parametrize("fmt", ["raylm", "hf"])
def test_init_from_reproduces_the_weights_exactly(tmp_path, fmt):
    cfg = load_config("tiny", OVERRIDES)
    source = _trained_like(cfg)
    if fmt == "raylm":
        save_consolidated(source.state_dict(), cfg.model, tmp_path)
    else:
        save_hf(source.state_dict(), cfg.model, tmp_path)
    model = build_dense_model(cfg, tmp_path)
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_init_from_weights_of_another_shape_is_refused(tmp_path):
    cfg = load_config("tiny", OVERRIDES)
    save_consolidated(_trained_like(cfg).state_dict(), cfg.model, tmp_path)
    other = load_config("tiny", [*OVERRIDES[:1], "model.n_layer=2"])
    with pytest.raises(UserError, match="model.n_layer=2 vs 4"):
        build_dense_model(other, tmp_path)


def test_init_from_a_directory_without_weights_is_refused(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        build_dense_model(load_config("tiny", OVERRIDES), tmp_path)
