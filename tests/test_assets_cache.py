"""The process-wide model cache: a trainer's uncached load after a cached one returns (the cache lock is not
reentrant: a regression hung every run that loaded the same model twice in one process)."""
import threading

from lorakit import assets
from train.conftest import tiny_lm_dir  # noqa: F401


def test_uncached_load_after_a_cached_one_returns(tiny_lm_dir):
    out = {}

    def run():
        a, _ = assets.load_causal_lm(str(tiny_lm_dir))
        b, _ = assets.load_causal_lm(str(tiny_lm_dir), cache=False)
        out["ok"] = a is not b and type(a) is type(b)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "load_causal_lm(cache=False) deadlocked on the cache lock"
    assert out.get("ok")
