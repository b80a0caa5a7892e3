"""Finding an environment by name: a registry object (no module-level state) that maps a
name to (environment class, config dataclass), and ``module:Class`` paths for
environments defined in a user's own package.

    registry = default_registry()              # the built-ins: "shop"
    registry.register("maze", MazeEnv, MazeConfig)
    env = registry.make("maze", {"size": 5})   # MazeEnv(MazeConfig(size=5))
    env = registry.make("my_pkg.envs:Maze", {...})   # Maze(Maze.Config(...)) or Maze(**...)
"""

from __future__ import annotations

import dataclasses
import importlib

from livethinking.envs.base import Environment

__all__ = ["EnvironmentRegistry", "default_registry"]


class EnvironmentRegistry:
    def __init__(self) -> None:
        self._entries: dict[str, tuple[type, type | None]] = {}

    def register(self, name: str, env_class: type, config_class: type | None = None) -> None:
        """Add ``name``; ValueError if it is taken or holds ``:`` (kept for import paths)."""
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"an environment name must be a non-empty string without ':', "
                             f"got {name!r}")
        if name in self._entries:
            raise ValueError(f"environment {name!r} is already registered")
        if not isinstance(env_class, type):
            raise TypeError(f"env_class must be a class, got {type(env_class).__name__}")
        if config_class is not None and not dataclasses.is_dataclass(config_class):
            raise TypeError("config_class must be a dataclass")
        self._entries[name] = (env_class, config_class)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def resolve(self, name: str) -> tuple[type, type | None]:
        """(class, config class) of a registered name or a ``module:Class`` path (its config
        class: the class's ``Config`` attribute, if any)."""
        if name in self._entries:
            return self._entries[name]
        if ":" not in name:
            raise ValueError(f"unknown environment {name!r}; registered: "
                             f"{', '.join(self.names()) or 'none'}, or give module:Class")
        module_name, _, attr = name.partition(":")
        try:
            env_class = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load environment {name!r}: {e}") from None
        return env_class, getattr(env_class, "Config", None)

    def make(self, name: str, config=None) -> Environment:
        """An instance of ``name`` built from ``config``: a config object, a dict of its
        fields, or None (the config class's defaults)."""
        env_class, config_class = self.resolve(name)
        if config_class is None:
            return env_class(**(config or {}))
        if config is None:
            config = config_class()
        elif isinstance(config, dict):
            known = {f.name for f in dataclasses.fields(config_class)}
            unknown = sorted(set(config) - known)
            if unknown:
                raise ValueError(f"environment {name!r}: unknown config key(s) "
                                 f"{', '.join(unknown)}; known: {', '.join(sorted(known))}")
            config = config_class(**config)
        elif not isinstance(config, config_class):
            raise TypeError(f"environment {name!r} takes a {config_class.__name__} or a dict, "
                            f"got {type(config).__name__}")
        return env_class(config)


def default_registry() -> EnvironmentRegistry:
    """A fresh registry holding the built-in environments."""
    from livethinking.envs.shop import ShopConfig, ShopEnvironment

    registry = EnvironmentRegistry()
    registry.register("shop", ShopEnvironment, ShopConfig)
    return registry
