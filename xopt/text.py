"""Text for calibration and evaluation.

Defaults are bundled and disjoint: calibration reads the opening of *Emma*, evaluation the
opening of *Persuasion*. Any UTF-8 text file can replace either; giving the same file for both
is refused, since a quality figure measured on calibration text flatters the lossy pass: every
calibration text a pass reads is noted (`calibration_texts_read`), `PassManager` records their
SHA-256 digests in the output's metadata, and `xopt eval` refuses to measure on any of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator
from contextvars import ContextVar
from importlib import resources
from pathlib import Path

from xopt.errors import XoptError

# Metadata key holding the SHA-256 digests (space-separated) of the texts a model was calibrated on.
CALIBRATION_DIGEST_KEY = "xopt.calibration_sha256"
_TEXTS_READ: ContextVar[set[str] | None] = ContextVar("xopt_calibration_texts_read", default=None)
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
        raise XoptError(f"{path}: is a folder; give a text file ({kind})")
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
    """SHA-256 of the text with its whitespace collapsed: a copy re-wrapped, indented or given a
    trailing newline is the same text."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


@contextlib.contextmanager
def calibration_texts_read() -> Iterator[set[str]]:
    """The digests of the calibration texts read (`note_calibration_text`) inside the block."""
    digests: set[str] = set()
    token = _TEXTS_READ.set(digests)
    try:
        yield digests
    finally:
        _TEXTS_READ.reset(token)


def note_calibration_text(text: str) -> None:
    """Called by whatever feeds calibration text to a model."""
    digests = _TEXTS_READ.get()
    if digests is not None:
        digests.add(text_digest(text))


def record_calibration_texts(metadata: dict[str, str], digests: set[str]) -> None:
    """Add `digests` to those a model's metadata records (space-separated, sorted)."""
    recorded = set(metadata.get(CALIBRATION_DIGEST_KEY, "").split())
    metadata[CALIBRATION_DIGEST_KEY] = " ".join(sorted(recorded | digests))


def calibrated_on(metadata: dict[str, str], text: str) -> bool:
    """Whether a model's metadata records `text` among its calibration texts."""
    return text_digest(text) in metadata.get(CALIBRATION_DIGEST_KEY, "").split()


def split_sentences(text: str, min_words: int = 4) -> list[str]:
    """Sentences of at least `min_words` words, whitespace collapsed (a period, ! or ? ends one)."""
    flat = " ".join(text.split())
    return [s.strip() for s in _SENTENCE_END.split(flat) if len(s.split()) >= min_words]
