"""Cross-field rules of a run config, checked before Ray starts.

Each rule raises a one-line ``UserError`` that names the key(s) and the fix.
"""

from __future__ import annotations

import glob
import math
from pathlib import Path
from typing import List

from raylm.configs.schema import DataConfig, DataSourceConfig, DistillConfig, LoraConfig, RunConfig
from raylm.errors import UserError
from raylm.storage import check_uri, is_uri
from raylm.parallelism.zero import batch_splits, batch_unit

BYTE_TOKENIZER_MIN_VOCAB = 262  # 256 bytes + the 6 special tokens of raylm.data.tokenizer
STAGE_KINDS = ("pretrain", "sft", "classify", "distill")
BUILTIN_SOURCES = {"pretrain": ("builtin:pydoc",), "sft": ("builtin:pydoc-sft",), "classify": ("builtin:pydoc-topic",),
                   "distill": ("builtin:pydoc",)}


def _positive(value: float, key: str, strict: bool = True) -> None:
    if value is None:
        return
    bound = "> 0" if strict else ">= 0"
    if not math.isfinite(value):  # nan compares False with everything
        raise UserError(f"{key}={value} must be a finite number {bound}")
    if (strict and value <= 0) or (not strict and value < 0):
        raise UserError(f"{key}={value} must be {bound}")


def _one_of(value: str, key: str, allowed: tuple) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value!r} must be one of {', '.join(repr(a) for a in allowed)}")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def validate_model(run: RunConfig) -> None:
    m = run.model
    for key in ("vocab_size", "d_model", "n_layer", "n_head", "multiple_of", "max_seq_len"):
        _positive(getattr(m, key), f"model.{key}")
    _positive(m.n_kv_head, "model.n_kv_head")
    _positive(m.ffn_hidden, "model.ffn_hidden")
    _positive(m.rope_theta, "model.rope_theta")
    _positive(m.norm_eps, "model.norm_eps")
    _positive(m.init_std, "model.init_std")
    if m.d_model % m.n_head:
        raise UserError(f"model.n_head={m.n_head} must divide model.d_model={m.d_model}; choose n_head among {_divisors(m.d_model)}")
    if (m.d_model // m.n_head) % 2:
        raise UserError(f"head size model.d_model/model.n_head={m.d_model // m.n_head} must be even for RoPE; change model.n_head or model.d_model")
    kv = m.n_kv_head or m.n_head
    if m.n_head % kv:
        raise UserError(f"model.n_kv_head={kv} must divide model.n_head={m.n_head}; choose among {_divisors(m.n_head)}")
    if run.data.tokenizer == "byte" and m.vocab_size < BYTE_TOKENIZER_MIN_VOCAB:
        raise UserError(f"model.vocab_size={m.vocab_size} is too small for data.tokenizer='byte'; use at least {BYTE_TOKENIZER_MIN_VOCAB}")


def validate_parallel(run: RunConfig) -> None:
    p, m, c = run.parallel, run.model, run.cluster
    for key in ("tp", "pp", "micro_batch_size"):
        _positive(getattr(p, key), f"parallel.{key}")
    _positive(p.pipeline_microbatches, "parallel.pipeline_microbatches")
    if p.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"parallel.zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
    if p.pp > 1 and p.zero_stage > 1:
        raise UserError(
            f"parallel.zero_stage={p.zero_stage} cannot run with parallel.pp={p.pp}: DeepSpeed's pipeline engine supports ZeRO 0 or 1; set parallel.zero_stage=1"
        )
    kv = m.n_kv_head or m.n_head
    if m.n_head % p.tp or kv % p.tp:
        raise UserError(
            f"parallel.tp={p.tp} must divide model.n_head={m.n_head} and model.n_kv_head={kv}; choose tp among {_divisors(kv)}"
        )
    from raylm.models.shapes import ffn_hidden_size

    ffn = ffn_hidden_size(m)
    if ffn % p.tp:
        raise UserError(f"parallel.tp={p.tp} must divide the SwiGLU width {ffn} (model.ffn_hidden / model.multiple_of); change one of them")
    if m.vocab_size % p.tp:
        raise UserError(f"parallel.tp={p.tp} must divide model.vocab_size={m.vocab_size}; round the vocabulary up to a multiple of {p.tp}")
    if p.pp > m.n_layer:
        raise UserError(f"parallel.pp={p.pp} exceeds model.n_layer={m.n_layer}; each pipeline stage needs at least one block")
    model_parallel = p.tp * p.pp
    _positive(c.num_workers, "cluster.num_workers")
    if c.min_workers is None:
        if c.num_workers % model_parallel:
            raise UserError(
                f"cluster.num_workers={c.num_workers} is not divisible by parallel.tp={p.tp} x parallel.pp={p.pp}; use a multiple of {model_parallel}"
            )
        dp = c.num_workers // model_parallel
        if not batch_splits(run, dp):
            raise _batch_error(run, dp)
    else:
        # Elastic: Ray may start any count in [min, max]; the ranks beyond the whole
        # replicas that split the global batch wait (raylm.parallelism.zero.usable_world_size).
        if not model_parallel <= c.min_workers <= c.num_workers:
            raise UserError(
                f"cluster.min_workers={c.min_workers} must lie between one tp x pp replica ({model_parallel}) and "
                f"cluster.num_workers={c.num_workers}, the elastic upper bound"
            )
        if not batch_splits(run, 1):
            raise _batch_error(run, 1)
    for key in ("elastic_check_s", "placement_timeout_s"):
        if getattr(c, key) <= 0:
            raise UserError(f"cluster.{key}={getattr(c, key)} must be > 0")


def _batch_error(run: RunConfig, dp: int) -> UserError:
    name, per_replica = batch_unit(run)
    return UserError(
        f"train.global_batch_size={run.train.global_batch_size} must be a multiple of data-parallel size {dp} x "
        f"{name}={per_replica} = {dp * per_replica}"
    )


def validate_training(run: RunConfig) -> None:
    t, o = run.train, run.optim
    _positive(t.max_steps, "train.max_steps")
    _positive(t.global_batch_size, "train.global_batch_size")
    _positive(t.log_every, "train.log_every")
    _positive(t.eval_batches, "train.eval_batches")
    _positive(t.keep_last, "train.keep_last")
    _positive(t.eval_every, "train.eval_every", strict=False)
    _positive(t.ckpt_every, "train.ckpt_every", strict=False)
    _positive(t.sample_tokens, "train.sample_tokens", strict=False)
    _one_of(t.precision, "train.precision", ("auto", "fp32", "bf16"))
    _positive(o.lr, "optim.lr")
    _positive(o.warmup_steps, "optim.warmup_steps", strict=False)
    _positive(o.weight_decay, "optim.weight_decay", strict=False)
    _positive(o.grad_clip, "optim.grad_clip", strict=False)
    _positive(o.eps, "optim.eps")
    if not 0 <= o.min_lr_ratio <= 1:
        raise UserError(f"optim.min_lr_ratio={o.min_lr_ratio} must be between 0 and 1")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(o, key) < 1:
            raise UserError(f"optim.{key}={getattr(o, key)} must be in [0, 1)")


def _check_corpus(source: str, key: str, kind: str) -> None:
    if source.startswith("builtin:"):
        if source not in BUILTIN_SOURCES[kind]:
            raise UserError(f"{key}={source!r} is not a built-in {kind} corpus; use {' or '.join(BUILTIN_SOURCES[kind])} or a path")
    elif not Path(source).exists() and not glob.glob(source):
        raise UserError(f"{key}={source!r}: no such file, directory or glob match; check the path")


def validate_sources(sources: List[DataSourceConfig], key: str, kind: str) -> None:
    """A mixture's list: ``key`` is where it was set (``data.sources`` or ``stages.N.data.sources``)."""
    if kind not in ("pretrain", "distill"):
        raise UserError(f"{key} mixes pretraining corpora but this stage is {kind}; give it one data.source instead")
    if not sources:
        raise UserError(f"{key} is empty; list sources as [{{path: ..., weight: ...}}, ...], or set it to null to read data.source")
    for k, source in enumerate(sources):
        if not source.path:
            raise UserError(f"{key}.{k}.path is empty; give a corpus path or {' or '.join(BUILTIN_SOURCES[kind])}")
        _check_corpus(source.path, f"{key}.{k}.path", kind)
        if not (math.isfinite(source.weight) and source.weight >= 0):
            raise UserError(f"{key}.{k}.weight={source.weight} must be a number >= 0 (weights are relative shares of the samples)")
        if source.path in [s.path for s in sources[:k]]:
            raise UserError(f"{key}.{k}.path={source.path!r} is listed twice; list each source once with the sum of its weights")
    if not any(source.weight > 0 for source in sources):
        raise UserError(f"{key}: every weight is 0; give at least one source a weight > 0")


def validate_data(run: RunConfig, kind: str, sources_key: str = "data.sources") -> None:
    d = run.data
    _one_of(d.tokenizer, "data.tokenizer", ("bpe", "byte"))
    if not 0 < d.val_fraction < 1:
        raise UserError(f"data.val_fraction={d.val_fraction} must be between 0 and 1 (exclusive)")
    if d.sources is None:
        _check_corpus(d.source, "data.source", kind)
        return
    if d.source != DataConfig().source:
        raise UserError(f"data.source={d.source!r} and {sources_key} are both set; keep one (data.source reads one corpus, data.sources mixes several)")
    validate_sources(d.sources, sources_key, kind)


def validate_cluster(run: RunConfig) -> None:
    c = run.cluster
    _positive(c.cpus_per_worker, "cluster.cpus_per_worker")
    _positive(c.local_cpus, "cluster.local_cpus")
    _one_of(c.use_gpu, "cluster.use_gpu", ("auto", "true", "false"))
    f = run.fault
    _positive(f.max_failures, "fault.max_failures", strict=False)
    _positive(f.hang_timeout_s, "fault.hang_timeout_s")
    _one_of(run.logging.wandb.mode, "logging.wandb.mode", ("offline", "online", "disabled"))
    _positive(run.logging.mfu_peak_tflops, "logging.mfu_peak_tflops")


def validate_lora(run: RunConfig, lora: LoraConfig, index: int) -> None:
    """LoRA's own settings, and the layouts it runs on: one whole model per rank (tp=1, pp=1), ZeRO 0-2."""
    from raylm.models.lora import TARGET_PATHS

    key = f"stages.{index}.lora"
    _positive(lora.rank, f"{key}.rank")
    _positive(lora.alpha, f"{key}.alpha")
    if not 0 <= lora.dropout < 1:
        raise UserError(f"{key}.dropout={lora.dropout} must be in [0, 1)")
    allowed = ", ".join(TARGET_PATHS)
    if not lora.targets:
        raise UserError(f"{key}.targets is empty; name projections among {allowed}")
    for target in lora.targets:
        if target not in TARGET_PATHS:
            raise UserError(f"{key}.targets has {target!r}, not a projection of raylm's Llama; choose among {allowed}")
    if len(set(lora.targets)) != len(lora.targets):
        raise UserError(f"{key}.targets={list(lora.targets)} names a projection twice; list each once")
    p = run.parallel
    for degree in ("tp", "pp"):
        if getattr(p, degree) > 1:
            raise UserError(f"{key} cannot run with parallel.{degree}={getattr(p, degree)}: LoRA stages keep the whole model on each rank; "
                            f"set parallel.{degree}=1 (adapters are small, data parallelism is enough)")
    if p.zero_stage > 2:
        raise UserError(f"{key} cannot run with parallel.zero_stage=3 (the frozen base would be partitioned too); use parallel.zero_stage=2")


def validate_classify(run: RunConfig, index: int, stage_run: RunConfig) -> None:
    """A classify stage runs one whole model per rank: its head and the pooling at each text's last token are not
    split over tensor ranks or pipeline stages. Its weights are a classifier, not a language model, for whatever follows."""
    stage = run.stages[index]
    key = f"stages.{index}"
    if stage.kind == "classify":
        parallel = stage_run.parallel
        for degree in ("tp", "pp"):
            if getattr(parallel, degree) > 1:
                raise UserError(f"stage '{stage.name}': kind classify cannot run with parallel.{degree}={getattr(parallel, degree)}; "
                                f"set {key}.parallel.{degree}=1 (the model is whole on each rank, data parallelism and ZeRO still apply)")
        for option in ("lora", "eval_tasks"):
            if getattr(stage, option) is not None:
                raise UserError(f"stage '{stage.name}': kind classify does not take {key}.{option}; remove it "
                                f"({'every weight trains' if option == 'lora' else 'the stage reports its held-out accuracy'})")
    if index > 0 and run.stages[index - 1].kind == "classify" and stage.init_from is None:
        raise UserError(f"stage '{stage.name}' would start from classify stage '{run.stages[index - 1].name}', whose weights are a "
                        f"classifier; set {key}.init_from to a language model's weights, or make the classify stage the last")


def validate_distill(run: RunConfig, index: int, stage_run: RunConfig) -> None:
    """A distill stage names its teacher (an earlier stage, or a directory: checked as weights before the launch,
    in ``raylm.launcher.stages.check_teachers``) and runs one whole student and teacher per rank: the KL term needs
    every vocabulary entry of both models' logits on one rank (tensor parallelism splits them) and the teacher's
    logits beside the student's last pipeline stage. Other kinds take neither teacher nor distill settings."""
    stage = run.stages[index]
    key = f"stages.{index}"
    if stage.kind != "distill":
        for option in ("teacher", "distill"):
            if getattr(stage, option) is not None:
                raise UserError(f"stage '{stage.name}': {key}.{option} is for kind distill, this stage is {stage.kind}; "
                                f"remove it or set {key}.kind=distill")
        return
    if stage.teacher is None:
        raise UserError(f"stage '{stage.name}': kind distill needs {key}.teacher: an earlier stage's name, or a raylm final/ "
                        "or Hugging Face Llama directory")
    names = [s.name for s in run.stages]
    earlier = f"the stages before it are {', '.join(repr(n) for n in names[:index])}" if index else "no stage comes before it"
    if stage.teacher in names:
        teacher_index = names.index(stage.teacher)
        if teacher_index >= index:
            raise UserError(f"stage '{stage.name}': {key}.teacher={stage.teacher!r} is not an earlier stage (it has not trained "
                            f"yet; {earlier}); name an earlier stage or a raylm final/ or Hugging Face Llama directory")
        if run.stages[teacher_index].kind == "classify":
            raise UserError(f"stage '{stage.name}': {key}.teacher={stage.teacher!r} is a classify stage, whose weights are a "
                            "classifier; name a language model's stage or directory")
    elif not Path(stage.teacher).is_dir():
        raise UserError(f"stage '{stage.name}': {key}.teacher={stage.teacher!r} is neither a stage of this run nor a directory "
                        f"({earlier}); name an earlier stage or a raylm final/ or Hugging Face Llama directory")
    if is_uri(run.runs_dir):
        raise UserError(f"stage '{stage.name}': kind distill cannot run in object storage (runs_dir={run.runs_dir!r}) yet: "
                        "workers read the teacher from a disk they share with the driver; use a local or shared runs_dir")
    parallel = stage_run.parallel
    for degree in ("tp", "pp"):
        if getattr(parallel, degree) > 1:
            raise UserError(f"stage '{stage.name}': kind distill cannot run with parallel.{degree}={getattr(parallel, degree)}; "
                            f"set {key}.parallel.{degree}=1 (student and teacher are whole on each rank, data parallelism and ZeRO still apply)")
    if stage.lora is not None:
        raise UserError(f"stage '{stage.name}': kind distill does not take {key}.lora; remove it (every student weight trains)")
    settings = stage.distill or DistillConfig()
    if not (math.isfinite(settings.temperature) and settings.temperature > 0):
        raise UserError(f"stage '{stage.name}': {key}.distill.temperature={settings.temperature} must be > 0")
    if not 0 <= settings.alpha <= 1:
        raise UserError(f"stage '{stage.name}': {key}.distill.alpha={settings.alpha} must be in [0, 1] (the KL term's share)")


def validate_stages(run: RunConfig) -> None:
    from raylm.configs.loader import resolve_stage

    if not run.stages:
        raise UserError("stages is empty; give at least one stage, e.g. stages='[{name: pretrain, kind: pretrain}]'")
    seen = set()
    for index, stage in enumerate(run.stages):
        if not stage.name or "/" in stage.name or stage.name.startswith("."):
            raise UserError(f"stages.{index}.name={stage.name!r} must be a plain directory name")
        if stage.name in seen:
            raise UserError(f"stages.{index}.name={stage.name!r} is used twice; stage names must be unique")
        seen.add(stage.name)
        _one_of(stage.kind, f"stages.{index}.kind", STAGE_KINDS)
        if stage.init_from is not None and not Path(stage.init_from).is_dir():
            raise UserError(f"stages.{index}.init_from={stage.init_from!r} is not a directory; point it at a raylm final/ or Hugging Face Llama directory")
        if stage.eval_tasks is not None:
            from raylm.evals.harness import check_spec

            check_spec(stage.eval_tasks, f"stages.{index}.eval_tasks")
        stage_run = resolve_stage(run, index)
        validate_classify(run, index, stage_run)
        validate_distill(run, index, stage_run)
        for rule in (validate_model, validate_training, validate_parallel, validate_cluster):
            try:
                rule(stage_run)
            except UserError as err:
                raise UserError(f"stage '{stage.name}': {err}") from None
        try:
            validate_data(stage_run, stage.kind, f"stages.{index}.data.sources" if "sources" in stage.data else "data.sources")
            if stage.lora is not None:
                validate_lora(stage_run, stage.lora, index)
        except UserError as err:
            raise UserError(f"stage '{stage.name}': {err}") from None


def validate_runs_dir(run: RunConfig) -> None:
    """A URI raylm cannot serve is refused, never taken as a local directory named after its scheme (``s3:/bucket``)."""
    if is_uri(run.runs_dir):
        check_uri(run.runs_dir)  # the store itself is opened and probed when the run is created


def validate(run: RunConfig) -> None:
    if run.name is not None and (not run.name or "/" in run.name or run.name.startswith(".")):
        raise UserError(f"name={run.name!r} must be a plain directory name")
    validate_runs_dir(run)
    validate_stages(run)
