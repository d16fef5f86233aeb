"""Issue 16 item 11: ``lorakit export --out`` never overwrites or mixes with its source, and writes atomically."""
import hashlib

import pytest

from helpers import load_base, make_adapter, make_base
from lorakit.errors import ConfigError
from lorakit.serve import export as ex


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("expout")
    base = load_base(make_base(d / "base"))
    src = make_adapter(base, d / "src", "lora", r=2, seed=1)
    return d, base, src


def _digest(d):
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["vllm", "gguf"])
@pytest.mark.parametrize("where", ["same", "same-trailing", "inside", "inside-deep", "parent", "dotdot"])
def test_out_overlapping_the_source_is_refused(env, fmt, where):
    d, base, src = env
    out = {"same": src, "same-trailing": f"{src}/", "inside": src / "exp", "inside-deep": src / "a" / "b.gguf",
           "parent": src.parent, "dotdot": src / ".." / src.name}[where]
    before = _digest(src)
    with pytest.raises(ConfigError, match="overlaps"):
        ex.export_adapter(src, out, fmt, model=base)
    assert _digest(src) == before
    assert ex.export_main([str(src), "--format", fmt, "--base", str(d / "base"), "--out", str(out)]) == 2
    assert _digest(src) == before


def test_out_is_replaced_atomically(env, monkeypatch):
    d, base, src = env
    out = ex.export_adapter(src, d / "out", "vllm", model=base)
    good = _digest(out)
    import lorakit.formats.peft_lora as pl

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pl, "write_lora", broken)
    with pytest.raises(OSError):
        ex.export_adapter(src, d / "out", "vllm", model=base)
    assert _digest(out) == good  # the previous export is intact
    assert [p.name for p in d.iterdir() if p.name.startswith(".out")] == []  # no temporaries left
    monkeypatch.undo()
    ex.export_adapter(src, d / "out", "vllm", model=base)  # an existing export is replaced
    assert _digest(out) == good


def test_gguf_out_must_be_a_file(env):
    d, base, src = env
    (d / "adir").mkdir()
    with pytest.raises(ConfigError, match="directory"):
        ex.export_adapter(src, d / "adir", "gguf", model=base)
