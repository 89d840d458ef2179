"""README claims about using finished stages, checked on a run directory built without Ray.

- weights cross stages and come in from outside only through safetensors, never a pickle;
- ``raylm plan`` prints ``raylm.parallelism.memory.estimate``'s numbers and the right verdict;
- ``raylm generate`` honours --interactive, --top-k, --top-p, --temperature, --seed and the chat template;
- ``raylm eval --data`` scores only the responses of sft data.

A "finished" stage here is what a stage's ``finish`` leaves (``final/`` with
consolidated safetensors, config and tokenizer, plus ``summary.json``) holding
seeded random weights: every check compares raylm against a computation made
here with the same model, so training would add nothing but minutes.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import cli_here
from numerics import longest_reduction, model_depth, worst_case

from raylm.configs.loader import load_config, resolve_stage
from raylm.data.corpus import BUILTIN_PYDOC, input_documents
from raylm.data.tokenizer import ASSISTANT, END, USER, train_tokenizer
from raylm.errors import UserError
from raylm.trainer import run_dir as rundir
from raylm.launcher.cli import main
from raylm.launcher.inference import load_stage
from raylm.trainer.layout import FINAL_DIR, STAGE_SUMMARY
from raylm.trainer.run_inputs import TOKENIZER_DIR
from raylm.trainer.run_inputs import initial_weights
from raylm.trainer.worker import build_dense_model, check_init_weights
from raylm.models.hf import hf_config, save_hf, to_hf_state_dict
from raylm.models.llama import Llama
from raylm.models.weights import load_any, save_consolidated
from raylm.parallelism.memory import estimate, parse_size

# The tiny preset's pretrain -> sft, shrunk like the other tests' runs.
SMALL = ["model.vocab_size=512", "model.max_seq_len=64"]


def make_finished_run(root: Path, name: str = "claims") -> Path:
    """A run directory whose every stage looks finished: seeded random weights, one BPE tokenizer."""
    run = load_config("tiny", [f"runs_dir={root}", f"name={name}", *SMALL])
    run_dir = rundir.create(run, "tiny")
    tokenizer = train_tokenizer(input_documents(BUILTIN_PYDOC), "bpe", run.model.vocab_size)
    tokenizer.save(run_dir / TOKENIZER_DIR)
    for index, stage in enumerate(run.stages):
        cfg = resolve_stage(run, index).model
        torch.manual_seed(100 + index)
        final = run_dir / stage.name / FINAL_DIR
        save_consolidated(Llama(cfg).state_dict(), cfg, final)
        tokenizer.save(final)
        (run_dir / stage.name / STAGE_SUMMARY).write_text(json.dumps({"stage": stage.name, "kind": stage.kind}))
    return run_dir


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return make_finished_run(tmp_path_factory.mktemp("finished"))


# ------------------------------------------------------------- never unpickle
_watchers: List[list] = []


def _audit(event: str, args: tuple) -> None:
    # Every unpickler, C or Python, raises this event when it resolves a class or function.
    if event == "pickle.find_class" and _watchers:
        _watchers[-1].append(f"pickle.find_class{args}")


sys.addaudithook(_audit)


@pytest.fixture
def unpickled(monkeypatch) -> List[str]:
    """Every unpickling this test does: torch.load (any weights_only), pickle.load(s), pickle.Unpickler, and
    any unpickler that resolves a global. A spy: the real function still runs."""
    calls: List[str] = []

    def spy(name, real):
        def recorded(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return recorded

    monkeypatch.setattr(torch, "load", spy("torch.load", torch.load))
    monkeypatch.setattr(torch.serialization, "load", spy("torch.serialization.load", torch.serialization.load))
    monkeypatch.setattr(pickle, "load", spy("pickle.load", pickle.load))
    monkeypatch.setattr(pickle, "loads", spy("pickle.loads", pickle.loads))
    real_unpickler = pickle.Unpickler

    class Unpickler(real_unpickler):
        def __init__(self, *args, **kwargs):
            calls.append("pickle.Unpickler")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pickle, "Unpickler", Unpickler)
    _watchers.append(calls)
    yield calls
    _watchers.remove(calls)


def test_the_spy_sees_every_kind_of_unpickling(unpickled):
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert unpickled[0] == "torch.load"
    del unpickled[:]
    import _pickle  # a module holding the C unpickler directly still shows through the audit hook

    _pickle.loads(pickle.dumps(torch.ones(1)))
    assert unpickled and unpickled[0].startswith("pickle.find_class")


def test_stage_hand_off_and_init_from_never_unpickle(finished, tmp_path, unpickled):
    """Stage 2 starts from stage 1's final/, or from stages.N.init_from (another run's final/ or a Hugging Face
    directory): what the driver checks and each worker loads, all through safetensors."""
    run = rundir.load(finished)
    sft = resolve_stage(run, 1)
    other_run, hugging_face = Llama(sft.model), Llama(sft.model)
    save_consolidated(other_run.state_dict(), sft.model, tmp_path / "other" / FINAL_DIR)
    save_hf(hugging_face.state_dict(), sft.model, tmp_path / "hf")
    previous_stage = load_file(str(finished / "pretrain" / FINAL_DIR / "model.safetensors"))
    for init_from, weights_dir, expected in (
        (None, finished / "pretrain" / FINAL_DIR, previous_stage),
        (str(tmp_path / "other" / FINAL_DIR), tmp_path / "other" / FINAL_DIR, other_run.state_dict()),
        (str(tmp_path / "hf"), tmp_path / "hf", hugging_face.state_dict()),
    ):
        run.stages[1].init_from = init_from
        assert initial_weights(finished, run, 1) == weights_dir
        check_init_weights(sft, weights_dir)  # the driver, before any worker starts
        loaded = build_dense_model(sft, weights_dir).state_dict()  # each worker
        for name, tensor in expected.items():
            assert torch.equal(loaded[name], tensor), (weights_dir, name)
    assert unpickled == []


def test_generate_eval_export_and_import_never_unpickle(finished, tmp_path, unpickled, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {w}?", "response": f"{w} is a word."}) + "\n" for w in ("spam", "eggs", "ham")))
    out = tmp_path / "export"
    assert main(["generate", str(finished), "--prompt", "What is a list?", "--max-new-tokens", "4"]) == 0
    assert main(["generate", str(finished), "--stage", "pretrain", "--prompt", "The ", "--max-new-tokens", "4"]) == 0
    assert main(["eval", str(finished), "--data", str(data)]) == 0
    assert main(["export", str(finished), "--out", str(out)]) == 0
    _, state = load_any(out)  # the export read back as an import
    assert torch.equal(state["tok_embeddings.weight"], load_stage(finished).model.tok_embeddings.weight)
    assert unpickled == []


class _Trap:
    """Unpickling this creates a directory: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_pickled_hugging_face_checkpoint_is_refused_not_loaded(finished, tmp_path, unpickled):
    sft = resolve_stage(rundir.load(finished), 1)
    hf_dir, sprung = tmp_path / "pickled", tmp_path / "trap-sprung"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(hf_config(sft.model)))
    state = to_hf_state_dict(Llama(sft.model).state_dict())
    torch.save({**state, "trap": _Trap(sprung)}, hf_dir / "pytorch_model.bin")

    with pytest.raises(UserError, match=r"only safetensors weights are imported"):
        load_any(hf_dir)
    with pytest.raises(UserError, match=r"pytorch_model.bin|\.bin"):
        build_dense_model(sft, hf_dir)
    assert unpickled == [] and not sprung.exists()
    # The trap is armed: loading the file the way pickle-based tools do springs it.
    torch.load(hf_dir / "pytorch_model.bin", weights_only=False)
    assert sprung.is_dir() and unpickled


# ----------------------------------------------------------------- raylm plan
def _plan_output(capsys, monkeypatch, *args: str) -> str:
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    assert main(["plan", *args]) == 0
    return capsys.readouterr().out


ROWS = {
    "weights": "weights_gib",
    "gradients": "grads_gib",
    "optimizer state": "optimizer_gib",
    "activations per step (no checkpointing)": "activations_gib",
    "activations per step (checkpointing)": "activations_checkpointed_gib",
    "final norm, logits and loss buffers (last stage)": "loss_gib",
    "backward: the largest weight's gradient before accumulation": "backward_gib",
    "DeepSpeed communication buckets": "buckets_gib",
    "start-up: fp32 weights before deepspeed.initialize": "startup_gib",
}
VERDICT = re.compile(r"(fits|does NOT fit) in ([\d,.]+) GiB per GPU \(([\d,.]+) GiB needed\)")


@pytest.mark.parametrize("overrides, verdict", [
    (["parallel.tp=1", "parallel.zero_stage=0", "cluster.num_workers=8"], "does NOT fit"),
    (["parallel.tp=1", "parallel.zero_stage=3", "cluster.num_workers=64"], "fits"),
], ids=["7b-replicated", "7b-zero3-64"])
def test_plan_prints_the_estimate_and_its_verdict(capsys, monkeypatch, overrides, verdict):
    out = _plan_output(capsys, monkeypatch, "7b", *overrides, "--gpu-mem", "80GB")
    run = load_config("7b", overrides)
    plan = estimate(run, bf16=True)
    assert f"{plan.params / 1e6:,.1f}M parameters" in out
    for label, attribute in ROWS.items():
        printed = re.search(rf"│ {re.escape(label)}\s+│\s+([\d,.]+) │", out)
        assert printed and printed.group(1) == f"{getattr(plan, attribute):,.2f}", label
    total = plan.total_gib(run.parallel.activation_checkpointing)
    assert re.search(rf"│ total\s+│\s+{re.escape(f'{total:,.2f}')} │", out)
    said = VERDICT.search(out)
    assert said.groups() == (verdict, f"{parse_size('80GB'):,.1f}", f"{total:,.1f}")
    assert (total <= parse_size("80GB")) == (verdict == "fits")


def test_plan_verdict_flips_at_the_estimated_total(capsys, monkeypatch):
    overrides = ["parallel.tp=1", "parallel.zero_stage=3", "cluster.num_workers=64"]
    total = estimate(load_config("7b", overrides), bf16=True).total_gib(False)
    above = VERDICT.search(_plan_output(capsys, monkeypatch, "7b", *overrides, "--gpu-mem", f"{total * 1.01}GiB"))
    below = VERDICT.search(_plan_output(capsys, monkeypatch, "7b", *overrides, "--gpu-mem", f"{total * 0.99}GiB"))
    assert above.group(1) == "fits" and below.group(1) == "does NOT fit"


# ------------------------------------------------------------- raylm generate
def greedy(stage, text: str, max_new_tokens: int) -> str:
    """The temperature-0 continuation, one full forward pass per token (no KV cache), as the CLI would print it."""
    tok = stage.tokenizer
    # A chat answer ends at end-of-turn or at end-of-text.
    stop = {tok.end_id, tok.eos_id} if stage.kind == "sft" else {tok.eos_id}
    ids, new = tok.encode(text), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(stage.model(torch.tensor([ids + new]))[0, -1].argmax())
            if token in stop:
                break
            new.append(token)
    # The CLI holds back a trailing partial UTF-8 character.
    return tok.decode(new).rstrip("\ufffd")


def _generate(run_dir: Path, *args: str, stdin: str = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "raylm.launcher.cli", "generate", str(run_dir), "--max-new-tokens", "12", *args],
        input=stdin, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


# Sampling at temperature 5 with top-k 1 or a tiny top-p must still be greedy.
HOT_BUT_TOP_K_1 = ["--temperature", "5", "--top-k", "1", "--seed", "1"]
HOT_BUT_TINY_TOP_P = ["--temperature", "5", "--top-p", "1e-6", "--seed", "2"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_interactive_generation_answers_each_line_until_an_empty_one_and_top_k_1_is_greedy(finished):
    pretrain = load_stage(finished, "pretrain")
    prompts = ["The list", "A class is"]
    out = _generate(finished, "--stage", "pretrain", "--interactive", *HOT_BUT_TOP_K_1,
                    stdin="\n".join([*prompts, "", "never read"]) + "\n")
    # input("> ") writes its prompt to stdout when stdin is not a terminal; a pretrain stage echoes the prompt.
    assert out == "".join(f"> {p}{greedy(pretrain, p, 12)}\n" for p in prompts) + "> "


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_interactive_generation_ends_at_eof_sft_uses_the_chat_template_and_tiny_top_p_is_greedy(finished):
    sft = load_stage(finished)
    assert sft.kind == "sft"
    question = "What is a tuple?"
    templated = greedy(sft, f"{USER}\n{question}{END}\n{ASSISTANT}\n", 12)
    assert templated != greedy(sft, question, 12)  # the template changes what this model says
    out = _generate(finished, "--interactive", *HOT_BUT_TINY_TOP_P, stdin=question + "\n")
    assert out == f"> {templated}\n> "


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_seed_decides_a_sample(finished, capsys):
    prompt = "The "
    hot = ["generate", str(finished), "--max-new-tokens", "12", "--stage", "pretrain", "--prompt", prompt, "--temperature", "5",
           "--top-k", "100"]

    def sample(seed: str) -> str:  # in this process: three interpreter starts would be most of the test's time
        code, out, err = cli_here(capsys, *hot, "--seed", seed)
        assert code == 0, err
        return out

    first = sample("7")
    assert first != prompt + greedy(load_stage(finished, "pretrain"), prompt, 12) + "\n"
    assert sample("7") == first
    assert sample("8") != first


# ----------------------------------------------------------------- raylm eval
def test_eval_on_sft_data_scores_only_the_responses(finished, tmp_path, capsys):
    rows = [
        ("What is a list?", "A mutable sequence."),
        ("Name a keyword.", "lambda"),
        ("What does len do? Answer briefly, please, in a few words.", "It counts items."),
        ("Is None true?", "No, it is false."),
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    assert main(["eval", str(finished), "--data", str(data)]) == 0
    reported = json.loads(capsys.readouterr().out)
    assert reported["stage"] == "sft" and reported["sequences"] == len(rows)

    stage = load_stage(finished)
    tok = stage.tokenizer
    response_losses, all_losses = [], []
    with torch.no_grad():
        for prompt, response in rows:
            asked = tok.encode(f"{USER}\n{prompt}{END}\n{ASSISTANT}\n")
            answer = tok.encode(response + END)
            ids = torch.tensor(asked + answer + tok.encode("\n"))
            per_token = F.cross_entropy(stage.model(ids[None, :-1])[0], ids[1:], reduction="none")
            # Target j is token j + 1: the answer's tokens are targets len(asked) - 1 ... len(asked) + len(answer) - 2.
            response_losses.append(per_token[len(asked) - 1 : len(asked) - 1 + len(answer)])
            all_losses.append(per_token)
    by_hand = torch.cat(response_losses).mean().item()
    everything = torch.cat(all_losses).mean().item()
    # raylm scores the rows as one padded batch, the hand computation row by row: the same sums, reordered.
    rel = worst_case(longest_reduction(stage.model_cfg, len(rows) * stage.model_cfg.max_seq_len)) * model_depth(stage.model_cfg)
    assert reported["loss"] == pytest.approx(by_hand, rel=rel)
    assert abs(reported["loss"] - everything) > 1e-3


@pytest.mark.parametrize("option, value", [("--top-k", "-1"), ("--top-p", "0"), ("--top-p", "1.5"), ("--temperature", "-1")])
def test_impossible_sampling_settings_are_one_line_errors(finished, capsys, option, value):
    assert main(["generate", str(finished), "--prompt", "Hi", option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raylm: error: ") and option in err and err.count("\n") == 1
