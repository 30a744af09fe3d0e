"""Hub reachability is decided once (HF_HUB_OFFLINE honoured) and the fallback reported once."""

import http.server
import json
import os
import threading
import time

import pytest

from sa_bench.launch import jobdir, outcome, preflight
from sa_bench.models import loading


@pytest.fixture
def online_env(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return monkeypatch


class Answers404(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_reachability_follows_the_environment_and_the_endpoint(online_env):
    online_env.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    assert loading.hub_offline(timeout=2)
    assert time.monotonic() - start < 2.5
    server = http.server.HTTPServer(("127.0.0.1", 0), Answers404)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        online_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert not loading.hub_offline()  # any answer, even 404, means reachable
        online_env.setenv("HF_HUB_OFFLINE", "1")
        assert loading.hub_offline() and loading.offline_by_env()
    finally:
        server.shutdown()


def test_a_sweep_without_hub_models_never_asks(online_env):
    online_env.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    cfg = {"model": {"name": "tiny", "pretrained": "embedded:tiny-retrieval"}}
    assert preflight.decide_hub([cfg]) is None


def test_offline_sweep_tells_its_jobs_and_reports_the_fallback_once(online_env, tmp_path):
    online_env.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    cfg = {"model": {"name": "m", "pretrained": "org/model"}}
    assert preflight.decide_hub([cfg, cfg]) == "the Hugging Face hub is not reachable"
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # inherited by the workers started next
    dirs = []
    for i, source in enumerate(["offline_fallback:x", "offline_fallback:x", "hub"]):
        path = tmp_path / str(i)
        path.mkdir()
        (path / jobdir.ENV).write_text(json.dumps({"model_source": {"source": source, "path": "/fb"}}))
        dirs.append(path)
    note = outcome.fallback_note(dirs, "the Hugging Face hub is not reachable")
    assert note == ("  offline fallback weights used (the Hugging Face hub is not reachable): "
                    "/fb (2 jobs)")
    assert outcome.fallback_note(dirs[2:], None) is None
