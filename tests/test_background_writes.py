"""The background ledger of asynchronous checkpoints: it writes what it was given when it was given it, the very
bytes the inline ledger writes, and its hashes are those of a fresh read."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors.torch import load_file

from raylm.background_writes import BackgroundWrittenFiles
from raylm.host_snapshot import HostBuffers, HostCopies, take_snapshot
from raylm.trainer.checkpoint import describe_files
from raylm.written_files import WrittenFiles


def _state():
    """What DeepSpeed hands torch.save: module weights that are views of one flat buffer (ZeRO), a module's
    state_dict (with its ``_metadata``), optimizer moments, plain Python values."""
    flat = torch.arange(40, dtype=torch.float32)
    module = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return {"views": {"a": flat[:12].view(3, 4), "b": flat[12:40]}, "module": module.state_dict(),
            "optimizer": optimizer.state_dict(), "fp32": torch.nn.Parameter(torch.randn(5)), "steps": [3, {"lr": 0.1}]}


def _tensors():
    return {"param/w": torch.randn(6, 4), "param/b": torch.zeros(0), "exp_avg/w": torch.randn(3).bfloat16()}


def _write_doubled(written: WrittenFiles, tensors) -> None:
    """A ``write_with`` job: work on the state it is given (a layout-free gather's), then a file of the result."""
    written.save_safetensors({name: tensor * 2 for name, tensor in tensors.items()}, written.root / "layout_free" / "doubled.safetensors")


def _write_all(written: WrittenFiles, state, tensors) -> None:
    written.torch_save(state, written.root / "deepspeed" / "states.pt")
    written.save_safetensors(tensors, written.root / "layout_free" / "param.safetensors", {"format": "test"})
    written.write_with(_write_doubled, tensors)
    written.write_text(written.root / "records.jsonl", '{"step": 3}\n')


def _change_in_place(state, tensors) -> None:
    """What the next optimizer step does to the live tensors."""
    with torch.no_grad():
        for tensor in [*state["views"].values(), *state["module"].values(), state["fp32"], *tensors.values()]:
            tensor.add_(1)
        for moments in state["optimizer"]["state"].values():
            moments["exp_avg"].mul_(2)


def test_background_writes_keep_the_values_they_were_given(tmp_path):
    state, tensors = _state(), _tensors()
    weights_given = tensors["param/w"].clone()
    inline = WrittenFiles(tmp_path / "inline")
    _write_all(inline, state, tensors)
    inline.sync()
    expected_states = torch.load(inline.root / "deepspeed" / "states.pt", weights_only=False)

    # The writer finishes its first file, then waits in on_written (where a session starts an upload) until released:
    # every write queued after it is still to come when the tensors change.
    release = threading.Event()
    background = BackgroundWrittenFiles(tmp_path / "background", ThreadPoolExecutor(1), lambda rel: release.wait(60))
    background.write_text(background.root / "first.txt", "held")
    _write_all(background, state, tensors)
    background.sync()
    _change_in_place(state, tensors)
    assert not background.done()
    release.set()
    background.wait()
    assert background.done()

    del background.files["first.txt"]
    (background.root / "first.txt").unlink()
    # The very bytes the inline ledger wrote before the change (shared storages shared in the copy too), and each
    # hash is a fresh read's.
    assert background.files == inline.files
    assert describe_files(background.root) == background.files
    got = torch.load(background.root / "deepspeed" / "states.pt", weights_only=False)
    assert torch.equal(got["views"]["a"], expected_states["views"]["a"]) and not torch.equal(got["views"]["a"], state["views"]["a"])
    assert got["views"]["a"].untyped_storage().data_ptr() == got["views"]["b"].untyped_storage().data_ptr()
    back = load_file(str(background.root / "layout_free" / "param.safetensors"))
    assert torch.equal(back["param/w"], weights_given)
    doubled = load_file(str(background.root / "layout_free" / "doubled.safetensors"))
    assert torch.equal(doubled["param/w"], weights_given * 2)


def test_a_snapshot_keeps_sharing_types_and_attributes():
    flat = torch.zeros(10)
    parameter = torch.nn.Parameter(torch.ones(3))
    tagged = torch.ones(2)
    tagged.partition_id = 7  # attributes DeepSpeed sets on a tensor are saved with it
    snapshot = take_snapshot({"x": flat[:5], "y": flat[5:], "p": parameter, "t": tagged, "same": [flat[:5], flat[:5]]})
    flat.fill_(1)  # after the snapshot, before its copy is built (on the writer thread, in a checkpoint)
    copy = snapshot.restore()
    assert torch.equal(copy["x"], torch.zeros(5)) and copy["x"].untyped_storage()._cdata == copy["y"].untyped_storage()._cdata
    assert type(copy["p"]) is torch.nn.Parameter and copy["p"].requires_grad
    assert copy["t"].partition_id == 7


def test_snapshots_taken_with_one_host_copies_share_a_storage_copy_while_the_original_lives():
    copies = HostCopies()
    flat = torch.zeros(10)
    first, second = take_snapshot({"a": flat[:5]}, copies).restore(), take_snapshot([flat[5:]], copies).restore()
    assert first["a"].untyped_storage()._cdata == second[0].untyped_storage()._cdata
    # Storages made and freed one after another (at reused addresses, often): each is copied anew.
    for value in range(20):
        made = torch.full((10,), float(value))
        assert torch.equal(take_snapshot(made, copies).restore(), made)
        del made


def test_snapshots_into_host_buffers_reuse_them_once_reclaimed():
    buffers = HostBuffers()
    flat, other = torch.arange(10.0), torch.arange(4.0)
    first = take_snapshot({"a": flat[:5], "b": flat[5:], "c": other}, HostCopies(buffers)).restore()
    assert torch.equal(first["a"], torch.arange(5.0)) and torch.equal(first["c"], other)
    used = {first[name].untyped_storage().data_ptr() for name in ("a", "c")}
    assert len(used) == 2  # one buffer per storage, the views of one storage share it
    # Not reclaimed: the first snapshot's buffers stay its own.
    flat.add_(100)
    held = take_snapshot({"a": flat[:5]}, HostCopies(buffers)).restore()
    assert held["a"].untyped_storage().data_ptr() not in used and torch.equal(first["a"], torch.arange(5.0))
    # Reclaimed (the first snapshot is written): the next snapshot of the same sizes copies into the same memory.
    buffers.reclaim()
    again = take_snapshot({"a": flat[:5], "c": other}, HostCopies(buffers)).restore()
    assert {again[name].untyped_storage().data_ptr() for name in ("a", "c")} <= used | {held["a"].untyped_storage().data_ptr()}
    assert torch.equal(again["a"], torch.arange(100.0, 105.0))


def test_abandoning_drops_the_writes_not_begun(tmp_path):
    release = threading.Event()
    background = BackgroundWrittenFiles(tmp_path, ThreadPoolExecutor(1), lambda rel: release.wait(60))
    background.write_text(tmp_path / "first.txt", "under way")
    background.write_text(tmp_path / "second.txt", "never begun")
    threading.Timer(1.0, release.set).start()  # the write under way ends after abandon has dropped the rest
    background.abandon()
    assert (tmp_path / "first.txt").is_file() and not (tmp_path / "second.txt").exists()
