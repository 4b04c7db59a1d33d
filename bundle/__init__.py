"""Packaging of the one-click bundle and the launcher behind ``1键推理.sh``.

``bundle.build`` / ``bundle.archive`` make and verify ``dist/vibethinker-app-<ver>-<target>.tar.gz``;
``bundle.launcher`` is what ``1键推理.sh`` runs after it has found a Python ≥ 3.10, and
``bundle.resolve`` is how the launcher reads the configuration through the one schema. Modules that
run on the platform's bare Python (``bundle.launcher``, ``archive``, ``reqfiles``) use the standard
library only.
"""
