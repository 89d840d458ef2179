"""The per-rank training loop of one stage.

Runs unchanged under Ray Train (``raylm.launcher.ray_entry``) and under
``torchrun`` (``python -m raylm.trainer.torchrun_main``): it reads the run's
config.yaml, computes on the device its launcher chose, joins the process
group its launcher set up (or sets one up from the torchrun environment), and
talks to the launcher only through a ``Session``. No Ray import here.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from raylm.configs.loader import dump_nested, from_yaml_file, resolve_stage
from raylm.configs.schema import DistillConfig, LoraConfig, ModelConfig, RunConfig, StageConfig
from raylm.errors import UserError
from raylm.storage import where
from raylm.written_files import WrittenFiles
from raylm.trainer.checkpoint import DEEPSPEED_TAG, RECORDS_FILE, TrainerState, lacks_pipeline_embedding, read_state
from raylm.trainer.checkpoint_saves import CheckpointSaves
from raylm.trainer.deepspeed_save_sync import without_redundant_sync
from raylm.trainer.hashed_deepspeed import hashed_saves
from raylm.trainer.device import allow_tf32, init_distributed, rng_state, set_rng_state
from raylm.trainer.fp32_grad_norm import keep_fp32_grad_norm
from raylm.trainer.layout import CONFIG_FILE, FINAL_DIR, METRICS_FILE, STAGE_SUMMARY
from raylm.trainer.metrics import MetricsFile, WandbRun, read_records, restart_event
from raylm.trainer.mfu import Peak, configured_peak, measured_peak, mfu
from raylm.trainer.phases import Phases
from raylm.trainer.precision import choose_precision, slow_bf16_warning
from raylm.trainer.schedule import lr_factor
from raylm.trainer.session import Session
from raylm.trainer.sample import sample_text
from raylm.trainer.classify import held_out_score, with_score_head
from raylm.trainer.distill import Distiller, load_teacher
from raylm.trainer.run_inputs import initial_weights, teacher_weights
from raylm.trainer.stage_data import load_stage_data
from raylm.trainer.stored_checkpoints import read_by_rank
from raylm.trainer.watchdog import HangWatchdog
from raylm.evals.classification import flat_counts
from raylm.models.classifier import LlamaClassifier
from raylm.models.flops import classifier_flops_per_token, distill_flops_per_token, flops_per_token, lora_flops_per_token
from raylm.models.llama import Llama, num_params
from raylm.models.shapes import ffn_hidden_size, kv_heads
from raylm.models.lora import ADAPTER_DIR, adapter_weights, add_lora, load_adapters, merged_weights, save_peft_adapter
from raylm.models.weights import check_weights, save_consolidated, weight_locations
from raylm.data.sampler import eval_indices
from raylm.parallelism.apply import ParallelModel, build_parallel_model
from raylm.parallelism.layout_free import LAYOUT_FREE_DIR, OPTIMIZER_FILE, layout_free_locations, load_layout_free, save_layout_free
from raylm.parallelism.materialize import WeightSource, fresh_weights, materialize, stored_weights
from raylm.parallelism.masters import consolidated_state_dict, fp32_weights, optimizer_state_bytes, set_master_weights
from raylm.parallelism.topology import Topology, build_checkpoint_groups, group_timeout_s
from raylm.parallelism.zero import deepspeed_config, deepspeed_zero_stage, micro_batch_size, micro_batches, skip_single_replica_allreduce


def _shape(cfg: ModelConfig) -> Dict[str, object]:
    """What the weights' shapes and meaning depend on (not the context length)."""
    return {
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_kv_head": kv_heads(cfg), "ffn_hidden": ffn_hidden_size(cfg), "tie_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta, "norm_eps": cfg.norm_eps,
    }


def check_init_weights(cfg: RunConfig, init_path: Path) -> None:
    """Refuse weights that are incomplete or whose shape differs from ``cfg.model`` (reads their config and headers only)."""
    theirs, ours = _shape(check_weights(init_path)), _shape(cfg.model)
    differing = [f"model.{k}={ours[k]} vs {theirs[k]}" for k in ours if ours[k] != theirs[k]]
    if differing:
        raise UserError(f"weights in {init_path} do not fit this config ({', '.join(differing)}); make model.* match them")


def initial_weight_source(cfg: RunConfig, init_path: Optional[Path]) -> WeightSource:
    """Where a stage's weights come from unless it reshards a checkpoint: ``init_path`` (checked against
    ``cfg.model`` first; each rank reads only its slices), else the seed."""
    if init_path is None:
        return fresh_weights(cfg.model, cfg.train.seed)
    check_init_weights(cfg, init_path)
    return stored_weights(weight_locations(init_path), str(init_path))


def build_dense_model(cfg: RunConfig, init_path: Optional[Path]) -> Llama:
    """The whole model in one process, from the source every rank of every layout takes its parts from
    (``initial_weight_source``): a LoRA stage's frozen base, and what its adapters are merged into."""
    with torch.device("meta"):
        model = Llama(cfg.model, cfg.train.seed)
    materialize(model, {name for name, _ in model.named_parameters()}, initial_weight_source(cfg, init_path), 0, 1)
    return model


def build_stage_model(cfg: RunConfig, lora: Optional[LoraConfig], init_path: Optional[Path],
                      trained: Optional[WeightSource] = None, labels: Optional[Sequence[str]] = None) -> Llama:
    """The model a stage trains: laid out on ``meta``, each rank giving only its own weights values
    (``build_parallel_model``), a classifier over ``labels`` when given; or, with ``lora`` (one whole model
    per rank), the frozen base from ``init_path`` with adapters, those of a resharded resume read from ``trained``.
    """
    if lora is None:
        with torch.device("meta"):
            return Llama(cfg.model, cfg.train.seed) if labels is None else LlamaClassifier(cfg.model, len(labels), cfg.train.seed)
    model = build_dense_model(cfg, init_path)
    add_lora(model, lora, cfg.train.seed)
    if trained is not None:
        load_adapters(model, {name: trained(name, 0, 1) for name in adapter_weights(model.state_dict())})
    # Checkpoints save the module's state_dict: here the adapters alone. (DeepSpeed's exclude_frozen_parameters
    # matches named_parameters' names, which miss a tied head and differ under activation checkpointing's wrapper.)
    frozen = [name for name, tensor in model.state_dict(keep_vars=True).items() if not tensor.requires_grad]
    model.register_state_dict_post_hook(partial(_drop_entries, frozen))
    return model


def _drop_entries(names: List[str], module: torch.nn.Module, state: Dict[str, torch.Tensor], prefix: str, local_metadata: Dict) -> None:
    for name in names:
        del state[prefix + name]


class StageTrainer:
    """Owns one stage's engine, data and sinks on one rank."""

    def __init__(self, run_dir: Path, stage_index: int, session_factory: Callable[[Path, RunConfig], Session], device: torch.device,
                 phases: Optional[Phases] = None):
        self.phases = phases or Phases()
        self.run_dir = run_dir
        self.run = from_yaml_file(run_dir / CONFIG_FILE)
        self.stage: StageConfig = self.run.stages[stage_index]
        self.cfg = resolve_stage(self.run, stage_index)
        self.stage_dir = run_dir / self.stage.name
        self.session = session_factory(self.stage_dir, self.cfg)
        self.ctx = init_distributed(self.cfg, device)
        self.is_logger = self.ctx.rank == 0
        allow_tf32(self.ctx.device)

        # Rank 0 writes metrics.jsonl and the W&B run itself only where its launcher does not (torchrun).
        owns = self.is_logger and self.session.owns_metrics
        self.metrics = MetricsFile(run_dir / METRICS_FILE) if owns else None
        self.wandb = (
            WandbRun(self.cfg.logging.wandb, run_dir, self.run.name or run_dir.name, self.stage.name, dump_nested(self.cfg))
            if owns
            else None
        )

        # Every record rank 0 logged in this stage, also before a restart; each checkpoint keeps them (a few hundred
        # bytes per logged step) so a resume can hand the driver those it never received.
        self.history: List[Dict] = []
        self.phases.mark("process_group")
        self.precision = choose_precision(self.cfg.train.precision, self.ctx.device, self.ctx.rank, self.cfg.model.d_model)
        self.bf16 = self.precision.bf16
        warning = slow_bf16_warning(self.precision)
        if warning is not None:
            print(f"[raylm] warning: stage {self.stage.name}: {warning}", flush=True)
        self.phases.mark("precision")
        self.data = load_stage_data(run_dir, self.run, stage_index, leader=self.ctx.rank == 0, barrier=dist.barrier)
        self.phases.mark("data")
        self.labels: Optional[List[str]] = self.data.train.labels if self.stage.kind == "classify" else None
        topology = Topology.for_world(self.cfg.parallel.tp, self.cfg.parallel.pp, self.ctx.world_size)
        self.lora = self.stage.lora
        self.state = TrainerState(0, 0, 0, self.ctx.world_size, topology.tp, topology.pp, topology.dp,
                                  self.cfg.parallel.zero_stage, self.bf16, asdict(self.lora) if self.lora is not None else None)
        self.resume_from = self._choose_checkpoint()
        if self.resume_from is not None:
            self.session.fetch(self.resume_from, lambda rel: False)  # the manifest
        self.saved = read_state(self.resume_from) if self.resume_from is not None else None
        if self.saved is not None and self.saved.lora != self.state.lora:
            raise UserError(f"checkpoint {self.resume_from} was written with stages.{stage_index}.lora={self.saved.lora}, this stage has "
                            f"{self.state.lora}; restore that setting, or start a new stage from this one's initial weights")
        # Another layout, or DeepSpeed's files lacking the tied embedding (an older raylm's pipelined checkpoint):
        # the layout-free copy.
        self.reshard = self.saved is not None and (self.saved.layout() != self.state.layout()
                                                   or lacks_pipeline_embedding(self.resume_from, self.saved))
        if self.reshard:
            self.session.fetch(self.resume_from, self._with_records(lambda rel: rel.startswith(LAYOUT_FREE_DIR + "/")))
        self.init_path = initial_weights(run_dir, self.run, stage_index)
        weights = self._weight_source(self.init_path)
        torch.manual_seed(self.cfg.train.seed)
        dense = build_stage_model(self.cfg, self.lora, self.init_path, weights if self.reshard else None, self.labels)
        self.par: ParallelModel = build_parallel_model(dense, self.cfg, self.ctx.rank, self.ctx.world_size, weights)
        self.dp_rank, self.dp_size = self.par.dp_rank, self.par.dp_size
        # The writer thread of asynchronous checkpoints gathers the layout-free copy and commits over groups of its own.
        self.checkpoint_groups = (build_checkpoint_groups(self.par.topology, self.ctx.rank, self.cfg.fault.collective_timeout())
                                  if self.cfg.train.async_checkpoint else None)
        self.saves = CheckpointSaves(self.session, self.log, self.checkpoint_groups.world_group if self.checkpoint_groups else None)
        self.accum = micro_batches(self.cfg, self.dp_size)
        self.micro_batch = micro_batch_size(self.cfg, self.dp_size)
        self.phases.mark("model")
        self.engine = self._build_engine(weights)
        self.phases.mark("deepspeed_initialize")
        self.seq_len = self.cfg.model.max_seq_len
        self.teacher_path = teacher_weights(run_dir, self.run, stage_index)
        self.distiller: Optional[Distiller] = None
        if self.teacher_path is not None:
            teacher = load_teacher(self.teacher_path, self.ctx.device, self.precision.dtype)
            self.distiller = Distiller(teacher, self.stage.distill or DistillConfig())
            self.phases.mark("teacher")
        # The last step's distill loss parts (kl, ce), averaged like its loss; empty for other kinds.
        self.loss_parts: Dict[str, float] = {}
        if self.distiller is not None:
            self.flops_per_token = distill_flops_per_token(self.cfg.model, self.distiller.teacher.cfg, self.seq_len)
        elif self.labels is not None:
            self.flops_per_token = classifier_flops_per_token(self.cfg.model, self.seq_len, len(self.labels))
        elif self.lora is None:
            self.flops_per_token = flops_per_token(self.cfg.model, self.seq_len)
        else:
            adapters = sum(p.numel() for p in dense.parameters() if p.requires_grad)
            self.flops_per_token = lora_flops_per_token(self.cfg.model, self.seq_len, adapters)
        self.watchdog = HangWatchdog(self.cfg.fault.hang_timeout_s, f"rank {self.ctx.rank} of stage {self.stage.name}")
        # Every rank runs its stage's forward once per micro-batch, training or
        # evaluating; a middle pipeline stage never touches the data, so the
        # heartbeat goes here rather than where batches are read.
        self.par.module.register_forward_pre_hook(lambda *_: self.watchdog.beat())

    def _build_engine(self, weights: WeightSource):
        import deepspeed

        o = self.cfg.optim
        params = [p for p in self.par.module.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(
            # DeepSpeed drops an empty group (a LoRA stage trains no norms), and the scheduler would then count one too many.
            [group for group in groups if group["params"]],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
        )
        max_steps = self.cfg.train.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, o, max_steps))
        adapters = fp32_weights(self.par) if self.bf16 and self.lora is not None else None
        engine, _, _, _ = deepspeed.initialize(
            model=self.par.module.to(self.ctx.device),
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(self.cfg, self.dp_size, self.bf16),
            mpu=self.par.mpu,
        )
        if self.bf16:
            # DeepSpeed made its fp32 masters from the bf16-rounded module; a stage starting from given (or
            # seeded) weights starts from them exactly: made again from their source, or, for LoRA's few
            # adapter weights (drawn in add_lora), copied before.
            set_master_weights(engine, self.par, weights if adapters is None else lambda name, tp_rank, tp: adapters[name])
        skip_single_replica_allreduce(engine, self.dp_size, deepspeed_zero_stage(self.cfg.parallel.zero_stage, self.bf16))
        keep_fp32_grad_norm(engine, self.par.groups)
        return engine

    # ----------------------------------------------------------------- logging
    def log(self, record: Dict) -> None:
        if not self.is_logger:
            return
        record = {"time": round(time.time(), 3), "stage": self.stage.name, **record}
        if record["kind"] != "start":
            self.history.append(record)
        if self.metrics is not None:
            self.metrics.write(record)
        if self.wandb is not None:
            self.wandb.log_record(record)
        if not self.session.owns_metrics:
            self.session.record(record)

    # ------------------------------------------------------------------ resume
    def _choose_checkpoint(self) -> Optional[Path]:
        """The newest complete checkpoint of this stage (rank 0 verifies, everyone learns it)."""
        chosen: list = [None]
        if self.ctx.rank == 0:
            for candidate in self.session.resume_candidates():
                reason = self.session.verify(candidate)
                if reason is None:
                    chosen[0] = str(candidate)
                    break
                self.log({"step": 0, "kind": "event", "event": "skipped_checkpoint", "path": str(candidate), "reason": reason})
                print(f"[raylm] warning: checkpoint {candidate} is incomplete ({reason}); trying the previous one", flush=True)
        dist.broadcast_object_list(chosen, src=0)
        return Path(chosen[0]) if chosen[0] is not None else None

    def _weight_source(self, init_path: Optional[Path]) -> WeightSource:
        """Where this rank's weights come from: a resharded checkpoint's layout-free copy, the stage's initial weights, or the seed.

        A resume in the same layout starts from the seed too; DeepSpeed's own checkpoint overwrites every weight.
        """
        if self.reshard:
            source = self.resume_from / LAYOUT_FREE_DIR
            if not (source / OPTIMIZER_FILE).is_file():
                raise UserError(
                    f"checkpoint {self.resume_from} was written with {self.saved.layout()} and has no {LAYOUT_FREE_DIR}/ copy, "
                    f"this stage runs {self.state.layout()}; keep that layout or start a new stage with init_from its final weights"
                )
            return stored_weights(layout_free_locations(source), f"the layout-free checkpoint {source}")
        if self.labels is not None:
            return with_score_head(initial_weight_source(self.cfg, init_path), self.cfg.model, len(self.labels), self.cfg.train.seed)
        return initial_weight_source(self.cfg, init_path)

    def resume(self) -> None:
        """Continue from the chosen checkpoint: DeepSpeed's own shards when the layout is the same, else the layout-free copy."""
        if self.resume_from is None:
            return
        path, saved = self.resume_from, self.saved
        if self.reshard:
            load_layout_free(self.engine, self.par, path / LAYOUT_FREE_DIR)
            self.engine.global_steps, self.engine.global_samples = saved.step, saved.consumed_samples
            self.log({"step": saved.step, "kind": "event", "event": "resharded", "path": str(path),
                      "from_layout": saved.layout(), "to_layout": self.state.layout()})
            if self.is_logger:
                why = "" if saved.layout() != self.state.layout() else " (its DeepSpeed files lack the tied embedding: the layout-free copy has it)"
                print(f"[raylm] resharding checkpoint {path.name}: {saved.layout()} -> {self.state.layout()}{why}", flush=True)
        else:
            self.session.fetch(path, self._with_records(read_by_rank(self.engine, self.ctx.rank)))
            load_path, _ = self.engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=True,
                                                       load_module_strict=self.lora is None)  # a LoRA checkpoint lacks the frozen base
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load the verified checkpoint {path}")
            set_rng_state(torch.load(path / f"rng_rank{self.ctx.rank:05d}.pt", weights_only=False), self.ctx.device)
        self.state = replace(self.state, step=saved.step, consumed_samples=saved.consumed_samples, tokens_seen=saved.tokens_seen)
        self.replay_records(path)
        self.log({"step": saved.step, "kind": "event", "event": "resumed", "path": str(path), "consumed_samples": saved.consumed_samples})

    def _with_records(self, wanted: Callable[[str], bool]) -> Callable[[str], bool]:
        """The checkpoint files this rank reads on resume: ``wanted``, and on rank 0 the stage's records."""
        return lambda rel: wanted(rel) or (self.is_logger and rel == RECORDS_FILE)

    def replay_records(self, checkpoint: Path) -> None:
        """Take back the stage's records up to ``checkpoint`` and, where a launcher keeps them (Ray's driver), send
        them again marked ``replayed``: a driver that died took with it what it had not written yet, possibly
        steps before this checkpoint, which no rank redoes. The launcher keeps those it lacks.
        (A checkpoint written before raylm kept records has none to give back.)"""
        if not self.is_logger or not (checkpoint / RECORDS_FILE).is_file():
            return
        kept = read_records(checkpoint / RECORDS_FILE)
        self.history = kept + self.history
        if not self.session.owns_metrics:
            for record in kept:
                self.session.record({**record, "replayed": True})

    def _log_restart(self, resumed_step: int) -> None:
        """After a failure: which step the stage restarts from and how many steps were lost (a launcher that
        logs the records itself, as under Ray, tells this from the start record)."""
        if self.metrics is None or not self.metrics.path.exists():
            return
        event = restart_event(read_records(self.metrics.path), self.stage.name, resumed_step, self.ctx.world_size)
        if event is not None:
            self.log(event)
            print(f"[raylm] restart of stage {self.stage.name}: resuming at step {resumed_step} on {self.ctx.world_size} "
                  f"worker(s), {event['steps_lost']} logged step(s) to redo", flush=True)

    # -------------------------------------------------------------- checkpoint
    def checkpoint(self, metrics: Dict) -> None:
        self.saves.save(replace(self.state, consumed_by_source=self._consumed_by_source()), metrics, self._write_checkpoint)

    def _write_checkpoint(self, written: WrittenFiles, directory: Path) -> None:
        """This rank's files of a checkpoint of the current step, each hashed as it is written: the manifest needs no
        second read of the checkpoint."""
        # A frozen weight never changes: a LoRA stage rebuilds its base from its initial weights, so only adapters are
        # saved (ZeRO-2 would otherwise add its copy of every frozen weight).
        with hashed_saves(self.engine, written), without_redundant_sync(self.engine):
            self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
        save_layout_free(self.engine, self.par, directory / LAYOUT_FREE_DIR, written, self.checkpoint_groups)
        written.torch_save(rng_state(self.ctx.device), directory / f"rng_rank{self.ctx.rank:05d}.pt")
        if self.is_logger:
            written.write_text(directory / RECORDS_FILE, "".join(json.dumps(record) + "\n" for record in self.history))

    def _consumed_by_source(self) -> Dict[str, int]:
        return self.data.order.consumed_by_source(self.state.consumed_samples)

    # ---------------------------------------------------------------- training
    def _micro_batch(self, reader, indices):
        inputs, targets = reader.batch(indices)
        return torch.from_numpy(inputs).to(self.ctx.device), torch.from_numpy(targets).to(self.ctx.device)

    def _dp_mean(self, value: torch.Tensor) -> float:
        value = value.detach().float().clone()
        dist.all_reduce(value, group=self.par.dp_group)
        return value.item() / self.dp_size

    def _train_micro_batches(self):
        t = self.cfg.train
        for accum_step in range(self.accum):
            indices = self.data.order.micro_batch_indices(
                self.state.consumed_samples, t.global_batch_size, self.dp_rank, self.dp_size, self.micro_batch, accum_step
            )
            yield self._micro_batch(self.data.train, indices)

    def _eval_micro_batches(self):
        for indices in eval_indices(self.data.val.num_samples, self.cfg.train.eval_batches, self.dp_rank, self.dp_size, self.micro_batch):
            yield self._micro_batch(self.data.val, indices)

    def train_step(self) -> float:
        """One optimizer step over the global batch; returns its mean loss."""
        if self.par.pp > 1:
            # The pipeline engine runs the 1F1B schedule over all micro-batches
            # and returns the loss already averaged over them and over dp.
            loss = float(self.engine.train_batch(self._train_micro_batches()))
        else:
            total = torch.zeros((), device=self.ctx.device)
            parts: Dict[str, torch.Tensor] = {}
            for inputs, targets in self._train_micro_batches():
                logits = self.engine(inputs).float()
                if self.distiller is None:
                    micro_loss = self.par.loss_fn(logits, targets)
                else:
                    micro_loss, micro_parts = self.distiller.loss(logits, inputs, targets)
                    parts = {name: parts.get(name, 0.0) + value for name, value in micro_parts.items()}
                self.engine.backward(micro_loss)
                self.engine.step()
                total += micro_loss.detach()
            loss = self._dp_mean(total / self.accum)
            self.loss_parts = {name: self._dp_mean(value / self.accum) for name, value in parts.items()}
        t = self.cfg.train
        self.state.step += 1
        self.state.consumed_samples += t.global_batch_size
        self.state.tokens_seen += t.global_batch_size * self.seq_len
        return loss

    @torch.no_grad()
    def evaluate(self) -> float:
        if self.par.pp > 1:
            return float(self.engine.eval_batch(self._eval_micro_batches(), num_micro_batches=self.cfg.train.eval_batches))
        self.engine.eval()
        total = torch.zeros((), device=self.ctx.device)
        for inputs, targets in self._eval_micro_batches():
            total += self.par.loss_fn(self.engine(inputs).float(), targets)
        self.engine.train()
        return self._dp_mean(total / self.cfg.train.eval_batches)

    def _memory_gb(self) -> float:
        if self.ctx.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        import psutil

        return psutil.Process().memory_info().rss / 2**30

    def _due(self, every: int) -> bool:
        return self.state.step == self.cfg.train.max_steps or (every > 0 and self.state.step % every == 0)

    def run_loop(self) -> Dict:
        with self.watchdog:
            try:
                return self._run_loop()
            except BaseException:
                # A checkpoint still being written never commits, and none of its writes outlives the failure (one
                # that never ends, on a stalled disk, holds this up until the watchdog ends the process).
                self.saves.abandon()
                raise

    def _run_loop(self) -> Dict:
        t = self.cfg.train
        # Every rank measures, though only rank 0 reports: all at once, the cores are shared as in training.
        peak_tflops = self.cfg.logging.mfu_peak_tflops
        peak = configured_peak(peak_tflops) if peak_tflops else measured_peak(self.ctx.device, self.precision.dtype)
        self.phases.mark("mfu_peak")
        self.resume()
        self.phases.mark("resume")
        start_step = self.state.step
        self._log_restart(start_step)
        # The longest any of raylm's groups lets a collective wait, read back from the live groups.
        pg_timeout_s = max(group_timeout_s(g, self.ctx.device) for g in [dist.group.WORLD, *self.par.groups.groups()])
        self.log({"step": start_step, "kind": "start", "max_steps": t.max_steps, "world_size": self.ctx.world_size,
                  "tp": self.par.tp, "pp": self.par.pp, "dp": self.dp_size, "zero_stage": self.cfg.parallel.zero_stage,
                  **self.precision.record(), "pg_timeout_s": pg_timeout_s, "entered": self.phases.began, "setup_s": self.phases.seconds})
        last = {"loss": math.nan, "eval_loss": math.nan, "tokens_per_s": 0.0, "mfu": 0.0}
        window_tokens, window_time = 0, 0.0
        train_time, train_tokens = 0.0, 0
        while self.state.step < t.max_steps:
            began = time.perf_counter()
            loss = self.train_step()
            elapsed = time.perf_counter() - began
            step_tokens = t.global_batch_size * self.seq_len
            window_tokens += step_tokens
            window_time += elapsed
            train_time += elapsed
            train_tokens += step_tokens
            last["loss"] = loss
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.state.step}; lower optim.lr or check the data")
            self.saves.poll()
            if self._due(t.log_every):
                tokens_per_s = window_tokens / window_time
                last["tokens_per_s"] = tokens_per_s
                last["mfu"] = mfu(self.flops_per_token, tokens_per_s, peak.flops, self.ctx.world_size)
                self.log({
                    "step": self.state.step, "kind": "train", "loss": loss, "lr": self.engine.get_lr()[0],
                    "grad_norm": _float_or_nan(self.engine.get_global_grad_norm()), "tokens_per_s": tokens_per_s,
                    "mfu": last["mfu"], "mem_gb": self._memory_gb(), "tokens": self.state.tokens_seen, **self.loss_parts,
                })
                window_tokens, window_time = 0, 0.0
            if self._due(t.eval_every):
                last["eval_loss"] = self.evaluate()
                self.log({"step": self.state.step, "kind": "eval", "eval_loss": last["eval_loss"],
                          "eval_ppl": math.exp(min(last["eval_loss"], 50.0)), "tokens": self.state.tokens_seen})
            if t.ckpt_every > 0 and self._due(t.ckpt_every):
                self.watchdog.beat()
                self.checkpoint({"loss": loss})
                self.watchdog.beat()
        self.saves.finish()  # the stage ends with its last checkpoint committed and the old ones pruned
        self.watchdog.beat()
        if start_step == t.max_steps and self.state.step == t.max_steps:
            last["eval_loss"] = self.evaluate()
        return self.finish(last, train_tokens / train_time if train_time else last["tokens_per_s"], peak)

    def finish(self, last: Dict, tokens_per_s: float, peak: Peak) -> Dict:
        self.watchdog.beat()
        done = Phases()
        full_state = consolidated_state_dict(self.engine, self.par)  # every trained weight: under LoRA, the adapters
        done.mark("gather_weights")
        trainable_params = sum(t.numel() for t in full_state.values())
        optimizer_state_mb = optimizer_state_bytes(self.engine) / 2**20
        summary: Dict = {}
        if self.ctx.rank == 0:
            final_dir = self.stage_dir / FINAL_DIR
            if self.lora is not None:
                save_peft_adapter(full_state, self.lora, final_dir / ADAPTER_DIR)
                # The next stage and export read dense weights: the base, unrounded, plus the adapters' update.
                base = build_dense_model(self.cfg, self.init_path).state_dict()
                full_state = merged_weights(base, full_state, self.lora)
            save_consolidated(full_state, self.cfg.model, final_dir, self.labels)
            self.data.tokenizer.save(final_dir)
            self.session.publish(self.run_dir, f"{self.stage.name}/{FINAL_DIR}")
            done.mark("save_final")
            scores: Dict = {}
            if self.labels is None:
                sample = sample_text(full_state, self.cfg.model, self.data.tokenizer, self.stage.kind, self.cfg.train.sample_tokens,
                                     self.ctx.device, self.precision.dtype)
            else:
                report, sample = held_out_score(full_state, self.cfg.model, self.labels, self.data.val, self.data.tokenizer, self.ctx.device)
                self.log({"step": self.state.step, "kind": "classify", **flat_counts(report), "confusion": report["confusion"]})
                scores = {"accuracy": report["accuracy"], "classification": report}
            if self.distiller is not None:
                settings = self.distiller.settings
                scores = {"distill": {"teacher": str(self.teacher_path), "teacher_params": num_params(self.distiller.teacher),
                                      "temperature": settings.temperature, "alpha": settings.alpha, **self.loss_parts}}
            done.mark("sample")
            has_perplexity = self.labels is None and math.isfinite(last["eval_loss"])  # a loss over class labels has none
            summary = {
                "stage": self.stage.name, "kind": self.stage.kind, "steps": self.state.step, "tokens": self.state.tokens_seen,
                "final_loss": last["loss"], "eval_loss": last["eval_loss"],
                "perplexity": math.exp(min(last["eval_loss"], 50.0)) if has_perplexity else None, **scores,
                "tokens_per_s": tokens_per_s, "mfu": mfu(self.flops_per_token, tokens_per_s, peak.flops, self.ctx.world_size),
                **peak.summary(), "sample": sample, "final_dir": f"{where(self.run_dir)}/{self.stage.name}/{FINAL_DIR}",
                "layout": {"tp": self.par.tp, "pp": self.par.pp, "dp": self.dp_size, "zero_stage": self.cfg.parallel.zero_stage},
                **self.precision.record(), "trainable_params": trainable_params, "optimizer_state_mb": optimizer_state_mb,
                "consumed_samples": self.state.consumed_samples, "consumed_by_source": self._consumed_by_source(),
            }
            (self.stage_dir / STAGE_SUMMARY).write_text(json.dumps(summary, indent=2))
            self.session.publish(self.run_dir, f"{self.stage.name}/{STAGE_SUMMARY}")  # last: it marks the stage finished
            self.log({"step": self.state.step, "kind": "end", **{k: v for k, v in summary.items() if isinstance(v, (int, float))},
                      "finish_s": done.seconds})
            if self.wandb is not None:
                self.wandb.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
                self.wandb.finish()
        dist.barrier()
        self.session.close(self.state.step)
        return summary


def _float_or_nan(value) -> float:
    if value is None:
        return math.nan
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def train_stage(run_dir: Path, stage_index: int, session_factory: Callable[[Path, RunConfig], Session], device: torch.device,
                phases: Optional[Phases] = None) -> Dict:
    """Train one stage on this rank, on the launcher's ``device``; returns the stage summary on rank 0 ({} elsewhere).
    ``phases`` holds what the launcher timed before calling (the start record reports every set-up phase)."""
    return StageTrainer(run_dir, stage_index, session_factory, device, phases).run_loop()
