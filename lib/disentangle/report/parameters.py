"""Notebook parameters checked against the types their ``parameters`` cell declares.

Each notebook's ``parameters`` cell holds typed literals (``seeds: list[int] = [0, 1, 2]``). The runner
checks a profile's values against them in :func:`disentangle.report.run.plan`, before anything runs, and
every notebook calls :func:`check_notebook` right after its parameters cell, so that values given to
papermill by hand (``-p seeds 3``) are caught too. Problems are named as the user wrote them
(``seeds``, ``sweep_weights.orthogonality[3]``) and reported all at once.
"""

from __future__ import annotations

import difflib
import math
from functools import lru_cache
from typing import Any

from ..paths import REPO


class ParameterError(ValueError):
    """One or more notebook parameters of the wrong type; ``problems`` lists one message each."""

    def __init__(self, problems: list[str], where: str = ""):
        self.problems = list(problems)
        head = f"invalid parameters{' of ' + where if where else ''}:"
        super().__init__(head + "\n  - " + "\n  - ".join(self.problems))


def _split_args(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    return parts + [cur.strip()] if cur.strip() else parts


def parse_type(text: str | None) -> tuple:
    """``'dict[str, list[float]]'`` -> ``('dict', ('str',), ('list', ('float',)))``; unknown -> ``('any',)``."""
    text = (text or "").strip()
    if "[" in text and text.endswith("]"):
        head, inner = text.split("[", 1)
        return (head.strip(), *[parse_type(a) for a in _split_args(inner[:-1])])
    return (text,) if text in ("str", "int", "float", "bool", "list", "dict") else ("any",)


def _describe(tp: tuple) -> str:
    if len(tp) == 1:
        return {"any": "any value", "list": "a list", "dict": "a mapping"}.get(tp[0], "a " + tp[0] if tp[0] != "int" else "an int")
    if tp[0] == "list":
        return f"a list of {_describe(tp[1]).removeprefix('a ').removeprefix('an ')}"
    return f"a mapping of {_describe(tp[1]).removeprefix('a ')} to {_describe(tp[2]).removeprefix('a ')}"


def check_value(name: str, value: Any, tp: tuple) -> list[str]:
    """Problems with ``value`` as a value of declared type ``tp``; ``name`` as the user wrote it."""
    kind = tp[0]
    if kind == "any":
        return []
    bad = [f"{name}={value!r} must be {_describe(tp)}"]
    if kind == "str":
        return [] if isinstance(value, str) else bad
    if kind == "bool":
        return [] if isinstance(value, bool) else bad
    if kind == "int":
        return [] if isinstance(value, int) and not isinstance(value, bool) else bad
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return bad
        return [] if math.isfinite(value) else [f"{name}={value!r} must be a finite number"]
    if kind == "list":
        if not isinstance(value, (list, tuple)):
            return bad
        if len(tp) == 1:
            return []
        return [p for i, v in enumerate(value) for p in check_value(f"{name}[{i}]", v, tp[1])]
    if kind == "dict":
        if not isinstance(value, dict):
            return bad
        if len(tp) == 1:
            return []
        problems = []
        for k, v in value.items():
            problems += check_value(f"{name} key {k!r}", k, tp[1])
            problems += check_value(f"{name}.{k}", v, tp[2])
        return problems
    return []


def check(values: dict[str, Any], declared: dict[str, dict], where: str = "", prefix: str = "") -> list[str]:
    """Problems with ``values`` against papermill's ``inspect_notebook`` output ``declared``: unknown names
    (with "did you mean") and values of the wrong type, all at once."""
    problems = []
    for key, value in values.items():
        if key not in declared:
            close = difflib.get_close_matches(str(key), list(declared), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{prefix}{key} is not a parameter{' of ' + where if where else ''}{hint} "
                            f"(parameters: {', '.join(declared)})")
            continue
        tp = parse_type(declared[key].get("inferred_type_name"))
        problems += [prefix + p for p in check_value(key, value, tp)]
    return problems


@lru_cache(maxsize=None)
def _declared(notebook: str) -> dict[str, dict]:
    """``{name: {"name", "inferred_type_name", "default"}}`` of the notebook's ``parameters`` cell, like
    ``papermill.inspect_notebook`` for annotated assignments, read with ``ast``: importing papermill costs
    ~3 s, paid at the top of every notebook otherwise."""
    import ast
    import json

    nb = json.loads((REPO / "notebooks" / f"{notebook}.ipynb").read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        return {}
    source = "".join(cells[0]["source"]) if isinstance(cells[0]["source"], list) else cells[0]["source"]
    out: dict[str, dict] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = {"name": node.target.id, "inferred_type_name": ast.unparse(node.annotation),
                                   "default": ast.unparse(node.value) if node.value is not None else None}
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = {"name": t.id, "inferred_type_name": "None", "default": ast.unparse(node.value)}
    return out


def check_notebook(notebook: str, namespace: dict[str, Any]) -> None:
    """Raise :class:`ParameterError` if any parameter of ``notebook`` (e.g. ``"01_baseline"``) in
    ``namespace`` (the notebook's ``globals()``) does not have its declared type."""
    declared = _declared(notebook)
    problems = check({k: namespace[k] for k in declared if k in namespace}, declared)
    if problems:
        raise ParameterError(problems, f"{notebook}.ipynb")
