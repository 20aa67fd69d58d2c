"""Providers, chosen by the manifest's `provider.kind`, loaded lazily by name.

Heavy ones (the local transformers provider) import their libraries only when a manifest names
them, so the gateway starts fast on a machine without torch.
"""

from __future__ import annotations

import importlib

from .base import GenRequest, GenResult, Provider, ProviderError, StreamStats

PROVIDERS = {
    "mock": "quantgate.serve.providers.mock:MockProvider",
    "openai": "quantgate.serve.providers.openai_compat:OpenAIProvider",
    "local": "quantgate.serve.providers.local:LocalProvider",
    "command": "quantgate.serve.providers.command:CommandProvider",
}


def make_provider(deployment) -> Provider:
    module, attr = PROVIDERS[deployment.provider.kind].split(":")
    return getattr(importlib.import_module(module), attr)(deployment)


__all__ = ["GenRequest", "GenResult", "Provider", "ProviderError", "StreamStats", "make_provider", "PROVIDERS"]
