"""Manifest-based completeness checks of checkpoint directories."""

from pathlib import Path

from raylm.trainer.checkpoint import TrainerState, describe_files, read_state, step_dir_name, step_dirs, verify, write_manifest

STATE = TrainerState(step=3, consumed_samples=48, tokens_seen=6144, world_size=2, tp=1, pp=1, dp=2)


def _checkpoint(root: Path) -> Path:
    (root / "deepspeed").mkdir(parents=True)
    (root / "deepspeed" / "shard_0.pt").write_bytes(b"a" * 100)
    (root / "deepspeed" / "shard_1.pt").write_bytes(b"b" * 50)
    write_manifest(root, STATE, describe_files(root))
    return root


def test_complete_checkpoint_verifies_and_reads_back(tmp_path):
    root = _checkpoint(tmp_path / step_dir_name(3))
    assert verify(root) is None
    assert read_state(root) == STATE


def test_missing_manifest_is_incomplete(tmp_path):
    root = tmp_path / "c"
    (root / "deepspeed").mkdir(parents=True)
    assert "no manifest" in verify(root)


def test_missing_truncated_and_flipped_shards_are_caught(tmp_path):
    root = _checkpoint(tmp_path / "c")
    shard = root / "deepspeed" / "shard_0.pt"
    shard.write_bytes(b"a" * 99)
    assert "has 99 bytes" in verify(root)
    shard.write_bytes(b"a" * 99 + b"c")
    assert "sha256" in verify(root)
    shard.unlink()
    assert "missing shard" in verify(root)


def test_step_dirs_newest_first(tmp_path):
    for step in (5, 40, 7):
        (tmp_path / step_dir_name(step)).mkdir()
    (tmp_path / "final").mkdir()
    assert [p.name for p in step_dirs(tmp_path)] == [step_dir_name(40), step_dir_name(7), step_dir_name(5)]
