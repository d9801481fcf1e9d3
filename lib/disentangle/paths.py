"""Where things are: the repository root, computed once.

The library is installed editable from ``lib/``, so the checkout that holds it is two folders above the
package: ``REPO`` is that folder when it has the project's ``pyproject.toml``, else the working directory
(an installed copy without a checkout). Every path the package derives (reports, cache, notebooks,
profiles, relative bAbI paths) starts here, so moving a module never moves them.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parents[1]
REPO = _CHECKOUT if (_CHECKOUT / "pyproject.toml").exists() else Path.cwd()


def from_repo(path: str | Path) -> Path:
    """``path`` itself when absolute, else relative to the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO / p


__all__ = ["REPO", "from_repo"]
