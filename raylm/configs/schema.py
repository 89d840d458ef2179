"""The typed configuration of a raylm run: one dataclass per section.

Every field carries its help text in ``metadata["help"]`` so that the CLI can
explain keys (``raylm config keys``) and error messages can quote them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from datetime import timedelta
from typing import Any, Dict, List, Optional


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help text."""
    if isinstance(default, (list, dict)) or is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


@dataclass
class ModelConfig:
    vocab_size: int = _f(2048, "Vocabulary size; the BPE tokenizer is trained to this size (the byte tokenizer needs >= 262: 256 bytes + 6 specials).")
    d_model: int = _f(128, "Width of the residual stream.")
    n_layer: int = _f(4, "Number of transformer blocks.")
    n_head: int = _f(4, "Number of query heads; must divide d_model.")
    n_kv_head: Optional[int] = _f(None, "Key/value heads for grouped-query attention; null means n_head (plain multi-head).")
    ffn_hidden: Optional[int] = _f(None, "SwiGLU hidden width; null means 8/3 * d_model rounded up to multiple_of.")
    multiple_of: int = _f(32, "Rounding for the derived SwiGLU hidden width.")
    max_seq_len: int = _f(128, "Context length in tokens; training sequences are this long.")
    rope_theta: float = _f(10000.0, "RoPE base frequency.")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon.")
    tie_embeddings: bool = _f(True, "Share the token embedding with the output head.")
    init_std: float = _f(0.02, "Standard deviation of the normal weight init (output projections are scaled by 1/sqrt(2 n_layer)).")


@dataclass
class ParallelConfig:
    tp: int = _f(1, "Tensor-parallel degree: heads and MLP width split across this many ranks of one node.")
    pp: int = _f(1, "Pipeline-parallel degree: blocks split into this many stages.")
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage 0-3 over the data-parallel ranks (pp > 1 allows 0 or 1).")
    micro_batch_size: int = _f(4, "Sequences per rank per forward pass.")
    pipeline_microbatches: Optional[int] = _f(None, "Micro-batches per pipeline step; null means gradient accumulation steps.")
    activation_checkpointing: bool = _f(False, "Recompute each block's activations in the backward pass.")


@dataclass
class DataSourceConfig:
    path: str = _f("", "A pretraining corpus, as data.source takes one (builtin:pydoc, files, a directory or glob, a prepared dataset).")
    weight: float = _f(1.0, "Its share of the training samples, relative to the other sources' weights (>= 0).")


@dataclass
class DataConfig:
    source: str = _f("builtin:pydoc", "Corpus: 'builtin:pydoc' (ships with Python), a .txt/.md, .jsonl, .jsonl.gz, .parquet or .arrow file, a directory or glob of them, or a directory made by 'raylm data prepare'; for sft stages 'builtin:pydoc-sft' or a .jsonl of prompt/response or messages; for classify stages 'builtin:pydoc-topic' or a .jsonl(.gz) of text/label objects.")
    sources: Optional[List[DataSourceConfig]] = _f(
        None,
        "A mixture instead of data.source (pretrain stages; set one of the two): a list of {path, weight}, each path anything "
        "data.source takes, e.g. [{path: 'builtin:pydoc', weight: 0.7}, {path: web.jsonl, weight: 0.3}]. Every source is "
        "tokenized with the run's one tokenizer and each draws its weight's share of every prefix of the training stream "
        "(off by less than one sample); a small source repeats, reshuffled each pass. null reads data.source.",
    )

    def corpora(self) -> List[str]:
        """The corpora a stage reads: data.sources' paths, else data.source."""
        return [s.path for s in self.sources] if self.sources is not None else [self.source]
    text_field: str = _f("text", "Field (JSONL) or column (Parquet, Arrow) holding the text.")
    label_field: str = _f("label", "Field (JSONL) holding a classify example's label, a string; the stage's classes are the sorted labels of its training split.")
    tokenizer: str = _f("bpe", "'bpe' (byte-level BPE trained locally to model.vocab_size) or 'byte' (raw UTF-8 bytes).")
    val_fraction: float = _f(0.05, "Fraction of the tokens held out for evaluation.")


@dataclass
class OptimConfig:
    lr: float = _f(3e-3, "Peak learning rate of AdamW.")
    min_lr_ratio: float = _f(0.1, "Final learning rate as a fraction of lr after cosine decay.")
    warmup_steps: int = _f(10, "Linear warm-up steps before cosine decay.")
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to norms and biases).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this value; 0 disables clipping.")


@dataclass
class TrainConfig:
    max_steps: int = _f(60, "Optimizer steps in this stage.")
    global_batch_size: int = _f(16, "Sequences per optimizer step across all data-parallel ranks.")
    seed: int = _f(1234, "Seed of the weights init and the data order.")
    log_every: int = _f(5, "Log training metrics every this many steps.")
    eval_every: int = _f(30, "Evaluate on the held-out split every this many steps (and at the end); 0 only at the end.")
    eval_batches: int = _f(4, "Micro-batches per rank in one evaluation.")
    ckpt_every: int = _f(30, "Checkpoint every this many steps and at the end; 0 never (the final weights are still saved).")
    keep_last: int = _f(2, "Complete checkpoints kept per stage.")
    async_checkpoint: bool = _f(
        False,
        "Write checkpoints in the background: each rank copies its checkpoint state to host memory (one copy of it "
        "more, kept between saves), training goes on, and each rank's writer thread commits the checkpoint once "
        "every rank's files are on disk.",
    )
    precision: str = _f(
        "auto",
        "'auto' (bf16 on GPUs with native bf16, compute capability >= 8.0, and on CPUs whose bf16 matmul peak, measured by rank 0 "
        "at stage start, is >= 2x fp32's; else fp32), 'fp32' (TF32 matmuls on GPUs) or 'bf16' "
        "(fp32 masters, gradients accumulated and reduced in fp32).",
    )
    sample_tokens: int = _f(48, "Tokens generated for the sample shown in the summary.")


@dataclass
class ClusterConfig:
    address: Optional[str] = _f(None, "Address of an existing Ray cluster ('auto', 'host:6379', 'ray://...'); null starts a local one.")
    num_workers: int = _f(2, "Training workers (ranks); the data-parallel size is num_workers / (tp * pp).")
    min_workers: Optional[int] = _f(None, "Elastic lower bound on workers (num_workers is the upper one); null means a fixed size. After a node is lost the stage restarts on what is left, down to this many.")
    elastic_check_s: float = _f(60.0, "How often an elastic stage looks for freed or added resources to grow back to num_workers.")
    placement_timeout_s: float = _f(60.0, "How long a (re)start waits for its workers to be placed; an elastic stage then retries with what the cluster has.")
    cpus_per_worker: int = _f(1, "CPUs reserved per worker; torch uses this many threads in each.")
    use_gpu: str = _f("auto", "'auto' (GPUs when the cluster has them), 'true' or 'false'.")
    local_cpus: Optional[int] = _f(None, "CPUs of the embedded local cluster; null means every core of this machine.")


@dataclass
class FaultConfig:
    max_failures: int = _f(2, "Worker-group restarts Ray Train may do before the stage fails (stages that share a worker group share the budget).")
    hang_timeout_s: float = _f(600.0, "A rank that makes no progress for this long (a frozen peer, a deadlocked collective, a stalled write) exits, and its worker group restarts.")

    def collective_timeout(self) -> timedelta:
        """How long one collective of raylm's process groups waits for its peers: the hang timeout and a grace of a
        tenth of it (at least 1 s). A rank's heartbeat runs out first and says so in one line; a collective running
        out at the same moment would race it and fail the group with the backend's own error instead. Where no
        heartbeat runs (set-up, loading a checkpoint) the collective's timeout is what ends a hang."""
        return timedelta(seconds=self.hang_timeout_s + max(1.0, self.hang_timeout_s / 10))


@dataclass
class WandbConfig:
    mode: str = _f("offline", "'offline' (default), 'online' (needs WANDB_API_KEY in the environment) or 'disabled'.")
    project: str = _f("raylm", "W&B project.")
    entity: Optional[str] = _f(None, "W&B entity (team or user); null uses the key's default.")


@dataclass
class LoggingConfig:
    wandb: WandbConfig = _f(WandbConfig(), "Weights & Biases settings.")
    progress: bool = _f(True, "Show a live progress bar on the console.")
    mfu_peak_tflops: Optional[float] = _f(None, "Peak TFLOP/s per worker for MFU (a datasheet's dense peak makes MFU comparable across machines); null measures the best square matmul of the worker's device at start.")


@dataclass
class LoraConfig:
    rank: int = _f(8, "Rank r of each adapter: A is r x in, B is out x r.")
    alpha: float = _f(16.0, "Adapter scale numerator: the update B A is multiplied by alpha / rank.")
    dropout: float = _f(0.0, "Dropout on the adapters' input while training, in [0, 1).")
    targets: List[str] = _f(
        ["wq", "wv"],
        "Projections of every block that get adapters, by raylm's module names: wq, wk, wv, wo (attention), w1, w3, w2 "
        "(SwiGLU gate, up, down); PEFT calls them q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.",
    )


@dataclass
class DistillConfig:
    temperature: float = _f(2.0, "Softening temperature T of both distributions in the KL term (> 0); the term is scaled by T^2 so its gradients keep their size as T changes.")
    alpha: float = _f(0.5, "Weight of the KL-to-teacher term in [0, 1]; the next-token cross-entropy gets 1 - alpha (0 is plain pretraining, 1 pure distillation).")


@dataclass
class StageConfig:
    name: str = _f("pretrain", "Stage name; also its directory under the run.")
    kind: str = _f(
        "pretrain",
        "'pretrain' (next-token loss on the corpus), 'sft' (loss on responses only), 'classify' (a class head on the last "
        "token's hidden state, cross-entropy over the labels; needs parallel.tp=1, parallel.pp=1, no lora; held-out accuracy in the summary) "
        "or 'distill' (pretraining data, loss mixing KL to a teacher's distribution with the next-token loss; needs teacher, "
        "parallel.tp=1, parallel.pp=1, no lora).",
    )
    init_from: Optional[str] = _f(None, "Weights to start from: a raylm final/ or Hugging Face Llama directory; null means the previous stage's final weights (or a fresh init for the first stage).")
    data: Dict[str, Any] = _f({}, "Overrides of the data section for this stage.")
    optim: Dict[str, Any] = _f({}, "Overrides of the optim section for this stage.")
    train: Dict[str, Any] = _f({}, "Overrides of the train section for this stage.")
    parallel: Dict[str, Any] = _f({}, "Overrides of the parallel section for this stage.")
    cluster: Dict[str, Any] = _f({}, "Overrides of num_workers/min_workers/cpus_per_worker for this stage.")
    lora: Optional[LoraConfig] = _f(
        None,
        "Train LoRA adapters on a frozen base instead of every weight (e.g. {rank: 8, alpha: 16, targets: [wq, wv]}); "
        "needs parallel.tp=1, parallel.pp=1 and parallel.zero_stage 0-2. The stage still ends with dense weights in final/, "
        "and its adapter in PEFT's format in final/adapter/. null trains every weight.",
    )
    teacher: Optional[str] = _f(
        None,
        "The teacher of a distill stage: the name of an earlier stage of this run, or a raylm final/ or Hugging Face Llama directory. "
        "It may be larger or shaped otherwise, but must share the run's tokenizer and model.vocab_size; each rank holds a whole copy "
        "in the stage's compute dtype. null for every other kind.",
    )
    distill: Optional[DistillConfig] = _f(
        None,
        "A distill stage's loss: {temperature, alpha}, alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * next-token loss; "
        "null means the defaults (temperature 2, alpha 0.5). Only for kind distill.",
    )
    eval_tasks: Optional[str] = _f(
        None,
        "lm-evaluation-harness tasks scored on the stage's final weights when it ends, as 'raylm eval --tasks' takes them "
        "(built-in names or directories of task YAMLs, comma-separated); scores go into the stage summary, metrics.jsonl and "
        "W&B. null scores none.",
    )


@dataclass
class RunConfig:
    name: Optional[str] = _f(None, "Run name (directory under runs_dir); null picks a fresh one.")
    runs_dir: str = _f("runs", "Where run directories are created; must be shared storage on a multi-node cluster.")
    model: ModelConfig = _f(ModelConfig(), "Model shape.")
    parallel: ParallelConfig = _f(ParallelConfig(), "Parallel layout.")
    data: DataConfig = _f(DataConfig(), "Training data.")
    optim: OptimConfig = _f(OptimConfig(), "Optimizer and learning-rate schedule.")
    train: TrainConfig = _f(TrainConfig(), "Steps, batch, logging and checkpoint cadence.")
    cluster: ClusterConfig = _f(ClusterConfig(), "Where and on how many workers to run.")
    fault: FaultConfig = _f(FaultConfig(), "Restarts and hang detection.")
    logging: LoggingConfig = _f(LoggingConfig(), "Console, metrics file and W&B.")
    stages: List[StageConfig] = _f([StageConfig()], "Ordered stages; each starts from the previous one's final weights.")


STAGE_SECTIONS = ("data", "optim", "train", "parallel", "cluster")
"""Sections a stage may override."""


def field_help(cls: type, name: str) -> str:
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    return ""
