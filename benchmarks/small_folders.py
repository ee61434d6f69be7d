"""Small real folders from flower_photos, for measuring the shipped sweeps as a new user meets them (issue 27).

Builds, in a folder of your choosing (links to the photos, nothing copied):

- ``flowers60/``: the 5 classes, 60 photos each in ``train/`` and 20 in ``test/`` (tlsweep carves validation out of
  ``train/``: 9 photos per class);
- ``roses_tulips/``: a hard pair, cats-vs-dogs sized: 60 ``train/``, 30 ``validation/``, 30 ``test/`` per class.

Each class's files are sorted, then shuffled with a seed of their own, so the same command gives the same folders.
``python -m benchmarks.small_folders /tmp/sel`` prints the ``make`` commands that measure them
(benchmarks/results/2026-12-05-default-sweep.md).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flower_photos"
FOLDERS = {
    "flowers60": (("daisy", "dandelion", "roses", "sunflowers", "tulips"), {"train": 60, "test": 20}),
    "roses_tulips": (("roses", "tulips"), {"train": 60, "validation": 30, "test": 30}),
}


def build(source: Path, target: Path, classes: tuple[str, ...], counts: dict[str, int], seed: int = 0) -> Path:
    """``target/<split>/<class>/`` links to ``counts[split]`` photos of each class of ``source``, disjoint across
    splits."""
    for name in classes:
        files = sorted(p for p in (source / name).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        random.Random(f"{seed}-{name}").shuffle(files)
        start = 0
        for split, n in counts.items():
            folder = target / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for f in files[start:start + n]:
                (folder / f.name).symlink_to(f.resolve())
            start += n
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="an empty or new folder (e.g. /tmp/sel)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="flower_photos folder")
    parser.add_argument("--seed", type=int, default=0, help="another seed: other photos in each folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    for name, (classes, counts) in FOLDERS.items():
        if (out / name).exists():
            print(f"error: {out / name} exists; give another folder")
            return 2
        build(Path(args.data), out / name, classes, counts, args.seed)
    print(f"make train DATASET={out}/flowers60\n"
          f"make sweep DATASET={out}/flowers60 EXPERIMENT=flowers60\n"
          f"make sweep DATASET={out}/roses_tulips SWEEP=quick EXPERIMENT=roses_tulips_quick")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
