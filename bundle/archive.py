"""Reproducible tar.gz writing and SHA256SUMS checking (stdlib only: also runs on a bare Python)."""
from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

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

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.changed or self.problems)

    def render(self, what: str) -> str:
        if self.ok:
            return f"OK: {what}: all {self.checked} files match {SUMS_NAME} / 全部文件校验通过"
        lines = [f"FAILED: {what} does not match its {SUMS_NAME} / 校验失败:"]
        lines += [f"  problem / 问题: {p}" for p in self.problems]
        lines += [f"  missing / 缺失: {n}" for n in self.missing]
        lines += [f"  extra (not in {SUMS_NAME}) / 多余: {n}" for n in self.extra]
        lines += [f"  changed / 被修改: {n}" for n in self.changed]
        lines.append("Fix: download or copy the bundle again / 修复: 重新下载或复制发布包")
        return "\n".join(lines)


def _compare(listed: dict[str, str], actual: dict[str, str], report: VerifyReport) -> VerifyReport:
    report.missing = sorted(set(listed) - set(actual))
    report.extra = sorted(set(actual) - set(listed))
    report.changed = sorted(n for n in set(listed) & set(actual) if listed[n] != actual[n])
    report.checked = len(set(listed) & set(actual))
    return report


def verify_archive(path: Path) -> VerifyReport:
    report = VerifyReport()
    actual: dict[str, str] = {}
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
            for block in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(block)
            actual[rel] = digest.hexdigest()
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
    return _compare(listed, actual, report)


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
    return _compare(listed, actual, report)
