"""Key maps: rename, regex rename, prefixes, scopes and dropping keys."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch

from ..tree import TensorSpec
from ._core import Group, StateMap, select_keys

__all__ = ["Rename", "RegexRename", "AddPrefix", "StripPrefix", "SelectScope", "Drop", "rename", "regex_rename"]


def _renamer(source: str, target: str):
    def fn(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {target: tensors[source]}

    return fn


def _missing(spec: Mapping[str, TensorSpec], keys, what: str) -> None:
    missing = [key for key in keys if key not in spec]
    if missing:
        raise KeyError(f"{what} reads key(s) {', '.join(repr(k) for k in missing[:5])}, which the tree does not have.")


@dataclasses.dataclass(frozen=True)
class Rename(StateMap):
    """Rename exact keys; the inverse swaps each pair."""

    pairs: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        targets = [target for _, target in self.pairs]
        sources = [source for source, _ in self.pairs]
        for name, values in (("source", sources), ("target", targets)):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"rename has repeated {name} key(s) {repeated}; a rename must be one to one.")

    def reads(self, spec):
        return {source for source, _ in self.pairs}

    def _plan(self, spec):
        _missing(spec, [source for source, _ in self.pairs], "rename")
        return [Group((source,), (target,), _renamer(source, target)) for source, target in self.pairs]

    def inverse(self) -> StateMap:
        return Rename(tuple((target, source) for source, target in self.pairs))


def rename(mapping: Mapping[str, str] | str, target: str | None = None) -> Rename:
    """Return a map that renames keys: ``rename({"a": "b"})`` or ``rename("a", "b")``."""
    if isinstance(mapping, str):
        if target is None:
            raise TypeError("rename(source, target) needs both keys, or pass a dict {source: target}.")
        return Rename(((mapping, target),))
    return Rename(tuple(mapping.items()))


@dataclasses.dataclass(frozen=True)
class RegexRename(StateMap):
    """Rename every key that ``pattern`` fullmatches to ``match.expand(replacement)``.

    The inverse is the rename from ``inverse_pattern`` to
    ``inverse_replacement``. ``regex_rename`` derives it when the pattern
    is literal text and capture groups, each group used once in the
    replacement. Applying either direction checks that the rename is one to
    one on the keys it meets and that the inverse brings each key back.
    """

    pattern: str
    replacement: str
    inverse_pattern: str | None = None
    inverse_replacement: str | None = None

    def _targets(self, spec) -> dict[str, str]:
        regex = re.compile(self.pattern)
        targets: dict[str, str] = {}
        seen: dict[str, str] = {}
        for key in spec:
            match = regex.fullmatch(key)
            if match is None:
                continue
            new = match.expand(self.replacement)
            if new in seen:
                raise ValueError(
                    f"regex rename {self.pattern!r} -> {self.replacement!r} maps both {seen[new]!r} and {key!r} to "
                    f"{new!r}, so it is not one to one on these keys."
                )
            seen[new] = key
            targets[key] = new
        if self.inverse_pattern is not None:
            back = re.compile(self.inverse_pattern)
            for key, new in targets.items():
                match = back.fullmatch(new)
                restored = match.expand(self.inverse_replacement or "") if match else None
                if restored != key:
                    raise ValueError(
                        f"regex rename {self.pattern!r} -> {self.replacement!r} is not invertible on {key!r}: it "
                        f"becomes {new!r}, which the inverse {self.inverse_pattern!r} -> {self.inverse_replacement!r} "
                        f"turns into {restored!r}. Give an explicit inverse= that restores the key."
                    )
        return targets

    def reads(self, spec):
        return set(self._targets(spec))

    def _plan(self, spec):
        return [Group((key,), (new,), _renamer(key, new)) for key, new in self._targets(spec).items()]

    def inverse(self) -> StateMap:
        if self.inverse_pattern is None or self.inverse_replacement is None:
            raise ValueError(
                f"regex rename {self.pattern!r} -> {self.replacement!r} has no inverse: it could not be derived "
                "(the pattern must be literal text and capture groups, each used once in the replacement). "
                "Pass inverse=(pattern, replacement) to regex_rename."
            )
        return RegexRename(self.inverse_pattern, self.inverse_replacement, self.pattern, self.replacement)


def regex_rename(pattern: str, replacement: str, *, inverse: tuple[str, str] | None = None) -> RegexRename:
    """Return a map that renames keys by a regex with capture groups.

    Example:
        >>> f = regex_rename(r"model\\.layers\\.(\\d+)\\.(.*)", r"layers.\\1.\\2")
        >>> f.inverse()
        RegexRename(pattern='layers\\\\.(\\\\d+)\\\\.(.*)', replacement='model.layers.\\\\1.\\\\2', ...)

    Args:
        pattern: fullmatched against each key; keys it does not match are
            not read by this map.
        replacement: a ``re`` template (``\\1`` or ``\\g<name>`` refer to groups).
        inverse: the ``(pattern, replacement)`` that undoes the rename, when
            it cannot be derived.
    """
    re.compile(pattern)
    if inverse is None:
        derived = _derive_inverse(pattern, replacement)
        inverse_pattern, inverse_replacement = derived if derived else (None, None)
    else:
        inverse_pattern, inverse_replacement = inverse
        re.compile(inverse_pattern)
    return RegexRename(pattern, replacement, inverse_pattern, inverse_replacement)


def _derive_inverse(pattern: str, replacement: str) -> tuple[str, str] | None:
    """Derive the inverse rename when the pattern is literal text plus capture groups."""
    pattern_parts = _split_pattern(pattern)
    replacement_parts = _split_replacement(replacement)
    if pattern_parts is None or replacement_parts is None:
        return None

    groups = [source for kind, source in pattern_parts if kind == "group"]
    used = [index for kind, index in replacement_parts if kind == "ref"]
    if sorted(used) != list(range(1, len(groups) + 1)):
        return None

    inverse_pattern = ""
    order: dict[int, int] = {}
    for kind, value in replacement_parts:
        if kind == "text":
            inverse_pattern += re.escape(value)
        else:
            order[value] = len(order) + 1
            inverse_pattern += f"({groups[value - 1]})"

    inverse_replacement = ""
    group_index = 0
    for kind, value in pattern_parts:
        if kind == "text":
            inverse_replacement += value.replace("\\", "\\\\")
        else:
            group_index += 1
            inverse_replacement += f"\\g<{order[group_index]}>"
    return inverse_pattern, inverse_replacement


_SPECIAL = set(".^$*+?{}[]|()")


def _split_pattern(pattern: str) -> list[tuple[str, str]] | None:
    """Split a pattern into literal text and top-level capture groups, or None if it has other syntax."""
    parts: list[tuple[str, str]] = []
    text = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 >= len(pattern) or pattern[i + 1].isalnum():
                return None
            text += pattern[i + 1]
            i += 2
        elif char == "(":
            if pattern.startswith("(?", i):
                return None
            end = _group_end(pattern, i)
            if end is None:
                return None
            if text:
                parts.append(("text", text))
                text = ""
            parts.append(("group", pattern[i + 1 : end]))
            i = end + 1
        elif char in _SPECIAL:
            return None
        else:
            text += char
            i += 1
    if text:
        parts.append(("text", text))
    return parts


def _group_end(pattern: str, start: int) -> int | None:
    depth, i, in_class = 0, start, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            if pattern.startswith("(?", i) and not pattern.startswith("(?:", i):
                return None
            if i != start and not pattern.startswith("(?:", i):
                return None
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _split_replacement(replacement: str) -> list[tuple[str, object]] | None:
    parts: list[tuple[str, object]] = []
    text = ""
    i = 0
    while i < len(replacement):
        char = replacement[i]
        if char != "\\":
            text += char
            i += 1
            continue
        match = re.match(r"\\(\d+)|\\g<(\d+)>", replacement[i:])
        if match is None:
            if i + 1 < len(replacement) and replacement[i + 1] == "\\":
                text += "\\"
                i += 2
                continue
            return None
        if text:
            parts.append(("text", text))
            text = ""
        parts.append(("ref", int(match.group(1) or match.group(2))))
        i += match.end()
    if text:
        parts.append(("text", text))
    return parts


def _segments(prefix: str) -> str:
    prefix = prefix.strip(".")
    if not prefix:
        raise ValueError("A prefix must hold at least one key segment, such as 'model'.")
    return prefix


@dataclasses.dataclass(frozen=True)
class AddPrefix(StateMap):
    """Put ``prefix.`` in front of every key; the inverse strips it."""

    prefix: str
    scoped: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", _segments(self.prefix))

    def reads(self, spec):
        return set(spec)

    def _plan(self, spec):
        return [Group((key,), (f"{self.prefix}.{key}",), _renamer(key, f"{self.prefix}.{key}")) for key in spec]

    def inverse(self) -> StateMap:
        return SelectScope(self.prefix) if self.scoped else StripPrefix(self.prefix)


@dataclasses.dataclass(frozen=True)
class StripPrefix(StateMap):
    """Remove ``prefix.`` from the keys that start with it, whole dot-separated segments only.

    Stripping ``_orig_mod`` turns ``_orig_mod.lin.weight`` into ``lin.weight``
    and leaves ``my_orig_mod.lin.weight`` unread.
    """

    prefix: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", _segments(self.prefix))

    def reads(self, spec):
        return {key for key in spec if key.startswith(f"{self.prefix}.")}

    def _plan(self, spec):
        start = len(self.prefix) + 1
        return [Group((key,), (key[start:],), _renamer(key, key[start:])) for key in sorted(self.reads(spec), key=list(spec).index)]

    def inverse(self) -> StateMap:
        return AddPrefix(self.prefix)


def _drop(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {}


@dataclasses.dataclass(frozen=True)
class SelectScope(StateMap):
    """Keep the keys under ``scope.`` with the scope removed, and drop every other key.

    ``SelectScope("encoder")`` turns ``encoder.layer.0.weight`` into
    ``layer.0.weight``. The inverse adds the scope back; keys outside the
    scope were dropped and do not come back.
    """

    scope: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "scope", _segments(self.scope))

    def reads(self, spec):
        return set(spec)

    def _plan(self, spec):
        start = len(self.scope) + 1
        groups = []
        for key in spec:
            if key.startswith(f"{self.scope}."):
                groups.append(Group((key,), (key[start:],), _renamer(key, key[start:])))
            else:
                groups.append(Group((key,), (), _drop))
        return groups

    def inverse(self) -> StateMap:
        return AddPrefix(self.scope, scoped=True)


@dataclasses.dataclass(frozen=True)
class Drop(StateMap):
    """Drop keys, for example adapter leaves after a merge. It has no inverse."""

    keys: tuple[str, ...] = ()
    pattern: str | None = None

    def _selected(self, spec) -> list[str]:
        return select_keys(spec, self.keys, self.pattern, "Drop")

    def reads(self, spec):
        return set(self._selected(spec))

    def _plan(self, spec):
        return [Group((key,), (), _drop) for key in self._selected(spec)]

    def inverse(self) -> StateMap:
        raise ValueError(
            "A Drop map has no inverse: the dropped values are gone. Keep them aside (for example with ftpeft.split) "
            "and combine them back after the inverse of the rest of the pipeline."
        )
