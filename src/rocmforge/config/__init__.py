"""Configuration objects: small validated dataclasses, one per concern, each field's default
and docstring written once.

* :mod:`~rocmforge.config.engine` -- :class:`LoadConfig`, :class:`DeviceConfig`,
  :class:`CacheConfig`, :class:`SchedulerConfig`, :class:`PoolerConfig` and their bundle
  :class:`EngineConfig`;
* :mod:`~rocmforge.config.server` -- :class:`ServerConfig`;
* :mod:`~rocmforge.config.fields` -- reading a class's fields (names, types, defaults,
  docstrings) for whoever derives settings, flags or keyword arguments from them.

``LLM(**kwargs)`` (:meth:`EngineConfig.from_kwargs`), the ``ROCMFORGE_*`` environment
(:mod:`rocmforge.settings`) and the CLI flags all derive from these classes.
"""

from __future__ import annotations

from rocmforge.config.engine import (
    ENGINE_PARTS,
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    LoadConfig,
    PoolerConfig,
    SchedulerConfig,
)
from rocmforge.config.fields import ConfigField, config_fields
from rocmforge.config.server import ServerConfig

__all__ = [
    "ENGINE_PARTS",
    "CacheConfig",
    "ConfigField",
    "DeviceConfig",
    "EngineConfig",
    "LoadConfig",
    "PoolerConfig",
    "SchedulerConfig",
    "ServerConfig",
    "config_fields",
]
