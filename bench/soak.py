"""Many deploys and rollbacks on one Triton: does its memory grow, and does the repository's disk use stay bounded?

Each cycle deploys a good version (alternating v1 and v3, so that every cycle really loads one and
unloads the other) and then a broken one (v2, which fails at load: the path where a backend stub
starts and dies, where Triton has leaked before), which is rolled back and quarantined.

Prints Triton's RSS (the server and its Python backend stubs) after the warm-up cycles and at the
end, and their ratio; and the repository's disk use after the warm-up and at the end, with the
quarantine retention setting (FERRY_QUARANTINE_KEEP) on, against what the quarantine would hold
without it (the same failed versions, every file kept).

    .venv/bin/python bench/soak.py [--cycles 50] [--keep 5] [--trees 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]

from conftest import make_settings  # noqa: E402
from train_model import train_and_register  # noqa: E402

from ferry.deploy import Ferry, deploy  # noqa: E402
from ferry.runtime import server  # noqa: E402

MODEL = "soak"
WARM_UP_CYCLES = 5


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (Triton and its backend stubs)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def cycle(ferry: Ferry, good: int) -> tuple[str, str]:
    committed = deploy(ferry, MODEL, version=good)
    failed = deploy(ferry, MODEL, version=2)
    return committed.outcome, failed.outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--keep", type=int, default=5, help="FERRY_QUARANTINE_KEEP for the run")
    parser.add_argument("--trees", type=int, default=300, help="size of the model (a forest of this many trees)")
    args = parser.parse_args()
    if args.cycles <= WARM_UP_CYCLES:
        parser.error(f"--cycles must be over the {WARM_UP_CYCLES} warm-up cycles")

    with tempfile.TemporaryDirectory(prefix="ferry-soak-") as home:
        settings = make_settings(Path(home), quarantine_keep=args.keep)
        for breakage in ("none", "unknown-op", "none"):
            train_and_register(MODEL, None, breakage, args.trees, settings.tracking_uri)
        state = server.up(settings)
        ferry = Ferry(settings)
        try:
            began = time.perf_counter()
            failed_version_bytes = 0
            for i in range(args.cycles):
                outcomes = cycle(ferry, good=1 if i % 2 == 0 else 3)
                if outcomes != ("committed", "rolled_back"):
                    sys.exit(f"cycle {i}: expected a commit and a rollback, got {outcomes}")
                if i == 0:
                    failed_version_bytes = max(disk_bytes(f) for f in ferry.model_dir(MODEL).quarantine_root.iterdir())
                if i + 1 == WARM_UP_CYCLES:
                    rss_start, disk_start = rss_bytes(state.pid), disk_bytes(settings.repository)
            seconds = time.perf_counter() - began
            rss_end, disk_end = rss_bytes(state.pid), disk_bytes(settings.repository)
        finally:
            server.down(settings)

    unbounded = disk_end + (args.cycles - args.keep) * failed_version_bytes
    mb = 1024 * 1024
    print(f"cycles: {args.cycles} (each one commit and one rollback) in {seconds:.1f} s, "
          f"{seconds / args.cycles / 2:.2f} s per deploy")
    print(f"triton rss after {WARM_UP_CYCLES} cycles: {rss_start / mb:.1f} MB, at the end: {rss_end / mb:.1f} MB")
    print(f"triton rss growth ratio: {rss_end / rss_start:.3f}")
    print(f"repository disk after {WARM_UP_CYCLES} cycles: {disk_start / mb:.2f} MB, at the end: {disk_end / mb:.2f} MB "
          f"(quarantine keep {args.keep}; one failed version holds {failed_version_bytes / mb:.2f} MB)")
    print(f"repository disk growth ratio: {disk_end / disk_start:.3f} "
          f"(without retention: {unbounded / disk_start:.3f}, {unbounded / mb:.2f} MB)")


if __name__ == "__main__":
    main()
