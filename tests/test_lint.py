"""The linter, as configured in pyproject.toml ([tool.ruff]): pycodestyle,
pyflakes, import order, and imports at the top of a module."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
  proc = subprocess.run([sys.executable, '-m', 'ruff', 'check', REPO], capture_output=True,
                        text=True, cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
