"""A GGUF file's tokenizer and config, converted once and kept in their saved form.

transformers builds a GGUF file's tokenizer and config by parsing the file's metadata in Python
every time (SmolLM2's: 2.4 s and 1.2 s, through `huggingface._fast_gguf_reads`), while their saved
forms (tokenizer.json, tokenizer_config.json, config.json) load in 0.1 s and give the same objects:
the same token ids on the bundled texts and the same files when saved again. So the first load saves
them under the cache folder's `gguf/`, and later loads read them from there. Key: the folder
(resolved path; each file's name, size and modification time), the GGUF file, the loader class and
transformers' version. A saved form that cannot be loaded is converted anew; one that cannot be
written costs only the next load's time. At most `KEEP` conversions are kept, the least recently
used dropped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from xopt.cache import cache_dir, drop_least_recent
from xopt.capture.graph_cache import folder_files

logger = logging.getLogger(__name__)

FOLDER = "gguf"  # under the cache folder
KEEP = 8  # conversions kept (SmolLM2's tokenizer and config: 3.5 MB)


def load(auto, folder: Path, gguf_file: str):
    """`auto.from_pretrained(folder, gguf_file=gguf_file)` (a tokenizer or a config), through its
    saved form in the cache."""
    parts = (auto.__name__, str(folder.resolve()), gguf_file, folder_files(folder), metadata.version("transformers"))
    saved = cache_dir() / FOLDER / hashlib.sha256(repr(parts).encode()).hexdigest()[:32]
    if saved.is_dir():
        try:
            loaded = auto.from_pretrained(str(saved))
            os.utime(saved)  # recently used
            return loaded
        except Exception as error:  # a damaged conversion is made anew
            logger.debug("the converted %s in %s is not used: %s", gguf_file, saved, error)
    loaded = auto.from_pretrained(str(folder), gguf_file=gguf_file)
    _keep(loaded, saved)
    return loaded


def _keep(loaded, saved: Path) -> None:
    """Save `loaded` as the folder `saved`, whole or not at all."""
    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{saved.name}.", dir=saved.parent))
    except OSError as error:
        logger.debug("the GGUF conversion is not cached: %s", error)
        return
    from xopt.saving import replace_folder  # here: saving imports the capture package

    try:
        loaded.save_pretrained(staging)
        replace_folder(staging, saved)  # over a damaged one
        drop_least_recent((p for p in saved.parent.iterdir() if p.is_dir() and not p.name.startswith(".")), KEEP)
    except Exception as error:  # caching is best effort: the load itself succeeded
        logger.debug("the GGUF conversion is not cached: %s", error)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
