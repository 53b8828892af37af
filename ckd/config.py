"""Typed configuration: dataclasses loaded from YAML with CLI overrides.

Precedence is CLI > experiment file > dataclass defaults. Unknown keys are errors, values are
coerced to the declared type (a bool accepts only true/false spellings), and YAML is read with
``safe_load`` so no tag can execute code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

T = TypeVar("T")

DATA_DIR_ENV = "CKD_DATA_DIR"


class ConfigError(ValueError):
    """A configuration value or file is wrong; the message names the key."""


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


@dataclasses.dataclass
class DataConfig:
    """Which domains to load and from where (shared by teacher and student runs)."""

    data_dir: str = ""  # empty: --data-dir, else $CKD_DATA_DIR, else ../shared/data/amazon
    domains: list[str] = dataclasses.field(default_factory=lambda: ["Scientific"])
    max_len: int = 50

    def validate(self) -> None:
        if not self.domains:
            raise ConfigError("data.domains: name at least one domain")
        if self.max_len < 1:
            raise ConfigError("data.max_len must be >= 1")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} matches none of {tp}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        out = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(val, hints[name], prefix + name) for name, val in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view of a (nested) dataclass, for YAML/JSON dumps."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


BASE_KEY = "base"


def _parse_mapping(name: str, text: str | bytes) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {name} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {name} must hold a mapping at the top level")
    return data


def with_base(doc: dict[str, Any], name: str, read: Callable[[str], dict[str, Any]],
              _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """``doc`` (the mapping of config file ``name``) over the config its top-level ``base:`` names,
    that one resolved the same way: a config states only what it changes. ``base`` is a path relative
    to the directory of the file that names it; ``read(path)`` returns that file's mapping. Sections
    merge key by key; any other value, a list included, replaces the base's. A cycle or a base that
    is not a path is a ConfigError naming the files."""
    base = doc.get(BASE_KEY)
    if base is None:
        return doc
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"config file {name}: {BASE_KEY} must be the path of another config, got {base!r}")
    chain = _chain or (os.path.normpath(name),)
    target = os.path.normpath(os.path.join(os.path.dirname(name), base))
    if target in chain:
        raise ConfigError("config files name each other as base: " + " -> ".join((*chain, target)))
    parent = with_base(read(target), target, read, (*chain, target))
    return _merge(parent, {k: v for k, v in doc.items() if k != BASE_KEY})


def read_file_bytes(path: str) -> bytes | None:
    """A file's bytes, None when there is no such file: the ``read`` of ``content_key`` for files on disk."""
    p = Path(path)
    return p.read_bytes() if p.is_file() else None


def mapping_reader(read: Callable[[str], bytes | None]) -> Callable[[str], dict[str, Any]]:
    """``read`` (a file's bytes by path, None when absent) as the ``read`` of ``with_base``: a config's
    mapping, a ConfigError naming the file when it is absent, not YAML or not a mapping."""
    def read_mapping(path: str) -> dict[str, Any]:
        raw = read(path)
        if raw is None:
            raise ConfigError(f"config file not found: {path}")
        return _parse_mapping(path, raw)
    return read_mapping


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping safely, over its ``base:`` config when it names one (``with_base``); a
    missing or malformed file is a ConfigError naming it."""
    name, read = str(Path(path)), mapping_reader(read_file_bytes)
    return with_base(read(name), name, read)


def content_key(name: str, data: bytes, read: Callable[[str], bytes | None] | None = None) -> bytes:
    """What a file's content means, as bytes to compare or hash: for a YAML file (by ``name``) its
    parsed document with keys sorted, so a comment, layout or key-order edit of a config keeps the
    results it produced; any other file, or YAML that does not parse, is its bytes. With ``read``
    (the bytes of a file by path, None when absent) a config's ``base:`` is resolved first
    (``with_base``), so a config and the copy it became by naming a base compare equal, and an edit
    of the base changes every config over it; a base that cannot be resolved keeps the bytes,
    marked, so it never compares equal to a resolved document."""
    if not name.endswith((".yaml", ".yml")):
        return data
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError:
        return data
    if read is not None and isinstance(doc, dict) and BASE_KEY in doc:
        try:
            doc = with_base(doc, name, mapping_reader(read))
        except ConfigError:
            return b"unresolved base:" + data
    try:
        return b"yaml:" + json.dumps(doc, sort_keys=True, default=str).encode()
    except TypeError:  # keys of mixed types that cannot be sorted
        return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["train.epochs=3", "model.hidden=64"]`` into a nested mapping (values YAML-parsed)."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_path(tree, key.strip(), value)
    return tree


def with_overrides(data: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """``data`` with the ``--set`` items applied, as ``load_config`` applies them (values YAML-parsed)."""
    return _merge(data, parse_overrides(items))


def load_config(
    cls: type[T],
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> T:
    """Resolve ``cls`` from defaults, then the YAML file, then ``extra`` and ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        data = load_yaml(path)
    if extra:
        data = _merge(data, extra)
    if overrides:
        data = with_overrides(data, overrides)
    return from_dict(cls, data)


def dump_config(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML (and nothing that needs a tag to read back)."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def default_data_dir() -> str:
    """The data root: $CKD_DATA_DIR, else ../shared/data/amazon relative to the working dir."""
    return os.environ.get(DATA_DIR_ENV, str(Path("..") / "shared" / "data" / "amazon"))


def json_dump(obj: Any, path: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
