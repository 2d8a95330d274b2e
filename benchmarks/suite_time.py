"""What the test suite costs: the README's test command run on a fresh clone
of a commit, its wall time, and the time of each test file.

  python benchmarks/suite_time.py --commit HEAD [--venv .venv] [--quick]
      [--json benchmarks/suite_time.json]
  python benchmarks/suite_time.py --tabulate NAME=JUNIT.xml [NAME=JUNIT.xml ...]

The first form clones this repository at --commit into a temporary folder
(a fresh clone: no compilation cache, no prepared dataset), installs it
into --venv without its dependencies (the venv must have them; a new one is
made by the README's set-up), runs `python -m pytest -q -n 2 --dist
loadfile` there (with -m "not slow" for --quick) and prints the per-file
table; the row is added to --json. The second form prints the same table
for junit files already written (pytest --junitxml), side by side.

A file's time is the sum of its tests' times (setup and teardown included),
so with two workers the files add up to about twice the wall time. The
figures are for the machine they ran on (printed with the table).
"""

import collections
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

from absl import app, flags

_COMMIT = flags.DEFINE_string('commit', 'HEAD', 'The commit to clone and test.')
_VENV = flags.DEFINE_string('venv', '.venv', 'A virtual environment with the test dependencies.')
_QUICK = flags.DEFINE_bool('quick', False, 'Run the quick loop (-m "not slow") only.')
_JSON = flags.DEFINE_string('json', 'benchmarks/suite_time.json', 'Where to add the row.')
_TABULATE = flags.DEFINE_multi_string('tabulate', [], 'NAME=JUNIT.xml: tabulate, run nothing.')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def per_file(junit: str) -> tuple[dict, int]:
  """({test file: summed seconds}, number of tests) of a pytest junit file."""
  seconds, tests = collections.Counter(), 0
  for case in ET.parse(junit).getroot().iter('testcase'):
    seconds[case.get('classname', '').split('.')[-1] + '.py'] += float(case.get('time', 0))
    tests += 1
  return dict(seconds), tests


def table(columns: dict) -> str:
  """columns: {name: {test file: seconds}}; files in the first column's order, slowest first."""
  names = list(columns)
  files = sorted(set().union(*columns.values()), key=lambda f: -columns[names[0]].get(f, 0))
  lines = ['| file | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
  for f in files:
    lines.append(f'| {f} | ' + ' | '.join(f'{columns[n].get(f, 0):.0f} s' for n in names) + ' |')
  lines.append('| **sum of the files** | ' + ' | '.join(
      f'**{sum(columns[n].values()) / 60:.1f} min**' for n in names) + ' |')
  return '\n'.join(lines)


def run_suite(commit: str, venv: str, quick: bool) -> dict:
  work = tempfile.mkdtemp(prefix='jaxcl-suite-')
  try:
    clone = os.path.join(work, 'jaxcl')
    subprocess.run(['git', 'clone', '-q', REPO, clone], check=True)
    subprocess.run(['git', 'checkout', '-q', commit], cwd=clone, check=True)
    sha = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=clone, check=True, capture_output=True,
                         text=True).stdout.strip()
    python = os.path.join(os.path.abspath(venv), 'bin', 'python')
    subprocess.run([python, '-m', 'pip', 'install', '-q', '-e', clone, '--no-deps'], check=True)
    junit = os.path.join(work, 'junit.xml')
    args = [python, '-m', 'pytest', '-q', '-n', '2', '--dist', 'loadfile', f'--junitxml={junit}']
    start = time.monotonic()
    proc = subprocess.run(args + (['-m', 'not slow'] if quick else []), cwd=clone,
                          capture_output=True, text=True)
    wall = time.monotonic() - start
    print(proc.stdout[-3000:])
    files, tests = per_file(junit)
    return {'commit': sha, 'quick': quick, 'wall_s': round(wall, 1), 'tests': tests,
            'exit_code': proc.returncode, 'files_s': {f: round(s, 1) for f, s in files.items()},
            'machine': f'{platform.machine()}, {os.cpu_count()} cores',
            'date': time.strftime('%Y-%m-%d')}
  finally:
    shutil.rmtree(work, ignore_errors=True)
    # pip's editable install pointed the venv at the clone; point it back.
    subprocess.run([os.path.join(os.path.abspath(venv), 'bin', 'python'), '-m', 'pip', 'install',
                    '-q', '-e', REPO, '--no-deps'], check=False)


def main(argv):
  del argv
  print(f'machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}')
  if _TABULATE.value:
    columns = {}
    for item in _TABULATE.value:
      name, junit = item.split('=', 1)
      columns[name], tests = per_file(junit)
      print(f'{name}: {tests} tests')
    print(table(columns))
    return
  row = run_suite(_COMMIT.value, _VENV.value, _QUICK.value)
  print(f"{row['tests']} tests, exit code {row['exit_code']}, wall time "
        f"{row['wall_s'] / 60:.1f} min ({row['commit'][:7]}, {row['machine']})")
  print(table({row['commit'][:7]: row['files_s']}))
  rows = json.load(open(_JSON.value)) if os.path.exists(_JSON.value) else []
  with open(_JSON.value, 'w') as f:
    json.dump(rows + [row], f, indent=1)
  sys.exit(0 if row['exit_code'] == 0 else 1)


if __name__ == '__main__':
  app.run(main)
