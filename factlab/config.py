"""Config plumbing shared by every command: pydantic models, YAML files, ``key.sub=value``
overrides. Unknown keys and bad values become one :class:`FactlabError` naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from factlab.errors import FactlabError


class Strict(BaseModel):
    """Base for every config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


M = TypeVar("M", bound=BaseModel)


def parse_overrides(items: list[str] | None) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise FactlabError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise FactlabError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FactlabError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, block by block. ``null`` given for a block that ``base``
    sets (``world.pools=null``) drops the block, so that its defaults apply."""
    out = dict(base)
    for k, v in extra.items():
        if v is None and isinstance(out.get(k), dict):
            out.pop(k)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FactlabError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise FactlabError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise FactlabError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FactlabError(f"{path}: expected a mapping at the top level")
    return data


def build(model: type[M], data: dict, *, source: str = "config") -> M:
    """Validate ``data`` into ``model``; the first problem becomes one error line."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            raise FactlabError(f"{source}: unknown key {key!r}") from None
        raise FactlabError(f"{source}: {key}: {err['msg']}") from None
