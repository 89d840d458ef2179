"""What a distill stage does differently on a rank: it holds a teacher and mixes its distribution into the loss.

The student is the stage's model, built, sharded by ZeRO and checkpointed like
a pretraining stage's; it reads the pretraining data. The teacher is a whole
plain ``Llama`` on every rank, outside DeepSpeed: frozen, in eval mode, in the
student's compute dtype, run without autograd on the rank's own micro-batch.
It is never checkpointed: a resume loads it again from its source, and since
its forward draws no random numbers the resumed losses are the uninterrupted ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import torch

from raylm.configs.schema import DistillConfig, ModelConfig
from raylm.data.tokenizer import Tokenizer
from raylm.errors import UserError
from raylm.models.llama import Llama
from raylm.models.loss import distillation_loss
from raylm.models.weights import check_weights, load_any


def teacher_fix(key: str) -> str:
    return f"point {key} at a raylm final/ or Hugging Face Llama directory trained with this run's tokenizer"


def check_teacher(path: Path, student: ModelConfig, key: str) -> ModelConfig:
    """The teacher's model config, once its weights' headers are whole and its vocabulary is the student's
    (the KL compares the two distributions entry by entry); reads no tensor."""
    teacher = check_weights(path, teacher_fix(key))
    if teacher.max_seq_len < student.max_seq_len:
        raise UserError(f"{key}: the teacher in {path} has model.max_seq_len={teacher.max_seq_len}, shorter than the student's "
                        f"{student.max_seq_len} tokens it must read; set model.max_seq_len<={teacher.max_seq_len}")
    if teacher.vocab_size != student.vocab_size:
        raise UserError(f"{key}: the teacher in {path} has model.vocab_size={teacher.vocab_size}, the student "
                        f"{student.vocab_size}; distillation needs one vocabulary: set model.vocab_size={teacher.vocab_size}")
    return teacher


def check_teacher_tokenizer(tokenizer: Tokenizer, path: Path, key: str) -> None:
    """Refuse a teacher whose tokenizer.json is not the stage's: the same ids would mean other tokens."""
    theirs = Tokenizer.load(path, teacher_fix(key))
    if theirs.fingerprint != tokenizer.fingerprint:
        raise UserError(f"{key}: the teacher in {path} was trained with another tokenizer than this run's "
                        f"({theirs.kind}, {theirs.vocab_size} tokens vs {tokenizer.kind}, {tokenizer.vocab_size}); "
                        "distil from a teacher trained with the run's tokenizer, or start the run from the teacher's (a first distill stage takes it)")


def load_teacher(path: Path, device: torch.device, dtype: torch.dtype) -> Llama:
    """The whole teacher on ``device`` in ``dtype``, frozen and in eval mode: teacher.param_count x dtype bytes per rank."""
    cfg, state = load_any(path)
    with torch.device("meta"):
        teacher = Llama(cfg)
    teacher.load_state_dict(state, assign=True)  # the loaded tensors themselves, no second copy
    if cfg.tie_embeddings:  # assign gave the head its own Parameter over the same storage; one weight again, cast once
        teacher.output.weight = teacher.tok_embeddings.weight
    return teacher.to(device=device, dtype=dtype).requires_grad_(False).eval()


class Distiller:
    """The distill loss of one micro-batch: the student's logits against the teacher's on the same tokens."""

    def __init__(self, teacher: Llama, settings: DistillConfig):
        self.teacher = teacher
        self.settings = settings

    def loss(self, student_logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """student_logits (B, T, V), inputs and targets (B, T) -> (the loss to backpropagate, its parts kl and ce, detached)."""
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)  # (B, T, V) in the teacher's dtype
        loss, kl, ce = distillation_loss(student_logits, teacher_logits, targets, self.settings.temperature, self.settings.alpha)
        return loss, {"kl": kl.detach(), "ce": ce.detach()}
