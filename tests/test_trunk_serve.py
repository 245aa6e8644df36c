"""Serving many classifiers tuned from one base: one trunk pass for several models, loading and
unloading models while the server runs (a shared trunk reused), and what verify and /v1/models say.

The split classifiers are ``test_trunk``'s: two tiny runs from one 4-block BERT, top 2 trained,
exported int8 (byte-identical trunks). The server runs in-process (Starlette's TestClient); a
request is held inside its classifier by a hook, so "in flight" is a state, never a race.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_artifacts import run
from starlette.testclient import TestClient
from test_trunk import TEXTS, _flip, exported, runs  # noqa: F401  (fixtures, used by name)

from edgeft import artifact

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextlib.contextmanager
def _serving(arts: dict[str, Path], **kw) -> Iterator[TestClient]:
    """A started server for ``arts`` (name: folder), once every model is loaded."""
    from edgeft.runtime.serve import ServeConfig, build_app

    config = ServeConfig(artifacts=tuple(arts.values()), names=tuple(arts), threads=1, batch_wait_ms=0, **kw)
    with TestClient(build_app(config), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 300
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, client.get("/health").json()
            time.sleep(0.05)
        yield client


def _alone(folder: Path, texts=TEXTS) -> list[dict]:
    from edgeft.runtime import TextClassifier

    return TextClassifier.open(folder, threads=1).classify(texts)


def _classify(client, model, texts=TEXTS, headers=None):
    return client.post("/v1/classify", json={"model": model, "input": texts}, headers=headers or {})


@pytest.fixture(scope="module")
def pair(exported):  # noqa: F811
    """The two int8 split classifiers (one trunk), and the folder that holds them (a --model-dir)."""
    a, b = exported(0, "int8"), exported(1, "int8")
    assert a.parent == b.parent
    return a, b


def test_classify_over_two_models_equals_each_alone_with_one_trunk_pass(pair, monkeypatch):
    from edgeft.runtime.trunks import SharedTrunk

    a, b = pair
    with _serving({"a": a, "b": b}) as c:
        alone = {m: _classify(c, m).json() for m in ("a", "b")}
        calls = []
        real = SharedTrunk.run
        monkeypatch.setattr(SharedTrunk, "run", lambda self, feeds: calls.append(self.sha256) or real(self, feeds))
        r = _classify(c, ["a", "b"])
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == ["a", "b"] and body["results"] == alone
        assert len(calls) == 1  # 5 texts, one batch: the trunk ran once for both models
        assert [x["label"] for x in body["results"]["b"]["data"]] == [x["label"] for x in _alone(b)]
        one = _classify(c, ["b"], "good").json()["results"]["b"]
        assert one == _classify(c, "b", "good").json()
        for bad in ([], ["a", "a"], ["a", 3], ["a", "nope"]):
            assert _classify(c, bad).status_code in (400, 404), bad
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        sha = json.loads((a / "manifest.json").read_text())["trunk"]["sha256"]
        assert models["a"]["trunk"] == {"sha256": sha, "blocks": 2, "file": f"trunk-{sha[:16]}.onnx",
                                        "shared_with": ["b"]}
        assert models["b"]["trunk"]["shared_with"] == ["a"]


def test_the_startup_log_names_the_models_that_share_a_trunk(pair, caplog):
    a, b = pair
    with caplog.at_level("INFO", logger="edgeft.serve"), _serving({"a": a, "b": b}):
        pass
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trunk ")]
    sha = json.loads((a / "manifest.json").read_text())["trunk"]["sha256"]
    assert lines == [f"trunk {sha[:16]} (embeddings and 2 blocks): a, b share one session"]


def test_a_model_loaded_while_serving_reuses_the_trunk_session_and_answers(pair):
    from edgeft.runtime import trunks

    a, b = pair
    with _serving({"a": a}, api_key=KEY, model_dirs=(a.parent,)) as c:
        state = c.app.state.edgeft
        r = c.post("/v1/models/load", json={"model": "b", "path": b.name}, headers=AUTH)  # relative to the dir
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "b" and r.json()["trunk"]["shared_with"] == ["a"]
        ta, tb = state.models["a"].front.trunk, state.models["b"].front.trunk
        assert tb is ta and tb.session is ta.session and trunks.loaded()[ta.sha256] is ta
        assert state.models["b"].front.session is not state.models["a"].front.session
        got = _classify(c, "b", headers=AUTH).json()
        assert [(x["label"], x["scores"]) for x in got["data"]] == [(x["label"], x["scores"]) for x in _alone(b)]
        assert {m["id"] for m in c.get("/v1/models", headers=AUTH).json()["data"]} == {"a", "b"}
        again = c.post("/v1/models/load", json={"model": "b", "path": str(b)}, headers=AUTH)
        assert again.status_code == 409 and again.json()["error"]["code"] == "model_exists"
        r = c.post("/v1/models/unload", json={"model": "a"}, headers=AUTH)
        assert r.status_code == 200 and _classify(c, "a", headers=AUTH).status_code == 404
        assert state.models["b"].front.trunk is tb and _classify(c, "b", headers=AUTH).status_code == 200
        assert c.post("/v1/models/unload", json={"model": "a"}, headers=AUTH).status_code == 404


def _held(front, monkeypatch):
    """Hold every graph call of ``front``'s top (alone or beside other models) until ``release`` is
    set; ``entered`` counts the calls waiting there."""
    entered, release = [], threading.Event()
    real = front._logits

    def logits(feeds, below):
        entered.append(1)
        assert release.wait(120)
        return real(feeds, below)

    monkeypatch.setattr(front, "_logits", logits)
    return entered, release


def _until(condition) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _in_thread(fn, *args, **kw):
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn(*args, **kw)), daemon=True)
    t.start()
    return t, out


def test_unloading_waits_for_the_requests_in_flight_and_loses_none(pair, monkeypatch):
    a, b = pair
    with _serving({"a": a, "b": b}, api_key=KEY, model_dirs=(a.parent,)) as c:
        state = c.app.state.edgeft
        model = state.models["a"]
        entered, release = _held(model.front, monkeypatch)
        busy, got = _in_thread(_classify, c, "a", headers=AUTH)
        several, got_both = _in_thread(_classify, c, ["b", "a"], headers=AUTH)
        _until(lambda: len(entered) == 2)  # both inside "a"'s top graph
        assert model.in_flight == 2
        unloading, unloaded = _in_thread(c.post, "/v1/models/unload", json={"model": "a"}, headers=AUTH)
        _until(lambda: "a" not in state.models)  # the unload has begun: new requests no longer reach "a"
        late = _classify(c, "a", headers=AUTH)
        assert late.status_code == 404 and late.json()["error"]["code"] == "model_not_found"
        assert busy.is_alive() and unloading.is_alive() and model.in_flight == 2
        release.set()
        for t in (busy, several, unloading):
            t.join(120)
        assert got["r"].status_code == 200 and got_both["r"].status_code == 200, got_both["r"].text
        want = [x["label"] for x in _alone(a)]
        assert [x["label"] for x in got["r"].json()["data"]] == want
        assert [x["label"] for x in got_both["r"].json()["results"]["a"]["data"]] == want
        assert unloaded["r"].status_code == 200 and model.in_flight == 0
        assert set(state.models) == {"b"} and _classify(c, "b", headers=AUTH).status_code == 200


def test_an_unload_that_would_cut_a_request_is_refused_and_the_model_stays(pair, monkeypatch):
    a, b = pair
    with _serving({"a": a}, api_key=KEY, model_dirs=(a.parent,), drain_timeout=0.2) as c:
        state = c.app.state.edgeft
        entered, release = _held(state.models["a"].front, monkeypatch)
        busy, got = _in_thread(_classify, c, "a", headers=AUTH)
        _until(lambda: len(entered) == 1)
        r = c.post("/v1/models/unload", json={"model": "a"}, headers=AUTH)  # the request never finishes in time
        assert r.status_code == 409 and r.json()["error"]["code"] == "model_busy"
        assert "a" in state.models
        release.set()
        busy.join(120)
        assert got["r"].status_code == 200 and _classify(c, "a", headers=AUTH).status_code == 200


def test_only_artifacts_under_a_model_dir_load(pair, tmp_path):
    a, b = pair
    allowed = tmp_path / "models"
    allowed.mkdir()
    outside = Path(shutil.copytree(b, tmp_path / "outside"))
    (allowed / "link").symlink_to(outside, target_is_directory=True)
    with _serving({"a": a}, api_key=KEY, model_dirs=(allowed,)) as c:
        for path in (str(outside), str(b), "../outside", "link", str(allowed / "link")):
            r = c.post("/v1/models/load", json={"model": "b", "path": path}, headers=AUTH)
            assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed", (path, r.text)
        r = c.post("/v1/models/load", json={"model": "b", "path": "missing"}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["code"] == "artifact_not_found"
        r = c.post("/v1/models/load", json={"model": "b"}, headers=AUTH)  # the path defaults to the name
        assert r.status_code == 400 and "no artifact 'b'" in r.json()["error"]["message"]
        for body in ({}, {"model": 3}, {"model": "b", "path": 4}, {"model": ""}, {"model": None}, {"model": ["b"]},
                     {"model": "b\n"}, {"model": "b", "path": ""}, {"model": "b", "path": "x\x00y"},
                     {"model": "b", "path": "x" * 5000}, {"model": "b", "path": ["b"]}):
            for route in ("load", "unload"):
                r = c.post(f"/v1/models/{route}", json=body, headers=AUTH)
                assert r.status_code in (400, 404) and "error" in r.json(), (route, body, r.text)
        for raw in (b"", b"[]", b"{", b'"b"'):
            r = c.post("/v1/models/load", content=raw, headers={**AUTH, "content-type": "application/json"})
            assert r.status_code == 400, raw
        shutil.copytree(b, allowed / "b")
        assert c.post("/v1/models/load", json={"model": "b"}, headers=AUTH).status_code == 200
        assert set(c.app.state.edgeft.models) == {"a", "b"}


def test_without_an_api_key_the_model_routes_are_refused(pair):
    a, b = pair
    with _serving({"a": a}, model_dirs=(a.parent,)) as c:
        for route, body in (("load", {"model": "b", "path": str(b)}), ("unload", {"model": "a"})):
            r = c.post(f"/v1/models/{route}", json=body)
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
        assert set(c.app.state.edgeft.models) == {"a"}
    with _serving({"a": a}, api_key=KEY, model_dirs=(a.parent,)) as c:
        r = c.post("/v1/models/load", json={"model": "b", "path": str(b)}, headers={"Authorization": "Bearer no"})
        assert r.status_code == 401 and set(c.app.state.edgeft.models) == {"a"}
    with _serving({"a": a}, api_key=KEY) as c:  # no --model-dir: nothing may be loaded
        r = c.post("/v1/models/load", json={"model": "b", "path": str(b)}, headers=AUTH)
        assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed"


def test_a_changed_trunk_byte_refuses_the_load(pair, tmp_path):
    a, b = pair
    folder = Path(shutil.copytree(b, tmp_path / "b"))
    _flip(folder / json.loads((b / "manifest.json").read_text())["trunk"]["file"])
    with _serving({"a": a}, api_key=KEY, model_dirs=(tmp_path,)) as c:  # "a" holds that trunk's session
        r = c.post("/v1/models/load", json={"model": "b"}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["code"] == "artifact_refused"
        assert "does not match its checksum" in r.json()["error"]["message"]
        assert set(c.app.state.edgeft.models) == {"a"} and _classify(c, "a", headers=AUTH).status_code == 200


def test_a_load_checks_the_signature_like_startup(pair, tmp_path):
    from edgeft.signing import keygen, load_private_key

    a, b = pair
    private, public, _ = keygen(tmp_path / "key")
    dirs = tmp_path / "models"
    signed_a, unsigned_b = (Path(shutil.copytree(f, dirs / n)) for f, n in ((a, "a"), (b, "b")))
    artifact.sign(signed_a, load_private_key(private))
    with _serving({"a": signed_a}, api_key=KEY, model_dirs=(dirs,), trusted_keys=(public,)) as c:
        r = c.post("/v1/models/load", json={"model": "b"}, headers=AUTH)
        assert r.status_code == 400 and "sign" in r.json()["error"]["message"]
        artifact.sign(unsigned_b, load_private_key(private))
        r = c.post("/v1/models/load", json={"model": "b"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["manifest"]["signature_checked"] is True


def test_verify_shows_the_trunk_and_its_boundary(pair):
    a, _ = pair
    sha = json.loads((a / "manifest.json").read_text())["trunk"]["sha256"]
    res = run("verify", a)
    assert res.exit_code == 0, res.output
    first, trunk = res.stdout.splitlines()
    assert first.startswith(f"{a}: ok") and trunk.startswith(f"  trunk {sha} (trunk-{sha[:16]}.onnx, ")
    assert "the embeddings and the first 2 blocks" in trunk and "top top.onnx" in trunk
