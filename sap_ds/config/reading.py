"""Reading config files: YAML or JSON, ``base:`` chains, relative paths, dotted
``key=value`` overrides, and validation errors that name the key.

Generic over the schema (a pydantic model), so the run config (``sap_ds.config.run``), the eval
config, the compare, sweep and bench configs all read files, resolve paths and report a
typo the same way. The run config's sections live in ``sap_ds.config.run`` and
``sap_ds.config.methods``.
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from sap_ds.errors import ConfigError

# How a relative path in a config file is read (docs/design.md, "Paths"): the rule, in one
# sentence, is "relative to the config file's folder in a file, to the working directory
# on the command line; output and model folders always to the working directory".
# Fields marked INPUT_PATH are files a config ships with (data); CONFIG_PATH fields name
# another config, which may also be a shipped config's name (sap_ds.resources). Unmarked
# paths (output_dir, model.path) are left as written: relative to the working directory.
INPUT_PATH = {"sap_ds_path": "input"}
CONFIG_PATH = {"sap_ds_path": "config"}


class Section(BaseModel):
    """A run-config section: an unknown key is an error (with the valid ones listed), and an
    assignment is validated too."""

    # coerce_numbers_to_str: overrides are parsed as YAML, so ``run_name=123`` arrives as an int.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


def _format_location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _submodel(annotation: Any) -> Optional[type[BaseModel]]:
    """The pydantic class inside an annotation such as ``Optional[X]`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _section_model(root: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic class that owns the key at ``loc`` (to list its valid keys)."""
    model: Optional[type[BaseModel]] = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        model = _submodel(field.annotation) if field else None
    return model


def _dotted_keys(model: type[BaseModel], prefix: str = "") -> dict[str, list[str]]:
    """Every key of ``model``, sections included, by its own name: ``{"lr": ["train.lr"], "rho": ["sap.rho",
    "lisa.rho"], ...}``. Sections inside lists (data sources) are left out: their keys have no single dotted name."""
    found: dict[str, list[str]] = {}
    for name, field in model.model_fields.items():
        found.setdefault(name, []).append(prefix + name)
        sub = _submodel(field.annotation)
        if sub is not None and getattr(field.annotation, "__origin__", None) is not list:
            for leaf, keys in _dotted_keys(sub, f"{prefix}{name}.").items():
                found.setdefault(leaf, []).extend(keys)
    return found


def key_hints(root: type[BaseModel], loc: tuple) -> list[str]:
    """What an unknown key at ``loc`` was probably meant to be, best first (at most 3): the
    name sap-ds uses for a key another toolkit names differently (``root.KEY_SYNONYMS``:
    ``learning_rate`` -> ``train.lr``, with a note where the value means something else), a
    close spelling in the same section (``train.lrr`` -> ``train.lr``), and the same name in
    another section (``train.output_dir`` -> ``output_dir``)."""
    name = str(loc[-1])
    synonyms: dict[str, str] = getattr(root, "KEY_SYNONYMS", {})
    hints = [synonyms[name]] if name in synonyms else []
    owner = _section_model(root, loc)
    valid = sorted(owner.model_fields) if owner else []
    hints += [_format_location(loc[:-1] + (close,)) for close in difflib.get_close_matches(name, valid, n=1)]
    hints += _dotted_keys(root).get(name, [])
    by_key: dict[str, str] = {}
    for hint in hints:  # the first of each key wins (a synonym's note over a bare name)
        by_key.setdefault(hint.partition(": ")[0], hint)
    return list(by_key.values())[:3]


def explain(root: type[BaseModel], error: dict) -> str:
    """One line per pydantic error, naming the dotted key and what would be valid."""
    loc = error["loc"]
    key = _format_location(loc)
    if error["type"] == "extra_forbidden":
        owner = _section_model(root, loc)
        valid = sorted(owner.model_fields) if owner else []
        hints = key_hints(root, loc)
        msg = f"unknown key '{key}'"
        if hints:
            msg += " (did you mean " + " or ".join(_quote_hint(hint) for hint in hints) + "?)"
        if valid:
            msg += f"; valid keys here: {', '.join(valid)}"
        return msg
    text = error["msg"].removeprefix("Value error, ")
    if not loc:
        return text
    got = error.get("input")
    return f"key '{key}': {text}" + ("" if isinstance(got, dict) else f" (got {got!r})")


def _quote_hint(hint: str) -> str:
    """``"train.warmup_steps: a number of steps"`` -> ``'train.warmup_steps' (a number of steps)``."""
    key, _, note = hint.partition(": ")
    return f"'{key}'" + (f" ({note})" if note else "")


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    """Set ``a.b.0.c`` in a nested dict/list tree, creating missing sections."""
    parts = dotted.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{source}: '{dotted}': '{part}' is not an index of a list of {len(node)} items")
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
        else:
            where = ".".join(parts[:depth])
            raise ConfigError(f"{source}: '{dotted}': '{where}' is a value, not a section")
        if depth == len(parts) - 1:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.lr=1e-4", "lora.enabled=false"]`` -> typed pairs (values parsed as YAML)."""
    pairs = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key.strip(), value))
    return pairs


BASE_KEY = "base"


def _read_mapping(path: Path) -> dict:
    """One YAML/JSON file's top-level mapping, with errors that name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    try:
        tree = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(tree).__name__}")
    return tree


def merge_trees(base: dict, child: dict) -> dict:
    """``child`` laid over ``base``: sections merge key by key, any other value (lists
    included) replaces the base's, as a dotted override would."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = value
    return merged


def shipped_or_as_given(value: str) -> str:
    """``value`` if it names an existing file, else the shipped config of that name
    (``sap_ds.resources.find_shipped``), else ``value`` unchanged (its error comes later)."""
    from sap_ds.resources import find_shipped

    if not value or Path(value).exists():
        return value
    shipped = find_shipped(value)
    return str(shipped) if shipped is not None else value


def _path_kind(field) -> Optional[str]:
    extra = field.json_schema_extra
    return extra.get("sap_ds_path") if isinstance(extra, dict) else None


def _resolve_one(value: Any, folder: Path, kind: str) -> Any:
    if not isinstance(value, str) or not value.strip() or Path(value).is_absolute():
        return value
    local = Path(os.path.normpath(folder / value))
    if kind == "config" and not local.exists():
        from sap_ds.resources import find_shipped

        shipped = find_shipped(value)
        if shipped is not None:
            return str(shipped)
    return str(local)


def resolve_paths(tree: dict, schema: type[BaseModel], folder: Path) -> dict:
    """``tree`` (one config file's keys) with the relative paths of the fields ``schema``
    marks INPUT_PATH / CONFIG_PATH made absolute against ``folder``, the file's folder."""
    out = dict(tree)
    for key, value in tree.items():
        field = schema.model_fields.get(key)
        if field is None:
            continue
        kind = _path_kind(field)
        if kind is not None:
            out[key] = [_resolve_one(v, folder, kind) for v in value] if isinstance(value, list) else \
                _resolve_one(value, folder, kind)
            continue
        sub = _submodel(field.annotation)
        if sub is None:
            continue
        if isinstance(value, dict):
            out[key] = resolve_paths(value, sub, folder)
        elif isinstance(value, list):
            out[key] = [resolve_paths(v, sub, folder) if isinstance(v, dict) else v for v in value]
    return out


def find_config_file(path: str | Path) -> Path:
    """``path`` if it is a file, else the shipped config of that name (``demo``,
    ``configs/demo.yaml``, ``70b/llama2_70b_chat_lora``); ConfigError listing them if neither."""
    from sap_ds.resources import find_shipped, shipped_names

    path = Path(path)
    if path.is_file():
        return path
    shipped = find_shipped(str(path))
    if shipped is not None:
        return shipped
    raise ConfigError(f"config file not found: {path} (neither a file nor the name of a shipped config; "
                      f"shipped: {', '.join(shipped_names())}; `sap-ds configs` lists them)")


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = (), schema: Optional[type[BaseModel]] = None) -> dict:
    """A config file's keys, with ``base: other.yaml`` resolved.

    ``base`` names another config file, relative to this file's folder (or a shipped
    config's name, e.g. ``base: demo``); this file's keys are laid over it
    (``merge_trees``), so a preset states only what it changes and cannot drift from the
    run it derives from. Bases may chain; a loop is an error. With ``schema``, the
    relative paths of its marked fields are made absolute against each file's own folder
    (``resolve_paths``) before the files are merged."""
    path = find_config_file(path) if not _chain else Path(path)
    tree = _read_mapping(path)
    has_base = BASE_KEY in tree
    base = tree.pop(BASE_KEY, None)
    if schema is not None:
        tree = resolve_paths(tree, schema, path.resolve().parent)
    if not has_base:
        return tree
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: key '{BASE_KEY}': expected the path of the config file this one "
                          f"builds on, relative to {path.parent} (e.g. base: demo.yaml), got {base!r}")
    base_path = Path(_resolve_one(base, path.resolve().parent, "config"))
    if not base_path.is_file():
        raise ConfigError(f"{path}: key '{BASE_KEY}': file not found: {base_path} "
                          f"(the path is relative to the folder of {path.name}, or a shipped config's name)")
    chain = _chain + (path.resolve(),)
    if base_path.resolve() in chain:
        loop = " -> ".join(str(p) for p in (*chain, base_path.resolve()))
        raise ConfigError(f"{path}: key '{BASE_KEY}': the bases form a loop: {loop}")
    return merge_trees(read_config_file(base_path, chain, schema), tree)


def validate_tree(root: type[BaseModel], tree: dict, overrides: list[str] = (), source: str = "<config>"):
    """``root`` validated from ``tree`` with dotted overrides applied; ConfigError on failure."""
    tree = json.loads(json.dumps(tree))  # deep copy, plain types
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value, "command line")
    try:
        return root.model_validate(tree)
    except ValidationError as exc:
        problems = "\n  ".join(explain(root, err) for err in exc.errors())
        raise ConfigError(f"{source}: invalid configuration:\n  {problems}") from None
