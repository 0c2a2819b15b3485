"""The service's settings: environment variables prefixed DLMCTL_SERVICE_ (e.g. DLMCTL_SERVICE_PORT)."""
from __future__ import annotations

from typing import Optional

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DLMCTL_SERVICE_", extra="ignore")

    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=1 << 20, gt=0, description="largest request body accepted (413 beyond)")
    kubeconfig: str = Field(default="", description="empty: the in-cluster configuration of the pod's ServiceAccount")
    context: Optional[str] = Field(default=None, description="the kubeconfig context (its current one if unset)")
    log_level: str = "info"
    auth_cache_seconds: float = Field(
        default=5.0, ge=0, description="how long a TokenReview or SubjectAccessReview answer is reused (0: never)")
