"""The server under hostile input (issue 16), against a real server over loopback (127.0.0.1 only).

Every failure is a 4xx (or a 5xx that says what failed) with a JSON message and no raw exception text; files are
confined to the adapter directory (symlinks resolved); concurrent loads of one name cannot both win; unload means
unloaded; /metrics needs the key; nonsensical limits are refused at startup.
"""
import copy
import json
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import http_server, load_base, make_adapter, make_base
from lorakit.errors import ConfigError
from lorakit.serve.engine import Engine
from lorakit.serve.server import create_app

httpx = pytest.importorskip("httpx")

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
SECRET = "OUTSIDE-SECRET-CONTENT"
# what a leaked Python exception looks like in a message
RAW = re.compile(r"Traceback|\b\w+(Error|Exception)\(|ZeroDivision|division by zero|RecursionError|KeyError|"
                 r"TypeError|AttributeError|IndexError|maximum recursion|object is not|positional argument|"
                 r"unexpected keyword|File \"")
PROMPT = [5, 6, 7, 8, 9]


def _crafted(src: Path, dst: Path, conf=None, tensors=None, raw_config: bytes | None = None,
             raw_weights: bytes | None = None, drop=()):
    """A copy of adapter ``src`` at ``dst`` with its config/tensors edited (functions) or replaced (raw bytes)."""
    shutil.copytree(src, dst)
    if conf is not None:
        c = json.loads((dst / "adapter_config.json").read_text())
        res = conf(c)
        c = res if isinstance(res, dict) else c
        (dst / "adapter_config.json").write_text(json.dumps(c))
    if raw_config is not None:
        (dst / "adapter_config.json").write_bytes(raw_config)
    if tensors is not None:
        t = load_file(str(dst / "adapter_model.safetensors"))
        res = tensors(t)
        t = res if isinstance(res, dict) else t
        save_file(t, str(dst / "adapter_model.safetensors"))
    if raw_weights is not None:
        (dst / "adapter_model.safetensors").write_bytes(raw_weights)
    for f in drop:
        (dst / f).unlink()
    return dst


def _peft_only(c):
    c.pop("lorakit")


def _first(t, fn):
    k = next(k for k in sorted(t) if k.endswith("lora_A.weight"))
    t[k] = fn(t[k])


BAD_ADAPTERS = {  # name -> (how it is crafted, a word the message must contain)
    "r0_peft": (dict(conf=lambda c: (_peft_only(c), c.update(r=0))), "r"),
    "alpha_str": (dict(conf=lambda c: (_peft_only(c), c.update(lora_alpha="big"))), "alpha"),
    "alpha_nan": (dict(raw_config=b'{"peft_type": "LORA", "r": 2, "lora_alpha": NaN, "target_modules": ["q_proj"]}'),
                  "adapter"),
    "r0_lorakit": (dict(conf=lambda c: c["lorakit"]["config"].update(r=0)), "adapter"),
    "rneg_lorakit": (dict(conf=lambda c: c["lorakit"]["config"].update(r=-3)), "adapter"),
    "method_unknown": (dict(conf=lambda c: c["lorakit"]["config"].update(method="no-such-method")), "no-such-method"),
    "config_not_dict": (dict(conf=lambda c: c["lorakit"].update(config=5)), "adapter_config.json"),
    "method_int": (dict(conf=lambda c: c["lorakit"]["config"].update(method=5)), "adapter_config.json"),
    "r_mismatch": (dict(conf=lambda c: c["lorakit"]["config"].update(r=3)), "rank"),
    "method_other": (dict(conf=lambda c: c["lorakit"]["config"].update(method="vera")), "vera adapter"),
    "method_pissa_r0": (dict(conf=lambda c: c["lorakit"]["config"].update(method="pissa", r=0)), "adapter"),
    "r_float": (dict(conf=lambda c: c["lorakit"]["config"].update(r=2.5)), "adapter"),
    "paths_int": (dict(conf=lambda c: c["lorakit"].update(paths=7)), "adapter_config.json"),
    "rank_pattern_int": (dict(conf=lambda c: (_peft_only(c), c.update(rank_pattern=5))), "rank_pattern"),
    "alpha_pattern_nan": (dict(raw_config=b'{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": '
                                          b'["q_proj"], "alpha_pattern": {"q_proj": -Infinity}}'), "adapter"),
    "nested_config": (dict(raw_config=b'{"peft_type": "LORA", "r": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
                      "nested"),
    "bigint_config": (dict(raw_config=b'{"peft_type": "LORA", "r": ' + b"9" * 5000 + b"}"), "too long"),
    "config_list": (dict(raw_config=b"[1, 2, 3]"), "peft_type"),
    "config_binary": (dict(raw_config=b"\xff\xfe\x00garbage"), "UTF-8"),
    "peft_type_unknown": (dict(conf=lambda c: (_peft_only(c), c.update(peft_type="FOO"))), "FOO"),
    "nan_weights": (dict(tensors=lambda t: _first(t, lambda a: torch.full_like(a, float("nan")))), "non-finite"),
    "inf_weights": (dict(tensors=lambda t: _first(t, lambda a: torch.full_like(a, float("inf")))), "non-finite"),
    "wrong_shape": (dict(tensors=lambda t: _first(t, lambda a: torch.zeros(a.shape[0], a.shape[1] + 3))), "shape"),
    "rank0": (dict(tensors=lambda t: {k: (v[:0] if k.endswith("lora_A.weight") else v[:, :0]) for k, v in t.items()}),
              "adapter"),
    "int_weights": (dict(tensors=lambda t: _first(t, lambda a: a.to(torch.int32))), "floating"),
    "extra_key": (dict(tensors=lambda t: t.update({"base_model.model.nowhere.lora_A.weight": torch.zeros(2, 2)})),
                  "nowhere"),
    "garbage_weights": (dict(raw_weights=b"\x00" * 64), "safetensors"),
    "no_weights": (dict(drop=("adapter_model.safetensors",)), "adapter_model.safetensors"),
}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("hard")
    base_dir = make_base(d / "base")
    base = load_base(base_dir)
    ad = d / "adapters"
    good = make_adapter(base, ad / "lo4", "lora", r=4, seed=1)
    make_adapter(base, ad / "lo2", "lora", r=2, seed=2)
    make_adapter(base, ad / "pA", "lora", r=2, seed=11, scale=0.6)
    make_adapter(base, ad / "pB", "lora", r=3, seed=12, scale=0.6)
    # outside the adapter directory, reachable only through symlinks
    out = d / "outside"
    make_adapter(base, out / "ext", "lora", r=2, seed=5)
    (out / "secret.json").write_text(SECRET + "{")
    shutil.copy(out / "ext" / "adapter_config.json", out / "valid_config.json")
    (ad / "linkdir").symlink_to(out / "ext", target_is_directory=True)
    _crafted(good, ad / "linkcfg", drop=("adapter_config.json",))
    (ad / "linkcfg" / "adapter_config.json").symlink_to(out / "secret.json")
    _crafted(good, ad / "linkcfg_valid", drop=("adapter_config.json",))
    (ad / "linkcfg_valid" / "adapter_config.json").symlink_to(out / "valid_config.json")
    _crafted(good, ad / "linkw", drop=("adapter_model.safetensors",))
    (ad / "linkw" / "adapter_model.safetensors").symlink_to(out / "ext" / "adapter_model.safetensors")
    (ad / "loop").mkdir()
    (ad / "loop" / "adapter_config.json").symlink_to(ad / "loop" / "adapter_config.json")
    for name, (how, _) in BAD_ADAPTERS.items():
        _crafted(good, ad / f"bad_{name}", **how)
    eng = Engine(copy.deepcopy(base), AutoTokenizer.from_pretrained(base_dir), ad, max_loras=2, max_batch=8,
                 base_name="tiny", max_new_tokens=32).start()
    try:
        with http_server(create_app(eng, api_key=KEY, max_body_bytes=256 * 1024)) as url:
            with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
                yield c, ad, out, eng
    finally:
        eng.stop()


def _complete(c, model, **kw):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "ignore_eos": True, **kw}
    return c.post("/v1/completions", json=body)


def _text(c, model) -> str:
    r = _complete(c, model)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _assert_clean_error(r, lo=400, hi=499, word=None):
    assert lo <= r.status_code <= hi, (r.status_code, r.text)
    err = r.json()["error"]
    msg = err["message"]
    assert isinstance(msg, str) and len(msg) > 10, r.text
    assert not RAW.search(msg), f"raw exception text leaked: {msg}"
    assert SECRET not in r.text
    if word is not None:
        assert word.lower() in msg.lower(), msg
    return msg


# --- item 5: bad adapter files, through `model` and through load_lora_adapter ---------------------------------------
@pytest.mark.parametrize("name", sorted(BAD_ADAPTERS))
def test_bad_adapter_files_are_clear_4xx(srv, name):
    c, ad, out, eng = srv
    word = BAD_ADAPTERS[name][1]
    msg = _assert_clean_error(_complete(c, f"bad_{name}"), word=word)
    if os.environ.get("LORAKIT_SHOW_MESSAGES"):
        print(f"\n{name}: {msg}")
    _assert_clean_error(c.post("/v1/load_lora_adapter", json={"lora_name": f"x_{name}",
                                                              "lora_path": str(ad / f"bad_{name}")}), word=word)
    assert f"x_{name}" not in {m["id"] for m in c.get("/v1/models").json()["data"]}


# --- item 5: hostile requests ---------------------------------------------------------------------------------------
def _nested(n):
    return b'{"model": "lo4", "prompt": ' + b"[" * n + b"]" * n + b"}"


HOSTILE = [  # (id, method, path, json body or raw bytes, lowest status, highest status)
    ("path_nul", "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": "lo4\x00x"}, 400, 400),
    ("path_5000", "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": "a" * 5000}, 400, 400),
    ("path_5000_parts", "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": "/".join(["b" * 250] * 20)}, 400, 404),
    ("path_newline", "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": "lo4\n"}, 400, 400),
    ("path_outside_abs", "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": "/etc"}, 400, 400),
    ("path_traversal", "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": "../outside/ext"}, 400, 400),
    ("path_missing", "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": "nope"}, 404, 404),
    ("path_is_file", "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": "lo4/adapter_config.json"}, 404, 404),
    ("path_list", "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": ["lo4"]}, 400, 400),
    ("name_traversal", "/v1/load_lora_adapter", {"lora_name": "../x", "lora_path": "lo4"}, 400, 400),
    ("name_long", "/v1/load_lora_adapter", {"lora_name": "n" * 5000, "lora_path": "lo4"}, 400, 400),
    ("name_base", "/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": "lo4"}, 400, 400),
    ("name_int", "/v1/load_lora_adapter", {"lora_name": 3}, 400, 400),
    ("unload_missing", "/v1/unload_lora_adapter", {"lora_name": "never-loaded"}, 404, 404),
    ("unload_int", "/v1/unload_lora_adapter", {"lora_name": [1]}, 400, 400),
    ("seed_2_70", "/v1/completions", {"model": "lo4", "prompt": "a", "seed": 2**70, "temperature": 0.5}, 400, 400),
    ("seed_neg_2_70", "/v1/completions", {"model": "lo4", "prompt": "a", "seed": -(2**70)}, 400, 400),
    ("seed_str", "/v1/completions", {"model": "lo4", "prompt": "a", "seed": "1"}, 400, 400),
    ("max_tokens_2_70", "/v1/completions", {"prompt": "a", "max_tokens": 2**70}, 400, 400),
    ("max_tokens_0", "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, 400),
    ("temperature_neg", "/v1/completions", {"prompt": "a", "temperature": -1}, 400, 400),
    ("temperature_huge_int", "/v1/completions", {"prompt": "a", "temperature": 10**400}, 400, 400),
    ("top_p_0", "/v1/completions", {"prompt": "a", "temperature": 1, "top_p": 0}, 400, 400),
    ("top_k_neg", "/v1/completions", {"prompt": "a", "temperature": 1, "top_k": -5}, 400, 400),
    ("stream_str", "/v1/completions", {"prompt": "a", "stream": "yes"}, 400, 400),
    ("n_2", "/v1/completions", {"prompt": "a", "n": 2}, 400, 400),
    ("prompt_big_id", "/v1/completions", {"prompt": [2**70]}, 400, 400),
    ("prompt_neg_id", "/v1/completions", {"prompt": [-1, 5]}, 400, 400),
    ("prompt_float_ids", "/v1/completions", {"prompt": [1.5, 2]}, 400, 400),
    ("prompt_empty", "/v1/completions", {"prompt": ""}, 400, 400),
    ("prompt_dict", "/v1/completions", {"prompt": {"a": 1}}, 400, 400),
    ("stop_many", "/v1/completions", {"prompt": "a", "stop": ["x"] * 100}, 400, 400),
    ("stop_dicts", "/v1/completions", {"prompt": "a", "stop": [{"a": 1}]}, 400, 400),
    ("model_long", "/v1/completions", {"model": "m" * 5000, "prompt": "a"}, 404, 404),
    ("model_int", "/v1/completions", {"model": 7, "prompt": "a"}, 400, 400),
    ("model_nul", "/v1/completions", {"model": "lo4\x00", "prompt": "a"}, 404, 404),
    ("chat_content_int", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, 400),
    ("chat_empty", "/v1/chat/completions", {"messages": []}, 400, 400),
    ("raw_nested_50k", "/v1/completions", _nested(50_000), 400, 400),
    ("raw_nested_in_load", "/v1/load_lora_adapter", b'{"lora_name": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, 400),
    ("raw_bigint", "/v1/completions", b'{"prompt": "a", "max_tokens": ' + b"7" * 5000 + b"}", 400, 400),
    ("raw_nan", "/v1/completions", b'{"prompt": "a", "temperature": NaN}', 400, 400),
    ("raw_infinity", "/v1/completions", b'{"prompt": "a", "top_p": Infinity}', 400, 400),
    ("raw_lone_surrogate", "/v1/completions", b'{"prompt": "a\\ud800b"}', 400, 400),
    ("raw_chat_lone_surrogate", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, 400),
    ("raw_not_utf8", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, 400),
    ("raw_array", "/v1/completions", b"[1, 2]", 400, 400),
    ("raw_truncated", "/v1/completions", b'{"prompt": "a"', 400, 400),
]


def test_unknown_endpoints_and_methods_get_the_error_shape(srv):
    c, ad, out, eng = srv
    _assert_clean_error(c.get("/v1/nope"), 404, 404)
    _assert_clean_error(c.put("/v1/completions", json={}), 405, 405)
    _assert_clean_error(c.get("/v1/completions"), 405, 405)


@pytest.mark.parametrize("case", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_get_clear_4xx(srv, case):
    c, ad, out, eng = srv
    _, path, body, lo, hi = case
    if isinstance(body, bytes):
        r = c.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = c.post(path, json=body)
    msg = _assert_clean_error(r, lo, hi)
    assert len(msg) < 1000  # a 5000-character input is not echoed back whole
    assert c.get("/health").status_code == 200


def test_chunked_body_over_the_limit_is_413_and_server_keeps_serving(srv):
    c, ad, out, eng = srv
    before = _text(c, "lo4")

    def gen():  # no Content-Length: sent chunked, counted as it arrives
        yield b'{"prompt": "'
        for _ in range(64):
            yield b"a" * 8192
        yield b'"}'

    r = c.post("/v1/completions", content=gen(), headers={"Content-Type": "application/json"})
    _assert_clean_error(r, 413, 413)
    assert _text(c, "lo4") == before


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": "bad_nan_weights", "prompt": "a", "stream": True}),
    ("/v1/chat/completions", {"model": "bad_r0_peft", "stream": True, "messages": [{"role": "user", "content": "a"}]}),
])
def test_a_stream_that_fails_before_its_first_token_gets_a_status(srv, path, body):
    c, ad, out, eng = srv
    r = c.post(path, json=body)
    assert r.headers["content-type"].startswith("application/json")
    _assert_clean_error(r)


def test_a_body_that_never_finishes_is_408(srv):
    import socket

    c, ad, out, eng = srv
    with http_server(create_app(eng, api_key=KEY, body_timeout_s=1)) as url:
        host, port = url.rsplit("/", 1)[-1].split(":")
        with socket.create_connection((host, int(port)), timeout=20) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                      b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
            got = b""
            while b"\r\n\r\n" not in got:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
    assert got.startswith(b"HTTP/1.1 408"), got[:200]


# --- item 2: symlinks out of the adapter directory -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["linkdir", "linkcfg", "linkcfg_valid", "linkw", "loop"])
def test_symlinks_outside_the_adapter_root_are_refused(srv, name):
    c, ad, out, eng = srv
    r = _complete(c, name)
    msg = _assert_clean_error(r)
    assert "outside" in msg or r.status_code == 404, msg
    assert "JSON" not in msg  # a config symlinked outside is refused before it is parsed
    r = c.post("/v1/load_lora_adapter", json={"lora_name": f"s_{name}", "lora_path": str(ad / name)})
    msg = _assert_clean_error(r)
    assert "outside" in msg or name == "loop" or r.status_code == 404, msg
    assert "JSON" not in msg
    assert not {"linkdir", f"s_{name}"} & {m["id"] for m in c.get("/v1/models").json()["data"]}
    assert name not in eng.bank and f"s_{name}" not in eng.bank


def test_symlink_inside_the_root_is_served(srv):
    c, ad, out, eng = srv
    (ad / "alias").symlink_to(ad / "lo4", target_is_directory=True)
    try:
        assert _text(c, "alias") == _text(c, "lo4")
    finally:
        (ad / "alias").unlink()


# --- item 3: concurrent loads of one name ---------------------------------------------------------------------------
def test_concurrent_loads_of_one_name_one_wins(srv):
    c, ad, out, eng = srv
    want = {"pA": _text(c, "pA"), "pB": _text(c, "pB")}
    assert want["pA"] != want["pB"]  # the weights differ visibly
    for i in range(6):
        name = f"race{i}"
        barrier = threading.Barrier(2)

        def load(path):
            barrier.wait(timeout=30)
            return path, c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(ad / path)})

        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(load, ["pA", "pB"] if i % 2 else ["pB", "pA"]))
        codes = sorted(r.status_code for _, r in got)
        assert codes == [200, 409], [(p, r.status_code, r.text) for p, r in got]
        winner = next(p for p, r in got if r.status_code == 200)
        loser = next(r for _, r in got if r.status_code == 409)
        _assert_clean_error(loser, 409, 409, word=name)
        assert eng.registry[name] == (ad / winner).resolve()
        assert _text(c, name) == want[winner]
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200


def test_loading_a_name_bound_to_another_path_is_409(srv):
    c, ad, out, eng = srv
    want = {"pA": _text(c, "pA"), "pB": _text(c, "pB")}
    assert c.post("/v1/load_lora_adapter", json={"lora_name": "bound", "lora_path": "pA"}).status_code == 200
    assert c.post("/v1/load_lora_adapter", json={"lora_name": "bound", "lora_path": "pA"}).status_code == 200
    _assert_clean_error(c.post("/v1/load_lora_adapter", json={"lora_name": "bound", "lora_path": "pB"}), 409, 409)
    assert _text(c, "bound") == want["pA"]
    # a directory adapter that is resident cannot be re-pointed at another path either
    _assert_clean_error(c.post("/v1/load_lora_adapter", json={"lora_name": "pA", "lora_path": "pB"}), 409, 409)
    assert _text(c, "pA") == want["pA"]
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "bound"}).status_code == 200
    assert c.post("/v1/load_lora_adapter", json={"lora_name": "bound", "lora_path": "pB"}).status_code == 200
    assert _text(c, "bound") == want["pB"]
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "bound"}).status_code == 200


def test_a_name_can_be_repointed_right_after_its_unload_returns(srv):
    """unload_adapter returns once the engine thread has evicted an adapter no request uses (it used to return
    before, so an immediate load of the name from another path raced the eviction and got a 409)."""
    c, ad, out, eng = srv
    want = {"pA": _text(c, "pA"), "pB": _text(c, "pB")}
    for i in range(12):
        path = "pB" if i % 2 else "pA"
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "flip", "lora_path": path}).status_code == 200
        assert _text(c, "flip") == want[path]
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "flip"}).status_code == 200
        assert "flip" not in eng.unload_pending and "flip" not in eng.paths


# --- item 7: unload means unloaded ----------------------------------------------------------------------------------
def test_unloading_a_directory_adapter_keeps_it_unloaded_until_loaded(srv):
    c, ad, out, eng = srv
    before = _text(c, "lo2")
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "lo2"}).status_code == 200
    for _ in range(3):  # not reloaded from the directory by later requests
        msg = _assert_clean_error(_complete(c, "lo2"), 404, 404)
        assert "unloaded" in msg and "load_lora_adapter" in msg
    assert "lo2" not in {m["id"] for m in c.get("/v1/models").json()["data"]}
    assert "lo2" not in c.get("/metrics").json()["resident_adapters"]
    _assert_clean_error(c.post("/v1/unload_lora_adapter", json={"lora_name": "lo2"}), 404, 404)
    assert c.post("/v1/load_lora_adapter", json={"lora_name": "lo2"}).status_code == 200
    assert "lo2" in {m["id"] for m in c.get("/v1/models").json()["data"]}
    assert _text(c, "lo2") == before
    # a directory adapter never requested can be unloaded too, with the same meaning
    make = ad / "fresh"
    shutil.copytree(ad / "lo4", make)
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
    _assert_clean_error(_complete(c, "fresh"), 404, 404)
    assert c.post("/v1/load_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
    assert _text(c, "fresh") == _text(c, "lo4")


# --- item 6: /metrics needs the key ---------------------------------------------------------------------------------
def test_metrics_requires_the_api_key(srv):
    c, ad, out, eng = srv
    url = str(c.base_url)
    with httpx.Client(base_url=url, timeout=30) as anon:
        for path in ("/metrics", "/metrics/", "/v1/models"):
            r = anon.get(path)
            _assert_clean_error(r, 401, 401)
            assert "lo4" not in r.text
        _assert_clean_error(anon.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401, 401)
        assert anon.get("/health").status_code == 200  # liveness stays open
    r = c.get("/metrics")
    assert r.status_code == 200 and "requests" in r.json()


# --- item 4: limits ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [
    ("--max-loras", "0"), ("--max-loras", "-1"), ("--max-loras", "1000000000"), ("--max-batch", "0"),
    ("--max-batch", "-3"), ("--max-batch", "99999999999"), ("--max-tokens", "0"), ("--max-prompt-tokens", "0"),
    ("--max-body-bytes", "0"), ("--gather-cache-mb", "nan"), ("--gather-cache-mb", "-1"), ("--threads", "0"),
    ("--port", "70000"), ("--shutdown-timeout", "-1"), ("--max-loras", "two"),
])
def test_nonsensical_limits_exit_2_with_a_message(flag, value, capsys, tmp_path):
    from lorakit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--base", str(tmp_path / "unused"), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "must be" in err, err


@pytest.mark.parametrize("kw", [dict(max_loras=0), dict(max_batch=0), dict(max_batch=-1), dict(max_new_tokens=0),
                                dict(max_prompt_tokens=0), dict(gather_cache_mb=float("nan")),
                                dict(max_loras=10**12), dict(max_batch=1.5)])
def test_engine_refuses_nonsensical_limits(srv, kw):
    c, ad, out, eng = srv
    name = next(iter(kw))
    with pytest.raises(ConfigError, match=name):
        Engine(eng.model, eng.tok, ad, **kw)
