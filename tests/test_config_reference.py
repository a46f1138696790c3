"""README's configuration table against the config models: every setting is documented there, with
its default and (where the model documents the field) the model's own description, and nothing
that is not a setting is."""

import json
import re
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from trace_realign.flows.config import PipelineConfig

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^\| `(?P<name>[a-z0-9_.]+)` \| (?P<default>.*?) \| (?P<meaning>.*) \|$")


def _section(annotation) -> type[BaseModel] | None:
    """The model of a nested section; None for a value (a judge config is a union of backends,
    documented under "Judges", so it is one row)."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    return f"`{value}`" if isinstance(value, str) else f"`{json.dumps(value)}`"


def settings(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> dict[str, tuple[str, str | None]]:
    """``{dotted setting: (default as README shows it, the field's description or None)}``."""
    out = {}
    for name, field in model.model_fields.items():
        nested = _section(field.annotation)
        if nested is not None:
            out.update(settings(nested, f"{prefix}{name}."))
        else:
            out[prefix + name] = (_default(field), field.description)
    return out


def readme_rows() -> dict[str, tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = ROW.match(line)
        if m:
            assert m["name"] not in rows, f"README documents {m['name']} twice"
            rows[m["name"]] = (m["default"], m["meaning"])
    return rows


def test_every_setting_is_in_the_readme_table_and_nothing_else():
    documented, actual = readme_rows(), settings()
    assert not set(actual) - set(documented), f"settings missing from README's configuration table: {sorted(set(actual) - set(documented))}"
    assert not set(documented) - set(actual), f"README documents settings that do not exist: {sorted(set(documented) - set(actual))}"


def test_readme_defaults_and_descriptions_are_the_models():
    documented = readme_rows()
    for name, (default, description) in settings().items():
        row_default, row_meaning = documented[name]
        assert row_default == default, f"README's default of {name}: {row_default}, the model's: {default}"
        if description is not None:
            assert row_meaning == description, f"README's meaning of {name} differs from its Field description: {description}"
