"""Reproducible tar.gz writing and SHA256SUMS checking (stdlib only: also runs on a bare Python).

Verifying a bundle also checks its supply chain (bundle/hashes.py): every requirement file that
requirements/index.json lists as hashed has a ``--hash`` on every line, and every wheel in wheels/
matches one of the hashes pinned for it — so a wheel swapped together with a rewritten SHA256SUMS
is still named.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .hashes import HASHED_KEY, WheelhouseReport, check_wheelhouse, parse_pins

SUMS_NAME = "SHA256SUMS"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sums_text(digests: dict[str, str]) -> str:
    """``sha256sum``-compatible text (so ``sha256sum -c SHA256SUMS`` works in the extracted folder)."""
    return "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))


def parse_sums(text: str) -> dict[str, str]:
    digests: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ValueError(f"{SUMS_NAME} line {number} is malformed: {line!r}")
        digests[name.lstrip("*")] = digest.lower()
    return digests


def write_tar_gz(out: Path, root_name: str, files: Iterable[tuple[str, Path, bool]], mtime: int) -> None:
    """Write ``out`` with entries ``root_name/<rel>`` in sorted order, fixed owner, mode and mtime.

    ``files`` yields (relative posix path, source file, executable). The archive is written to a
    temporary name and renamed, so an interrupted build never leaves a plausible-looking tarball.
    """
    entries = sorted(files, key=lambda item: item[0])
    dirs: set[str] = set()
    for rel, _, _ in entries:
        parts = PurePosixPath(rel).parts
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
    tmp = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:

                def info(name: str, mode: int, kind: bytes, size: int = 0) -> tarfile.TarInfo:
                    ti = tarfile.TarInfo(name)
                    ti.mode, ti.type, ti.size, ti.mtime = mode, kind, size, mtime
                    ti.uid = ti.gid = 0
                    ti.uname = ti.gname = ""
                    return ti

                tar.addfile(info(root_name, 0o755, tarfile.DIRTYPE))
                for d in sorted(dirs):
                    tar.addfile(info(f"{root_name}/{d}", 0o755, tarfile.DIRTYPE))
                for rel, src, executable in entries:
                    size = src.stat().st_size
                    with open(src, "rb") as fh:
                        tar.addfile(info(f"{root_name}/{rel}", 0o755 if executable else 0o644, tarfile.REGTYPE, size), fh)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass
class VerifyReport:
    checked: int = 0
    missing: list[str] = field(default_factory=list)  # listed in SHA256SUMS, absent
    extra: list[str] = field(default_factory=list)  # present, not listed
    changed: list[str] = field(default_factory=list)  # digest differs
    problems: list[str] = field(default_factory=list)  # unsafe members, no sums file, ...
    wheelhouse: WheelhouseReport | None = None  # wheels/ against the --hash pins
    hashed_files: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.changed or self.problems) and (
            self.wheelhouse is None or self.wheelhouse.ok)

    def render(self, what: str) -> str:
        wheels = self.wheelhouse.checked if self.wheelhouse else 0
        if self.ok:
            pins = (f"; {self.hashed_files} requirement files hash-pinned"
                    + (f", all {wheels} wheels match their pins" if wheels else "")) if self.hashed_files else ""
            return f"OK: {what}: all {self.checked} files match {SUMS_NAME}{pins} / 全部文件校验通过"
        lines = [f"FAILED: {what} does not match its {SUMS_NAME} or its hash pins / 校验失败:"]
        lines += [f"  problem / 问题: {p}" for p in self.problems]
        lines += [f"  missing / 缺失: {n}" for n in self.missing]
        lines += [f"  extra (not in {SUMS_NAME}) / 多余: {n}" for n in self.extra]
        lines += [f"  changed / 被修改: {n}" for n in self.changed]
        if self.wheelhouse is not None:
            lines += self.wheelhouse.lines()
        lines.append("Fix: download or copy the bundle again; never install a wheel that fails its pin "
                     "/ 修复: 重新下载或复制发布包, 不要安装校验失败的 wheel")
        return "\n".join(lines)


def _is_supply_file(rel: str) -> bool:
    return rel == "BUNDLE.json" or (rel.startswith("requirements/") and rel.count("/") == 1)


def _compare(listed: dict[str, str], actual: dict[str, str], report: VerifyReport,
             texts: dict[str, str] | None = None) -> VerifyReport:
    report.missing = sorted(set(listed) - set(actual))
    report.extra = sorted(set(actual) - set(listed))
    report.changed = sorted(n for n in set(listed) & set(actual) if listed[n] != actual[n])
    report.checked = len(set(listed) & set(actual))
    if texts is not None:
        _check_supply_chain(texts, actual, listed, report)
    return report


def _check_supply_chain(texts: dict[str, str], actual: dict[str, str], listed: dict[str, str],
                        report: VerifyReport) -> None:
    """The requirement files' hash pins and the wheelhouse against them (bundles only)."""
    if "requirements/index.json" not in texts:
        return
    try:
        index = json.loads(texts["requirements/index.json"])
        info = json.loads(texts.get("BUNDLE.json", "{}"))
    except ValueError as exc:
        report.problems.append(f"requirements/index.json or BUNDLE.json is not JSON: {exc}")
        return
    hashed = index.get(HASHED_KEY)
    if not isinstance(hashed, list) or not hashed:
        report.problems.append("requirements/index.json lists no hash-pinned requirement file (a bundle built "
                               "before hashes, or edited): rebuild it with python -m bundle build")
        return
    req = {name: texts.get(f"requirements/{name}", "") for name in
           {rel.split("/", 1)[1] for rel in texts if rel.startswith("requirements/")}}
    for name in hashed:
        if f"requirements/{name}" not in texts:
            report.problems.append(f"requirements/{name}: listed as hashed in index.json but absent")
            continue
        loose = parse_pins(name, req[name])[1]
        if loose:
            report.problems.append(f"requirements/{name}: not hash-pinned: {', '.join(loose[:5])}")
    report.hashed_files = len(hashed)
    wheels = {rel: d for rel, d in actual.items() if rel.startswith("wheels/") and rel.endswith(".whl")}
    covered = info.get("wheelhouse_files") or []
    allowed = {f"wheels/{n}" for n in info.get("unpinned_wheels") or ()}
    report.wheelhouse = check_wheelhouse(req, hashed, wheels, covered, {r: d for r, d in listed.items() if r in allowed})


def verify_archive(path: Path) -> VerifyReport:
    report = VerifyReport()
    actual: dict[str, str] = {}
    texts: dict[str, str] = {}
    sums: str | None = None
    roots: set[str] = set()
    try:
        tar = tarfile.open(path, "r:*")
    except (OSError, tarfile.TarError) as exc:
        report.problems.append(f"cannot read {path} as a tar archive: {exc}")
        return report
    with tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if member.name.startswith("/") or ".." in parts:
                report.problems.append(f"unsafe path in archive: {member.name}")
                continue
            roots.add(parts[0])
            if member.isdir():
                continue
            if not member.isfile():
                report.problems.append(f"not a regular file (links are not allowed): {member.name}")
                continue
            rel = "/".join(parts[1:])
            fh = tar.extractfile(member)
            assert fh is not None
            if rel == SUMS_NAME:
                sums = fh.read().decode("utf-8")
                continue
            digest = hashlib.sha256()
            kept = [] if _is_supply_file(rel) else None
            for block in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(block)
                if kept is not None:
                    kept.append(block)
            actual[rel] = digest.hexdigest()
            if kept is not None:
                texts[rel] = b"".join(kept).decode("utf-8", errors="replace")
    if len(roots) != 1:
        report.problems.append(f"expected one top-level folder, found {sorted(roots) or 'none'}")
    if sums is None:
        report.problems.append(f"no {SUMS_NAME} in the archive")
        return report
    try:
        listed = parse_sums(sums)
    except ValueError as exc:
        report.problems.append(str(exc))
        return report
    return _compare(listed, actual, report, texts)


def verify_folder(folder: Path, ignore: Iterable[str] = ()) -> VerifyReport:
    """Check an extracted bundle. ``ignore``: top-level names the app creates at run time."""
    report = VerifyReport()
    sums_path = folder / SUMS_NAME
    if not sums_path.is_file():
        report.problems.append(f"no {SUMS_NAME} in {folder}")
        return report
    try:
        listed = parse_sums(sums_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        report.problems.append(str(exc))
        return report
    skip = set(ignore)
    actual: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel == SUMS_NAME or rel.split("/", 1)[0] in skip or "__pycache__" in rel.split("/"):
            continue
        if path.is_file():
            actual[rel] = sha256_file(path)
    texts = {rel: (folder / rel).read_text(encoding="utf-8", errors="replace") for rel in actual if _is_supply_file(rel)}
    return _compare(listed, actual, report, texts)
