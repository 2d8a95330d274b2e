"""How jaxcl turns an exception into its one-line messages."""

from __future__ import annotations


def first_line(e: BaseException, default: str | None = None) -> str:
  """The first line of `e`'s message; `default` (the exception's type name
  unless given) when the message is empty."""
  lines = str(e).strip().splitlines()
  if lines:
    return lines[0]
  return type(e).__name__ if default is None else default
