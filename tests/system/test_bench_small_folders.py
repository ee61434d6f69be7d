"""benchmarks/small_folders.py: the small real folders the shipped sweeps are measured on (issue 27)."""

from support import FLOWERS, needs_flowers

from benchmarks.small_folders import main

pytestmark = needs_flowers()


def test_the_folders_are_the_same_each_time_and_their_splits_disjoint(tmp_path, capsys):
    assert main([str(tmp_path / "a"), "--data", str(FLOWERS)]) == 0
    assert main([str(tmp_path / "b"), "--data", str(FLOWERS)]) == 0
    assert f"make sweep DATASET={tmp_path / 'a'}/roses_tulips SWEEP=quick" in capsys.readouterr().out

    def listing(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))

    assert listing(tmp_path / "a") == listing(tmp_path / "b")
    pair = tmp_path / "a" / "roses_tulips"
    names = {split: {p.name for p in (pair / split).rglob("*.jpg")} for split in ("train", "validation", "test")}
    assert [len(names[s]) for s in ("train", "validation", "test")] == [120, 60, 60]
    train, validation, test = names["train"], names["validation"], names["test"]
    assert not (train & validation or train & test or validation & test)
    assert len(list((tmp_path / "a" / "flowers60" / "test").rglob("*.jpg"))) == 100
    assert main([str(tmp_path / "a"), "--data", str(FLOWERS)]) == 2  # never writes into an earlier build
