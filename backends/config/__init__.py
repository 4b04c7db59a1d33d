"""The one schema of ``manifest.yaml`` and its precedence (see :mod:`backends.config.schema`)."""
from .schema import *  # noqa: F401,F403
from .schema import DEFAULT_MANIFEST, DEFAULT_MODEL_PATH, ENV_VARS, Manifest, ManifestError, load_manifest, to_sampling_params  # noqa: F401
