"""Packaging of the one-click bundle and the installer behind ``1键推理.sh``.

``bundle.build`` / ``bundle.archive`` make and verify ``dist/vibethinker-app-<ver>-<target>.tar.gz``;
``bundle.oneclick`` is what ``1键推理.sh`` runs after it has found a Python ≥ 3.10. Modules that
the one-click script runs on the platform's bare Python (oneclick, archive, platform_checks)
use the standard library only.
"""
