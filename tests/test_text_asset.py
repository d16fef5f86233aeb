"""The unlabelled-text asset (Shakespeare/Milton): whole works per split, disjoint, stable."""
import pytest

from lorakit import assets
from lorakit.errors import AssetError


def _texts():
    try:
        return assets.load_text("shakespeare")
    except AssetError as e:
        pytest.skip(str(e))


def test_splits_are_disjoint_whole_works():
    t = _texts()
    assert len(t["validation"]) == 2 and len(t["test"]) == 3 and len(t["train"]) >= 40
    seen = [d[:2000] for split in t.values() for d in split]
    assert len(seen) == len(set(seen)), "a work appears twice"
    assert all("\r" not in d for d in t["test"])
    assert "Hamlet" in t["test"][0][:200] or "HAMLET" in t["test"][0][:200]


def test_unknown_corpus_is_named():
    with pytest.raises(AssetError, match="unknown text corpus 'nope'"):
        assets.load_text("nope")
