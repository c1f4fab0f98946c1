"""Make the README's picture of the dashboard, docs/dashboard.png.

    .venv/bin/python tools/dashboard_picture.py [--output docs/dashboard.png]

It runs the dashboard's end-to-end scenario (tests/test_dashboard_e2e.py: a
real router, DCMTK storescu and storescp, Redis, Debian's chromium, all on
loopback), in which storescu sends a series while the destination is down and
a click on "retry all" delivers it, and keeps the page as the scenario leaves
it. The test suite itself writes its screenshot under a temporary directory:
running the tests never changes a tracked file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ("tests/test_dashboard_e2e.py::"
            "test_the_dashboard_follows_a_down_destination_and_its_retry_button_delivers_the_backlog")
PICTURE = "DICOM_ROUTER_DASHBOARD_PICTURE"
"""The variable the scenario reads for where to keep the page (tests/test_dashboard_e2e.py)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "dashboard.png",
                        help="where the PNG goes (default: docs/dashboard.png)")
    args = parser.parse_args()
    output = args.output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, PICTURE: str(output)}
    done = subprocess.run([sys.executable, "-m", "pytest", SCENARIO, "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env)
    if done.returncode == 0:
        print(f"wrote {output}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
