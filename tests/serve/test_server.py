"""HTTP API: OpenAI-compatible endpoints, streaming, adapter load/unload, auth, limits, bad adapters."""
import copy
import json
import shutil

import pytest
import torch

from helpers import load_base, make_adapter, make_base, merged_model
from lorakit.serve.engine import Engine
from lorakit.serve.server import create_app, serve_main


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("srv")
    base_dir = make_base(d / "base")
    base = load_base(base_dir)
    ad = d / "adapters"
    make_adapter(base, ad / "lo4", "lora", r=4, seed=1)
    make_adapter(base, d / "staging" / "x", "lora", r=2, seed=9)
    make_adapter(base, ad / "do2", "dora", r=2, seed=3)
    eng = Engine(copy.deepcopy(base), AutoTokenizer.from_pretrained(base_dir), ad, max_loras=2, base_name="tiny",
                 max_new_tokens=32).start()
    app = create_app(eng, api_key="sekret", max_body_bytes=4096)
    with TestClient(app) as c:
        c.headers["Authorization"] = "Bearer sekret"
        yield c, base, ad, d, eng
    eng.stop()


def test_completions_match_merged_and_models(client):
    c, base, ad, d, eng = client
    r = c.post("/v1/completions", json={"model": "lo4", "prompt": [5, 6, 7, 8], "max_tokens": 6, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 6 and body["choices"][0]["finish_reason"] == "length"
    ref = merged_model(base, ad / "lo4").generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, do_sample=False,
                                                  eos_token_id=None, pad_token_id=2)[0, 4:]
    assert body["choices"][0]["text"] == eng.tok.decode(ref.tolist(), skip_special_tokens=True)
    ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert ids[0] == "tiny" and {"lo4", "do2"} <= set(ids)
    assert c.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3}).status_code == 200


def test_chat_streaming(client):
    c, *_ = client
    with c.stream("POST", "/v1/chat/completions", json={"model": "do2", "stream": True, "max_tokens": 5,
                                                         "ignore_eos": True,
                                                         "messages": [{"role": "user", "content": "hello"}]}) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 5
    full = c.post("/v1/chat/completions", json={"model": "do2", "max_tokens": 5, "ignore_eos": True,
                                                "messages": [{"role": "user", "content": "hello"}]}).json()
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == \
        full["choices"][0]["message"]["content"]


def test_load_unload_auth_limits(client):
    c, base, ad, d, eng = client
    shutil.copytree(d / "staging" / "x", ad / "later")
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "newone", "lora_path": str(ad / "later")})
    assert r.status_code == 200, r.text
    assert c.post("/v1/completions", json={"model": "newone", "prompt": "a", "max_tokens": 2}).status_code == 200
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "newone"}).status_code == 200
    assert c.post("/v1/completions", json={"model": "newone", "prompt": "a"}).status_code == 404
    # path traversal / outside the adapter dir
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(d / "staging" / "x")})
    assert r.status_code == 400 and "outside" in r.json()["error"]["message"]
    assert c.post("/v1/completions", json={"model": "../staging/x", "prompt": "a"}).status_code == 404
    # auth, limits, bad input
    assert c.post("/v1/completions", json={"model": "lo4", "prompt": "a"},
                  headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/health").status_code == 200
    assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 10_000}).status_code == 400
    assert c.post("/v1/completions", json={"prompt": "a" * 5000}).status_code == 413
    assert c.post("/v1/completions", content=b"{not json").status_code == 400
    # a corrupt adapter fails its request only
    (ad / "broken").mkdir()
    (ad / "broken" / "adapter_config.json").write_text("{}")
    r = c.post("/v1/completions", json={"model": "broken", "prompt": "a"})
    assert r.status_code == 400 and "peft_type" in r.json()["error"]["message"]
    assert c.post("/v1/completions", json={"model": "lo4", "prompt": "a", "max_tokens": 2}).status_code == 200
    m = c.get("/metrics").json()
    assert m["requests"] >= 5 and m["adapter_hits"] >= 1 and m["adapter_load_errors"] >= 1


def test_serve_main_clear_errors(tmp_path, capsys):
    import socket

    assert serve_main(["--base", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "cannot load base model" in capsys.readouterr().err
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        assert serve_main(["--base", str(tmp_path), "--port", str(port)]) == 2
        assert "port in use" in capsys.readouterr().err
    finally:
        s.close()


def test_the_official_openai_client_parses_every_endpoint(client):
    """The real `openai` package (what users call) against the app: completions, chat, streaming, models."""
    openai = pytest.importorskip("openai")
    c, base, ad, d, eng = client
    oc = openai.OpenAI(base_url="http://testserver/v1", api_key="sekret", http_client=c, max_retries=0)
    r = oc.completions.create(model="lo4", prompt="hello", max_tokens=4, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4 and r.model == "lo4"
    ch = oc.chat.completions.create(model="do2", max_tokens=5, messages=[{"role": "user", "content": "hello"}],
                                    extra_body={"ignore_eos": True})
    assert ch.choices[0].message.role == "assistant" and ch.usage.completion_tokens == 5
    parts = [p.choices[0].delta.content or "" for p in oc.chat.completions.create(
        model="do2", max_tokens=5, stream=True, messages=[{"role": "user", "content": "hello"}],
        extra_body={"ignore_eos": True}) if p.choices]
    assert "".join(parts) == ch.choices[0].message.content
    assert {"lo4", "do2"} <= {m.id for m in oc.models.list()}
    with pytest.raises(openai.NotFoundError):
        oc.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    bad = openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=c, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
