"""A finished stage as a Hugging Face Llama directory that transformers uses as raylm does.

Besides the weights and tokenizer, the export carries what ``generate`` and
``apply_chat_template`` need to behave like raylm: the special tokens' roles,
the ids a generation stops at, and (for sft stages) the chat template.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from raylm.data.chat import jinja_chat_template
from raylm.data.classify import end_token_on_encode
from raylm.data.tokenizer import HF_SPECIAL_TOKENS, TOKENIZER_FILE
from raylm.errors import UserError
from raylm.launcher.inference import FinishedStage
from raylm.trainer.sample import stop_tokens
from raylm.models.hf import save_hf


def save_stage_hf(stage: FinishedStage, out: Path) -> Path:
    """Write the stage's Hugging Face directory into ``out``."""
    stops = stop_tokens(stage.kind)
    # The tokenizer's eos is the token the stage learnt to end with (<|end|> for a chat model, as
    # Llama 3 Instruct's is <|eot_id|>); tools that stop at the tokenizer's eos then stop where raylm does.
    special_tokens = {**HF_SPECIAL_TOKENS, "eos_token": stops[0]}
    saved = save_hf(
        stage.model.state_dict(),
        stage.model_cfg,
        out,
        tokenizer_json_path=stage.final_dir / TOKENIZER_FILE,
        special_tokens=special_tokens,
        stop_tokens=stops,
        # Only an sft model knows the chat format; a pretrained one continues text.
        chat_template=jinja_chat_template() if stage.kind == "sft" else None,
        labels=stage.labels,
    )
    if stage.labels is not None:
        end_token_on_encode(saved / TOKENIZER_FILE)  # what the classifier reads its class at
    return saved


def export_hf(stage: FinishedStage, out: Path) -> Path:
    """``raylm export --format hf``: a new (or empty) ``--out`` directory."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; choose a new directory")
    made = not out.exists()
    try:
        return save_stage_hf(stage, out)
    except OSError as err:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise UserError(f"--out {out}: cannot write there ({err.strerror or err}); choose a writable directory") from None
