"""The one configuration of the app: the schema of ``manifest.yaml`` (:mod:`.schema`) and how the
file, the environment and the flags combine (:mod:`.loading`)."""
from .loading import (
    LoadedConfig,
    effective_settings,
    env_name,
    iter_fields,
    load_config,
    load_manifest,
    short_env_names,
)
from .sampling import to_sampling_params
from .schema import DEFAULT_MANIFEST, DEFAULT_MODEL_PATH, Manifest, ManifestError

__all__ = [
    "DEFAULT_MANIFEST",
    "DEFAULT_MODEL_PATH",
    "LoadedConfig",
    "Manifest",
    "ManifestError",
    "effective_settings",
    "env_name",
    "iter_fields",
    "load_config",
    "load_manifest",
    "short_env_names",
    "to_sampling_params",
]
