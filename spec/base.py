from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base of every spec model: unknown fields are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
