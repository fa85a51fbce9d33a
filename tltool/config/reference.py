"""The config's reference output: the resolved config as YAML, the Markdown table of every key
(docs/CONFIG.md) and the JSON Schema for editors.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from tltool.config.schema import ExperimentConfig, model_in


def json_schema() -> dict[str, Any]:
    """JSON Schema of a config file: the pydantic models' schema plus the loader's own key
    `extends` (a parent config, or a list of them)."""
    schema = ExperimentConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tltool experiment config"
    schema.setdefault("properties", {})["extends"] = {
        "description": "the parent config, relative to this file, merged first",
        "type": "string"}
    return schema


def dump_config(cfg: ExperimentConfig) -> str:
    """The fully resolved config as YAML (every default spelled out)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def schema_reference() -> str:
    """Markdown reference of every config key, generated from the schema itself."""
    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            nested = model_in(field.annotation)
            default = field.default
            shown = "section" if isinstance(default, BaseModel) else f"`{default!r}`"
            lines.append(f"| `{key}` | {shown} | {field.description or ''} |")
            if nested is not None:
                walk(nested, key + ("[]." if "list" in str(field.annotation) else "."))

    walk(ExperimentConfig, "")
    return "| key | default | meaning |\n|---|---|---|\n" + "\n".join(lines)
