"""The README stays a user's guide and the documents' links and snippets stay whole."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / 'README.md', ROOT / 'CHANGELOG.md'] + sorted((ROOT / 'docs').glob('*.md'))
LINK = re.compile(r'\]\(([^)\s]+)\)')
README_LIMIT_BYTES = 15_000


def _anchors(markdown: str) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r'^#+\s+(.+?)\s*$', markdown, flags=re.M)
    return {re.sub(r'[^\w\- ]', '', h.lower()).replace(' ', '-') for h in headings}


def test_readme_is_a_short_users_guide():
    assert (ROOT / 'README.md').stat().st_size <= README_LIMIT_BYTES


@pytest.mark.parametrize('document', DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_reach_a_file_and_heading(document):
    text = document.read_text(encoding='utf-8')
    for target in LINK.findall(text):
        if re.match(r'[a-z]+:', target):
            continue  # https:, mailto:
        path, _, anchor = target.partition('#')
        linked = (document.parent / path).resolve() if path else document
        assert linked.exists(), '%s links to %s, which does not exist' % (document.name, target)
        if anchor:
            assert anchor in _anchors(linked.read_text(encoding='utf-8')), (document.name, target)


@pytest.mark.parametrize('document', DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_snippets_parse(document):
    for snippet in re.findall(r'```python\n(.*?)```', document.read_text(encoding='utf-8'), flags=re.S):
        ast.parse(snippet)
