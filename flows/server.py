"""A Prefect server as the commands address it: API and UI URLs, health, connecting, settings,
deployment names. Imports no Prefect at module level (it reads its settings when first imported)."""

from __future__ import annotations

import os
import re
import sys
import urllib.parse
import urllib.request

from trace_realign.core.errors import ConfigError, TraceError


def api_url_of(server: str) -> str:
    """The API URL for ``--server``: a bare ``http://host:port`` (the UI address) gets ``/api``."""
    url = server.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--server {server!r}: expected a URL such as http://127.0.0.1:4200/api")
    return url + "/api" if parts.path in ("", "/") else url


def ui_url_of(api_url: str) -> str:
    """The Prefect UI's address for an API URL (a self-hosted server serves the UI at its root)."""
    return api_url[: -len("/api")] if api_url.endswith("/api") else api_url


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether ``<api_url>/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def connect(server: str) -> str:
    """The API URL of a running server given as ``--server``, checked with ``/health``."""
    api_url = api_url_of(server)
    if not healthy(api_url, timeout=5.0):
        raise TraceError(f"Prefect server not reachable at {api_url} (GET {api_url}/health failed)")
    return api_url


def use_prefect_settings(env: dict[str, str]) -> None:
    """Apply Prefect settings from ``env``; refresh them if Prefect was imported before."""
    os.environ.update(env)
    if "prefect" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def deployment_name(run_name: str) -> str:
    """``run.name`` as a Prefect deployment name: Prefect refuses ``/ % & > <`` in names, which
    become ``-`` (``team/smoke`` -> ``team-smoke``; the original is in the deployment's description)."""
    mapped = re.sub(r"[/%&><]", "-", run_name).strip() or "trace-realign"
    return mapped
