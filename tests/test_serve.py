"""`lav2 serve` as its users meet it: a server process on 127.0.0.1 (a free port) spoken to with
the official `openai` package and raw HTTP, and its chat page in headless Chromium; plus the
pieces that need no server (the answer text under stop strings, the conversation rules, the
templates' multi-turn rendering)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from lav2cli.answer import Question
from lav2cli.serve.protocol import ApiError, Limits, conversation, parse_chat_request
from lav2cli.serve.scheduler import AnswerText
from lav2cli.templates import CHATML_SYSTEM, HISTORY_HEADING, Turn, get_template

openai = pytest.importorskip("openai", reason="the official client is a test dependency: pip install -e '.[test]'")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "LAV2_DEBUG": ""}
KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lav2 serve ...` in a subprocess, up when /health answers."""

    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.log = tmp / f"serve-{self.port}.log"
        self.out = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "lav2cli", "serve", "--port", str(self.port), *args],
                                     stdout=self.out, stderr=subprocess.STDOUT, env=ENV)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"lav2 serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if self.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError("lav2 serve did not come up:\n" + self.log.read_text())
            time.sleep(0.3)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None = KEY, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=300, **kw)

    def request(self, method: str, path: str, body: bytes | None = None, key: str | None = KEY,
                headers: dict | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        h = {"Content-Type": "application/json", **(headers or {})}
        if key:
            h["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, data, r

    def get(self, path: str, key: str | None = KEY) -> tuple[int, dict]:
        status, data, _ = self.request("GET", path, key=key)
        return status, json.loads(data)

    def post(self, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, data, _ = self.request("POST", "/v1/chat/completions", raw, key=key)
        return status, json.loads(data)

    def health(self) -> dict:
        return self.get("/health")[1]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode


def png_data_url(color: str = "red", size: int = 32) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, image_url: str | None = None) -> dict:
    if image_url is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": image_url}}]}


def sse_events(raw: bytes) -> list[str]:
    """The data lines of a server-sent event stream, in order."""
    text = raw.decode()
    assert text.endswith("\n\n"), text[-50:]
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events[:3]
    return [e[len("data: "):] for e in events]


# -- a tiny random model: fast, so most of the protocol is tested on it -------------------------


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("allowed")
    Image.new("RGB", (16, 16), "blue").save(d / "blue.png")
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, base_dir, images_dir):
    """The session's tiny LLaMA (alpaca template, context 256), with an API key, a 50 KiB body
    limit, local images allowed from one folder, and a batching window wide enough that
    requests sent together do meet."""
    srv = Server(tmp_path_factory.mktemp("tiny-serve"), "--model", str(base_dir), "--served-name", "tiny",
                 "--api-key", KEY, "--max-body-mb", "0.05", "--allow-local-images", str(images_dir),
                 "--batch-wait-ms", "300", "--max-batch", "8", "--max-tokens", "16", "--device", "cpu")
    yield srv
    assert srv.stop() == -signal.SIGTERM, srv.log.read_text()


@pytest.fixture(scope="module")
def tiny_engine(base_dir):
    from lav2cli.engine import load

    return load(str(base_dir), device="cpu", inference=True)


def test_models_and_health(tiny):
    assert [m.id for m in tiny.client().models.list().data] == ["tiny"]
    status, body = tiny.get("/health", key=None)  # liveness needs no key
    assert status == 200 and body["status"] == "ok" and body["model"] == "tiny" and body["context"] == 256


def test_a_plain_answer_counts_its_tokens(tiny, tiny_engine):
    r = tiny.client().chat.completions.create(model="tiny", messages=[user("what is the color of the cat")],
                                              temperature=0, max_tokens=5)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    tpl, tok = tiny_engine.template, tiny_engine.tokenizer
    assert r.usage.prompt_tokens == len(tpl.encode_prompt(tok, "what is the color of the cat"))
    assert 1 <= r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert (choice.finish_reason == "length") == (r.usage.completion_tokens == 5)


def test_the_stream_adds_up_to_the_plain_answer_at_temperature_0(tiny):
    c = tiny.client()
    kw = dict(model="tiny", messages=[user("how many dogs sat on the mat")], temperature=0, max_tokens=12)
    plain = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({ch.id for ch in chunks}) == 1 and all(ch.object == "chat.completion.chunk" for ch in chunks)
    # on the wire: one JSON object per event, ending with [DONE]
    body = json.dumps({**kw, "stream": True}).encode()
    status, raw, resp = tiny.request("POST", "/v1/chat/completions", body)
    assert status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]) == text


def test_stop_strings_cut_the_answer_in_both_modes(tiny):
    c = tiny.client()
    kw = dict(model="tiny", messages=[user("the red circle")], temperature=0, max_tokens=16)
    full = c.chat.completions.create(**kw).choices[0].message.content
    assert len(full) > 6, full
    stop = full[4:6]  # a piece from inside the answer
    expected = full[:full.index(stop)].rstrip()
    plain = c.chat.completions.create(**kw, stop=[stop, "no such text"])
    assert plain.choices[0].message.content == expected and plain.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**kw, stop=stop, stream=True))
    assert streamed == expected


def test_a_seed_makes_sampling_reproducible(tiny):
    c = tiny.client()
    kw = dict(model="tiny", messages=[user("hello world")], temperature=1.0, top_p=1.0, max_tokens=10, seed=7)
    assert c.chat.completions.create(**kw).choices[0].message.content == \
        c.chat.completions.create(**kw).choices[0].message.content


def test_a_conversation_goes_through_the_template(tiny, tiny_engine):
    """Earlier turns and the system message reach the prompt (alpaca folds them into Input)."""
    messages = [{"role": "system", "content": "Answer briefly."}, user("what is the color of the cat"),
                {"role": "assistant", "content": "red"}, user("and the dog")]
    r = tiny.client().chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=3)
    tpl, tok = tiny_engine.template, tiny_engine.tokenizer
    ids = tpl.encode_prompt(tok, "and the dog", history=(Turn("what is the color of the cat", "red"),),
                            system="Answer briefly.")
    assert r.usage.prompt_tokens == len(ids)
    assert len(ids) > len(tpl.encode_prompt(tok, "and the dog")) + 10


def test_requests_sent_together_are_decoded_in_one_batch(tiny):
    before = tiny.health()
    c = tiny.client()
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        word = ["one", "two", "three", "four"][i]
        r = c.chat.completions.create(model="tiny", messages=[user(f"what is {word}")], temperature=0, max_tokens=4)
        answers[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = tiny.health()
    assert len(answers) == 4
    assert after["batches"] - before["batches"] == 1 and after["largest_batch"] >= 4
    assert after["completed"] - before["completed"] == 4


def test_the_api_key_is_required_on_v1(tiny):
    for key in (None, "wrong-key"):
        with pytest.raises(openai.AuthenticationError) as e:
            tiny.client(key=key).chat.completions.create(model="tiny", messages=[user("hi")], max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        status, body = tiny.get("/v1/models", key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, page, _ = tiny.request("GET", "/", key=None)  # the page itself is public: it asks for the key
    assert status == 200 and b"<textarea" in page
    assert tiny.client().chat.completions.create(model="tiny", messages=[user("hi")], max_tokens=2).choices


def _bad_requests(images_dir: Path) -> dict[str, tuple[bytes | dict, int, str, str | None]]:
    """name -> (body, status, error code, key)"""
    not_image = "data:image/png;base64," + base64.b64encode(b"this is text, not a PNG").decode()
    return {
        "malformed json": (b'{"model": "tiny", "messages": [', 400, "invalid_json", KEY),
        "body not an object": (b'["hi"]', 400, "invalid_json", KEY),
        "missing messages": ({"model": "tiny"}, 400, "missing_required_parameter", KEY),
        "empty messages": ({"model": "tiny", "messages": []}, 400, "invalid_value", KEY),
        "last message not the user's": ({"messages": [user("hi"), {"role": "assistant", "content": "yo"}]}, 400,
                                         "invalid_value", KEY),
        "unknown model": ({"model": "gpt-4o", "messages": [user("hi")]}, 404, "model_not_found", KEY),
        "prompt longer than the context": ({"messages": [user("the cat sat on the mat " * 80)]}, 400,
                                           "context_length_exceeded", KEY),
        "max_tokens past the context": ({"messages": [user("hi")], "max_tokens": 1000}, 400,
                                        "context_length_exceeded", KEY),
        "image that is not an image": ({"messages": [user("hi", not_image)]}, 400, "invalid_image", KEY),
        "image that is not base64": ({"messages": [user("hi", "data:image/png;base64,%%%not-base64%%%")]}, 400,
                                     "invalid_image", KEY),
        "remote image url": ({"messages": [user("hi", "https://example.com/cat.png")]}, 400,
                             "remote_image_refused", KEY),
        "local file outside the allowed folder": ({"messages": [user("hi", str(images_dir / ".." / "x.png"))]}, 400,
                                                  "local_image_refused", KEY),
        "local file that is not an image": ({"messages": [user("hi", str(images_dir / "notes.txt"))]}, 400,
                                            "invalid_image", KEY),
        "two images": ({"messages": [user("hi", png_data_url("red")), user("and", png_data_url("blue"))]}, 400,
                       "too_many_images", KEY),
        "temperature out of range": ({"messages": [user("hi")], "temperature": 5}, 400, "invalid_value", KEY),
        "n above 1": ({"messages": [user("hi")], "n": 2}, 400, "unsupported_parameter", KEY),
        "penalty out of range": ({"messages": [user("hi")], "frequency_penalty": 3}, 400, "invalid_value", KEY),
        "body over the limit": ({"messages": [user("x" * 80_000)]}, 413, "request_too_large", KEY),
        "wrong api key": ({"messages": [user("hi")]}, 401, "invalid_api_key", "not-the-key"),
    }


BAD = list(_bad_requests(Path("/nonexistent")))


@pytest.mark.parametrize("name", BAD)
def test_bad_input_gets_a_json_error_and_the_next_request_succeeds(tiny, images_dir, name):
    body, status, code, key = _bad_requests(images_dir)[name]
    got, err = tiny.post(body, key=key)
    assert got == status, (name, got, err)
    assert set(err) == {"error"} and {"message", "type", "code"} <= set(err["error"]), err
    assert err["error"]["code"] == code and err["error"]["message"], err
    ok, good = tiny.post({"model": "tiny", "messages": [user("hi")], "max_tokens": 2})
    assert ok == 200 and good["choices"][0]["message"]["role"] == "assistant", good


def test_the_official_client_sees_the_errors_as_api_errors(tiny):
    c = tiny.client()
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=[user("hi")])
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        c.chat.completions.create(model="tiny", messages=[user("the cat sat on the mat " * 80)])
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="tiny", messages=[user("x" * 80_000)])
    assert e.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="not a readable image"):  # streamed: refused before the stream
        list(c.chat.completions.create(model="tiny", messages=[user("hi", "data:image/png;base64,aGVsbG8=")],
                                       stream=True))


def test_a_local_image_in_the_allowed_folder_is_read(tiny, images_dir):
    for url in (str(images_dir / "blue.png"), "blue.png", (images_dir / "blue.png").as_uri()):
        status, body = tiny.post({"messages": [user("what color", url)], "max_tokens": 2})
        assert status == 200, (url, body)


def test_unknown_paths_get_json_errors(tiny):
    status, body = tiny.get("/v1/nothing-here")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, data, _ = tiny.request("GET", "/v1/chat/completions")
    assert status == 405 and json.loads(data)["error"]["code"] == "method_not_allowed"


def test_sigterm_finishes_the_requests_in_flight(tmp_path, base_dir):
    """A request waiting in the batching window when SIGTERM arrives is still answered, then the
    server exits (uvicorn re-raises the signal once it has shut down, so the process ends by it)."""
    srv = Server(tmp_path, "--model", str(base_dir), "--batch-wait-ms", "3000", "--device", "cpu")
    try:
        got: dict = {}
        t = threading.Thread(target=lambda: got.update(r=srv.post({"messages": [user("hi")], "max_tokens": 3})))
        t.start()
        deadline = time.monotonic() + 60
        while srv.health()["requests"] < 1:  # the request has reached the scheduler
            assert time.monotonic() < deadline
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGTERM)
        t.join(120)
        status, body = got["r"]
        assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body
        assert srv.proc.wait(60) == -signal.SIGTERM
        log = srv.log.read_text()
        assert "Shutting down" in log and "Finished server process" in log and "Traceback" not in log
    finally:
        srv.stop()


def test_serve_help_has_examples():
    r = subprocess.run([sys.executable, "-m", "lav2cli", "serve", "--help"], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 0 and "Examples" in r.stdout and "--api-key" in r.stdout


def test_a_busy_port_fails_in_one_line_before_the_model_loads(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "lav2cli", "serve", "--model", "no-such-model-xyz", "--port",
                            str(port)], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().startswith("lav2: error: cannot listen on 127.0.0.1:"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# -- the demo model: images, self-captioning, a client that goes away ---------------------------


@pytest.fixture(scope="module")
def easyvqa_image() -> Path:
    easy_vqa = pytest.importorskip("easy_vqa")
    return Path(easy_vqa.__file__).parent / "data" / "test" / "images" / "0.png"  # a red triangle


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("demo-serve"), "--model", "demo", "--device", "cpu")
    yield srv
    assert srv.stop() == -signal.SIGTERM, srv.log.read_text()


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.slow
def test_an_image_question_is_answered_as_lav2_ask_answers_it(demo, easyvqa_image):
    question = "What shape is in the image?"
    r = demo.client(key=None).chat.completions.create(
        model="demo", temperature=0, max_tokens=20, messages=[user(question, _data_url(easyvqa_image))])
    answer = r.choices[0].message.content
    assert "triangle" in answer.lower()
    [caption] = r.model_extra["lav2"]["experts"]  # the demo captions the image itself first
    assert caption["name"] == "caption" and caption["source"] == "the model itself"
    ask = subprocess.run([sys.executable, "-m", "lav2cli", "ask", str(easyvqa_image), question, "--model", "demo",
                          "--temperature", "0", "--max-new-tokens", "20", "--json"],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert ask.returncode == 0, ask.stderr
    asked = json.loads(ask.stdout)
    assert asked["answer"] == answer and asked["experts"][0]["text"] == caption["text"]
    assert asked["prompt_tokens"] == r.usage.prompt_tokens


@pytest.mark.slow
@pytest.mark.slow
def test_penalties_change_a_repetitive_greedy_answer(demo):
    """frequency_penalty reaches generation: a greedy list with a strong penalty on repeats
    differs from the plain one, and penalty 0 is the plain answer."""
    client = demo.client(key=None)

    def ask(**extra) -> str:
        r = client.chat.completions.create(model="demo", messages=[user("Write a short story about a robot who learns to paint.")],
                                           max_tokens=64, temperature=0, **extra)
        return r.choices[0].message.content

    plain = ask()
    assert ask(frequency_penalty=0) == plain
    assert ask(frequency_penalty=2.0, presence_penalty=2.0) != plain


def test_local_paths_are_refused_without_allow_local_images(demo, easyvqa_image):
    status, body = demo.post({"messages": [user("hi", str(easyvqa_image))]}, key=None)
    assert status == 400 and body["error"]["code"] == "local_image_refused"
    assert "--allow-local-images" in body["error"]["message"]


@pytest.mark.slow
def test_a_client_that_goes_away_frees_its_slot(demo):
    before = demo.health()
    body = json.dumps({"model": "demo", "stream": True, "temperature": 0, "max_tokens": 400,
                       "messages": [user("Write a long story about a cat who travels the world.")]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", demo.port, timeout=300)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    seen = b""
    while seen.count(b"data: ") < 3:  # the role chunk and two pieces of text
        seen += resp.read1(4096)
    resp.close()
    conn.close()
    deadline = time.monotonic() + 120
    while True:
        h = demo.health()
        if h["cancelled"] > before["cancelled"] and h["running"] == 0:
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.1)
    assert h["completion_tokens"] - before["completion_tokens"] < 400  # generation stopped early
    r = demo.client(key=None).chat.completions.create(model="demo", messages=[user("What is 2 + 2?")], max_tokens=8)
    assert r.choices[0].message.content


# -- the chat page in a real browser -------------------------------------------------------------


def _browser():
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[test]' (make test-browser)")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver; "
                    "make test-browser installs them)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"lav2-chromium-{os.getpid()}-{time.monotonic_ns()}"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1000,760"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts), profile


@pytest.mark.slow
@pytest.mark.browser
def test_the_chat_page_streams_an_answer_about_an_attached_image(demo, easyvqa_image, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, profile = _browser()
    try:
        browser.get(demo.url + "/")
        wait = WebDriverWait(browser, 300)
        wait.until(lambda b: b.find_element(By.ID, "model").text == "demo")
        browser.find_element(By.ID, "image").send_keys(str(easyvqa_image))
        wait.until(lambda b: b.find_element(By.ID, "preview").is_displayed())
        browser.find_element(By.ID, "question").send_keys("What shape is in the image?")
        browser.find_element(By.ID, "send").click()
        answer = wait.until(lambda b: next((e for e in b.find_elements(By.CSS_SELECTOR, ".msg.assistant")
                                            if e.get_attribute("data-state") == "done"), None))
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert "triangle" in answer.text.lower()
        assert "a red triangle" in answer.find_element(By.CLASS_NAME, "experts").text  # the self-caption
        user_msg = browser.find_element(By.CSS_SELECTOR, ".msg.user")
        assert "What shape" in user_msg.text and user_msg.find_elements(By.TAG_NAME, "img")
        # a follow-up question carries the conversation (and its image)
        browser.find_element(By.ID, "question").send_keys("What color is the shape?")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: len([e for e in b.find_elements(By.CSS_SELECTOR, ".msg.assistant")
                                  if e.get_attribute("data-state") == "done"]) == 2)
        second = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1]
        assert "red" in second.text.lower()
        browser.save_screenshot(os.environ.get("LAV2_SERVE_SCREENSHOT") or str(tmp_path / "page.png"))
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


# -- no server: the pieces ------------------------------------------------------------------------


def _pieces(text: AnswerText, pieces: list[str]) -> str:
    return "".join(text.push(p) for p in pieces) + text.finish()


def test_answer_text_holds_back_what_a_stop_string_may_take():
    t = AnswerText(("###",))
    assert t.push(" Paris") == "Paris"
    assert t.push(" is #") == " is"  # "#" may start the stop string, " " may be trailing
    assert t.push("#") == ""
    assert t.push("# Instruction") == "" and t.stopped and t.finish() == ""
    assert _pieces(AnswerText(("###",)), [" Paris", " is #", "# ok"]) == "Paris is ## ok"
    assert _pieces(AnswerText(), ["\n ", " a", "  ", "b ", "\n"]) == "a  b"  # as ask strips it
    assert _pieces(AnswerText(("b",)), ["a", "b", "c"]) == "a"
    assert _pieces(AnswerText(("END", "x")), ["hello E", "N", "D there"]) == "hello"


def test_messages_become_one_question():
    limits = Limits("m")
    q, images = conversation([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello!"},
                              {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                           {"type": "image_url", "image_url": {"url": png_data_url()}}]},
                              {"role": "user", "content": "Be precise."}], limits)
    assert q.instruction == "What is this?\n\nBe precise." and q.system == "Be brief."
    assert q.history == (Turn("Hi", "Hello!"),)
    assert q.image in images and q.image.startswith("sha256:") and images[q.image].size == (32, 32)
    same, _ = conversation([user("a", png_data_url()), {"role": "assistant", "content": "b"}, user("c")], limits)
    assert same.image == q.image  # an image is known by its bytes
    with pytest.raises(ApiError, match="tool calls"):
        conversation([{"role": "user", "content": "x", "tool_calls": [{}]}], limits)
    req = parse_chat_request({"messages": [user("hi")]}, limits)
    assert (req.temperature, req.top_p, req.max_tokens, req.stops) == (0.1, 0.75, None, ())  # lav2 ask's defaults
    assert parse_chat_request({"messages": [user("hi")], "max_completion_tokens": 9, "stop": "x"}, limits).max_tokens == 9
    assert isinstance(q, Question)
    penalised = parse_chat_request({"messages": [user("hi")], "frequency_penalty": 0.5, "presence_penalty": -1}, limits)
    assert (penalised.frequency_penalty, penalised.presence_penalty) == (0.5, -1.0)
    assert (req.frequency_penalty, req.presence_penalty) == (0.0, 0.0)


def test_chatml_renders_real_turns_and_alpaca_folds_them_into_the_input():
    chatml, alpaca = get_template("chatml"), get_template("alpaca")
    history = (Turn("Hi", "Hello!"), Turn("2+2?", "4"))
    assert chatml.prompt("And 3+3?", "Image caption: a cat", history=history, system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nImage caption: a cat\n\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")
    assert chatml.prompt("x", history=()) == chatml.prompt("x") and CHATML_SYSTEM in chatml.prompt("x")
    folded = alpaca.prompt("And 3+3?", "Image caption: a cat", history=history, system="Be brief.")
    assert folded.endswith("### Instruction:\nAnd 3+3?\n\n### Input:\nBe brief.\n\n"
                           f"{HISTORY_HEADING}\nUser: Hi\nAssistant: Hello!\nUser: 2+2?\nAssistant: 4\n\n"
                           "Image caption: a cat\n\n### Response:")
    assert alpaca.prompt("x", history=()) == alpaca.prompt("x")  # no conversation: the template as trained


def test_generate_stops_a_row_when_on_token_says_so(tiny_engine):
    """The hook the server stops rows with (a client gone, a stop string, a row's max_tokens):
    the row ends there, the others run on, and the batch ends when no row runs."""
    from lav2cli.inference.generate import Sampling

    eng = tiny_engine
    prompts = [eng.template.encode_prompt(eng.tokenizer, q) for q in ("the red circle", "a blue square")]
    sampling = Sampling(max_new_tokens=12, temperature=0)
    free = eng.generate(prompts, sampling=sampling)
    calls: list[int] = []

    def on_token(row: int, ids: list[int]) -> bool:
        calls.append(row)
        return row == 0 and len(ids) == 2

    out = eng.generate(prompts, sampling=sampling, on_token=on_token)
    assert out[0] == free[0][:2] and out[1] == free[1]
    assert calls.count(0) == 2 and calls.count(1) == len(free[1])
    calls.clear()
    assert eng.generate(prompts, sampling=sampling, on_token=lambda r, ids: True) == [free[0][:1], free[1][:1]]


def test_the_scheduler_stops_a_cancelled_row_and_finishes_the_others(tiny_engine):
    from lav2cli.answer import Pipeline
    from lav2cli.experts import ExpertOptions, Experts
    from lav2cli.serve.scheduler import Job, Scheduler

    sched = Scheduler(tiny_engine, Pipeline(Experts(ExpertOptions())), max_batch=4, wait_s=0.5)
    events: dict[str, list] = {"gone": [], "kept": []}
    ended = {name: threading.Event() for name in events}
    jobs: dict[str, Job] = {}

    def emitter(name: str):
        def emit(event: tuple) -> None:
            events[name].append(event)
            if name == "gone" and event[0] == "text":
                jobs[name].cancel()  # the client goes away after its first piece of text
            if event[0] in ("end", "error"):
                ended[name].set()
        return emit

    for name, q in (("gone", "the red circle"), ("kept", "a blue square")):
        jobs[name] = Job(Question(None, q), {}, 30, 0.0, 1.0, None, (), emitter(name))
    sched.start()
    try:
        for job in jobs.values():
            sched.submit(job)
        assert all(e.wait(120) for e in ended.values())
    finally:
        sched.stop()
    gone_end, kept_end = events["gone"][-1], events["kept"][-1]
    assert gone_end[:2] == ("end", "cancelled")
    texts_before_cancel = [i for i, e in enumerate(events["gone"]) if e[0] == "text"][0]
    assert jobs["gone"].tokens < 30 and len(events["gone"]) == texts_before_cancel + 2  # no text after it
    assert kept_end[1] in ("stop", "length") and (kept_end[1] == "length") == (kept_end[3] == 30)
    assert sched.stats.batches == 1 and sched.stats.cancelled == 1 and sched.stats.completed == 1
