"""The browser page at ``GET /`` of ``edgeft serve``, driven in Debian's Chromium with Selenium.

The real CLI server runs on loopback with a bearer key and a trusted signing key over five
tiny signed artifacts: a "parrot" llama whose weights are set by hand so that, whatever the
prompt, it says the same five pieces in a loop (one of them ``<img src=x onerror=alert(1)>``),
the 4-block BERT sentiment classifier, the same BERT as a mean-pooled embedding model, and two
classifiers tuned from it and split at their freeze boundary (``test_trunk``'s: one trunk). The
page is driven like a user would: type the key into the dialog, chat (streamed text, stats,
history sent), stop a long generation (the server's in-flight count drops to zero), classify
two texts, compare two texts' embeddings, read which models share a trunk. Screenshots of each view (wide and phone, light and
dark) go to ``$EDGEFT_UI_SCREENSHOTS`` or the test's temporary folder.

The browser tests are skipped, with the reason, where chromium, chromedriver or selenium are
missing (``.ci/run`` installs them and sets ``EDGEFT_REQUIRE_BROWSER=1``, so there they run or
fail); the route, --no-ui and /v1/models checks need no browser.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from test_server import KEY, free_port, metric, start_cli_server, stop, wait_healthy, InProcessServer
from test_trunk import exported, runs  # noqa: F401  (fixtures, used by name)

REPO = Path(__file__).resolve().parents[1]
PIECES = ["Sure: ", "<img src=x onerror=alert(1)>", " is markup, ", "<b>bold</b>", " too. "]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _browser_missing() -> str | None:
    if not CHROMIUM or not CHROMEDRIVER:
        return "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


# CI (.ci/run) sets EDGEFT_REQUIRE_BROWSER=1: there a missing browser fails the tests instead of skipping them.
browser = pytest.mark.skipif(_browser_missing() is not None and not os.environ.get("EDGEFT_REQUIRE_BROWSER"),
                             reason=_browser_missing() or "")


# ---------------------------------------------------------------- artifacts and server

@pytest.fixture(scope="module")
def parrot_dir(tmp_path_factory) -> Path:
    """A 2-block llama that ignores its prompt: any token -> PIECES[0] -> PIECES[1] -> ... -> PIECES[0] ...

    Each piece is one added token; the blocks' weights are scaled down to near zero so the
    residual stream carries the input token's embedding, a one-hot slot that the head maps to
    the next piece. The context is long (8192) so a generation can run for seconds.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import CHATML, _bpe_tokenizer, _save

    tok = _bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.bos_token, tok.eos_token, tok.pad_token = "<|endoftext|>", "<|im_end|>", "<|endoftext|>"
    tok.chat_template = CHATML
    tok.add_tokens(PIECES)
    ids = [tok.convert_tokens_to_ids(p) for p in PIECES]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(0.01)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.normal_(0, 0.01)
        head.normal_(0, 0.01)
        emb[:, 0] += 1.0  # every token outside the loop sits in slot 0, which leads to the first piece
        head[ids[0], 0] += 10.0
        for i, t in enumerate(ids):
            emb[t, 0] -= 1.0
            emb[t, i + 1] += 1.0
            head[ids[(i + 1) % len(ids)], i + 1] += 10.0
    return _save(model, tok, tmp_path_factory.mktemp("parrot-hf"))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, parrot_dir, tiny_bert_dir, exported) -> dict[str, Path]:  # noqa: F811
    from test_embed import _st_folder

    from edgeft.export import ExportConfig, export

    out = tmp_path_factory.mktemp("ui-artifacts")
    parrot = export(ExportConfig(source=str(parrot_dir), out=out / "parrot", task="causal-lm",
                                 allow_degraded=True, gate_texts=4, gate_prompts=1, gate_new_tokens=4))
    sentiment = export(ExportConfig(source=str(tiny_bert_dir), out=out / "sentiment", task="classification",
                                    labels=("negative", "positive"), allow_degraded=True, gate_texts=8,
                                    eval_data=REPO / "demo" / "sst2_2k.csv"))
    st_dir = _st_folder(tiny_bert_dir, tmp_path_factory.mktemp("ui-st") / "tiny-st")
    vectors = export(ExportConfig(source=str(st_dir), out=out / "vectors", gate_texts=16,
                                  eval_data=REPO / "demo" / "sst2_2k.csv", progress=False), log=None)
    # two classifiers tuned from one base, split at their freeze boundary (test_trunk's): one trunk, two tops
    mood, season = (Path(shutil.copytree(exported(i, "int8"), out / name)) for i, name in enumerate(("mood", "season")))
    return {"parrot": Path(parrot), "sentiment": Path(sentiment), "vectors": Path(vectors), "mood": mood,
            "season": season}


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory, artifacts) -> tuple[Path, str]:
    """Both artifacts signed with a fresh key: (the public key file, its key id)."""
    from edgeft.artifact import sign
    from edgeft.signing import keygen, load_private_key

    private, public, kid = keygen(tmp_path_factory.mktemp("ui-key") / "release.key")
    for path in artifacts.values():
        assert sign(path, load_private_key(private)) == kid
    return public, kid


@pytest.fixture(scope="module")
def server(artifacts, signing_key):
    proc, url = start_cli_server([artifacts[n] for n in ("parrot", "sentiment", "vectors", "mood", "season")],
                                 {"EDGEFT_API_KEY": KEY, "EDGEFT_MAX_TOKENS": "8000",
                                  "EDGEFT_TRUSTED_KEY": str(signing_key[0]),
                                  # the parrot repeats itself: drafts would finish its 8,000 tokens
                                  # before the page's Stop could be pressed
                                  "EDGEFT_SPECULATE": "off"})
    yield url
    rc, err = stop(proc)
    assert rc == 0, err[-2000:]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("EDGEFT_UI_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("ui-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- no browser needed

def test_page_and_assets_are_served_with_a_strict_policy(server):
    page = httpx.get(server + "/")  # no key: the page holds no secrets, /v1 still wants one
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/ui/app.js"' in page.text and "http" not in page.text.replace("http-equiv", "")
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{server}/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.content) > 1000
    assert "innerHTML" not in httpx.get(server + "/ui/app.js").text
    assert httpx.get(server + "/ui/../server.py").status_code == 404
    missing = httpx.get(server + "/ui/secret.txt")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(server + "/v1/models").status_code == 401


def test_models_list_what_the_manifest_says(http, artifacts, signing_key):
    from edgeft.artifact import read_manifest

    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    for name, path in artifacts.items():
        manifest, card = read_manifest(path), models[name]["manifest"]
        assert card["architecture"] == manifest.architecture
        assert card["base_model"] == manifest.source.base_model
        assert card["quantization"] == manifest.quantization.scheme
        assert card["size_bytes"] == sum(f["size"] for f in manifest.files.values()) > 0
        assert card["gate"]["passed"] == manifest.gate.passed
        assert card["gate"]["metrics"] == manifest.gate.metrics
        assert card["digest"] == manifest.digest and card["digest"].startswith("sha256:")
        assert card["signed_by"] == signing_key[1] and card["signature_checked"] is True
    assert models["sentiment"]["labels"] == ["negative", "positive"] and models["vectors"]["dimensions"] == 64


def _trunk(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())["trunk"]


def test_models_list_which_models_share_a_trunk(http, artifacts):
    sha = _trunk(artifacts["mood"])["sha256"]
    assert _trunk(artifacts["season"])["sha256"] == sha  # byte-identical trunks: one session in the server
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models["mood"]["trunk"]["shared_with"] == ["season"] and models["season"]["trunk"]["shared_with"] == ["mood"]
    assert models["mood"]["trunk"]["sha256"] == sha and models["mood"]["trunk"]["blocks"] == 2
    assert not {"trunk"} & (set(models["sentiment"]) | set(models["parrot"]) | set(models["vectors"]))


def test_no_ui_turns_the_page_off(artifacts, signing_key):
    from edgeft.runtime.serve import ServeConfig

    cfg = ServeConfig(artifacts=(artifacts["sentiment"],), port=free_port(), threads=1, ui=False)
    with InProcessServer(cfg) as s:
        wait_healthy(s.url)
        card = httpx.get(s.url + "/v1/models").json()["data"][0]["manifest"]
        assert card["signed_by"] and card["signature_checked"] is False  # signed, but no --trusted-key here
        for path in ("/", "/ui/app.js"):
            r = httpx.get(s.url + path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# ---------------------------------------------------------------- in the browser

@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    d.set_script_timeout(30)
    yield d
    d.quit()


def wait_for(condition, timeout: float = 30, what: str = "the page"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def by_id(d, element_id: str):
    from selenium.webdriver.common.by import By

    return d.find_element(By.ID, element_id)


def css(d, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return d.find_elements(By.CSS_SELECTOR, selector)


def dark(d, on: bool) -> None:
    d.execute_cdp_cmd("Emulation.setEmulatedMedia",
                      {"features": [{"name": "prefers-color-scheme", "value": "dark" if on else "light"}]})


def phone(d, on: bool) -> None:
    if on:
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                          {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    else:
        d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def shot(d, path: Path, full: bool = True) -> None:
    """A screenshot of the whole page, or of the window scrolled to the end (where the chat composer sticks)."""
    import base64

    if not full:
        d.execute_script("window.scrollTo(0, document.documentElement.scrollHeight)")
        d.save_screenshot(str(path))
        return
    size = d.execute_script("return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    png = d.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
        "x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}})
    path.write_bytes(base64.b64decode(png["data"]))


def set_field(d, element_id: str, value: str) -> None:
    field = by_id(d, element_id)
    field.clear()
    field.send_keys(value)


def settings(d, **fields: str) -> None:
    """Open the chat settings, fill the fields (by element id, ``_`` for ``-``), close them again."""
    summary = by_id(d, "settings").find_element("css selector", "summary")
    summary.click()
    for name, value in fields.items():
        set_field(d, name.replace("_", "-"), value)
    summary.click()


@pytest.fixture(scope="module")
def page(driver, server, shots):
    """The page, opened and unlocked with the API key typed into its dialog."""
    driver.get(server + "/")
    dialog = wait_for(lambda: by_id(driver, "key-dialog").get_attribute("open") is not None and
                      by_id(driver, "key-dialog"), what="the API key dialog")
    assert dialog.is_displayed()
    shot(driver, shots / "key-dialog.png")
    by_id(driver, "key-input").send_keys(KEY + "\n")
    wait_for(lambda: driver.find_element("css selector", "body").get_attribute("data-ready") == "true",
             what="the models to be listed")
    return driver


def messages_of(d) -> list[tuple[str, str]]:
    return [(m.get_attribute("class").split()[1], m.find_element("css selector", ".content").text)
            for m in css(d, "#transcript .msg")]


def idle(d) -> bool:
    return not by_id(d, "send").get_attribute("disabled") and bool(by_id(d, "chat-stats").text)


def expected_reply(artifact: Path, messages: list[dict], max_tokens: int) -> tuple[str, int]:
    from edgeft.runtime import Generator, SamplingParams

    gen = Generator.open(artifact, threads=1)
    ids = gen.encode(gen.render_chat(messages))
    return gen.generate(ids, SamplingParams(max_new_tokens=max_tokens)).text, len(ids)


@browser
def test_chat_streams_keeps_history_and_shows_model_output_as_text(page, http, artifacts, signing_key, shots):
    d = page
    assert by_id(d, "model").get_attribute("value") == "parrot"
    facts = by_id(d, "model-facts").text
    assert "causal-lm" in facts and "int8" in facts and "vs PyTorch" in facts
    assert f"key {signing_key[1]} (verified by this server)" in facts
    settings(d, system="Answer briefly.", max_tokens="10", stop_strings="never appears")

    history = [{"role": "system", "content": "Answer briefly."}]
    for text in ["Hello there", "And again?"]:
        before = metric(http.get("/metrics").text, 'edgeft_prompt_tokens_total{model="parrot"}')
        history.append({"role": "user", "content": text})
        want, n_prompt = expected_reply(artifacts["parrot"], history, 10)
        by_id(d, "prompt").send_keys(text + "\n")  # Enter sends
        wait_for(lambda: idle(d), what="the answer to finish")
        got = messages_of(d)
        assert got[-2:] == [("user", text), ("assistant", want)]
        history.append({"role": "assistant", "content": want})
        # the whole history (system prompt, earlier turns) reached the server
        after = metric(http.get("/metrics").text, 'edgeft_prompt_tokens_total{model="parrot"}')
        assert after - before == n_prompt
    assert len(messages_of(d)) == 4
    stats = by_id(d, "chat-stats").text
    assert "10 tokens" in stats and "tokens/s" in stats and "first token after" in stats, stats
    # the model's markup is text: no element was made from it, and no script ran
    assert "<img src=x onerror=alert(1)>" in messages_of(d)[-1][1]
    assert not css(d, "#transcript img") and not css(d, "#transcript b")
    assert "Sure: <img src=x onerror=alert(1)> is markup, <b>bold</b>" in by_id(d, "transcript").text
    shot(d, shots / "chat-light.png", full=False)
    dark(d, True)
    shot(d, shots / "chat-dark.png", full=False)
    phone(d, True)
    shot(d, shots / "chat-phone-dark.png", full=False)
    phone(d, False)
    dark(d, False)
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE" and "status of 401" not in e["message"]]
    assert not errors, errors


@browser
def test_stop_cancels_the_generation_on_the_server(page, http, shots):
    d = page
    by_id(d, "new-chat").click()
    assert not messages_of(d)
    settings(d, max_tokens="8000")
    before = http.get("/metrics").text
    cancelled = metric(before, 'edgeft_stream_cancelled_total{model="parrot"}')
    generated = metric(before, 'edgeft_generated_tokens_total{model="parrot"}')
    by_id(d, "prompt").send_keys("Talk for a long time\n")
    # text streams in while the request is still open
    wait_for(lambda: len(messages_of(d)) == 2 and len(messages_of(d)[1][1]) > 40, what="streamed text")
    assert by_id(d, "stop").is_enabled()
    assert metric(http.get("/metrics").text, 'edgeft_inference_in_flight{model="parrot"}') == 1
    shot(d, shots / "chat-streaming.png", full=False)
    by_id(d, "stop").click()
    wait_for(lambda: idle(d), what="the page to stop")
    assert "stopped" in by_id(d, "chat-stats").text
    text = wait_for(lambda: (t := http.get("/metrics").text) and
                    'edgeft_inference_in_flight{model="parrot"} 0' in t and t, timeout=10,
                    what="the server to stop generating")
    assert metric(text, 'edgeft_stream_cancelled_total{model="parrot"}') == cancelled + 1
    assert metric(text, 'edgeft_generated_tokens_total{model="parrot"}') - generated < 8000
    partial = messages_of(d)[1][1]
    assert partial.startswith("Sure: <img src=x onerror=alert(1)>")
    # the partial answer stays in the conversation, and the next message still works
    settings(d, max_tokens="3")
    by_id(d, "prompt").send_keys("Short now\n")
    wait_for(lambda: idle(d) and len(messages_of(d)) == 4, what="the next answer")
    assert messages_of(d)[3] == ("assistant", "".join(PIECES[:3]))


@browser
def test_classify_two_texts_shows_labels_and_probabilities(page, artifacts, shots):
    from edgeft.runtime import TextClassifier

    d = page
    texts = ["a gorgeous, witty, seductive movie.", "the plot is a lump of coal."]
    want = TextClassifier.open(artifacts["sentiment"], threads=1).predict_proba(texts)
    by_id(d, "tab-classify").click()
    assert by_id(d, "model").get_attribute("value") == "sentiment"
    assert by_id(d, "view-classify").is_displayed() and not by_id(d, "view-chat").is_displayed()
    assert "negative, positive" in by_id(d, "model-facts").text
    set_field(d, "classify-input", texts[0] + "\n\n" + texts[1])
    by_id(d, "classify-run").click()
    wait_for(lambda: len(css(d, "#classify-results .result")) == 2, what="two results")
    labels = ["negative", "positive"]
    for result, text, probs in zip(css(d, "#classify-results .result"), texts, want):
        assert result.find_element("css selector", ".text").text == text
        assert result.find_element("css selector", ".chip").text == labels[int(probs.argmax())]
        rows = result.find_elements("css selector", ".bar")
        assert [r.find_element("css selector", ".name").text for r in rows] == labels
        for row, p in zip(rows, probs):
            assert row.find_element("css selector", ".pct").text == f"{100 * p:.1f}%"
    shot(d, shots / "classify-light.png")
    dark(d, True)
    shot(d, shots / "classify-dark.png")
    phone(d, True)
    shot(d, shots / "classify-phone-dark.png")
    phone(d, False)
    dark(d, False)
    # keyboard: arrow keys move between the tabs
    from selenium.webdriver.common.keys import Keys

    by_id(d, "tab-classify").send_keys(Keys.ARROW_LEFT)
    assert by_id(d, "view-chat").is_displayed() and by_id(d, "model").get_attribute("value") == "parrot"


@browser
def test_embed_tab_shows_the_cosine_similarity_of_two_texts(page, artifacts, shots):
    import numpy as np

    from edgeft.runtime import TextEmbedder

    d = page
    texts = ["a gorgeous, witty, seductive movie.", "the plot is a lump of coal."]
    a, b = TextEmbedder.open(artifacts["vectors"], threads=1).embed(texts)
    want = float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
    by_id(d, "tab-embed").click()
    assert by_id(d, "model").get_attribute("value") == "vectors" and by_id(d, "view-embed").is_displayed()
    assert "mean cosine to PyTorch" in by_id(d, "model-facts").text and "64" in by_id(d, "model-facts").text
    set_field(d, "embed-a", texts[0])
    set_field(d, "embed-b", texts[1])
    by_id(d, "embed-run").click()
    shown = wait_for(lambda: css(d, "#similarity") and css(d, "#similarity")[0].text, what="the similarity")
    assert abs(float(shown) - want) < 2e-3  # int8 activations move a vector slightly with its batch-mates
    shot(d, shots / "embed-light.png")
    dark(d, True)
    phone(d, True)
    shot(d, shots / "embed-phone-dark.png")
    phone(d, False)
    dark(d, False)


@browser
def test_the_picker_and_the_card_say_which_models_share_a_trunk(page, artifacts, shots):
    from selenium.webdriver.support.ui import Select

    d = page
    sha = _trunk(artifacts["mood"])["sha256"]
    options = {o.get_attribute("value"): o.get_attribute("textContent") for o in css(d, "#model option")}
    assert options["mood"] == f"mood · shares trunk {sha[:8]} with season"
    assert options["season"] == f"season · shares trunk {sha[:8]} with mood"
    assert [options[n] for n in ("parrot", "sentiment", "vectors")] == ["parrot", "sentiment", "vectors"]
    many = d.execute_script("return trunkShared({trunk: {sha256: 'ab'.repeat(32), shared_with: ['a', 'b', 'c', 'd']}}, 3)")
    assert many == "shares trunk abababab with a, b and 2 more"  # eight models sharing one trunk stay short
    Select(by_id(d, "model")).select_by_value("season")
    wait_for(lambda: by_id(d, "view-classify").is_displayed(), what="the classify view")
    facts = {row.find_element("css selector", "dt").get_attribute("textContent"):
             row.find_element("css selector", "dd").get_attribute("textContent") for row in css(d, "#model-facts .fact")}
    assert facts["Trunk"] == f"{sha[:16]} (embeddings and 2 blocks), shared with mood"
    assert "trunk shared with 1 other" in by_id(d, "model-summary").get_attribute("textContent")
    shot(d, shots / "trunk-card.png")
    Select(by_id(d, "model")).select_by_value("sentiment")
    wait_for(lambda: "negative, positive" in by_id(d, "model-facts").text, what="the sentiment card")
    assert "Trunk" not in [dt.get_attribute("textContent") for dt in css(d, "#model-facts dt")]
    assert "trunk" not in by_id(d, "model-summary").get_attribute("textContent")
