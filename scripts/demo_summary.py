"""Summarise `ferry history --json` (read from stdin) in a few lines for the demo."""

import json
import sys

for record in json.load(sys.stdin):
    line = f"{record['target']} -> v{record['version']}: {record['outcome']}"
    if record["outcome"] == "committed":
        line += f" in {sum(record['steps'].values()):.2f} s"
    elif record["outcome"] == "rolled_back":
        rollback = record["rollback"]
        quarantined = [path.rsplit("/", 1)[1] for path in rollback["quarantined"]]
        line += (
            f" at {record['failed_step']} ({record['error']});\n   rolled back in {record['steps']['rollback']:.2f} s,"
            f" Triton serves {rollback['serving']}, quarantined as {quarantined}"
        )
    else:
        line += f" ({record['error']})"
    print(" -", line)
