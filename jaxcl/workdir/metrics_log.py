"""The run's metrics log: one JSON row per log step, {'step': int, ...}.

On a local disk it is WORKDIR/metrics.jsonl, appended and flushed at each
log step; a resumed run first cuts the rows past its restored step (the
killed run logged them; the resumed one logs them again).

Object stores (gs://) can neither append to an object nor cut one short.
There the rows go to parts in WORKDIR/metrics.jsonl.d/, named
START-from-STEP-PART.jsonl: START counts the run's starts, STEP is the step
that start resumed from, PART counts the parts of one start. A part is
rewritten whole at each log step (one upload: readers and a kill see the
old object or the new one) until it holds PART_ROWS rows; the next row
opens the next part, so no write grows with the run's length. Nothing is
ever cut: a start's STEP says which earlier rows it replaces.

`read_lines` gives either layout as the one logical file.
"""

from __future__ import annotations

import json
import re

from etils import epath

from jaxcl import files

PART_ROWS = 500  # rows per part on object stores: each log step rewrites at most this many
_PART_NAME = re.compile(r'(\d+)-from-(\d+)-(\d+)\.jsonl')


def row_step(line: str) -> int | None:
  """The step of one line of the log; None for a line that is not a row
  (cut short by a full disk, edited by hand)."""
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return None


def _up_to(lines: list[str], step: int) -> list[str]:
  return [line for line in lines if (s := row_step(line)) is not None and s <= step]


def _parts(workdir: epath.Path) -> list[tuple[int, int, int, epath.Path]]:
  """(start, from step, part, path) of the object-store parts, in order."""
  folder = workdir / files.METRICS_PARTS_DIR
  if not folder.is_dir():
    return []
  found = [(_PART_NAME.fullmatch(p.name), p) for p in folder.iterdir()]
  return sorted((*map(int, m.groups()), p) for m, p in found if m)


def read_lines(workdir) -> list[str]:
  """The lines of the run's log, as one file: metrics.jsonl, then the parts
  of each start, each start first dropping the rows past its step."""
  workdir = epath.Path(workdir)
  path = workdir / files.METRICS_FILE
  lines = path.read_text().splitlines() if path.exists() else []
  for _, from_step, part, path in _parts(workdir):
    if part == 0:
      lines = _up_to(lines, from_step)
    lines += path.read_text().splitlines()
  return lines


def exists(workdir) -> bool:
  """Whether the run has logged (in either layout)."""
  workdir = epath.Path(workdir)
  return (workdir / files.METRICS_FILE).exists() or bool(_parts(workdir))


def drop_rows_after(workdir, step: int) -> None:
  """Cuts a local metrics.jsonl to the rows up to `step` (and drops lines
  that are not rows); object stores need nothing: each start's parts say
  where they resume."""
  path = epath.Path(workdir) / files.METRICS_FILE
  if not path.exists():
    return
  lines = path.read_text().splitlines()
  kept = _up_to(lines, step)
  if len(kept) != len(lines):
    files.write_atomically(path, ''.join(line + '\n' for line in kept))


class MetricsLog:
  """Appends rows to the run's log in the workdir's layout; `step` is the
  step this run starts (or resumes) from."""

  def __init__(self, workdir, step: int):
    workdir = epath.Path(workdir)
    self._file = None
    if not files.is_object_store(workdir):
      self._file = (workdir / files.METRICS_FILE).open('a')
      return
    starts = [start for start, *_ in _parts(workdir)]
    self._start, self._from, self._part = (max(starts) + 1 if starts else 0), int(step), 0
    self._folder, self._rows = workdir / files.METRICS_PARTS_DIR, []
    self._folder.mkdir(parents=True, exist_ok=True)

  def write(self, row: dict) -> None:
    line = json.dumps(row) + '\n'
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
      return
    if len(self._rows) == PART_ROWS:
      self._part, self._rows = self._part + 1, []
    self._rows.append(line)
    name = f'{self._start:04d}-from-{self._from:09d}-{self._part:05d}.jsonl'
    (self._folder / name).write_text(''.join(self._rows))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
