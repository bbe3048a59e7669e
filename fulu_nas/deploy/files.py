"""The files of an exported model, checked against the SHA-256 recorded for each one.

A loader must use the bytes it checked: a folder can change between a check and a later read (a
file swapped, or a symbolic link pointed elsewhere). So :func:`checked_copy` reads each file once,
hashing it as it copies it into a private folder, and the model is loaded from that copy. Only
regular files at plain relative paths count: a symbolic link, a device or a name that leaves the
folder is refused, as is any file no checksum lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path, PurePosixPath

from ..errors import FuluConfigError

CHUNK = 1 << 20
SHA256 = re.compile(r"[0-9a-f]{64}")



def expected_digest(expected_sha256: object, option: str = "expected_sha256") -> str | None:
    """A fingerprint a user gave (``expected_sha256``, as the ``option`` they gave it with), in lower case;
    None for none. FuluConfigError for anything that is not 64 hex digits (an int, bytes, a truncated copy)."""
    if expected_sha256 is None:
        return None
    if not (isinstance(expected_sha256, str) and SHA256.fullmatch(expected_sha256.strip().lower())):
        raise FuluConfigError(f"{option}: {expected_sha256!r} is not a SHA-256 (64 hex digits: the "
                              "fingerprint fulu-nas export printed)")
    return expected_sha256.strip().lower()

def path_argument(value: object, name: str, otherwise: str) -> str:
    """``value`` (a str or an os.PathLike such as a Path) as a string; FuluConfigError for anything else,
    naming the argument ``name`` and saying the value is ``otherwise``."""
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str):  # bytes, a number, None
        raise FuluConfigError(f"{name}: {value!r} is {otherwise}")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_json(manifest: dict[str, str]) -> str:
    """A manifest (name -> SHA-256) written canonically, as recorded and as hashed."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"))


def manifest_digest(manifest: dict[str, str]) -> str:
    """The SHA-256 of a manifest's canonical text: one hash for a whole folder."""
    return hashlib.sha256(manifest_json(manifest).encode()).hexdigest()


def folder_entries(directory: Path, shown: Path | None = None) -> tuple[list[str], list[str]]:
    """The regular files under ``directory`` (relative POSIX names, sorted), and the problems: every
    symbolic link (followed by no one here, but by whatever reads the folder next) and every entry
    that is neither a regular file nor a folder. ``shown``: the folder as messages name it (a download's
    private folder is no name to give the user), by default ``directory``."""
    shown = directory if shown is None else shown
    files, problems = [], []
    for root, folders, names in os.walk(directory, followlinks=False):
        for name in sorted(folders + names):
            path = Path(root) / name
            mode = path.lstat().st_mode
            relative = path.relative_to(directory).as_posix()
            if stat.S_ISLNK(mode):
                problems.append(f"{shown / relative}: a symbolic link (an export holds regular files only)")
            elif stat.S_ISREG(mode):
                files.append(relative)
            elif not stat.S_ISDIR(mode):
                problems.append(f"{shown / relative}: not a regular file")
    return sorted(files), problems


def parse_manifest(text: str | bytes, source: str) -> dict[str, str]:
    """A manifest (JSON object: relative file name -> SHA-256), or FuluConfigError naming ``source``."""
    try:
        manifest = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise FuluConfigError(f"{source}: not valid JSON ({e})") from None
    except RecursionError:  # arrays or objects nested thousands deep: a manifest is one flat object
        raise FuluConfigError(f"{source}: not valid JSON here (nested too deeply for a list of files)") from None
    if not isinstance(manifest, dict):
        raise FuluConfigError(f"{source}: expected an object of file names and SHA-256 values")
    problems = []
    for name, digest in manifest.items():
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or "\\" in name or name in ("", "."):
            problems.append(f"{source}: {name!r} is not a file inside the folder")
        elif not (isinstance(digest, str) and SHA256.fullmatch(digest)):
            problems.append(f"{source}: {name}: {digest!r} is not a SHA-256")
    if problems:
        raise FuluConfigError(problems)
    return manifest


def checked_copy(directory: Path, manifest: dict[str, str], listed_in: str, ignore: tuple[str, ...] = (),
                 into: Path | None = None, shown: Path | None = None) -> list[str]:
    """Check that ``directory`` holds exactly the files of ``manifest`` (besides ``ignore``), each with
    its SHA-256, as regular files; copy each into ``into`` (a private folder) in the same read. The
    problems, one per file: missing, changed, added (not in ``listed_in``), a link or a special file,
    each named within ``shown`` (see :func:`folder_entries`)."""
    shown = directory if shown is None else shown
    files, problems = folder_entries(directory, shown)
    present = set(files)
    for name, expected in manifest.items():
        source = directory / name
        if name not in present:
            if not source.is_symlink():  # a link: folder_entries named it (or the linked folder it is in)
                problems.append(f"{shown / name}: missing")
            continue
        target = into / name if into is not None else None
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(source, "rb") as f, (open(target, "wb") if target is not None else open(os.devnull, "wb")) as out:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != expected:
            problems.append(f"{shown / name}: checksum mismatch (the file was modified after export)")
    for name in files:
        if name not in manifest and name not in ignore:
            problems.append(f"{shown / name}: not listed in {listed_in} (added after export, or exported by "
                            "an older fulu-nas: export again)")
    return problems
