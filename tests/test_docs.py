"""The docs that mirror the code are generated from it (docs/generate.py)
and up to date, and every link between the docs leads somewhere."""

import importlib.util
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted([REPO / 'README.md', *(REPO / 'docs').glob('*.md'),
                REPO / 'benchmarks' / 'RESULTS.md'])


def _generate():
  spec = importlib.util.spec_from_file_location('generate', REPO / 'docs' / 'generate.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_generated_docs_are_up_to_date(capsys):
  assert _generate().main(['--check']) == 0, capsys.readouterr().out


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_to_files(page):
  links = re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', page.read_text())
  missing = [link for link in links if '://' not in link
             and not (page.parent / link).exists()]
  assert not missing, f'{page.name} links to missing files: {missing}'
