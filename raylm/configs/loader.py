"""Compose a RunConfig: preset < YAML file < ``key=value`` dotlist.

Every OmegaConf error (unknown key, wrong type) becomes a one-line
``UserError`` naming the key; nothing here starts Ray or imports torch.
"""

from __future__ import annotations

import copy
import difflib
import re
import typing
from dataclasses import fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raylm.configs.schema import STAGE_SECTIONS, DataConfig, ModelConfig, RunConfig, StageConfig
from raylm.errors import UserError
from raylm.files import read_text

DEFAULT_PRESET = "tiny"


def preset_names() -> List[str]:
    folder = resources.files("raylm.configs") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _preset_text(name: str) -> str:
    return (resources.files("raylm.configs") / "presets" / f"{name}.yaml").read_text()


def _read_yaml(text: str, origin: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{origin}:{where} is not valid YAML ({getattr(err, 'problem', err)}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{origin} must be a mapping of config sections, got a {type(data).__name__}")
    return data


def _source_layer(source: str) -> tuple[dict, str]:
    """A preset name or a YAML path -> (mapping, human origin)."""
    path = Path(source)
    if source in preset_names():
        return _read_yaml(_preset_text(source), f"preset '{source}'"), f"preset '{source}'"
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"config file {source} does not exist; give a YAML path or a preset ({', '.join(preset_names())})")
        return _read_yaml(read_text(path, "give a readable YAML file"), str(path)), str(path)
    hint = difflib.get_close_matches(source, preset_names(), n=1)
    did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise UserError(f"'{source}' is neither a preset nor a YAML file{did_you_mean}; presets: {', '.join(preset_names())}")


def _known_keys(cls: type, prefix: str = "") -> List[str]:
    keys = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_known_keys(type(default), key + "."))
    return keys


def _did_you_mean(key: str) -> str:
    candidates = _known_keys(RunConfig) + [f"stages.N.{f.name}" for f in fields(StageConfig)]
    normalized = re.sub(r"stages\.\d+\.", "stages.N.", key)
    hint = difflib.get_close_matches(normalized, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{hint[0]}'?)" if hint and hint[0] != normalized else ""


_SCALAR_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _found(value: Any) -> str:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    if isinstance(value, (dict, list)):
        return f"{'a mapping' if isinstance(value, dict) else 'a list'} {shown}"
    return "null" if value is None else f"{type(value).__name__} {shown}"


def optional_inner(annotation: Any) -> tuple[bool, Any]:
    """(whether None is allowed, the type without Optional)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        return True, next(a for a in args if a is not type(None))
    return False, annotation


def check_shape(value: Any, annotation: Any, key: str, origin: str) -> None:
    """Refuse a value whose shape (mapping, list or single value) is not the schema's at ``key``.

    OmegaConf would report it in its own terms ("list is not a subclass of
    ModelConfig"), or not at all; scalar conversions and unknown keys are left to it.
    """
    optional, annotation = optional_inner(annotation)
    if value is None and optional:
        return
    if is_dataclass(annotation):
        if not isinstance(value, dict):
            some = ", ".join(f.name for f in fields(annotation)[:3])
            section = re.sub(r"\.\d+(\.|$)", r".N\1", key)
            raise UserError(
                f"{origin}: '{key}' must be a mapping of {section}.* keys ({some}, ...), found {_found(value)}; run 'raylm config keys' to list them"
            )
        hints = typing.get_type_hints(annotation)
        for name, item in value.items():
            if name in hints:
                check_shape(item, hints[name], f"{key}.{name}" if key else str(name), origin)
    elif typing.get_origin(annotation) is list:
        if not isinstance(value, list):
            item = typing.get_args(annotation)[0]
            example = "{" + ", ".join(f"{f.name}: ..." for f in fields(item)[:2]) + "}" if is_dataclass(item) else "..."
            raise UserError(f"{origin}: '{key}' must be a list (e.g. {key}=[{example}, ...]), found {_found(value)}")
        element = typing.get_args(annotation)[0]
        for index, item in enumerate(value):
            if is_dataclass(element) and isinstance(item, dict):
                _check_known(item, element, f"{key}.{index}", origin)
            check_shape(item, element, f"{key}.{index}", origin)
    elif typing.get_origin(annotation) is dict:
        if not isinstance(value, dict):
            raise UserError(f"{origin}: '{key}' must be a mapping of overrides (e.g. {{max_steps: 10}}), found {_found(value)}")
    elif annotation in _SCALAR_NAMES and (value is None or isinstance(value, (dict, list))):
        raise UserError(f"{origin}: '{key}' must be {_SCALAR_NAMES[annotation]}, found {_found(value)}")


def _check_known(value: dict, cls: type, key: str, origin: str) -> None:
    """Refuse a key ``cls`` does not have in a list's element: OmegaConf reports those without the element's path."""
    names = [f.name for f in fields(cls)]
    for name in value:
        if name not in names:
            hint = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
            raise UserError(f"{origin}: unknown key '{key}.{name}'" + (f" (did you mean '{key}.{hint[0]}'?)" if hint else "")
                            + f"; each element takes {', '.join(names)}")


def _annotation_at(key: str) -> Any:
    """The schema type at a dotted key (``stages.1.train``), or None where the schema has no such key."""
    annotation: Any = RunConfig
    for part in key.split("."):
        annotation = optional_inner(annotation)[1]
        if typing.get_origin(annotation) is list and part.isdigit():
            annotation = typing.get_args(annotation)[0]
        elif is_dataclass(annotation):
            annotation = typing.get_type_hints(annotation).get(part)
        else:
            return None
    return annotation


def _explain(err: OmegaConfBaseException, origin: str) -> UserError:
    key = getattr(err, "full_key", None) or ""
    message = str(err).splitlines()[0]
    if "Key '" in message and "not in" in message or "Could not override" in message or "Missing key" in message:
        return UserError(f"unknown config key '{key}' in {origin}{_did_you_mean(key)}; run 'raylm config keys' to list keys")
    if "Value '" in message and ("could not be converted" in message or "is not a valid" in message):
        return UserError(f"config key '{key}' in {origin}: {message}")
    return UserError(f"config key '{key}' in {origin}: {message}" if key else f"{origin}: {message}")


def _merge(base: DictConfig, layer: dict, origin: str) -> DictConfig:
    check_shape(layer, RunConfig, "", origin)
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _explain(err, origin) from None


def _start_null_sections(cfg: DictConfig, key: str) -> None:
    """A key inside an optional section that is null (``stages.1.lora.rank=16``, lora null) starts it from its defaults."""
    parts = key.split(".")
    for end in range(1, len(parts)):
        prefix = ".".join(parts[:end])
        optional, section = optional_inner(_annotation_at(prefix))
        if optional and is_dataclass(section) and OmegaConf.select(cfg, prefix, default=0) is None:
            OmegaConf.update(cfg, prefix, OmegaConf.structured(section), merge=False)


def _with_list_indices(cfg: DictConfig, key: str, item: str) -> str:
    """``key`` with every list item named by its index; a stage may be named by its name (``stages.sft.lora.rank``).

    OmegaConf takes only in-range integers there (a name raises a bare TypeError; an index past the end
    would append an empty item).
    """
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        if isinstance(node, ListConfig):
            prefix = ".".join(parts[:i])
            names = [str(entry.get("name")) for entry in node] if prefix == "stages" else []
            if part in names:
                part = parts[i] = str(names.index(part))
            if not re.fullmatch(r"-?\d+", part) or not -len(node) <= int(part) < len(node):
                named = f" or a stage name ({', '.join(names)})" if names else ""
                raise UserError(f"override '{item}': {prefix} has {len(node)} items, so '{part}' names none of them; "
                                f"use an index 0..{len(node) - 1}{named}")
            node = node[int(part)]
        elif isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            break
    return ".".join(parts)


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply ``key=value`` items in order; list items by index (``stages.1.kind=sft``), stages also by name
    (``stages.sft.kind=sft``)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}' must look like key=value (e.g. train.max_steps=50)")
        key = _with_list_indices(cfg, key, item)
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        annotation = _annotation_at(key)
        if annotation is not None:
            check_shape(value, annotation, key, f"override '{item}'")
        try:
            _start_null_sections(cfg, key)
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as err:
            if not getattr(err, "full_key", None):
                err.full_key = key  # type: ignore[attr-defined]
            raise _explain(err, f"override '{item}'") from None
    return cfg


def load_config(source: Optional[str] = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Compose, type-check and validate a run config.

    ``source`` is a preset name or YAML path (default: the tiny preset). The
    result is a typed ``RunConfig`` object (not a DictConfig).
    """
    from raylm.configs.validate import validate

    cfg = OmegaConf.structured(RunConfig)
    preset_data = _read_yaml(_preset_text(DEFAULT_PRESET), f"preset '{DEFAULT_PRESET}'")
    cfg = _merge(cfg, preset_data, f"preset '{DEFAULT_PRESET}'")
    if source is not None and source != DEFAULT_PRESET:
        data, origin = _source_layer(source)
        cfg = _merge(cfg, data, origin)
    cfg = apply_overrides(cfg, list(overrides))
    run = to_run_config(cfg)
    validate(run)
    return run


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The typed config of a merged OmegaConf tree; every path from YAML or dotlists to a RunConfig goes here."""
    try:
        run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _explain(err, "the config") from None
    return _normalized(run)


def _normalized(run: RunConfig) -> RunConfig:
    # YAML and dotlists read a bare true/false as a boolean, which this str field then holds as 'True'/'False'.
    run.cluster.use_gpu = run.cluster.use_gpu.lower()
    return run


def model_config_from(data: dict, origin: str, fix: str) -> ModelConfig:
    """The ModelConfig stored with weights (a config.json's values), type-checked and validated
    like a config file's; ``fix`` ends the message when it is not a valid model."""
    from raylm.configs.validate import validate_model

    try:
        check_shape(data, ModelConfig, "model", origin)
        cfg: ModelConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), data))  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise UserError(f"{_explain(err, origin)}; {fix}") from None
    except UserError as err:
        raise UserError(f"{err}; {fix}") from None
    try:
        validate_model(RunConfig(model=cfg))
    except UserError as err:
        raise UserError(f"{origin}: {err}; {fix}") from None
    return cfg


def to_yaml(run: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(run))


def from_yaml_file(path: Path) -> RunConfig:
    """Load a resolved config written by ``to_yaml`` (a run's config.yaml)."""
    data = _read_yaml(read_text(path, "restore the config the run was started with"), str(path))
    return to_run_config(_merge(OmegaConf.structured(RunConfig), data, str(path)))


def resolve_stage(run: RunConfig, index: int) -> RunConfig:
    """The run's config as seen by stage ``index``: its overrides merged in.

    Each section the stage overrides is merged onto the run's typed section, so an unknown key or a wrong type in
    a stage is reported with its full key. Only those sections go through OmegaConf (the whole run's tree took
    ~30 ms a call, and a launch resolves each stage many times); the rest is a copy of the run's.
    """
    stage = run.stages[index]
    resolved = copy.deepcopy(run)
    hints = typing.get_type_hints(RunConfig)
    for section in STAGE_SECTIONS:
        override = getattr(stage, section)
        if not override:
            continue
        where = f"stages.{index}.{section}"
        check_shape(override, hints[section], where, f"stage '{stage.name}'")
        base = OmegaConf.structured(getattr(run, section))
        if section == "data":
            _drop_inherited_corpus(base, override)
        try:
            setattr(resolved, section, OmegaConf.to_object(OmegaConf.merge(base, override)))
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", "")
            raise UserError(
                f"stage '{stage.name}': bad key '{where}{'.' + key if key else ''}'{_did_you_mean(f'{section}.{key}')}: "
                f"{str(err).splitlines()[0]}"
            ) from None
    return _normalized(resolved)


def _drop_inherited_corpus(data: DictConfig, override: dict) -> None:
    """A stage that names its corpus (``data.source`` or ``data.sources``) does not also inherit the run's other one:
    ``data.sources`` on the run and ``data: {source: ...}`` on an sft stage mean that stage reads its own source."""
    if "source" in override and "sources" not in override:
        data.sources = None
    elif "sources" in override and "source" not in override:
        data.source = DataConfig().source


def dump_nested(cfg: Any) -> Any:
    """A plain-Python view (dicts, lists, scalars) of a config object."""
    container = OmegaConf.structured(cfg) if not isinstance(cfg, (DictConfig, ListConfig)) else cfg
    return OmegaConf.to_container(container, resolve=True)
