"""Many deploys and rollbacks on one Triton: does its memory grow, and does the repository's disk use stay bounded?

Each cycle deploys a good version (alternating v1 and v3, so that every cycle really loads one and
unloads the other) and then a broken one (v2, which fails at load: the path where a backend stub
starts and dies, where Triton has leaked before), which is rolled back and quarantined.

Prints Triton's RSS (the server, and its Python backend stubs once the retired ones have exited)
every few cycles, and the ratio of the last figure to the first; and the repository's disk use after
the warm-up and at the end, with the quarantine retention setting (FERRY_QUARANTINE_KEEP) on, against
what the quarantine would hold without it (the same failed versions, every file kept).

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

from train_model import train_and_register  # noqa: E402

from conftest import make_settings  # noqa: E402
from ferry.core.runner import deploy  # noqa: E402
from ferry.core.steps import Services  # noqa: E402
from ferry.runtime import server  # noqa: E402

MODEL = "soak"
WARM_UP_CYCLES = 5


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        try:
            children = [int(c) for task in Path(f"/proc/{current}/task").iterdir()
                        for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # it exited meanwhile
            continue
        found += children
        pending += children
    return found


def rss(pid: int) -> tuple[int, int, int]:
    """Resident memory of the Triton server, of its backend stubs (summed), and how many stubs run."""
    stubs = []
    for child in _descendants(pid):
        try:
            stubs.append(_rss(child))
        except FileNotFoundError:  # a stub that just exited
            continue
    return _rss(pid), sum(stubs), len(stubs)


def at_rest(ferry: Services, pid: int, timeout_s: float = 20.0) -> None:
    """Wait until exactly the active version's backend stub runs, twice in a row half a second apart:
    retired instances shut down in the background."""
    deadline, settled = time.monotonic() + timeout_s, 0
    while settled < 2 and time.monotonic() < deadline:
        ready = ferry.triton.ready_versions(MODEL)
        settled = settled + 1 if len(ready) == 1 and len(_descendants(pid)) == 1 else 0
        time.sleep(0.5)


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def cycle(ferry: Services, good: int) -> tuple[str, str]:
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
        ferry = Services(settings)
        trace = []
        try:
            seconds, failed_version_bytes = 0.0, 0
            for i in range(args.cycles):
                began = time.perf_counter()
                outcomes = cycle(ferry, good=1 if i % 2 == 0 else 3)
                seconds += time.perf_counter() - began
                if outcomes != ("committed", "rolled_back"):
                    sys.exit(f"cycle {i}: expected a commit and a rollback, got {outcomes}")
                if i == 0:
                    failed_version_bytes = max(disk_bytes(f) for f in ferry.model_dir(MODEL).quarantine_root.iterdir())
                if (i + 1) % WARM_UP_CYCLES == 0:
                    at_rest(ferry, state.pid)
                    trace.append((i + 1, *rss(state.pid), disk_bytes(settings.repository)))
        finally:
            server.down(settings)

    mb = 1024 * 1024
    print(f"cycles: {args.cycles} (each one commit and one rollback) in {seconds:.1f} s, "
          f"{seconds / args.cycles / 2:.2f} s per deploy")
    print("after cycle   server MB   stubs MB (count)   repository MB")
    for n, server_rss, stubs_rss, stubs, disk in trace:
        print(f"{n:11d}   {server_rss / mb:9.1f}   {stubs_rss / mb:8.1f} ({stubs})    {disk / mb:13.2f}")
    (_, server_start, stubs_start, _, disk_start), (_, server_end, stubs_end, _, disk_end) = trace[0], trace[-1]
    print(f"triton server rss growth ratio: {server_end / server_start:.3f} "
          f"(+{(server_end - server_start) / mb:.1f} MB over {args.cycles - WARM_UP_CYCLES} cycles)")
    print(f"triton rss growth ratio (server and stubs): {(server_end + stubs_end) / (server_start + stubs_start):.3f}")
    unbounded = disk_end + (args.cycles - args.keep) * failed_version_bytes
    print(f"repository disk after {WARM_UP_CYCLES} cycles: {disk_start / mb:.2f} MB, "
          f"at the end: {disk_end / mb:.2f} MB "
          f"(quarantine keep {args.keep}; one failed version holds {failed_version_bytes / mb:.2f} MB)")
    print(f"repository disk growth ratio: {disk_end / disk_start:.3f} "
          f"(without retention: {unbounded / disk_start:.3f}, {unbounded / mb:.2f} MB)")


if __name__ == "__main__":
    main()
