"""``python -m bundle build|verify`` (see bundle/build.py for the archive layout)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bundle", description="Build or verify the one-click bundle.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write dist/vibethinker-app-<version>-<target>.tar.gz")
    b.add_argument("--target", choices=["cpu", "cuda"], default="cpu", help="torch build the bundle installs (default cpu)")
    b.add_argument(
        "--wheelhouse",
        nargs="?",
        const="app",
        default="none",
        choices=["none", "app", "full"],
        help="add wheels/ for offline installs: app = everything but torch (platforms with torch; the default "
        "when the flag has no value), full = torch too",
    )
    b.add_argument("--with-model", type=Path, default=None, metavar="PATH", help="also pack a model folder or .gguf file")
    b.add_argument("--out", type=Path, default=Path("dist"), help="output folder (default dist/)")
    v = sub.add_parser("verify", help="check an archive (or an extracted folder) against its SHA256SUMS, and its "
                       "wheels/ against the --hash pins of its requirement files")
    v.add_argument("archive", type=Path)
    lk = sub.add_parser("lock", help="hash every pinned package of this environment from the pip indexes into "
                        "hashes.lock.json (commit it; builds read it offline)")
    lk.add_argument("--index-url", action="append", default=None, metavar="URL",
                    help="an index to read (repeatable; default: pip's configured index and extra indexes)")
    args = parser.parse_args(argv)

    if args.command == "lock":
        from .pinhash import lock_command
        from .requirements import RequirementsError

        try:
            path, count = lock_command(Path(__file__).resolve().parent.parent, args.index_url)
        except RequirementsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{path}  ({count} pinned versions hashed)")
        return 0

    if args.command == "build":
        from .build import BuildError, HashError, build
        from .requirements import RequirementsError

        try:
            result = build(target=args.target, out_dir=args.out, wheelhouse=args.wheelhouse, with_model=args.with_model)
        except (BuildError, HashError, RequirementsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        size = result.archive.stat().st_size / 2**20
        print(f"{result.archive}  ({result.files} files, {result.wheels} wheels, {size:.1f} MiB)")
        return 0

    from .archive import verify_archive, verify_folder

    if not args.archive.exists():
        print(f"error: {args.archive}: no such file or folder", file=sys.stderr)
        return 2
    if args.archive.is_dir():
        report = verify_folder(args.archive, ignore=RUNTIME_NAMES)
    else:
        report = verify_archive(args.archive)
    print(report.render(str(args.archive)))
    return 0 if report.ok else 1


# Created by 1键推理.sh inside the extracted folder at run time, so not covered by SHA256SUMS.
RUNTIME_NAMES = (".venv", "logs", "run", ".conda-py311")

if __name__ == "__main__":
    sys.exit(main())
