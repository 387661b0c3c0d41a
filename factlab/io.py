"""Atomic, deterministic file writing.

Every file factlab writes goes through here so that (1) nothing half-written is ever left
behind (write to a temp file in the same folder, fsync, rename) and (2) the same content
always gives the same bytes (sorted-free fixed key order, no timestamps, ``\\n`` endings).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from factlab.errors import FactlabError


def dumps(record) -> str:
    """One JSON line: compact, UTF-8 kept as is, key order as given (deterministic)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# JSON string literal of a str, exactly as json.dumps(..., ensure_ascii=False) writes it
# (the C implementation); used by the fast line encoders of documents and QA.
jstr = json.encoder.encode_basestring


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write records (dicts) as JSON lines atomically; returns the number of lines."""
    return write_lines(path, map(dumps, records))


def write_lines(path: str | Path, lines: Iterable[str]) -> int:
    """Write already-encoded JSON lines atomically; returns the number of lines."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            buf = []
            for line in lines:
                buf.append(line)
                n += 1
                if len(buf) >= 8192:
                    f.write("\n".join(buf) + "\n")
                    buf.clear()
            if buf:
                f.write("\n".join(buf) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FactlabError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return out


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_dir(out: str | Path, *, force: bool = False):
    """Build a directory in a temp sibling and move it into place only on success.

    An existing ``out`` is an error unless ``force``; with ``force`` it is replaced only
    after the new one is complete, so an interrupted write never destroys the old one.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FactlabError(f"{out} already exists (use --force to overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
