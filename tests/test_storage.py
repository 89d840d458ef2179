"""raylm.storage and stored checkpoints against real object stores on 127.0.0.1 (an S3 server, a GCS server), without Ray."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest

from object_store import CREDENTIALS, gcs_server, new_bucket, new_gcs_bucket, s3_server

STORES = {"s3": (s3_server, new_bucket), "gs": (gcs_server, new_gcs_bucket)}


@pytest.fixture(scope="module", params=sorted(STORES))
def new_runs(request):
    """Makes a fresh bucket on a running server of one kind (every test runs on each) and returns its runs URI."""
    server, bucket = STORES[request.param]
    with server() as endpoint:
        yield lambda: bucket(endpoint)


@pytest.fixture
def runs(new_runs):
    return new_runs()


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
    # A file changed in the bucket after it was listed (same size, other bytes) is refused, and not kept.
    storage.Store(runs).child("other").write_bytes("data/new.bin", b"N" * 7)
    cache("third")
    third = storage.view_of(storage.Store(runs).child("other"))
    with pytest.raises(RuntimeError, match="data/new.bin fails its sha256 check after download"):
        storage.fetch_tree(third, "data")
    assert not list((tmp_path / "third" / "blobs").rglob(hashlib.sha256(b"n" * 7).hexdigest()))


def test_a_pushed_tree_is_hashed_again_only_where_a_file_changed(runs, cache, monkeypatch):
    from raylm import storage

    store = storage.Store(runs).child("run")
    view = storage.view_of(store)
    (view / "data").mkdir()
    for name in ("a.bin", "b.bin"):
        (view / "data" / name).write_bytes(name.encode() * 100)
    storage.push_tree(view, "data")
    hashed = []
    real = storage.sha256_of
    monkeypatch.setattr(storage, "sha256_of", lambda path: hashed.append(path.name) or real(path))
    storage.push_tree(view, "data")  # the next stage's push: nothing read
    assert hashed == []
    (view / "data" / "b.bin").write_bytes(b"changed")
    storage.push_tree(view, "data")
    assert hashed == ["b.bin"]
    assert json.loads(store.read_bytes("data/.contents.json"))["b.bin"][0] == len(b"changed")
    assert store.read_bytes("data/b.bin") == b"changed"


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
    import os

    from raylm.storage import Store

    store = Store(runs)
    shipped = pickle.dumps(store) + pickle.dumps(store.fs) + store.uri.encode()
    secrets = [value for value in CREDENTIALS.values() if value != "us-east-1"]
    if runs.startswith("gs://"):
        key = json.loads(open(os.environ["GOOGLE_APPLICATION_CREDENTIALS"]).read())["private_key"]
        secrets = [os.environ["GOOGLE_APPLICATION_CREDENTIALS"], key.splitlines()[1]]
    assert not any(value.encode() in shipped for value in secrets)
    assert json.dumps(store.display()).count("endpoint_override") == 0


def test_inputs_only_the_drivers_disk_holds_reach_a_worker_through_the_store(runs, cache, tmp_path):
    """A prepared data.source and init_from weights on the driver's disk: staged into the run and uploaded by the
    driver, fetched by a machine that never saw them, and read there as the driver would."""
    from safetensors.torch import load_file

    from conftest import TINY_PRETRAIN, finished_run
    from raylm.configs.loader import load_config
    from raylm.launcher.cli import main
    from raylm import storage
    from raylm.storage import store_of
    from raylm.trainer import run_dir as rundir
    from raylm.trainer.run_inputs import fetch_inputs, initial_weights, stage_inputs
    from raylm.trainer.stage_data import open_stage_data, prepare_stage_data

    weights = finished_run(tmp_path / "local") / "pretrain" / "final"
    prepared = tmp_path / "prepared"
    assert main(["data", "prepare", "builtin:pydoc", "--out", str(prepared), "--tokenizer", str(weights), "--workers", "1"]) == 0
    stage = f"stages=[{{name: more, kind: pretrain, init_from: {weights}, data: {{source: {prepared}}}}}]"
    run = load_config("tiny", [f"runs_dir={runs}", "name=staged", *TINY_PRETRAIN, "data.tokenizer=byte", stage])
    driver_view = rundir.create(run, "staged")
    on_driver = prepare_stage_data(driver_view, run, 0)
    stage_inputs(driver_view, run, 0, prepared)

    cache("worker")
    worker_view = storage.view_of(store_of(driver_view))
    assert fetch_inputs(worker_view, 0) > 0
    init = initial_weights(worker_view, run, 0)
    assert init == worker_view / "more" / "init"
    expected, got = load_file(str(weights / "model.safetensors")), load_file(str(init / "model.safetensors"))
    assert all((expected[name] == got[name]).all() for name in expected)
    on_worker = open_stage_data(worker_view, run, 0)
    assert on_worker.train.num_samples == on_driver.train.num_samples > 0
    assert (on_worker.train.batch([0, 7])[0] == on_driver.train.batch([0, 7])[0]).all()
    assert on_worker.tokenizer.fingerprint == on_driver.tokenizer.fingerprint


def test_a_rank_log_reaches_the_store_while_the_rank_works_and_a_restart_elsewhere_continues_it(runs, cache):
    """A SIGKILLed rank never reaches its final upload: what it shipped while working is in the store, and the
    attempt that follows on another machine appends to that copy, not to an empty file."""
    from raylm import storage
    from raylm.launcher.rank_logs import LogShipper, continue_stored_log, log_rel
    from faults import wait_for

    store = storage.Store(runs).child("run")
    rel = log_rel("pretrain", 0)
    first = storage.view_of(store)
    (first / rel).parent.mkdir(parents=True)
    killed = LogShipper(first, rel, every_s=0.05).__enter__()  # never exited: the process dies
    (first / rel).write_text("attempt 1 step 1\n")
    wait_for(lambda: store.is_file(rel) and store.read_bytes(rel) == b"attempt 1 step 1\n", "the shipped log", timeout=20)
    killed.stop()

    cache("another machine")
    second = storage.view_of(store)
    continue_stored_log(second, rel)
    with LogShipper(second, rel):
        with open(second / rel, "a") as log:
            log.write("attempt 2 step 1\n")
    assert store.read_bytes(rel) == b"attempt 1 step 1\nattempt 2 step 1\n"

    # A machine whose own copy is the longer one keeps it.
    cache("driver")
    (first / rel).write_text("attempt 1 step 1\nattempt 1 step 2 (never shipped)\nmore\n")
    continue_stored_log(first, rel)
    assert (first / rel).read_text().endswith("more\n")


def _open_view_at_once(uri: str, cache_dir: str, start, errors) -> None:
    """One rank of a node opening the run's view at the same moment as the node's other ranks."""
    import os

    from raylm import storage

    os.environ["RAYLM_CACHE"] = cache_dir
    store = storage.Store(uri)
    start.wait()
    try:
        assert storage.store_of(storage.view_of(store)).uri == store.uri
    except Exception as err:  # reported to the test, which names it
        errors.put(repr(err))


def test_ranks_opening_a_view_at_once_all_find_its_store(runs, tmp_path):
    """Every rank of a node opens the run's view as it starts; none may read the marker while another writes it."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    for attempt in range(30):
        start = context.Barrier(4)
        ranks = [context.Process(target=_open_view_at_once, args=(runs, str(tmp_path / f"node{attempt}"), start, errors))
                 for _ in range(4)]
        for rank in ranks:
            rank.start()
        for rank in ranks:
            rank.join(timeout=60)
            assert rank.exitcode == 0
    assert errors.empty(), errors.get()


def test_a_large_file_comes_back_whole_from_parts_fetched_at_once(runs, tmp_path):
    """More parts than requests in flight, the last one short: the file and its sha256 are the uploaded ones."""
    import os

    from raylm import storage

    data = os.urandom((storage.TRANSFERS + 2) * storage.DOWNLOAD_PART + 12345)
    (tmp_path / "big.bin").write_bytes(data)
    store = storage.Store(runs)
    store.upload(tmp_path / "big.bin", "big.bin")
    size, sha256 = store.download_hashed("big.bin", tmp_path / "back" / "big.bin")
    assert (size, sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (tmp_path / "back" / "big.bin").read_bytes() == data
    assert [p.name for p in (tmp_path / "back").iterdir()] == ["big.bin"]  # no part file left behind
