"""Config composition and every validation rule, without Ray."""

import subprocess
import sys
from pathlib import Path

import pytest

from raylm.configs.loader import from_yaml_file, load_config, preset_names, resolve_stage, to_yaml
from raylm.configs.schema import RunConfig
from raylm.errors import UserError


def test_presets_load_and_validate():
    assert {"tiny", "125m", "350m", "1.3b", "7b"} <= set(preset_names())
    for name in preset_names():
        run = load_config(name)
        assert isinstance(run, RunConfig)
        assert run.stages


def test_composition_order_preset_file_dotlist(tmp_path: Path):
    file = tmp_path / "run.yaml"
    file.write_text("train: {max_steps: 7, log_every: 3}\nmodel: {n_layer: 2}\n")
    run = load_config(str(file), ["train.max_steps=9"])
    assert run.train.max_steps == 9  # dotlist beats file
    assert run.train.log_every == 3  # file beats preset
    assert run.model.n_layer == 2
    assert run.model.d_model == 128  # preset default survives


def test_stage_overrides_merge_onto_sections():
    run = load_config("tiny", ["train.max_steps=11", "stages.1.optim.lr=0.5"])
    pretrain, sft = resolve_stage(run, 0), resolve_stage(run, 1)
    assert pretrain.train.max_steps == 11
    assert sft.train.max_steps == 20  # the stage's own value wins
    assert sft.optim.lr == 0.5 and pretrain.optim.lr == run.optim.lr
    assert sft.data.source == "builtin:pydoc-sft"


def test_a_stage_is_named_by_index_or_by_name_in_overrides():
    by_name = load_config("tiny", ["stages.sft.train.max_steps=3", "stages.pretrain.optim.lr=0.5"])
    by_index = load_config("tiny", ["stages.1.train.max_steps=3", "stages.0.optim.lr=0.5"])
    assert by_name == by_index
    assert resolve_stage(by_name, 1).train.max_steps == 3 and resolve_stage(by_name, 0).optim.lr == 0.5


@pytest.mark.parametrize("key", ["stages.sftx.train.max_steps", "stages.2.train.max_steps", "stages.-3.train.max_steps"])
def test_an_override_of_a_stage_that_does_not_exist_lists_the_ones_that_do(key):
    with pytest.raises(UserError) as err:
        load_config("tiny", [f"{key}=3"])
    assert f"override '{key}=3': stages has 2 items" in str(err.value)
    assert "use an index 0..1 or a stage name (pretrain, sft)" in str(err.value)


def test_a_stage_that_names_its_corpus_does_not_inherit_the_other_one(tmp_path: Path):
    """data.source and data.sources exclude each other; the most specific level says which one a stage reads."""
    (tmp_path / "web.jsonl").write_text('{"text": "x"}\n')
    mixture = f"[{{path: 'builtin:pydoc', weight: 0.7}}, {{path: '{tmp_path / 'web.jsonl'}', weight: 0.3}}]"
    run = load_config("tiny", [f"data.sources={mixture}"])
    assert resolve_stage(run, 0).data.corpora() == ["builtin:pydoc", str(tmp_path / "web.jsonl")]
    assert [s.weight for s in resolve_stage(run, 0).data.sources] == [0.7, 0.3]
    assert resolve_stage(run, 1).data.corpora() == ["builtin:pydoc-sft"]  # the sft stage names its own source
    run = load_config("tiny", [f"data.source={tmp_path / 'web.jsonl'}", f"stages.0.data={{sources: {mixture}}}"])
    assert resolve_stage(run, 0).data.corpora() == ["builtin:pydoc", str(tmp_path / "web.jsonl")]
    (tmp_path / "run.yaml").write_text(to_yaml(run))
    again = from_yaml_file(tmp_path / "run.yaml")
    assert [resolve_stage(again, i).data for i in range(2)] == [resolve_stage(run, i).data for i in range(2)]


def test_yaml_round_trip(tmp_path: Path):
    run = load_config("tiny", ["model.n_layer=3"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(run))
    assert from_yaml_file(path) == run


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.n_hed=3"], "did you mean 'model.n_head'"),
        (["trian.max_steps=3"], "unknown config key 'trian"),
        (["train.max_steps=abc"], "train.max_steps"),
        (["train.max_steps=0"], "train.max_steps=0 must be > 0"),
        (["train.global_batch_size=-4"], "train.global_batch_size=-4 must be > 0"),
        (["optim.lr=nan"], "optim.lr=nan must be a finite number > 0"),
        (["fault.hang_timeout_s=.inf"], "fault.hang_timeout_s=inf must be a finite number > 0"),
        (["model.n_head=5"], "model.n_head=5 must divide model.d_model=128"),
        (["model.n_head=8", "model.d_model=24"], "head size"),
        (["model.n_kv_head=3"], "model.n_kv_head=3 must divide model.n_head=4"),
        (["parallel.tp=4"], "parallel.tp=4 must divide model.n_head=4 and model.n_kv_head=2"),
        (["parallel.zero_stage=4"], "parallel.zero_stage=4 must be 0, 1, 2 or 3"),
        (["parallel.pp=2", "parallel.zero_stage=2"], "DeepSpeed's pipeline engine supports ZeRO 0 or 1"),
        (["parallel.pp=9", "parallel.zero_stage=1", "cluster.num_workers=9", "train.global_batch_size=36"], "exceeds model.n_layer=4"),
        (["cluster.num_workers=3"], "train.global_batch_size=16 must be a multiple of data-parallel size 3"),
        (["parallel.tp=2", "cluster.num_workers=3"], "cluster.num_workers=3 is not divisible by parallel.tp=2"),
        (["cluster.min_workers=3"], "cluster.min_workers=3 must lie between one tp x pp replica (1) and cluster.num_workers=2"),
        (["parallel.tp=2", "cluster.num_workers=4", "cluster.min_workers=1"], "cluster.min_workers=1 must lie between one tp x pp replica (2)"),
        (["cluster.elastic_check_s=0"], "cluster.elastic_check_s=0.0 must be > 0"),
        (["data.source=/does/not/exist"], "/does/not/exist"),
        (["data.source=builtin:nope"], "not a built-in pretrain corpus"),
        (["data.tokenizer=byte", "model.vocab_size=100"], "too small for data.tokenizer='byte'"),
        (["data.val_fraction=1.5"], "data.val_fraction=1.5"),
        (["optim.min_lr_ratio=2"], "optim.min_lr_ratio=2.0"),
        (["optim.beta2=1.0"], "optim.beta2=1.0"),
        (["train.precision=fp8"], "train.precision='fp8' must be one of"),
        (["cluster.use_gpu=maybe"], "cluster.use_gpu='maybe'"),
        (["logging.wandb.mode=loud"], "logging.wandb.mode='loud'"),
        (["stages.1.kind=rlhf"], "stages.1.kind='rlhf'"),
        (["stages.1.name=pretrain"], "used twice"),
        (["stages.1.train.max_stepz=3"], "stages.1.train.max_stepz"),
        # A known key with a bad value suggests nothing (it had suggested the key itself).
        (["stages.1.optim.lr=abc"], "stage 'sft': bad key 'stages.1.optim.lr': Value 'abc'"),
        # A list element's unknown key is named with the element's path (OmegaConf names only 'pathz').
        (["stages.0.data={sources: [{pathz: x}]}"], "unknown key 'stages.0.data.sources.0.pathz' (did you mean 'stages.0.data.sources.0.path'?)"),
        (["data.sources=[{path: 'builtin:pydoc', wieght: 1}]"], "unknown key 'data.sources.0.wieght' (did you mean 'data.sources.0.weight'?)"),
        (["stages.0.init_from=/no/such/dir"], "stages.0.init_from"),
        (["stages=[]"], "stages is empty"),
        (["train.max_steps"], "must look like key=value"),
        (["runs_dir=hdfs://nn/runs"], "runs_dir=hdfs://nn/runs: raylm stores runs on a local or shared path, s3:// or gs://, not hdfs://"),
        (["runs_dir=s3://bucket/runs?secret_key=abc"], "runs_dir=s3://bucket/runs?...: credentials do not belong in a URI"),
    ],
)
def test_invalid_configs_name_the_key(overrides, fragment):
    with pytest.raises(UserError) as err:
        load_config("tiny", overrides)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_preset_suggests_the_close_one():
    with pytest.raises(UserError, match="did you mean 'tiny'"):
        load_config("tinyy")


def test_missing_yaml_file_names_the_path(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_bad_yaml_names_the_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(UserError, match="bad.yaml"):
        load_config(str(path))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("model: [1, 2]", "'model' must be a mapping of model.* keys (vocab_size, d_model, n_layer, ...), found a list [1, 2]"),
        ("model: 5", "'model' must be a mapping of model.* keys (vocab_size, d_model, n_layer, ...), found int 5"),
        ("train: null", "'train' must be a mapping of train.* keys"),
        ("logging: {wandb: on}", "'logging.wandb' must be a mapping of logging.wandb.* keys (mode, project, entity, ...), found bool True"),
        ("stages: {name: x}", "'stages' must be a list"),
        ("stages: [5]", "'stages.0' must be a mapping of stages.N.* keys (name, kind, init_from, ...), found int 5"),
        ("stages: [{name: x, kind: pretrain, train: [1]}]", "'stages.0.train' must be a mapping of overrides"),
        ("stages: [{name: x, kind: pretrain, train: {max_steps: [1]}}]", "'stages.0.train.max_steps' must be an integer, found a list [1]"),
        ("model: {n_layer: {a: 1}}", "'model.n_layer' must be an integer, found a mapping {'a': 1}"),
    ],
)
def test_a_section_of_the_wrong_shape_names_key_expected_and_found(tmp_path: Path, text, fragment):
    path = tmp_path / "shape.yaml"
    path.write_text(text + "\n")
    with pytest.raises(UserError) as err:
        load_config(str(path))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert "Merge error" not in str(err.value) and "subclass" not in str(err.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model=[1]", "override 'model=[1]': 'model' must be a mapping of model.* keys"),
        ("stages=5", "'stages' must be a list (e.g. stages=[{name: ..., kind: ...}, ...]), found int 5"),
        ("data.sources={path: x}", "'data.sources' must be a list (e.g. data.sources=[{path: ..., weight: ...}, ...]), found a mapping"),
        ("stages.1.optim=0.1", "'stages.1.optim' must be a mapping of overrides"),
        ("parallel.tp=[2]", "'parallel.tp' must be an integer, found a list [2]"),
    ],
)
def test_an_override_of_the_wrong_shape_names_key_expected_and_found(override, fragment):
    with pytest.raises(UserError) as err:
        load_config("tiny", [override])
    assert fragment in str(err.value)


def test_resume_may_change_the_layout_but_not_the_model():
    from raylm.launcher.resume import with_resume_overrides

    run = load_config("tiny", [])
    relaid = with_resume_overrides(run, ["parallel.tp=2", "cluster.num_workers=4", "parallel.zero_stage=3", "train.precision=bf16",
                                         "cluster.use_gpu=false"])
    assert (relaid.parallel.tp, relaid.cluster.num_workers, relaid.parallel.zero_stage) == (2, 4, 3)
    assert relaid.cluster.use_gpu == "false"
    with pytest.raises(UserError, match="--set model.d_model cannot change on resume"):
        with_resume_overrides(run, ["model.d_model=256"])
    with pytest.raises(UserError, match="--set stages.0.data.source cannot change on resume"):
        with_resume_overrides(run, ["stages.0.data.source=builtin:pydoc"])
    with pytest.raises(UserError, match="--set stages.sft.data.source cannot change on resume"):
        with_resume_overrides(run, ["stages.sft.data.source=builtin:pydoc"])
    assert resolve_stage(with_resume_overrides(run, ["stages.sft.train.max_steps=40"]), 1).train.max_steps == 40
    with pytest.raises(UserError, match="--set train.max_steps must look like key=value"):
        with_resume_overrides(run, ["train.max_steps"])


@pytest.mark.parametrize(
    "overrides, workers, usable",
    [
        ([], 3, 2),  # 16 sequences of micro-batch 4 split over 1, 2 or 4 replicas, not 3
        ([], 5, 4),
        (["parallel.tp=2", "cluster.num_workers=4"], 7, 4),
        (["parallel.tp=2", "parallel.pp=2", "cluster.num_workers=4", "parallel.zero_stage=1"], 3, 0),
        (["train.global_batch_size=12", "parallel.micro_batch_size=2", "cluster.num_workers=2"], 5, 3),
    ],
)
def test_usable_world_size_keeps_whole_replicas_that_split_the_batch(overrides, workers, usable):
    from raylm.parallelism.zero import usable_world_size

    assert usable_world_size(load_config("tiny", overrides), workers) == usable


def test_use_gpu_takes_bare_true_and_false():
    assert load_config("tiny", ["cluster.use_gpu=false"]).cluster.use_gpu == "false"
    run = load_config("tiny", ["stages.0.cluster.use_gpu=true"])
    assert resolve_stage(run, 0).cluster.use_gpu == "true"


def test_loading_and_checking_a_config_imports_no_torch():
    """`raylm config show` and a launch's config errors answer without torch's ~2 s import."""
    code = ("import sys; from raylm.configs.loader import load_config, resolve_stage; "
            "run = load_config('tiny', ['parallel.tp=2']); [resolve_stage(run, i) for i in range(len(run.stages))]; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
