"""The ``--hash=sha256:`` pins of a bundle's requirement files, and ``python -m bundle lock``.

Where the digests come from, for each pinned ``name==version``:

1. ``hashes.lock.json`` at the project root (committed, reviewed like code): every file of that
   version that the pip indexes listed when ``python -m bundle lock`` last ran — every wheel and
   sdist, all platforms, so that a launcher on another Python or a user's mirror still matches
   (mirrors serve PyPI's files unchanged, so the digests are the same). A build reads it and
   needs no network.
2. The wheels the build put in wheels/: a wheel pip downloaded must be one the index lists with
   that digest (else the build stops: the index served something else); a wheel pip built here
   from a hash-checked sdist (llama-cpp-python's CPU build) adds its own digest.
3. Pins the lock does not know (the build environment was upgraded) are looked up on the indexes
   at build time, with a note to refresh the lock; a pin no source can hash stops the build.

The indexes are pip's own configuration (``PIP_INDEX_URL``/``PIP_EXTRA_INDEX_URL`` or
``pip config``), read through their PEP 503 pages (the ``#sha256=`` fragment of each link).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from .archive import sha256_file
from .hashes import HASHED_KEY, hashed_line, wheel_name_version
from .reqfiles import INDEX_NAME

LOCK_NAME = "hashes.lock.json"
DEFAULT_INDEX = "https://pypi.org/simple"
_LINK = re.compile(r"<a\s[^>]*?href=\"([^\"]+)\"[^>]*>([^<]*)</a>", re.I)
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")
_SDIST = (".tar.gz", ".zip", ".tar.bz2", ".tgz")


class HashError(RuntimeError):
    """A pin cannot be hashed or a wheel does not match its index (message names the fix)."""


def _same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def dist_name_version(filename: str) -> tuple[str, str] | None:
    parsed = wheel_name_version(filename)
    if parsed:
        return parsed
    for ext in _SDIST:
        if filename.endswith(ext):
            name, sep, version = filename[: -len(ext)].rpartition("-")
            return (str(canonicalize_name(name)), version) if sep else None
    return None


def pip_indexes() -> list[str]:
    """pip's configured index and extra indexes (environment first, then ``pip config``)."""
    config: dict[str, str] = {}
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
        for line in out.stdout.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                config[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    except (OSError, subprocess.SubprocessError):
        pass
    index = os.environ.get("PIP_INDEX_URL") or config.get("index-url") or DEFAULT_INDEX
    extra = os.environ.get("PIP_EXTRA_INDEX_URL") or config.get("extra-index-url") or ""
    out_list: list[str] = []
    for url in [index, *extra.split()]:
        if url and url.rstrip("/") not in out_list:
            out_list.append(url.rstrip("/"))
    return out_list


def _page(index: str, name: str) -> str | None:
    """The PEP 503 page of ``name`` on ``index``; None when the index has no such project."""
    url = f"{index}/{name}/"
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        folder = Path(urllib.request.url2pathname(parsed.path))
        page = folder / "index.html"
        return page.read_text(encoding="utf-8", errors="replace") if page.is_file() else None
    request = urllib.request.Request(url, headers={"Accept": "text/html"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # pip's own index
            return response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def index_files(index: str, name: str, version: str) -> dict[str, str]:
    """filename → sha256 of every file of ``name==version`` that ``index`` lists with a digest."""
    page = _page(index, str(canonicalize_name(name)))
    files: dict[str, str] = {}
    for href, text in _LINK.findall(page or ""):
        url, _, fragment = href.partition("#")
        m = re.search(r"sha256=([0-9a-fA-F]{64})", fragment)
        filename = urllib.parse.unquote(text.strip() or url.rsplit("/", 1)[-1])
        parsed = dist_name_version(filename)
        if m and parsed and parsed[0] == canonicalize_name(name) and _same_version(parsed[1], version):
            files[filename] = m.group(1).lower()
    return files


def lookup(pins: Iterable[tuple[str, str]], indexes: list[str], say=print) -> dict[str, dict[str, str]]:
    """``"name==version"`` → {filename: sha256} from every reachable index (missing keys: not found)."""
    wanted = sorted(set(pins))
    dead: dict[str, str] = {}
    found: dict[str, dict[str, str]] = {}

    def one(index: str, pin: tuple[str, str]) -> tuple[str, tuple[str, str], dict[str, str] | Exception]:
        if index in dead:
            return index, pin, {}
        try:
            return index, pin, index_files(index, *pin)
        except Exception as exc:  # unreachable index: the others may still answer
            return index, pin, exc

    with ThreadPoolExecutor(max_workers=16) as pool:
        for index in indexes:
            for idx, (name, version), result in pool.map(one, [index] * len(wanted), wanted):
                if isinstance(result, Exception):
                    if idx not in dead:
                        dead[idx] = f"{type(result).__name__}: {result}"
                        say(f"warning: index {idx} did not answer ({dead[idx]}); hashes from the others",
                            file=sys.stderr)
                    continue
                entry = found.setdefault(f"{name}=={version}", {}) if result else {}
                for filename, digest in result.items():
                    # The same file name with another digest on another index: keep both (each may be served).
                    key = filename if entry.get(filename, digest) == digest else f"{filename} ({idx})"
                    entry[key] = digest
    return found


# -- the lock -----------------------------------------------------------------------------------------

def read_lock(root: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads((root / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("packages", {}) if isinstance(data, dict) else {}


def write_lock(root: Path, packages: dict[str, dict[str, str]], indexes: list[str]) -> Path:
    path = root / LOCK_NAME
    data = {
        "comment": "sha256 of every file of each pinned version, from the pip indexes below. Written by "
                   "`python -m bundle lock`; read by `python -m bundle build` (bundle/pinhash.py). Review changes.",
        "indexes": indexes,
        "packages": {k: dict(sorted(v.items())) for k, v in sorted(packages.items())},
    }
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


def file_pins(text: str) -> list[tuple[str, str]]:
    """The ``name==version`` lines of an unhashed pinned file (bundle/requirements.py's format)."""
    out = []
    for line in text.splitlines():
        m = _PIN.match(line.strip())
        if m:
            out.append((str(canonicalize_name(m.group(1))), m.group(2)))
    return out


def hashable_files(files: dict[str, str]) -> list[str]:
    """The requirement files that can be hash-pinned: every line ``name==version`` (not torch's,
    whose build and index the launcher picks at install time; not an unpinned fallback)."""
    out = []
    for name, text in files.items():
        if name == INDEX_NAME or name.startswith("torch-"):
            continue
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if all(_PIN.match(line) for line in lines):
            out.append(name)
    return sorted(out)


def lock_command(root: Path, indexes: list[str] | None = None) -> tuple[Path, int]:
    """``python -m bundle lock``: hash every pin of the build environment, write hashes.lock.json."""
    from .requirements import pinned_requirements

    files = pinned_requirements(root).files
    pins = {p for name in hashable_files(files) for p in file_pins(files[name])}
    indexes = indexes or pip_indexes()
    found = lookup(pins, indexes)
    missing = sorted(f"{n}=={v}" for n, v in pins if f"{n}=={v}" not in found)
    if missing:
        print(f"warning: no index lists {', '.join(missing)}: a bundle with a wheelhouse hashes its wheels; "
              f"without one the build will stop", file=sys.stderr)
    return write_lock(root, found, indexes), len(found)


# -- the build ----------------------------------------------------------------------------------------

def hash_requirement_files(req_dir: Path, root: Path, wheel_dir: Path | None, indexes: list[str] | None = None,
                           say=print) -> list[str]:
    """Rewrite the hashable files of ``req_dir`` with ``--hash`` pins; index.json lists them.

    Returns the files hashed. Raises HashError naming the pins no source could hash, or a wheel
    whose digest differs from the one the index lists for the same file.
    """
    files = {p.name: p.read_text(encoding="utf-8") for p in sorted(req_dir.iterdir()) if p.is_file()}
    names = hashable_files(files)
    pins = {p for name in names for p in file_pins(files[name])}
    lock = read_lock(root)
    digests: dict[tuple[str, str], set[str]] = {}
    listed: dict[tuple[str, str], dict[str, str]] = {}
    for pin in pins:
        entry = lock.get(f"{pin[0]}=={pin[1]}")
        if entry:
            listed[pin] = dict(entry)
    unknown = sorted(p for p in pins if p not in listed)
    if unknown:
        indexes = indexes if indexes is not None else pip_indexes()
        say(f"note: {len(unknown)} pins are not in {LOCK_NAME} ({', '.join(f'{n}=={v}' for n, v in unknown[:5])}"
            f"{'…' if len(unknown) > 5 else ''}): looking them up on {', '.join(indexes) or 'no index'}; "
            f"run `python -m bundle lock` and commit {LOCK_NAME}", file=sys.stderr)
        for key, value in lookup(unknown, indexes, say=say).items():
            name, version = key.split("==", 1)
            listed[(name, version)] = value
    for pin, entry in listed.items():
        digests[pin] = set(entry.values())
    for wheel in sorted(wheel_dir.glob("*.whl")) if wheel_dir else []:
        parsed = wheel_name_version(wheel.name)
        if parsed is None:
            continue
        pin = next((p for p in pins if p[0] == parsed[0] and _same_version(p[1], parsed[1])), None)
        if pin is None:
            continue
        digest = sha256_file(wheel)
        expected = listed.get(pin, {}).get(wheel.name)
        if expected is not None and digest not in digests.get(pin, ()):
            raise HashError(f"wheels/{wheel.name}: pip fetched a file whose sha256 ({digest}) differs from the one the "
                            f"index lists ({expected}). Fix: clear pip's cache (pip cache purge) and check the index "
                            f"(PIP_INDEX_URL); never ship it.")
        digests.setdefault(pin, set()).add(digest)
    missing = sorted(f"{n}=={v}" for n, v in pins if not digests.get((n, v)))
    if missing:
        raise HashError(f"cannot hash {', '.join(missing)}: neither {LOCK_NAME}, the indexes "
                        f"({', '.join(indexes or []) or 'none asked'}) nor wheels/ have their files. Fix: run "
                        f"`python -m bundle lock` with an index that has them (PIP_INDEX_URL), or build with --wheelhouse.")
    for name in names:
        out = []
        for line in files[name].splitlines(keepends=True):
            m = _PIN.match(line.strip())
            if m:
                pin = (str(canonicalize_name(m.group(1))), m.group(2))
                line = hashed_line(m.group(1), m.group(2), sorted(digests[pin]))
            out.append(line)
        (req_dir / name).write_text("".join(out), encoding="utf-8")
    index = json.loads(files[INDEX_NAME])
    index[HASHED_KEY] = names
    (req_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return names
