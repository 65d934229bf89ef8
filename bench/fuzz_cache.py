"""The long run of the cache-reader fuzz (tests/test_fuzz_cache.py): thousands of random caches, fresh seeds.

CI runs the same property on a bounded, derandomized set of examples; this script runs it with random seeds and
many more examples, and prints Hypothesis's statistics (what share of the files gave a report, and which one-line
errors the others got).

Usage::

    python bench/fuzz_cache.py                   # 3000 examples
    python bench/fuzz_cache.py --examples 20000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=3000)
    args = parser.parse_args()
    env = {**os.environ, "NCAUDIT_FUZZ_EXAMPLES": str(args.examples), "NCAUDIT_FUZZ_RANDOM": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
           str(ROOT / "tests" / "test_fuzz_cache.py")]
    return subprocess.call(cmd, env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
