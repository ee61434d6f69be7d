"""What a data folder holds, read without TensorFlow: its layout, its image files, and why the other files are skipped.

Only regular files (or links to them) are ever opened: a FIFO named ``pipe.jpg`` would block the open for good.
Every entry that is not read is skipped and named by ``skip_reason``, in ``train``, a sweep and ``predict`` alike.
The checks a command runs before any work (``check_split``, ``check_seed``, ``split_folders``) live here too.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import warnings
from collections import defaultdict
from pathlib import Path

from pipeline.errors import DataError, UserError, typed
from pipeline.hparams import SEED_MAX  # numpy's (np.random.seed, Keras' set_random_seed) largest seed

# Read by content, not by name: TensorFlow decodes JPEG, PNG, GIF, BMP and WebP; Pillow decodes TIFF.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
SUPPORTED = ", ".join(IMAGE_EXTENSIONS)
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "val": "validation",
               "valid": "validation", "test": "test", "testing": "test"}  # folder name, any case -> split
LAYOUTS = ("<folder>/<class>/<images>, or <folder>/train/<class>/<images> beside val/ (or valid/, validation/) "
           "and/or test/ (any case; training/ and testing/ too)")
SKIPPED_SHOWN = 10  # skipped files named on screen; the rest are counted


class DataWarning(UserWarning):
    """Something about the data the user should know (a class a split cannot measure, copies across splits); shown
    as one line, ``warning: <message>``, not as Python's file:line and source line."""


def _one_line(format_warning):
    def formatted(message, category, filename, lineno, line=None):  # noqa: ANN001, ANN202 - warnings' signature
        if issubclass(category, DataWarning):
            return f"warning: {message}\n"
        return format_warning(message, category, filename, lineno, line)

    formatted.data_warnings = True
    return formatted


if not getattr(warnings.formatwarning, "data_warnings", False):
    warnings.formatwarning = _one_line(warnings.formatwarning)
# Pillow's own warnings about a file ("Corrupt EXIF data") name no file, like libjpeg's lines: a file that does not
# decode is named in the skipped lines instead, and one whose EXIF is corrupt is read as stored.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


def skip_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not read as an image (a short phrase), or None for a file of a supported format. Looks at
    the entry's type and its first bytes; opens nothing but a regular file, and that without blocking."""
    path = Path(path)
    try:
        info = os.stat(path)  # follows a link: a link to a regular file is read like the file
    except FileNotFoundError:
        return f"a symlink to {os.readlink(path)}, which does not exist" if path.is_symlink() else "no longer exists"
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    if stat.S_ISDIR(info.st_mode):
        if path.is_symlink():
            return "a link to a folder (links to folders are not followed)"
        return "a folder named like an image file" if os.access(path, os.R_OK | os.X_OK) else \
            "a folder that cannot be read: Permission denied"
    if not stat.S_ISREG(info.st_mode):
        return f"{_kind(info.st_mode)}, not a regular file"
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        return f"unsupported format ({ext or 'no extension'})"
    if info.st_size == 0:
        return "an empty file"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the stat above
            return "not a regular file"
        head = os.read(fd, 16)
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    finally:
        os.close(fd)
    kind = sniff(head)
    if kind is None:
        return "not a readable image"
    if kind not in ("JPEG", "PNG", "GIF", "BMP", "WebP", "TIFF"):
        return f"unsupported format ({kind} content in a {ext} file)"
    return None


def sniff(head: bytes) -> str | None:
    """The image format of a file from its first 16 bytes, or None when it is none we know."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WebP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIC"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")):
        return "JPEG XL"
    if head.startswith(b"\x00\x00\x00\x0cjP  "):
        return "JPEG 2000"
    return None


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "a special file"


def walk(folder: Path) -> tuple[list[Path], list[Path]]:
    """The image files under ``folder`` (its subfolders too) and the entries skipped, each sorted. Hidden names
    (``.DS_Store``, ``.thumbnails/``) are passed over; links to folders and folders named like images are skipped,
    not entered; a subfolder that cannot be listed is skipped."""
    images: list[Path] = []
    skipped: list[Path] = []
    for base, dirs, names in os.walk(folder, onerror=lambda e: skipped.append(Path(e.filename))):
        entered = []
        for name in dirs:
            path = Path(base) / name
            if name.startswith("."):
                continue
            if path.is_symlink() or Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                skipped.append(path)
            else:
                entered.append(name)
        dirs[:] = entered
        for name in names:
            if not name.startswith("."):
                path = Path(base) / name
                (images if skip_reason(path) is None else skipped).append(path)
    return sorted(images), sorted(skipped)


def skipped_lines(skipped_files: list[str], limit: int = SKIPPED_SHOWN) -> list[str]:
    """The skipped files named on screen with why, ``limit`` of them, then how many more. A file that passed these
    checks but did not decode is ``not a readable image``. libjpeg's own messages (``Improper call to JPEG library in
    state 201``) name no file; they are held back while images decode (``pipeline.tfstart.quiet_decoders``)."""
    if not skipped_files:
        return []
    lines = [f"{len(skipped_files)} file(s) skipped (images read: {SUPPORTED}):"]
    lines += [f"  skipped ({skip_reason(path) or 'not a readable image'}): {path}" for path in skipped_files[:limit]]
    if len(skipped_files) > limit:
        lines.append(f"  ... and {len(skipped_files) - limit} more skipped files (all counted in skipped_files)")
    return lines


def orientation(path: str | os.PathLike) -> int:
    """The EXIF Orientation (1..8) of a JPEG, PNG or WebP file, 1 when it has none: the photo is turned to be read as
    displayed. About 0.1 ms a photo (Pillow reads the header only). TIFF: Pillow turns it while decoding."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if "exif" not in image.info:  # PNG: an eXIf chunk after the pixels is not read (it would decode them)
                return 1
            value = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a file Pillow cannot read is decoded (or refused) by TensorFlow
        return 1
    return value if value in range(1, 9) else 1


# --- layouts ---------------------------------------------------------------------------------------


def subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def split_folders(root: Path) -> dict[str, Path] | None:
    """``{"train": ..., "validation": ..., "test": ...}`` (validation or test may be absent) for a folder of split
    folders, None for a folder of class folders. Split folders are named ``train/``, ``val/``, ``valid/``,
    ``validation/``, ``test/`` in any case (``training/``, ``testing/`` too) and hold class folders. A folder beside
    them that is not a split would be ignored: it is refused, like two folders for one split."""
    dirs = subfolders(root)
    roles: dict[str, list[Path]] = defaultdict(list)
    for d in dirs:
        if d.name.lower() in SPLIT_NAMES:
            roles[SPLIT_NAMES[d.name.lower()]].append(d)
    holding = {role for role, ds in roles.items() if any(subfolders(d) for d in ds)}  # split folders of class folders
    others = [d for d in dirs if d.name.lower() not in SPLIT_NAMES]
    if not holding or (holding == {"train"} and others):  # classes, one of them perhaps named train
        return None
    for role, ds in roles.items():
        if len(ds) > 1:
            raise DataError(f"folder {root} has {' and '.join(f'{d.name}/' for d in ds)}, both the {role} split; "
                            f"keep one (merge the other into it). Layouts accepted: {LAYOUTS}")
    names = ", ".join(f"{roles[role][0].name}/" for role in ("train", "validation", "test") if role in roles)
    if "train" not in roles:
        raise DataError(f"folder {root} has {names} but no train/ folder; add train/<class>/<images> beside it, "
                        f"or pass a folder of class folders. Layouts accepted: {LAYOUTS}")
    if len(roles) == 1:
        train = roles["train"][0]
        raise DataError(f"folder {root} has {train.name}/ and no validation or test folder beside it; pass {train} "
                        f"itself (split by {typed('--split', 'SPLIT=')}), or add val/ or test/ beside it. Layouts accepted: {LAYOUTS}")
    if others:
        raise DataError(
            f"folder {root} has split folders ({names}) and also {', '.join(f'{d.name}/' for d in others)}, which "
            f"{'is' if len(others) == 1 else 'are'} not a split and would be ignored; move class folders into "
            f"{roles['train'][0].name}/ (and the validation and test folders), or move {others[0].name}/ out. "
            f"Layouts accepted: {LAYOUTS}")
    return {role: ds[0] for role, ds in roles.items()}


# --- settings checked before any work ----------------------------------------------------------------


def check_split(spec: str) -> tuple[float, float, float]:
    """A folder's ``SPLIT=``: three train/validation/test percentages above zero that add up to 100."""
    parts = spec.split("/")
    expected = (f"split {spec!r} for a folder must be three train/validation/test percentages above zero that add "
                "up to 100, such as 75/15/10")
    if len(parts) != 3:
        raise DataError(f"{expected}; it has {len(parts)} part(s)")
    if any(not p.strip() for p in parts):
        raise DataError(f"{expected}; a part is empty")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        bad = next(p for p in parts if not _is_number(p))
        raise DataError(f"{expected}; {bad.strip()!r} is not a number") from None
    for name, value in zip(("train", "validation", "test"), values):
        if not math.isfinite(value):
            raise DataError(f"{expected}; the {name} share {value} is not a finite number")
        if value <= 0:
            raise DataError(f"{expected}; the {name} share is {value:g}")
    if abs(sum(values) - 100) > 1e-6:
        raise DataError(f"{expected}; they add up to {sum(values):g}")
    return values  # type: ignore[return-value]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_seed(seed: object) -> int:
    """A seed numpy, TensorFlow, Keras and Keras Tuner all take: a whole number from 0 to 2**32 - 1. The CLIs check
    their flags and sweep files against the same bound (``pipeline.hparams.Seed``); this is the check of
    ``check_dataset`` and ``load_data`` called from Python (a seed out of range fails inside ``np.random.seed``)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise UserError(f"seed must be a whole number from 0 to {SEED_MAX} (2**32 - 1, the largest numpy takes), "
                        f"got {seed!r}")
    return seed


# --- leaks -------------------------------------------------------------------------------------------------


def copies_of_train(files: dict[str, list[tuple[Path, int]]]) -> dict[str, list[tuple[Path, Path]]]:
    """Per validation and test split: ``(its file, a train file with the same bytes)``. Only files of equal size are
    hashed (on flower_photos a few dozen of 3,670)."""
    by_size: dict[int, list[tuple[str, Path]]] = defaultdict(list)
    for split, items in files.items():
        for path, _ in items:
            by_size[path.stat().st_size].append((split, path))
    by_content: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for group in by_size.values():
        if len({split for split, _ in group}) > 1:
            for split, path in group:
                by_content[hashlib.sha256(path.read_bytes()).hexdigest()].append((split, path))
    copies: dict[str, list[tuple[Path, Path]]] = {}
    for group in by_content.values():
        train = [path for split, path in group if split == "train"]
        for split, path in group:
            if train and split != "train":
                copies.setdefault(split, []).append((path, train[0]))
    return {split: sorted(pairs) for split, pairs in sorted(copies.items(), key=lambda kv: kv[0] != "test")}


def copies_line(copies: dict[str, list[tuple[Path, Path]]], root: Path) -> str | None:
    """One line on images of the evaluation splits that are byte-identical to train images, or None."""
    if not copies:
        return None
    counts = " and ".join(f"{len(pairs)} {split} image(s)" for split, pairs in copies.items())
    path, twin = next(iter(copies.values()))[0]
    return (f"{counts} of {root} are byte-identical copies of train images (e.g. {path.relative_to(root)} = "
            f"{twin.relative_to(root)}): they are scored on images the model trained on, so their accuracy reads "
            "higher than on new photos; delete one file of each pair to measure it")
