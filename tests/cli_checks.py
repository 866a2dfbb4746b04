"""What every command-line test checks of a refusal: one paragraph on stderr, named by its command, no traceback."""
from __future__ import annotations

import hashlib
from pathlib import Path


def one_paragraph(capsys, command: str) -> str:
    """stderr of a refused ``twins-timm COMMAND`` as one line of text (lines break at spaces only, so a long path
    may start the second line), after checking it is one paragraph and no traceback."""
    err = capsys.readouterr().err
    text = ' '.join(err.split())
    assert 'Traceback' not in err and text.startswith('twins-timm %s: error: ' % command), err
    assert '\n\n' not in err.strip(), err
    return text


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
