"""Text for calibration and evaluation.

Defaults are bundled and disjoint: calibration reads the opening of *Emma*, evaluation the
opening of *Persuasion*. Any UTF-8 text file can replace either; giving the same file for both
is refused, since a quality figure measured on calibration text flatters the lossy pass.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from pathlib import Path

from xopt.errors import XoptError

# Metadata key under which `xopt optimize --calibration` records the SHA-256 of its text.
CALIBRATION_DIGEST_KEY = "xopt.calibration_sha256"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


def bundled_text(kind: str) -> Path:
    """The bundled `calibration` or `evaluation` text file."""
    if kind not in ("calibration", "evaluation"):
        raise ValueError(f"no bundled {kind!r} text")
    return Path(str(resources.files("xopt.data").joinpath(f"{kind}.txt")))


def read_text(path: Path | None, kind: str) -> str:
    """The text of `path`, or of the bundled `kind` text when `path` is None."""
    path = path or bundled_text(kind)
    if path.is_dir():
        raise XoptError(f"{path}: is a folder; give a {kind} text file")
    if not path.is_file():
        raise XoptError(f"{path}: no such {kind} text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise XoptError(f"{path}: not UTF-8 text") from None
    if not text.strip():
        raise XoptError(f"{path}: the {kind} text is empty")
    return text


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def split_sentences(text: str, min_words: int = 4) -> list[str]:
    """Sentences of at least `min_words` words, whitespace collapsed (a period, ! or ? ends one)."""
    flat = " ".join(text.split())
    return [s.strip() for s in _SENTENCE_END.split(flat) if len(s.split()) >= min_words]
