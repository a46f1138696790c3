"""Files that ship with the distribution: the demo and smoke configs, policies and data.

The repository keeps ``configs/`` and ``data/`` beside ``trace_core/``; an installed copy keeps them
beside it too (``site-packages/trace_realign/{core,configs,data}``, see pyproject.toml), so one
lookup serves a checkout and a wheel install alike.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_ROOT = Path(__file__).resolve().parent.parent
"""The folder holding ``configs/`` and ``data/``: the checkout's root, or ``trace_realign/`` installed."""
