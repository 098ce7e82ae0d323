"""The settings contract below the stages: each stage module declares one ``Section`` of settings
beside its code; ``flows.config`` only composes them.

A stage receives the settings of its own section and nothing else, so everything it reads is in its
key by construction. A few fields are not for the stage at all but for the flow (which variants to
train, whether to train them at the same time): they are declared with :func:`flow_setting` and are
left out of what the stage receives, so changing them can never change a stage's key.

Non-finite floats (``inf``, ``nan``) are refused everywhere: a learning rate of ``Infinity`` would
train a NaN model and report success.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_FLOW = "flow_only"


def flow_setting(default: Any = ..., **kw: Any) -> Any:
    """A field read by the flow to decide which stages run, never by the stage itself."""
    return Field(default, json_schema_extra={_FLOW: True}, **kw)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @classmethod
    def flow_fields(cls) -> set[str]:
        return {n for n, f in cls.model_fields.items() if (f.json_schema_extra or {}).get(_FLOW)}

    def for_stage(self) -> dict[str, Any]:
        """What the stage receives (and its key covers): every field but the flow's own."""
        return self.model_dump(mode="json", exclude=self.flow_fields())
