"""Typed documents people write (recipes, manifests, engine selections, workloads): one base
class and one loader, so every file's errors read the same way:

    recipes/demo.yaml:12: candidates.1.grup_size: unknown field 'grup_size'; did you mean 'group_size'?

`load_document(path, Model)` reads YAML or JSON, validates it against a pydantic model, and turns
every validation error into a `file:line: field.path: message` line (the line found from the
YAML node tree; JSON is read by the same composer). Discriminated unions (a candidate's
`method`, a provider's `kind`) are followed by their tag, so an unknown field is explained with
the fields of the right variant and an unknown tag lists the valid ones.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from .errors import QuantgateError


def omitted_while_unset(field: str, *with_it: str):
    """A Spec's wrap serializer: while `field` is None its dump leaves it (and `with_it`) out, so a field
    added later keeps the dump, and so every hash, of the documents that do not use it. Use as
    `_stable_dump = omitted_while_unset("trace", "time_scale")` in the class body."""

    def _omit(self, handler):
        out = handler(self)
        if getattr(self, field) is None and isinstance(out, dict):
            for name in (field, *with_it):
                out.pop(name, None)
        return out

    return model_serializer(mode="wrap")(_omit)


class Spec(BaseModel):
    """Base for everything a person writes: unknown keys are errors; values never change in place."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def suggest(word: str, choices) -> str:
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{near[0]}'?" if near else ""


# --------------------------------------------------------------------------------- reading
def read_mapping(text: str, source: str | Path, *, error: type[QuantgateError] = QuantgateError,
                 name: str = "document", shape: str = "a mapping of fields",
                 unwrap: str | None = None, syntax: str | None = None) -> tuple[dict, Any]:
    """(the document as a dict, its YAML node tree for line numbers, or None). `syntax`: json or
    yaml, by default JSON when `source` ends in .json; `unwrap`: a single top-level key whose value
    is the document."""
    import yaml

    root = None
    if (syntax or ("json" if Path(str(source)).suffix.lower() == ".json" else "yaml")) == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise error(f"{source}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
        try:
            root = yaml.compose(text)
        except yaml.YAMLError:
            root = None  # valid JSON that YAML 1.1 reads differently: errors go without a line
    else:
        try:
            root = yaml.compose(text)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise error(f"{source}{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    dup = duplicate_key(root) if root is not None else None
    if dup is not None:
        loc, first, again = dup
        raise error(f"{source}:{again}: {'.'.join(map(str, loc))}: '{loc[-1]}' is given twice (first on line "
                    f"{first}); only the last would be read — keep one")
    if unwrap and isinstance(data, dict) and set(data) == {unwrap}:
        data = data[unwrap]
        root = _child(root, unwrap)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{source}: a {name} is {shape}, not a {type(data).__name__}")
    return data, root


def validate(model: type[BaseModel], data: dict, source: str | Path, root: Any = None, *,
             error: type[QuantgateError] = QuantgateError):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(explain(exc, model, source, root)) from None


def load_document(path: str | Path, model: type[BaseModel], *, error: type[QuantgateError] = QuantgateError,
                  name: str = "document", shape: str = "a mapping of fields", unwrap: str | None = None,
                  hint: str = ""):
    """A typed document from a YAML/JSON file; every problem raises `error` naming file, line and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such {name} file{hint}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from None
    data, root = read_mapping(text, path, error=error, name=name, shape=shape, unwrap=unwrap)
    return validate(model, data, path, root, error=error)


# ------------------------------------------------------------------------------- explaining
def explain(exc: ValidationError, model: type[BaseModel], source: str | Path, root: Any = None) -> str:
    """pydantic's errors as `file:line: field.path: message` lines, one per problem."""
    lines = []
    for err in exc.errors():
        loc, owner, union = _walk(model, err["loc"])
        line = _line_of(root, loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and loc:
            allowed = list(owner.model_fields) if owner is not None else []
            msg = f"unknown field '{loc[-1]}'" + suggest(str(loc[-1]), allowed)
            if allowed:
                msg += f" (allowed: {', '.join(sorted(allowed))})"
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found") and union is not None:
            tag_field, choices = union
            line = _line_of(root, (*loc, tag_field)) or line
            if err["type"] == "union_tag_invalid":
                tag = str(err.get("ctx", {}).get("tag", ""))
                msg = f"unknown {tag_field} '{tag}'" + suggest(tag, choices) + f"; {tag_field}s: {', '.join(choices)}"
            else:
                msg = f"missing '{tag_field}'; {tag_field}s: {', '.join(choices)}"
        where = f"{source}:{line}" if line else str(source)
        lines.append(f"{where}: {'.'.join(map(str, loc)) or '(top level)'}: {msg}")
    return "\n".join(lines)


def _union(tp) -> tuple[str, dict[str, type]] | None:
    """A discriminated union's (tag field, {tag: model}), else None."""
    if typing.get_origin(tp) is typing.Annotated:
        base, *meta = typing.get_args(tp)
        field = next((m.discriminator for m in meta if isinstance(getattr(m, "discriminator", None), str)), None)
        if field:
            variants = [c for c in typing.get_args(_plain(base)) if isinstance(c, type) and issubclass(c, BaseModel)]
            return field, {typing.get_args(c.model_fields[field].annotation)[0]: c for c in variants}
    return None


def _plain(tp):
    """Strip Optional and plain Annotated wrappers (keeping discriminated unions)."""
    while True:
        if _union(tp) is not None:
            return tp
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _walk(model: type[BaseModel], loc: tuple):
    """(the location without union tags, the model that owns its last field, the discriminated
    union the location ends at). pydantic puts a tag into the location: candidates.2.gptq.bits."""
    clean: list = []
    tp: Any = model
    owner: type[BaseModel] | None = None
    for i, part in enumerate(loc):
        tp = _plain(tp)
        union = _union(tp)
        if union is not None:
            if isinstance(part, str) and part in union[1]:
                tp = union[1][part]
                continue  # the tag: not part of what the person wrote
            return clean + list(loc[i:]), owner, None
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            owner = tp
            clean.append(part)
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            tp = field.annotation if field is not None else None
            if field is not None and isinstance(field.discriminator, str):  # pydantic moved it off the type
                tp = typing.Annotated[tp, Field(discriminator=field.discriminator)]
            continue
        origin = typing.get_origin(tp)
        clean.append(part)
        if origin in (list, tuple, set, frozenset):
            tp = typing.get_args(tp)[0] if typing.get_args(tp) else None
        elif origin is dict:
            tp = typing.get_args(tp)[1] if typing.get_args(tp) else None
        else:
            tp = None
    return clean, owner, _union(_plain(tp)) if tp is not None else None


def _child(node, key):
    import yaml

    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.value == key:
                return v
    return None


def _line_of(root, loc) -> int | None:
    import yaml

    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def duplicate_key(node, path: tuple = ()) -> tuple[tuple, int, int] | None:
    """The first key given twice in one mapping: (its field path, first line, second line), or None.

    YAML and JSON loaders keep the last value silently, so `bits: 4 ... bits: 8` would run with 8
    whatever the author meant."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            key = getattr(k, "value", None)
            if isinstance(key, str):
                if key in seen:
                    return (*path, key), seen[key], k.start_mark.line + 1
                seen[key] = k.start_mark.line + 1
            found = duplicate_key(v, (*path, key))
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            found = duplicate_key(v, (*path, i))
            if found:
                return found
    return None


line_of = _line_of  # public: validate.py places its own findings on the recipe's lines
