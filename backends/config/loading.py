"""Reading the configuration: ``manifest.yaml`` < environment < command-line flags < nothing else.

- ``manifest.yaml``: the file (or the built-in defaults when there is none);
- environment: every key as ``VT_<SECTION>__<KEY>`` (``VT_GENERATION__TEMPERATURE=0.3``,
  ``VT_SERVER__AUTH__API_KEY=…``), read by pydantic-settings' own environment source, plus the
  short names the schema gives some keys (``VT_PORT``; the long form wins when both are set);
- flags: dotted keys (``--set server.port=8081``, ``--port``).

Each value remembers where it came from (:attr:`LoadedConfig.origins`), so that a wrong key or
value names its source, and ``python -m ui config`` shows where every effective value was set.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_settings import EnvSettingsSource, SettingsError
from pydantic_settings.sources.utils import parse_env_vars

from .schema import DEFAULT_MANIFEST, Manifest, ManifestError

ENV_PREFIX = "VT_"
ENV_DELIMITER = "__"
DEFAULT_ORIGIN = "default"


def _sections(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    out = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out[name] = annotation
    return out


def iter_fields(model: type[BaseModel] = Manifest, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, FieldInfo) of every leaf setting, in schema order."""
    sections = _sections(model)
    for name, info in model.model_fields.items():
        if name in sections:
            yield from iter_fields(sections[name], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def short_env_names() -> dict[str, str]:
    """Short environment variables → dotted keys, as the schema declares them (``VT_PORT``)."""
    out = {}
    for dotted, info in iter_fields():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("env"):
            out[str(extra["env"])] = dotted
    return out


def env_name(dotted: str) -> str:
    return ENV_PREFIX + dotted.replace(".", ENV_DELIMITER).upper()


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (tests pass their own)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = dict(environ)
        super().__init__(Manifest, case_sensitive=False, env_prefix=ENV_PREFIX,  # type: ignore[arg-type]
                         env_nested_delimiter=ENV_DELIMITER, env_ignore_empty=True, env_parse_none_str="null")

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


@dataclass(frozen=True)
class LoadedConfig:
    manifest: Manifest
    path: Path | None  # the manifest file read (None: built-in defaults only)
    origins: dict[str, str]  # dotted key → where its value was set (absent = default)

    def origin(self, dotted: str) -> str:
        found = self.origins.get(dotted)
        if found is None:  # a mapping setting (model.sha256) is set through its entries
            found = next((o for k, o in self.origins.items() if k.startswith(dotted + ".")), DEFAULT_ORIGIN)
        return found


def _leaves(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif prefix:
        yield prefix[:-1], data


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ManifestError(f"{origin}: cannot set {dotted!r} because {key!r} is not a section")
        node = child
    node[leaf] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(
            f"Manifest not found: {path}. Pass an existing file or omit it to use the defaults.") from None
    except OSError as exc:
        raise ManifestError(f"Cannot read the manifest {path}: {exc.strerror}.") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ManifestError(f"{path} must be a mapping of keys to values, got {type(loaded).__name__}")
    return loaded


def _env_layer(environ: Mapping[str, str]) -> tuple[list[tuple[str, Any, str]], list[str]]:
    """(dotted key, value, origin) set by the environment, and the names of misspelt variables."""
    sections = set(Manifest.model_fields)
    unknown = []
    for name in environ:
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and ENV_DELIMITER in upper:
            head = upper[len(ENV_PREFIX):].split(ENV_DELIMITER)[0].lower()
            if head not in sections:
                unknown.append(name)
    items: list[tuple[str, Any, str]] = []
    for var, dotted in short_env_names().items():
        value = environ.get(var)
        if value not in (None, ""):
            items.append((dotted, value, f"environment variable {var}"))
    upper_env = {k.upper(): k for k in environ}
    try:
        from_env = _EnvSource(environ)()
    except SettingsError as exc:  # a whole section (VT_REMOTE=...) that is not JSON
        field = str(exc).split('"')[1] if '"' in str(exc) else "?"
        name = next((k for k in environ if k.upper() == env_name(field)), env_name(field))
        raise ManifestError(
            f"Invalid configuration: environment variable {name} sets the whole {field!r} section and is not a "
            f"JSON object; set single keys instead, e.g. {env_name(field)}__<KEY>=value.") from None
    for dotted, value in _leaves(from_env):
        parts = dotted.split(".")
        var = next((upper_env[n] for n in (env_name(".".join(parts[:i])) for i in range(len(parts), 0, -1))
                    if n in upper_env), env_name(dotted))
        items.append((dotted, value, f"environment variable {var}"))
    return items, unknown


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Manifest
    for part in loc[:-1]:
        sub = _sections(model).get(str(part))
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _describe_error(err: dict[str, Any], origins: Mapping[str, str], fallback: str) -> str:
    key = ".".join(str(p) for p in err["loc"])
    origin = origins.get(key) or next((o for k, o in origins.items() if k.startswith(key + ".")), fallback)
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(err["loc"]))
        return f"  - {key}: unknown key (from {origin}); allowed here: {allowed}"
    expected = err.get("ctx", {}).get("expected")
    msg = err["msg"].removeprefix("Value error, ")
    text = f"  - {key} = {err.get('input')!r} (from {origin}): {msg}"
    if expected and expected not in msg:
        text += f"; allowed: {expected}"
    return text


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """Read the manifest, apply the environment then the flags, validate; remember each origin.

    ``overrides`` maps dotted keys (``"server.port"``) to flag values; None values are ignored so
    that argparse defaults do not shadow the manifest.
    """
    manifest_path = Path(path) if path else DEFAULT_MANIFEST
    env = os.environ if env is None else env
    read = path is not None or manifest_path.exists()
    data = _read_yaml(manifest_path) if read else {}
    file_origin = str(manifest_path)
    origins = {dotted: file_origin for dotted, _ in _leaves(data)}
    items, unknown = _env_layer(env)
    if unknown:
        sections = ", ".join(Manifest.model_fields)
        raise ManifestError(
            "Invalid configuration: environment variable(s) " + ", ".join(sorted(unknown))
            + f" name no manifest section (allowed: {sections}); e.g. VT_SERVER__PORT=8081. Fix or unset them.")
    items += [(k, v, "command-line flag") for k, v in (overrides or {}).items() if v is not None]
    for dotted, value, origin in items:
        _set_dotted(data, dotted, value, origin)
        # The new value replaces whatever was set at, above or below this key before.
        for key in [k for k in origins if k.startswith(dotted + ".") or dotted.startswith(k + ".")]:
            del origins[key]
        origins[dotted] = origin
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        lines = [_describe_error(e, origins, file_origin if read else DEFAULT_ORIGIN) for e in exc.errors()]
        where = manifest_path if read else "the configuration"
        raise ManifestError(f"Invalid configuration in {where}:\n" + "\n".join(lines)) from None
    from ..registry import choices  # the engines, and so the allowed backends, come from the registry

    allowed = choices()
    if manifest.backend not in allowed:
        where = manifest_path if read else "the configuration"
        origin = origins.get("backend", file_origin if read else DEFAULT_ORIGIN)
        raise ManifestError(f"Invalid configuration in {where}:\n  - backend = {manifest.backend!r} (from {origin}): "
                            f"unknown backend; allowed: {', '.join(allowed)}")
    return LoadedConfig(manifest=manifest, path=manifest_path if read else None, origins=origins)


def load_manifest(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Manifest:
    """:func:`load_config`'s manifest alone (what most callers need)."""
    return load_config(path, env, overrides).manifest


def effective_settings(loaded: LoadedConfig) -> list[tuple[str, Any, str, str]]:
    """(dotted key, effective value, origin, description) for every setting, in schema order."""
    data = loaded.manifest.model_dump(mode="json")
    rows = []
    for dotted, info in iter_fields():
        node: Any = data
        for part in dotted.split("."):
            node = node[part]
        rows.append((dotted, node, loaded.origin(dotted), info.description or ""))
    return rows
