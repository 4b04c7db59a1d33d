"""Hash-pinned requirement files and the wheelhouse check. Standard library only: the launcher
runs it on the platform's bare Python, ``python -m bundle verify`` on any Python.

A release bundle's requirement files (bundle/requirements.py, bundle/pinhash.py) pin every
package, transitive ones included, as pip's hash-checking mode demands::

    gradio==6.0.0 \\
        --hash=sha256:<one line per file of that version: every wheel and sdist the index lists,
        --hash=sha256:   and the wheel in wheels/ when the bundle built it itself>

``requirements/index.json`` lists those files under ``"hashed"``; the launcher installs them with
``--require-hashes``, so pip refuses any file — from wheels/, the index or a mirror — whose digest
is not pinned. Torch's files are pinned by version only (docs/SUPPLY_CHAIN.md says why); a torch
wheel in wheels/ is covered by SHA256SUMS.

:func:`check_wheelhouse` compares every wheel in wheels/ with those pins before anything is
installed, so a changed wheel is refused with its file named rather than deep in a pip log.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

HASHED_KEY = "hashed"  # requirements/index.json: the files every line of which has --hash
_LINE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;\\]+)")
_HASH = re.compile(r"--hash[= ]sha256:([0-9a-fA-F]{64})")


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def hashed_line(name: str, version: str, digests: list[str]) -> str:
    """``name==version`` with one ``--hash`` per digest, continued over lines as pip-compile writes it."""
    return f"{name}=={version}" + "".join(f" \\\n    --hash=sha256:{d}" for d in sorted(set(digests))) + "\n"


def logical_lines(text: str) -> list[str]:
    """The requirement lines of ``text``: comments dropped, backslash continuations joined."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0] if not raw.lstrip().startswith("#") else ""
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            out.append(line)
    if pending.strip():
        out.append(pending.strip())
    return out


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: str
    digests: frozenset[str]
    file: str  # the requirement file that pins it


def parse_pins(file: str, text: str) -> tuple[list[Pin], list[str]]:
    """The pins of one requirement file and the requirement lines that are not hash-pinned."""
    pins: list[Pin] = []
    loose: list[str] = []
    for line in logical_lines(text):
        if line.startswith("-"):  # an option line (--extra-index-url …)
            continue
        m = _LINE.match(line)
        digests = frozenset(d.lower() for d in _HASH.findall(line))
        if m is None or not digests:
            loose.append(line.split(" \\", 1)[0].split("--hash", 1)[0].strip())
            continue
        pins.append(Pin(canonical(m.group(1)), m.group(2), digests, file))
    return pins, loose


def wheel_name_version(filename: str) -> tuple[str, str] | None:
    """``gradio-6.0.0-py3-none-any.whl`` → ``("gradio", "6.0.0")``; None when not a wheel name."""
    if not filename.endswith(".whl"):
        return None
    parts = filename[:-4].split("-")
    if len(parts) not in (5, 6):
        return None
    return canonical(parts[0]), parts[1]


@dataclass
class WheelhouseReport:
    checked: int = 0
    tampered: list[str] = field(default_factory=list)  # "wheels/x.whl: …" with the pin it breaks
    unknown: list[str] = field(default_factory=list)  # a wheel no requirement file pins
    missing: list[str] = field(default_factory=list)  # a pin of a wheelhouse-covered file with no wheel
    unhashed: list[str] = field(default_factory=list)  # requirement lines without hashes (informational)

    @property
    def ok(self) -> bool:
        return not (self.tampered or self.unknown or self.missing)

    def lines(self) -> list[str]:
        out = [f"  tampered wheel / wheel 被篡改: {t}" for t in self.tampered]
        out += [f"  unknown wheel (no requirement file pins it) / 未知 wheel: {u}" for u in self.unknown]
        out += [f"  missing wheel / 缺少 wheel: {m}" for m in self.missing]
        return out


def check_wheelhouse(req_texts: dict[str, str], hashed_files: list[str], wheel_digests: dict[str, str],
                     covered_files: list[str] | None = None, unpinned: dict[str, str] | None = None) -> WheelhouseReport:
    """Check the wheels (``wheels/<file>`` → sha256) against the hash pins of ``hashed_files``.

    A wheel passes when its digest is one that a hashed file pins for its name, or — for a package no
    hashed file pins (torch and its own dependencies, pinned by version only) — when ``unpinned``
    (BUNDLE.json's ``unpinned_wheels``, with their SHA256SUMS digests) lists exactly that digest.
    ``covered_files``: the requirement files the wheelhouse was filled from; each of their pins must
    have its wheel (BUNDLE.json ``wheelhouse_files``).
    """
    report = WheelhouseReport()
    by_name: dict[str, list[Pin]] = {}
    pinned_digests: set[str] = set()
    for file in hashed_files:
        pins, loose = parse_pins(file, req_texts.get(file, ""))
        report.unhashed += [f"requirements/{file}: {line}" for line in loose]
        for pin in pins:
            by_name.setdefault(pin.name, []).append(pin)
            pinned_digests |= pin.digests
    for rel in sorted(wheel_digests):
        digest = wheel_digests[rel]
        report.checked += 1
        parsed = wheel_name_version(rel.rsplit("/", 1)[-1])
        pins = by_name.get(parsed[0], []) if parsed else []
        if pins:
            if not any(digest in p.digests for p in pins):
                where = ", ".join(f"{p.name}=={p.version} in requirements/{p.file}" for p in pins)
                report.tampered.append(f"{rel}: sha256 {digest[:16]}… is not a hash pinned for {where}")
        elif unpinned is not None and unpinned.get(rel) == digest:
            continue  # e.g. torch: pinned by version, the file itself covered by SHA256SUMS
        elif digest not in pinned_digests:
            report.unknown.append(rel)
    have = set(wheel_digests.values())
    for file in covered_files or []:
        for pin in parse_pins(file, req_texts.get(file, ""))[0]:
            if not pin.digests & have:
                report.missing.append(f"{pin.name}=={pin.version} (requirements/{file})")
    return report
