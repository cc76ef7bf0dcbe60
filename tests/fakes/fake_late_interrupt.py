"""Fault injection, not ferry: the ferry CLI with a Ctrl-C that arrives just after the deploy was decided.

    python fake_late_interrupt.py ferry-arguments...

A person's Ctrl-C cannot be aimed at the instant between the history record and the exit on demand;
this process sends SIGINT to itself there.
"""

from __future__ import annotations

import os
import signal
import sys

import ferry.core.runner
import ferry.core.target
from ferry.adapters.cli import app

decided = ferry.core.runner.Runner.deploy


def deploy_then_interrupted(self: ferry.core.runner.Runner, target: ferry.core.target.Target):
    report = decided(self, target)
    os.kill(os.getpid(), signal.SIGINT)
    return report


if __name__ == "__main__":
    ferry.core.runner.Runner.deploy = deploy_then_interrupted
    sys.argv = ["ferry", *sys.argv[1:]]
    app()
