"""Files that ship with the distribution: the demo and smoke configs, policies and data.

The repository keeps ``configs/`` and ``data/`` beside ``trace_core/``; an installed copy keeps them
beside it too (``site-packages/trace_realign/{core,configs,data}``, see pyproject.toml), so one
lookup serves a checkout and a wheel install alike.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_ROOT = Path(__file__).resolve().parent.parent
"""The folder holding ``configs/`` and ``data/``: the checkout's root, or ``trace_realign/`` installed."""


def shipped_config(name: str) -> Path | None:
    """The shipped config called ``name`` (``demo``, ``smoke``, or ``demo.yaml``), else None."""
    stem = name[:-5] if name.endswith(".yaml") else name
    if not stem or "/" in stem or "\\" in stem:
        return None
    path = SHIPPED_ROOT / "configs" / f"{stem}.yaml"
    return path if path.is_file() else None
