"""YAML + dotted overrides -> a typed, validated `Config`.

Precedence: command-line overrides > the YAML file > its `base:` files > objective defaults > dataclass
defaults. Every problem found is collected and raised once as a `ConfigError` naming the keys to fix.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from masktrain import configs as builtin_configs
from masktrain.launcher.config import Config, objective_defaults, raw_masking, unset_start_rate


class ConfigError(ValueError):
    """A configuration problem; the message lists every bad key with what is wrong and how to fix it."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({source}):\n{lines}")


class ConfigLoader(yaml.SafeLoader):
    """YAML 1.2's core schema for plain scalars, not PyYAML's 1.1: `1e-4` is a float; `on`, `no` and dates stay
    as written; `0312` is 312 (not octal). A key given twice in one mapping is an error, as YAML says: PyYAML keeps
    the last one, and a second `trainer:` section would drop the first one's settings without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, collections.abc.Hashable):
                continue  # SafeLoader refuses it below
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag.rsplit(":", 1)[-1] not in
            ("bool", "int", "float", "timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:int",
                                   re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+|0o[0-7]+)$"),
                                   list("-+0123456789"))
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
ConfigLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(
    loader.construct_scalar(node), 0 if loader.construct_scalar(node)[:2] in ("0x", "0o") else 10))


class ConfigDumper(yaml.SafeDumper):
    """Quotes every string that YAML 1.1 (yaml.safe_load, which reads the configs in run folders and
    checkpoints) or 1.2 (ConfigLoader, which reads config files) would take for something else: a dumped config
    reads back the same either way (run.name '1e3' is a float to 1.2 only, 'on' a bool to 1.1 only)."""


ConfigDumper.yaml_implicit_resolvers = {
    first: [*yaml.SafeDumper.yaml_implicit_resolvers.get(first, []), *ConfigLoader.yaml_implicit_resolvers.get(first, [])]
    for first in set(yaml.SafeDumper.yaml_implicit_resolvers) | set(ConfigLoader.yaml_implicit_resolvers)}


def to_yaml(data: dict) -> str:
    return yaml.dump(data, Dumper=ConfigDumper, sort_keys=False, default_flow_style=False)


class OverrideText(str):
    """An override that YAML reads as a number or true/false, as typed: a text field takes the text
    (run.name=0312 stays 0312), any other field the reading."""

    def __new__(cls, text: str, parsed: Any):
        self = super().__new__(cls, text)
        self.parsed = parsed
        return self

    def __getnewargs__(self):
        return str(self), self.parsed


def resolve_path(name_or_path: str) -> Path:
    """A config file path, or the name of a config shipped in configs/ ("smoke", "bert-base.yaml")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = builtin_configs.find(name_or_path)
    if shipped is not None:
        return shipped
    known = ", ".join(builtin_configs.names())
    what = "a folder, not a config file" if path.is_dir() else "no such config file"
    raise ConfigError(name_or_path, [f"{what}; shipped configs are: {known}"])


def parse_yaml(path: str | Path, loader: type = yaml.SafeLoader):
    """The YAML document in `path`; one that does not parse is a ConfigError naming the file."""
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=loader)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(str(path), [f"not valid YAML: {err}"]) from None


def read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """One YAML file with its `base:` chain merged beneath it."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(str(path), ["`base:` files include each other in a cycle"])
    raw = parse_yaml(path, ConfigLoader) or {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["the top level must be a mapping of sections"])
    bases = raw.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(str(path), [f"base: expected a config name or path, or a list of them; got {bases!r}"])
    merged: dict = {}
    for base in bases:
        # Beside the config, or a shipped one: never a file of that name where the command happens to run.
        base_path = path.parent / base
        if not base_path.is_file() and (base_path := builtin_configs.find(base)) is None:
            what = "a folder, not a config file" if (path.parent / base).is_dir() else "no such config file"
            where = "" if Path(base).is_absolute() else " beside it"
            raise ConfigError(str(path), [f"base: {base!r}: {what}{where}; shipped configs are: "
                                          f"{', '.join(builtin_configs.names())}"])
        merge(merged, read_yaml(base_path, _seen + (path,)))
    return merge(merged, raw)


def merge(into: dict, update: dict) -> dict:
    """Deep-merge `update` into `into` (mappings merge, everything else replaces). A section left empty (YAML
null: every key commented out) adds nothing."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        elif value is None and isinstance(into.get(key), dict):
            continue
        else:
            into[key] = copy.deepcopy(value)
    return into


def parse_overrides(overrides: list[str]) -> tuple[dict, list[str]]:
    """`a.b.c=value` strings into a nested dict; values are read as YAML (0.3, true, [1, 2])."""
    tree: dict = {}
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} is not of the form section.key=value")
            continue
        try:
            value = override_value(text)
        except ValueError as err:
            problems.append(f"override {item!r}: {err}")
            continue
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r} sets a key beneath a value")
                break
        else:
            merge(node, {parts[-1]: value})  # a.b={c: 1} after a.b.d=2 keeps d
    return tree, problems


def override_value(text: str) -> Any:
    """An override's value. YAML reads `{...}` mappings, `[...]` lists, quoted text, null and numbers/booleans
    (which keep their typed text for text fields); anything else is the text as typed, so `run.name=ablation #3`
    or a `pipe:` command with ': ' in it is not cut at a YAML comment or read as a mapping. A `[...]` list or
    `{...}` mapping YAML cannot read is an error, as in a config file: taken as text, it became one list item."""
    stripped = text.strip()
    try:
        value = yaml.load(stripped, Loader=ConfigLoader) if stripped else ""
    except yaml.YAMLError as err:
        if stripped[:1] + stripped[-1:] in ("[]", "{}"):
            kind = "list" if stripped[0] == "[" else "mapping"
            hint = "quote items holding {, }, [, ], a comma or ': ', e.g. [\"shard-{000000..000127}.tar\"]"
            raise ValueError(f"not a YAML {kind}: {err.problem} ({hint})") from None
        return stripped
    if isinstance(value, (bool, int, float)):
        return OverrideText(stripped, value)
    if value is None and stripped in ("null", "Null", "NULL", "~"):
        return None
    if (isinstance(value, dict) and stripped.startswith("{")) or (isinstance(value, list) and stripped.startswith("[")):
        return value
    if isinstance(value, str) and stripped[:1] in ("'", '"'):
        return value
    return stripped


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, merge, type-check and validate a run configuration."""
    from masktrain.launcher.validate import inert_policy_options, validate

    source = str(path)
    raw = read_yaml(resolve_path(str(path)))
    override_tree, problems = parse_overrides(overrides or [])
    merge(raw, override_tree)
    objective = raw.get("model", {}).get("objective", "mlm") if isinstance(raw.get("model"), dict) else "mlm"
    objective = objective if isinstance(objective, str) else "mlm"  # a wrong type is reported by `build`
    layered = merge(objective_defaults(objective, raw), raw)
    problems += [unset] if (unset := unset_start_rate(objective, raw)) else []
    cfg = build(Config, layered, "", problems)
    # Fields with a type error keep their defaults, so validating anyway reports every problem at once.
    # Inert options are judged from what the user wrote, which a saved config (with every key) no longer tells.
    problems += validate(cfg) + inert_policy_options(cfg, raw_masking(raw))
    if problems:
        raise ConfigError(source, problems)
    return cfg


def config_from_dict(raw: dict, source: str = "<dict>", policies: tuple[str, ...] = ("policy", "eval_policy")
                     ) -> Config:
    """A validated Config from a plain dict (as saved in run folders and checkpoints); `policies` as in
    `validate`."""
    from masktrain.launcher.validate import validate

    problems: list[str] = []
    cfg = build(Config, copy.deepcopy(raw), "", problems)
    problems += validate(cfg, policies)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return to_yaml(to_dict(cfg))


def build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass `cls` from `raw`, appending a message per unknown key or wrong type."""
    if not isinstance(raw, dict):
        shown = raw.parsed if isinstance(raw, OverrideText) else raw
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(shown).__name__} {shown!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            problems.append(unknown_key_message(dotted, key, prefix, list(fields), cls))
            continue
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = build(kind, {} if value is None else value, dotted + ".", problems)
        elif typing.get_origin(kind) is list and dataclasses.is_dataclass(item := typing.get_args(kind)[0]):
            items = [] if value in (None, "") else value  # data.mixture= empties the list
            items = [items] if isinstance(items, dict) else items  # one item as it is, as other list fields take it
            if isinstance(items, list):
                kwargs[key] = [build(item, entry, f"{dotted}[{index}].", problems) for index, entry in enumerate(items)]
            else:
                shown = items.parsed if isinstance(items, OverrideText) else items
                problems.append(f"{dotted}: expected a list of mappings, got {type(shown).__name__} {shown!r}")
        else:
            ok, converted = coerce(value, kind)
            if ok:
                kwargs[key] = converted
            else:
                shown = value.parsed if isinstance(value, OverrideText) else value
                hint = "; quote it to keep it as written" if kind is str and isinstance(shown, (int, float)) else ""
                problems.append(f"{dotted}: expected {type_name(kind)}, got {type(shown).__name__} {shown!r}{hint}")
    return cls(**kwargs)


def unknown_key_message(dotted: str, key: str, prefix: str, valid: list[str], cls: type) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    section = prefix.rstrip(".") or "the top level"
    return f"{dotted}: unknown key in {section}{hint} (valid: {', '.join(valid)})"


def coerce(value: Any, kind: Any) -> tuple[bool, Any]:
    """(True, value as `kind`) when `value` is acceptable for the annotation `kind`."""
    origin = typing.get_origin(kind)
    if isinstance(value, OverrideText):
        if kind is str or (origin is list and typing.get_args(kind) == (str,) and not isinstance(value.parsed, list)):
            return coerce(str(value), kind)  # a directory named 2024 stays "2024"
        return coerce(value.parsed, kind)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            ok, converted = coerce(value, option)
            if ok:
                return True, converted
        return False, None
    if kind is type(None):
        return value is None, None
    if origin is list:
        (item_kind,) = typing.get_args(kind)
        if value == "":  # data.train_shards= empties the list
            value = []
        if not isinstance(value, (list, dict)):  # one item: data.train_shards=shard-{000000..000127}.tar
            value = [value]
        if not isinstance(value, list):
            return False, None
        items = [coerce(v, item_kind) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if kind is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config annotation {kind!r}")


def type_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(k) for k in typing.get_args(kind))
    if origin is list:
        return f"a list of {type_name(typing.get_args(kind)[0])}"
    return {type(None): "null"}.get(kind, getattr(kind, "__name__", str(kind)))


def read_run_config(path: str | Path) -> Config:
    """The resolved config a launch wrote (`<run>/config.yaml`), as the ranks and the SLURM node read it."""
    return config_from_dict(parse_yaml(path), str(path))
