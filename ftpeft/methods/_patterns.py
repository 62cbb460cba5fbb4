"""Matching module-name patterns against module paths, with clear errors."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from ..methods.config import ModulePattern


def match_modules(pattern: ModulePattern, paths: Sequence[str], *, method: str, quiet: bool = False, noun: str = "module") -> list[str]:
    """Return the paths that ``pattern`` matches, in the order of ``paths``.

    A string is fullmatched against the whole path. Each entry of a list is
    fullmatched against the path and against every dot-separated suffix of it.

    Raises:
        ValueError: if the string, or any list entry, matches none of ``paths``
            (unless ``quiet``, which returns what matched instead). The
            message names the entry and lists paths that do exist.
    """
    entries = [pattern] if isinstance(pattern, str) else list(pattern)
    compiled = [re.compile(entry) for entry in entries]
    whole_path_only = isinstance(pattern, str)

    matched: list[str] = []
    hits = [0] * len(entries)
    for path in paths:
        candidates = [path] if whole_path_only else _suffixes(path)
        found = False
        for index, regex in enumerate(compiled):
            if any(regex.fullmatch(c) for c in candidates):
                hits[index] += 1
                found = True
        if found:
            matched.append(path)

    unmatched = [entries[i] for i, count in enumerate(hits) if count == 0]
    if unmatched and not quiet:
        raise ValueError(_no_match_message(unmatched, paths, method=method, whole_path_only=whole_path_only, noun=noun))
    return matched


def _suffixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def _no_match_message(unmatched: list[str], paths: Sequence[str], *, method: str, whole_path_only: bool, noun: str = "module") -> str:
    names = ", ".join(repr(u) for u in unmatched)
    listed = [p for p in paths if p][:6]
    label = method if method.endswith("_pattern") else f"{method} pattern"
    message = f"{label} {names} matches no {noun}."
    suffix_hits = [p for p in paths if whole_path_only and any(re.fullmatch(u, s) for u in unmatched for s in _suffixes(p)[1:])]
    close = [] if suffix_hits else _close_matches(unmatched, paths)
    if suffix_hits:
        message += (
            f" It matches the end of {suffix_hits[0]!r}, but a string pattern must fullmatch the whole path: "
            f"use a list such as [{unmatched[0]!r}], which also matches dot-separated suffixes, or r'.*\\.{unmatched[0]}'."
        )
        return message
    if close:
        message += f" Did you mean {', '.join(repr(c) for c in close)}?"
    if listed:
        more = f", ... ({len(paths)} in all)" if len(paths) > len(listed) else ""
        kind = "Module paths" if noun == "module" else "Parameter keys"
        message += f" {kind} that {method} can target include: {', '.join(listed)}{more}."
    if whole_path_only:
        message += (
            " A string pattern must fullmatch the whole path (e.g. r'.*\\.q_proj'); "
            "a list such as ['q_proj'] also matches dot-separated suffixes."
        )
    return message


def _close_matches(unmatched: list[str], paths: Sequence[str]) -> list[str]:
    last_parts = sorted({p.rpartition(".")[2] for p in paths if p})
    close: list[str] = []
    for entry in unmatched:
        for candidate in difflib.get_close_matches(entry, last_parts, n=2, cutoff=0.6):
            # A string pattern can fail on a name that exists as a suffix; suggesting it back would confuse.
            if candidate not in close and candidate != entry:
                close.append(candidate)
    return close
