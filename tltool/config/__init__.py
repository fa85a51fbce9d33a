"""The experiment config: one explicit schema, `extends:` inheritance and `--set` overrides.

Every field is declared once (schema) with its type, default and a one-line description. Unknown
keys are errors (with a "did you mean"), and every problem of a file is reported in one message
(loading). The reference output (resolved YAML, Markdown table, JSON Schema) is in reference.
"""

from tltool.config.loading import candidate_raw, load_config, set_key, validate_config
from tltool.config.reference import dump_config, json_schema, schema_reference
from tltool.config.schema import (
    NAME_PATTERN,
    AdaptConfig,
    CandidateConfig,
    DataConfig,
    DecisionConfig,
    EarlyStopping,
    ExperimentConfig,
    ExtractConfig,
    L2SPConfig,
    ModelConfig,
    OutputConfig,
    RoundConfig,
    SelectConfig,
    SplitConfig,
    TrainConfig,
)

__all__ = [
    "NAME_PATTERN", "AdaptConfig", "CandidateConfig", "DataConfig", "DecisionConfig",
    "EarlyStopping", "ExperimentConfig", "ExtractConfig", "L2SPConfig", "ModelConfig",
    "OutputConfig", "RoundConfig", "SelectConfig", "SplitConfig", "TrainConfig",
    "candidate_raw", "dump_config", "json_schema", "load_config", "schema_reference",
    "set_key", "validate_config",
]
