"""raylm.storage and stored checkpoints against a real S3 server (moto's) on 127.0.0.1, without Ray."""

from __future__ import annotations

import json
import pickle

import pytest

from object_store import CREDENTIALS, new_bucket, s3_server


@pytest.fixture(scope="module")
def endpoint():
    with s3_server() as url:
        yield url


@pytest.fixture
def runs(endpoint):
    return new_bucket(endpoint)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A machine's node-local cache; ``machine(name)`` switches to another machine's."""
    def machine(name: str):
        monkeypatch.setenv("RAYLM_CACHE", str(tmp_path / name))
    machine("driver")
    return machine


def test_a_tree_is_fetched_once_per_machine_and_shared_by_content(runs, cache, tmp_path):
    from raylm import storage

    store = storage.Store(runs).child("run")
    driver_view = storage.view_of(store)
    (driver_view / "data").mkdir()
    (driver_view / "data" / "a.bin").write_bytes(b"a" * 1000)
    (driver_view / "data" / "sub").mkdir()
    (driver_view / "data" / "sub" / "b.bin").write_bytes(b"b" * 10)
    storage.push_tree(driver_view, "data")
    # The driver's machine adopts what it wrote: nothing to download.
    assert storage.fetch_tree(driver_view, "data") == 0

    cache("worker")
    view = storage.view_of(store)
    assert view != driver_view and storage.store_of(view).uri == store.uri
    assert storage.fetch_tree(view, "data") == 1010
    assert (view / "data" / "sub" / "b.bin").read_bytes() == b"b" * 10
    assert storage.fetch_tree(view, "data") == 0  # a restart, another rank
    # Another run with a file of the same content downloads only what is new to this machine.
    other = storage.view_of(storage.Store(runs).child("other"))
    cache("driver")
    source = storage.view_of(storage.Store(runs).child("other"))
    (source / "data").mkdir()
    (source / "data" / "same.bin").write_bytes(b"a" * 1000)
    (source / "data" / "new.bin").write_bytes(b"n" * 7)
    storage.push_tree(source, "data")
    cache("worker")
    assert storage.fetch_tree(other, "data") == 7


def test_a_tree_without_its_contents_file_is_a_one_line_error(runs, cache):
    from raylm import storage
    from raylm.errors import UserError

    store = storage.Store(runs).child("run")
    store.write_bytes("data/a.bin", b"half-uploaded")
    with pytest.raises(UserError, match=r"run/data is missing or incomplete \(no \.contents\.json\)"):
        storage.fetch_tree(storage.view_of(store), "data")


def test_stored_checkpoints_are_verified_by_size_and_fetched_per_rank_with_their_hashes(runs, cache, tmp_path):
    from raylm import storage
    from raylm.trainer.checkpoint import TrainerState, describe_files, write_manifest
    from raylm.trainer.stored_checkpoints import fetch_stored, own_rng_file, stored_state, stored_steps, verify_stored

    local = tmp_path / "step_0000004"
    (local / "deepspeed").mkdir(parents=True)
    for rank in range(2):
        (local / f"rng_rank{rank:05d}.pt").write_bytes(bytes([rank]) * 100)
        (local / "deepspeed" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(bytes([rank]) * 5000)
    state = TrainerState(4, 64, 4096, 2, 1, 1, 2, 2)
    write_manifest(local, state, describe_files(local))
    store = storage.Store(runs).child("run")
    store.upload(local, "pretrain/step_0000004")
    store.write_bytes("pretrain/step_0000008/deepspeed/x.pt", b"no manifest yet")
    assert stored_steps(store, "pretrain") == ["step_0000008", "step_0000004"]
    assert verify_stored(store, "pretrain/step_0000008") == "no manifest (the save did not finish)"
    assert verify_stored(store, "pretrain/step_0000004") is None
    assert stored_state(store, "pretrain/step_0000004") == state

    target = tmp_path / "view" / "step_0000004"
    count, fetched = fetch_stored(store, "pretrain/step_0000004", target, own_rng_file(1))
    assert (count, fetched) == (1, 100)
    assert sorted(p.name for p in target.rglob("*") if p.is_file()) == ["manifest.json", "rng_rank00001.pt"]
    assert fetch_stored(store, "pretrain/step_0000004", target, own_rng_file(1)) == (0, 0)  # already here

    # A truncated shard fails the size check; a same-size corrupted one fails its hash after download.
    store.write_bytes("pretrain/step_0000004/rng_rank00000.pt", b"\x00" * 99)
    assert verify_stored(store, "pretrain/step_0000004") == "shard rng_rank00000.pt has 99 bytes, manifest says 100"
    store.write_bytes("pretrain/step_0000004/rng_rank00000.pt", b"\x07" * 100)
    with pytest.raises(RuntimeError, match="rng_rank00000.pt fails its sha256 check after download"):
        fetch_stored(store, "pretrain/step_0000004", target, own_rng_file(0))


def test_no_credential_travels_with_a_store(runs):
    from raylm.storage import Store

    store = Store(runs)
    shipped = pickle.dumps(store) + pickle.dumps(store.fs) + store.uri.encode()
    assert not any(value.encode() in shipped for value in CREDENTIALS.values() if value != "us-east-1")
    assert json.dumps(store.display()).count("endpoint_override") == 0
