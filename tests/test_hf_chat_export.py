"""`raylm export --format hf` of a chat model: transformers renders raylm's chat template and stops where raylm stops."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from jinja2.exceptions import TemplateError

from conftest import TINY_PRETRAIN, finished_run
from raylm.data.chat import format_chat, tokenize_chat
from raylm.data.tokenizer import END, EOS, PAD
from raylm.launcher.cli import main
from raylm.launcher.inference import generate_text, load_stage
from raylm.models.generate import stream

SAY_HI = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi! I am raylm."}]
WITH_SYSTEM = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Best language?"},
               {"role": "assistant", "content": "Python."}]
MULTI_TURN = [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1 2 3"},
              {"role": "user", "content": "And back?"}, {"role": "assistant", "content": "3 2 1"}]
CONVERSATIONS = {"single-turn": SAY_HI, "system": WITH_SYSTEM, "multi-turn": MULTI_TURN}
MAX_NEW_TOKENS = 24
"""More than any answer needs, and prompt + answer stay within the tiny model's 64-token context."""


def _greedy_answers(model, tokenizer) -> list:
    answers = []
    for conversation in CONVERSATIONS.values():
        prompt = tokenizer.encode(format_chat(conversation[:-1], add_generation_prompt=True))
        answers.append(tokenizer.decode(list(stream(model, torch.tensor([prompt]), MAX_NEW_TOKENS, temperature=0, eos_id=tokenizer.end_id))))
    return answers


def _chat_model_state() -> dict:
    """The tiny model fine-tuned (loss on the replies only, as raylm's sft) until greedy decoding gives every reply and its <|end|>:
    a model that stops on its own, which a freshly initialised one never does."""
    from raylm.configs.loader import load_config
    from raylm.data.tokenizer import train_tokenizer
    from raylm.models.llama import Llama
    from raylm.models.loss import cross_entropy_loss

    cfg = load_config("tiny", [*TINY_PRETRAIN, "data.tokenizer=byte"]).model
    tokenizer = train_tokenizer([], "byte", cfg.vocab_size)
    inputs = torch.full((len(CONVERSATIONS), cfg.max_seq_len), tokenizer.pad_id)
    targets = torch.full_like(inputs, -100)
    for row, conversation in enumerate(CONVERSATIONS.values()):
        ids, mask = tokenize_chat(tokenizer, conversation)
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        targets[row, : len(ids) - 1] = torch.where(torch.tensor(mask[1:]).bool(), torch.tensor(ids[1:]), -100)
    torch.manual_seed(0)
    model = Llama(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    wanted = [c[-1]["content"] + END for c in CONVERSATIONS.values()]
    for step in range(400):
        loss = cross_entropy_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 24:
            model.eval()
            if _greedy_answers(model, tokenizer) == wanted:
                return model.state_dict()
            model.train()
    raise AssertionError(f"the tiny model did not learn the replies in 400 steps (loss {loss.item():.3g})")


# Tests on this fixture are marked slow: the fine-tuning takes seconds on 2 idle cores.
@pytest.fixture(scope="module")
def chat_export(tmp_path_factory):
    """(the finished sft stage, its Hugging Face export) of a run whose model learnt CONVERSATIONS."""
    root = tmp_path_factory.mktemp("chat")
    run_dir = finished_run(root / "runs", "chat", kind="sft", state=_chat_model_state())
    out = root / "hf"
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    return load_stage(run_dir), out


@pytest.fixture(scope="module")
def hf_tokenizer(chat_export):
    return transformers.AutoTokenizer.from_pretrained(chat_export[1])


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_apply_chat_template_gives_raylms_token_ids(chat_export, hf_tokenizer, name):
    stage, _ = chat_export
    conversation = CONVERSATIONS[name]
    prompt = conversation[:-1]
    hf_prompt = hf_tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert hf_prompt == stage.tokenizer.encode(format_chat(prompt, add_generation_prompt=True))  # what raylm generates from
    hf_whole = hf_tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
    assert hf_whole == tokenize_chat(stage.tokenizer, conversation)[0]  # what raylm fine-tunes on


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_role_raylm_has_no_token_for_is_refused(hf_tokenizer):
    with pytest.raises(TemplateError, match="message 1 has role tool; use one of system, user, assistant"):
        hf_tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}], tokenize=False)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_special_tokens_are_in_every_config(chat_export, hf_tokenizer):
    stage, out = chat_export
    eos, pad, end = stage.tokenizer.eos_id, stage.tokenizer.pad_id, stage.tokenizer.end_id
    # The end-of-turn token first: the one a chat model learnt to end with.
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token, hf_tokenizer.pad_token) == (EOS, END, PAD)
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (eos, end, pad)
    config = transformers.AutoConfig.from_pretrained(out)
    generation = transformers.GenerationConfig.from_pretrained(out)
    for loaded in (config, generation):
        assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (eos, [end, eos], pad)
    # Encoding adds no token of its own, as raylm's tokenizer does not.
    assert hf_tokenizer("Say hi.")["input_ids"] == stage.tokenizer.encode("Say hi.")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pipeline_gives_raylms_greedy_answer_and_stops_where_raylm_stops(chat_export):
    stage, out = chat_export
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    question = SAY_HI[0]["content"]
    ours = "".join(generate_text(stage, question, MAX_NEW_TOKENS, temperature=0.0, top_k=None, top_p=None, seed=0))
    reply = pipe([{"role": "user", "content": question}], max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0]["generated_text"][-1]
    assert reply == {"role": "assistant", "content": ours}
    assert ours == SAY_HI[-1]["content"]  # stopped at <|end|>, well before MAX_NEW_TOKENS


@pytest.mark.parametrize("name", ["system", "multi-turn"])
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_generate_continues_a_conversation_as_raylm_does(chat_export, hf_tokenizer, name):
    stage, out = chat_export
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = hf_tokenizer.apply_chat_template(CONVERSATIONS[name][:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, prompt["input_ids"].size(1):].tolist()
    stops = [stage.tokenizer.end_id, stage.tokenizer.eos_id]
    ours = list(stream(stage.model, prompt["input_ids"], MAX_NEW_TOKENS, temperature=0, eos_id=stops))
    assert generated == ours and ours[-1] == stage.tokenizer.end_id


def test_a_pretrained_stage_exports_no_chat_template_and_stops_at_end_of_text(tmp_path):
    run_dir = finished_run(tmp_path / "runs")
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    stage = load_stage(run_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == EOS and tokenizer.chat_template is None
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == stage.tokenizer.eos_id
    with pytest.raises(ValueError, match="chat template"):
        tokenizer.apply_chat_template(SAY_HI[:1])
