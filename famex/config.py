"""Typed stage configs: dataclass fields become CLI options and TOML keys.

Every stage has one dataclass whose defaults are the paper's values and whose fields each carry a
one-line docstring (the string literal right below the field, read here with `ast`, so the help
text and the code cannot drift apart). Resolution order: dataclass defaults < ``--config FILE.toml``
< explicit command-line options. Unknown TOML keys fail with the key's name and the closest valid one.

Options several stages share (`famex.train_options.TrainOptions`) are one dataclass composed into
each stage's config with `compose`, which adds its fields flat: option names, TOML keys and the
meta.json config read as if the stage had declared them itself.

This module knows nothing about stages; `famex.stage` records the resolved config in meta.json.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import textwrap
import tomllib
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from famex.errors import FamexError


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (walking its bases and the options it composes)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        for options in klass.__dict__.get("__composed__", ()):
            docs.update(field_docs(options))
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def compose(options: type, *, help_prefix: str = "", notes: dict[str, str] | None = None, **defaults: Any):
    """Class decorator, under ``@dataclass``: add every field of the dataclass ``options`` to the class, flat.

    The class states only what differs for its stage: ``defaults`` replace the options' own,
    ``notes`` say what an option means for this stage, where a default comes from (``"default: the
    preset's value"``) or why it is what it is (``--help`` shows them after the default),
    ``help_prefix`` starts the help of every composed option (e.g. ``"qad: "``). The
    fields keep their names, types and docstrings (`field_docs`), so constructor keywords, attribute
    access, CLI options, TOML keys and `config_dict` are those of a class declaring them itself. A
    class may not declare a field the options already have: its default belongs in ``defaults``.
    """
    hints = typing.get_type_hints(options)
    fields = {f.name: f for f in dataclasses.fields(options)}
    notes = notes or {}
    unknown = sorted((set(defaults) | set(notes)) - set(fields))
    if unknown:
        raise TypeError(f"compose({options.__name__}): no such option {', '.join(unknown)}")

    def wrap(cls: type) -> type:
        own = dict(cls.__dict__.get("__annotations__", {}))
        clash = sorted(set(own) & set(fields))
        if clash:
            raise TypeError(f"{cls.__name__} declares {', '.join(clash)}, which {options.__name__} has; "
                            f"set the stage's default in compose({options.__name__}, ...) instead")
        for name, f in fields.items():
            meta = {**f.metadata, "help_prefix": help_prefix, "note": notes.get(name)}
            if name in defaults:
                value = defaults[name]
                new = (dataclasses.field(default_factory=lambda v=value: list(v), metadata=meta) if isinstance(value, list)
                       else dataclasses.field(default=value, metadata=meta))
            else:
                new = dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=meta)
            own[name] = hints[name]
            setattr(cls, name, new)
        cls.__annotations__ = own
        cls.__composed__ = (*cls.__dict__.get("__composed__", ()), options)
        return cls

    return wrap


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    """Add one option per dataclass field (and ``--config``) to ``parser``.

    Options default to ``argparse.SUPPRESS`` so that `resolve_config` can tell explicit options from
    defaults. Fields named in ``positional`` become optional positional arguments.
    """
    docs = field_docs(cls)
    parser.add_argument(
        "--config", metavar="FILE.toml", default=argparse.SUPPRESS,
        help="read options from a TOML file (keys = option names with underscores); explicit options win",
    )
    for f, tp in _fields(cls):
        base, optional = _unwrap_optional(tp)
        default = _default(f)
        help_text = f.metadata.get("help_prefix", "") + docs.get(f.name, "")
        note = f.metadata.get("note")
        if default not in (None, "", [], ()):
            help_text += f" (default: {default}; {note})" if note else f" (default: {default})"
        elif note:
            help_text += f" ({note})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        origin = get_origin(base)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            (item,) = get_args(base)
            kwargs.update(nargs="+", type=_scalar_parser(item), metavar=f.name.upper())
        elif origin is Literal:
            choices = get_args(base)
            kwargs.update(type=type(choices[0]), choices=choices)
        else:
            kwargs.update(type=_scalar_parser(base), metavar=f.name.upper())
        if f.name in positional:
            kwargs.pop("help")
            kwargs["nargs"] = "*" if origin is list else "?"
            parser.add_argument(f.name, help=help_text, **{k: v for k, v in kwargs.items() if k != "metavar"})
        else:
            parser.add_argument(option_name(f.name), dest=f.name, **kwargs)


def _scalar_parser(tp: Any):
    if tp in (int, float, str):
        return tp
    if tp is Path:
        return str
    raise TypeError(f"unsupported config field type {tp!r}")


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise FamexError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise FamexError(f"{path}: invalid TOML ({e})") from None


def check_keys(cls: type, data: dict[str, Any], source: str) -> None:
    """Fail on keys that are not fields of ``cls``, naming the closest valid key."""
    valid = [f.name for f, _ in _fields(cls)]
    for key in data:
        norm = key.replace("-", "_")
        if norm not in valid:
            close = difflib.get_close_matches(norm, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
            raise FamexError(f"{source}: unknown key {key!r}{hint}")


def _coerce(cls: type, name: str, tp: Any, value: Any, source: str) -> Any:
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise FamexError(f"{source}: {name} may not be empty")
    origin = get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if origin is list:
            (item,) = get_args(base)
            if isinstance(value, (str, int, float)):
                value = [value]
            return [_coerce_scalar(item, v) for v in value]
        if origin is Literal:
            if value not in get_args(base):
                raise FamexError(f"{source}: {name} must be one of {', '.join(map(str, get_args(base)))}, not {value!r}")
            return value
        return _coerce_scalar(base, value)
    except (TypeError, ValueError):
        raise FamexError(f"{source}: {name} must be {getattr(base, '__name__', base)}, not {value!r}") from None


def _coerce_scalar(tp: Any, value: Any) -> Any:
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (str, Path) and isinstance(value, (str, Path)):
        return str(value)
    raise TypeError


def config_from_dict(cls: type, data: dict[str, Any], source: str = "config"):
    """Build ``cls`` from a plain dict (TOML table), checking keys and types."""
    check_keys(cls, data, source)
    types_ = {f.name: tp for f, tp in _fields(cls)}
    kwargs = {k.replace("-", "_"): _coerce(cls, k, types_[k.replace("-", "_")], v, source) for k, v in data.items()}
    return cls(**kwargs)


def resolve_config(cls: type, args: argparse.Namespace):
    """Defaults < ``--config`` TOML < explicit options, as one ``cls`` instance."""
    data: dict[str, Any] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        data.update(load_toml(config_path))
        check_keys(cls, data, str(config_path))
        data = {k.replace("-", "_"): v for k, v in data.items()}
    for f, _ in _fields(cls):
        if hasattr(args, f.name):
            data[f.name] = getattr(args, f.name)
    cfg = config_from_dict(cls, data, str(config_path) if config_path else "options")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def config_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (every option, defaults included)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if not f.name.startswith("_")}


def config_defaults(cls: Any) -> dict[str, Any]:
    """The default of every option of a config dataclass (or instance) that has one, as plain data."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = _plain(f.default_factory())
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if dataclasses.is_dataclass(v):
        return config_dict(v)
    return v
