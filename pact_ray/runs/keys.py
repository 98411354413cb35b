"""The keys ``--set KEY=VALUE`` accepts, read from the config classes themselves: each key's
type, default and meaning (the comment beside its field), and the values its checks accept,
found by asking the config's own validation (:meth:`RunConfig.validate`) about values out of
range, so that the list never drifts from the checks. What ``--list-keys`` prints.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from pact_ray.errors import ConfigError
from pact_ray.runs.config import RunConfig, test_only_fields

# Values out of every sensible range: a key's checks name what they accept when refusing them.
_NUMBER_PROBES = (-1, 2, 10**12)
_TEXT_PROBE = "\x00not-a-value"
_MUST = re.compile(r" must (?:be )?(.*?)(?:, got .*)?$")
_FIELD = re.compile(r"^\s+(\w+)\s*:\s*[^=#]+?(?:=\s*(.*?))?\s*#\s*(.*)$")


@dataclass(frozen=True)
class Key:
    name: str  # the flat key ("lr", "router.eps")
    type: str  # "float", "int", "bool", "str"
    default: Any
    accepts: str  # what the checks accept ("> 0", "one of ('adamw', 'sgd')"); empty where anything of the type is
    help: str  # the comment beside the field
    knob: str = ""  # the Optuna search range, where --search optuna tunes the key


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    tp = args[0] if args else tp
    return getattr(tp, "__name__", str(tp))


@functools.lru_cache(maxsize=None)
def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment beside its declaration, over the class and its bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        for line in lines:
            m = _FIELD.match(line)
            if m:
                out[m.group(1)] = m.group(3).strip()
    return out


def _base_flat(config_cls: type[RunConfig], key: str) -> dict[str, Any] | None:
    """The flat config of the first variant that has ``key`` (quick profile, its default
    preset), as the ground the key's values are checked on; None where none has it."""
    for variant in config_cls.variants:
        profile = "quick" if "quick" in config_cls.profiles else next(iter(config_cls.profiles))
        v = config_cls.variants[variant]
        model = v.setting("model") or ("small" if "small" in config_cls.presets else config_cls.presets[0])
        try:
            flat = config_cls.for_variant(variant, profile, model).flat()
        except ConfigError:
            continue
        if key in flat:
            return flat
    return None


def _refusal(config_cls: type[RunConfig], flat: dict[str, Any], key: str, value: Any) -> str | None:
    """What the checks say of ``key=value`` ("> 0"), None where they accept it."""
    try:
        config_cls.from_flat({**flat, key: value})
    except ConfigError as e:
        m = _MUST.search(str(e))
        return m.group(1).strip() if m else ""
    return None


def _accepts(config_cls: type[RunConfig], flat: dict[str, Any], key: str, type_name: str) -> str:
    if type_name == "bool":
        return "true or false"
    probes = _NUMBER_PROBES if type_name in ("int", "float") else (_TEXT_PROBE,)
    said = []
    for value in probes:
        text = _refusal(config_cls, flat, key, value)
        # A refusal that names the probe itself is about another key's relation to it (">= batch_size (...)").
        if text and text not in said and str(value) not in text:
            said.append(text)
    return "; ".join(said)


def keys_of(config_cls: type[RunConfig], knobs: Mapping[str, Any] = {}) -> list[Key]:
    """Every key of ``config_cls`` a user may set (the test-only ones left out)."""
    hidden = test_only_fields(config_cls) | {"variant", "profile", "model", "seed"}  # flags of their own
    hints = typing.get_type_hints(config_cls)
    comments = _comments(config_cls)
    out: list[Key] = []
    for f in dataclasses.fields(config_cls):
        if f.name in hidden:
            continue
        if f.name in config_cls.nested:
            block = config_cls.nested[f.name]
            block_hints, block_comments = typing.get_type_hints(block), _comments(block)
            for sub in dataclasses.fields(block):
                name = f"{f.name}.{sub.name}"
                out.append(_key(config_cls, name, _type_name(block_hints[sub.name]), sub.default,
                                block_comments.get(sub.name, ""), knobs, f" (variants with a {f.name} only)"))
            continue
        out.append(_key(config_cls, f.name, _type_name(hints[f.name]), f.default, comments.get(f.name, ""), knobs))
    return out


def _key(config_cls, name: str, type_name: str, default: Any, help: str, knobs: Mapping[str, Any], note: str = "") -> Key:
    flat = _base_flat(config_cls, name)
    accepts = _accepts(config_cls, flat, name, type_name) if flat is not None else ""
    knob = knobs.get(name)
    searched = (f"{knob.low:g}..{knob.high:g}{' (log)' if knob.log else ''}" if knob is not None else "")
    return Key(name, type_name, default, accepts, help + (note if note and help else note.strip()), searched)


def format_keys(keys: list[Key], prefix: str = "") -> list[str]:
    """One line per key: name, type, default, what the checks accept, the Optuna range, meaning."""
    lines = []
    for k in keys:
        default = "''" if k.default == "" else k.default
        facts = [k.type, f"default {default}"]
        if k.accepts:
            facts.append(k.accepts)
        if k.knob:
            facts.append(f"--search optuna range {k.knob}")
        lines.append(f"  {prefix}{k.name} ({', '.join(facts)})" + (f": {k.help}" if k.help else ""))
    return lines
