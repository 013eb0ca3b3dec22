"""The one strict pydantic base every component's config derives from (run configs, presets, sampler, adaptor).

Unknown keys are errors (a misspelt key never silently falls back to a default) and values are not coerced across
types (a TOML string is not an int), so what a TOML file says is exactly what runs.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)
