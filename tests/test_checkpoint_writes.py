"""Checkpoint files are hashed as they are written: the manifest's sizes and sha256 equal a fresh read of every
file, and saving opens none of them for reading (2 gloo ranks, real DeepSpeed engines, no Ray)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import TINY_PRETRAIN, read_metrics
from gloo_spawn import run_on_gloo, train_stage_on_rank
from raylm.configs.loader import load_config
from raylm.trainer.checkpoint import MANIFEST, RAY_SNAPSHOT, describe_files, manifest_files, step_dir_name, verify
from raylm.written_files import WrittenFiles

def test_written_files_record_what_a_fresh_read_finds(tmp_path):
    finished = []
    written = WrittenFiles(tmp_path, on_written=lambda rel: finished.append((rel, (tmp_path / rel).stat().st_size)))
    state = {"weights": torch.randn(64, 32), "view": torch.arange(10)[2:7], "nested": [1, {"scalar": torch.tensor(3.5)}]}
    tensors = {"param/w": torch.randn(3, 4), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5),
               "half": torch.randn(5).bfloat16(), "index": torch.arange(7), "mask": torch.tensor([True, False])}
    written.torch_save(state, tmp_path / "a" / "state.pt")
    written.save_safetensors(tensors, tmp_path / "b" / "tensors.safetensors", {"format": "test"})
    written.write_text(tmp_path / "notes.json", json.dumps({"step": 3}))
    written.sync()

    assert written.files == describe_files(tmp_path)
    # Each file is announced once it is whole (a session may upload it at once).
    assert finished == [(rel, size) for rel, (size, _) in written.files.items()]
    loaded = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    assert torch.equal(loaded["weights"], state["weights"]) and torch.equal(loaded["view"], state["view"])
    back = load_file(str(tmp_path / "b" / "tensors.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[name], tensor) for name, tensor in tensors.items())
    with safe_open(str(tmp_path / "b" / "tensors.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "test"}
        assert torch.equal(handle.get_slice("param/w")[1:3], tensors["param/w"][1:3])


LAYOUTS = {"zero2": ["parallel.zero_stage=2"], "pp2": ["parallel.pp=2", "parallel.zero_stage=1"], "tp2": ["parallel.tp=2"]}


COLLECTIVES = ("barrier", "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object")


def _note_collectives_in_deepspeed_saves(noted: list) -> None:
    """Note (in ``noted``) every collective DeepSpeed's ``save_checkpoint`` makes, by name."""
    import torch.distributed as dist
    from deepspeed.runtime.engine import DeepSpeedEngine

    saving = []
    save_checkpoint = DeepSpeedEngine.save_checkpoint

    def noting_save(engine, *args, **kwargs):
        saving.append(True)
        try:
            return save_checkpoint(engine, *args, **kwargs)
        finally:
            saving.pop()

    def noting(name: str, collective):
        def call(*args, **kwargs):
            if saving:
                noted.append(name)
            return collective(*args, **kwargs)
        return call

    DeepSpeedEngine.save_checkpoint = noting_save
    for name in COLLECTIVES:
        setattr(dist, name, noting(name, getattr(dist, name)))


def _train_recording_reads(rank: int, world_size: int, root: Path) -> None:
    """Train each layout to its checkpoint at step 2, noting every checkpoint file this process opens for reading
    and every collective DeepSpeed's own save makes."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))  # what DeepSpeed reads
    reads, collectives = [], []
    _note_collectives_in_deepspeed_saves(collectives)  # this process is the test's own, as is the hook below

    def note_reads(event: str, args: tuple) -> None:
        # Python-level opens carry their mode; os.open's (mode None) opens for fsync, which reads nothing.
        if event == "open" and isinstance(args[1], str) and "r" in args[1] and "step_" in str(args[0]):
            reads.append(str(args[0]))

    sys.addaudithook(note_reads)  # this process is the test's own: the hook goes with it
    for name, layout in LAYOUTS.items():
        train_stage_on_rank(root / name, load_config("tiny", [*TINY_PRETRAIN, "cluster.num_workers=2", "train.max_steps=2",
                                                              "train.ckpt_every=2", *layout]), rank)
    (root / f"reads_rank{rank}.json").write_text(json.dumps(reads))
    (root / f"collectives_rank{rank}.json").write_text(json.dumps(collectives))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("writes")
    run_on_gloo(_train_recording_reads, 2, root)
    return root


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_manifest_holds_the_hashes_a_fresh_read_gives(saved, layout):
    checkpoint = saved / layout / "pretrain" / "step_0000002"
    listed = manifest_files((checkpoint / MANIFEST).read_text())
    assert listed == describe_files(checkpoint)  # every file, DeepSpeed's recovery scripts left out
    assert any(rel.startswith("layout_free/") for rel in listed) and any(rel.startswith("deepspeed/") for rel in listed)
    assert verify(checkpoint) is None


@pytest.mark.slow
def test_saving_reads_no_checkpoint_file_back(saved):
    for rank in range(2):
        reads = json.loads((saved / f"reads_rank{rank}.json").read_text())
        assert reads == [], f"rank {rank} read back {reads}"


@pytest.mark.slow
def test_deepspeeds_save_makes_no_collective(saved):
    """Its tag check and barriers are left out: raylm's own save synchronises the ranks around it."""
    for rank in range(2):
        assert json.loads((saved / f"collectives_rank{rank}.json").read_text()) == [], f"rank {rank}"


@pytest.mark.slow
def test_a_ray_run_on_a_disk_writes_each_checkpoint_once_in_place(tp2pp2_run):
    """Under Ray Train with a local runs_dir the ranks write straight into ``<stage>/step_N``, which Ray registers
    as it is (no staging directory, no copy), and the manifest still matches a fresh read."""
    stage_dir = tp2pp2_run / "pretrain"
    saves = [r for r in read_metrics(tp2pp2_run, kind="event") if r.get("event") == "checkpoint"]
    assert [r["step"] for r in saves] == [3, 5]
    assert [r["dir"] for r in saves] == [str(stage_dir / step_dir_name(r["step"])) for r in saves]
    snapshot = json.loads((tp2pp2_run / RAY_SNAPSHOT).read_text())  # the fit's directory is the run's
    assert [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]] == ["pretrain/step_0000003", "pretrain/step_0000005"]
    for save in saves:
        checkpoint = Path(save["dir"])
        on_disk = describe_files(checkpoint)
        assert manifest_files((checkpoint / MANIFEST).read_text()) == on_disk
        assert sum(size for size, _ in on_disk.values()) == save["bytes"]
