"""Text for calibration and evaluation.

Defaults are bundled and disjoint: calibration reads the opening of *Emma*, evaluation the
opening of *Persuasion*. Any UTF-8 text file can replace either; evaluating on calibration text is
refused, since a quality figure measured there flatters the lossy pass. Every calibration text a
pass reads is noted (`calibration_texts_read`), and `PassManager` records in the output's metadata
the text's SHA-256 digest and the passage fingerprints of the part fed to the model: the hashes of
its 13-word runs (whitespace collapsed) whose 64-bit BLAKE2 hash is 0 modulo 8, about one run in
eight, chosen by content and not by position, so a copy, a part or a superset of the text shares
the fingerprints of the words it shares. `xopt eval` refuses a text with the digest, or one sharing
at least 4 fingerprints (on average a passage of ~45 words in common; no two of the four Austen
novels in the shared data share one).
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

# Metadata keys holding the SHA-256 digests (space-separated) of the texts a model was calibrated
# on, and their passage fingerprints (space-separated hex).
CALIBRATION_DIGEST_KEY = "xopt.calibration_sha256"
CALIBRATION_FINGERPRINT_KEY = "xopt.calibration_passages"
PASSAGE_WORDS = 13
PASSAGE_SAMPLING = 8  # one 13-word run in this many, by hash
MIN_SHARED_PASSAGES = 4  # fingerprints in common that make a text calibration text
_TEXTS_READ: ContextVar[set[tuple[str, str]] | None] = ContextVar("xopt_calibration_texts_read", default=None)
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


def passage_fingerprints(text: str) -> set[str]:
    """The hashes (16 hex digits) of the text's 13-word runs that are 0 modulo `PASSAGE_SAMPLING`."""
    words = text.split()
    runs = (" ".join(words[i : i + PASSAGE_WORDS]) for i in range(len(words) - PASSAGE_WORDS + 1))
    hashes = (hashlib.blake2b(run.encode(), digest_size=8).hexdigest() for run in runs)
    return {h for h in hashes if int(h, 16) % PASSAGE_SAMPLING == 0}


@contextlib.contextmanager
def calibration_texts_read() -> Iterator[set[tuple[str, str]]]:
    """The calibration texts read (`note_calibration_text`) inside the block: (digest, part read)."""
    texts: set[tuple[str, str]] = set()
    token = _TEXTS_READ.set(texts)
    try:
        yield texts
    finally:
        _TEXTS_READ.reset(token)


def note_calibration_text(text: str, read: str) -> None:
    """Called by whatever feeds calibration text to a model: the text, and the part of it `read`
    (the fingerprints cover only that part, so a long corpus adds no more metadata than it fed)."""
    texts = _TEXTS_READ.get()
    if texts is not None:
        texts.add((text_digest(text), read))


def record_calibration_texts(metadata: dict[str, str], texts: set[tuple[str, str]]) -> None:
    """Add the digests and the read parts' passage fingerprints of the noted `texts` to those a
    model's metadata records."""
    for key, found in (
        (CALIBRATION_DIGEST_KEY, {digest for digest, _ in texts}),
        (CALIBRATION_FINGERPRINT_KEY, set().union(*(passage_fingerprints(read) for _, read in texts))),
    ):
        recorded = set(metadata.get(key, "").split())
        if recorded | found:
            metadata[key] = " ".join(sorted(recorded | found))


def calibration_overlap(metadata: dict[str, str], text: str) -> str | None:
    """Why `text` counts as calibration text of the model with this metadata, or None: the same
    text, or at least `MIN_SHARED_PASSAGES` passage fingerprints in common."""
    if text_digest(text) in metadata.get(CALIBRATION_DIGEST_KEY, "").split():
        return "was calibrated on this text"
    recorded = set(metadata.get(CALIBRATION_FINGERPRINT_KEY, "").split())
    if not recorded:  # a model calibrated on nothing: no need to hash a whole book
        return None
    own = passage_fingerprints(text)
    shared = own & recorded
    if len(shared) >= MIN_SHARED_PASSAGES:
        runs = f"{len(shared)} of its {len(own)} sampled {PASSAGE_WORDS}-word runs"
        return f"was calibrated on text sharing passages with this one ({runs})"
    return None


def split_sentences(text: str, min_words: int = 4) -> list[str]:
    """Sentences of at least `min_words` words, whitespace collapsed (a period, ! or ? ends one)."""
    flat = " ".join(text.split())
    return [s.strip() for s in _SENTENCE_END.split(flat) if len(s.split()) >= min_words]
