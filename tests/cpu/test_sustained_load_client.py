"""The load test's client and bookkeeping (benchmarks/reliability/sustained_load.py) against
a loopback stand-in for `vllm serve`: errors, short answers and token differences are counted,
never hidden. (The real run needs a GPU; see docs/reliability.md.)"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from tests.cpu.scripts import load_script


@pytest.fixture(scope="module")
def load():
    return load_script("sustained_load", "benchmarks/reliability/sustained_load.py")


def stand_in(answer):
    """A loopback server answering /v1/completions with ``answer(prompt) -> (status, ids)``."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert body["temperature"] == 0.0 and body["ignore_eos"] is True
            status, ids = answer(body["prompt"], body["max_tokens"])
            payload = json.dumps({"choices": [{"text": "", "token_ids": ids}]}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def ids_for(prompt: str, n: int) -> list[int]:
    return [(len(prompt) * 31 + k) % 1000 for k in range(n)]


def test_counts_errors_short_answers_and_token_differences(load, tmp_path):
    prompts = load.make_prompts(8)
    assert len(set(prompts)) == 8

    def unfused_answer(prompt, n):
        return 200, ids_for(prompt, n)

    def fused_answer(prompt, n):
        if prompt == prompts[1]:
            return 500, []
        if prompt == prompts[2]:
            return 200, ids_for(prompt, n)[:-1]  # one token short
        if prompt == prompts[3]:
            return 200, ids_for(prompt, n)[::-1]  # different tokens
        return 200, ids_for(prompt, n)

    args = SimpleNamespace(concurrency=4, max_tokens=6, request_timeout=10, duration=1.0)
    results = {}
    for name, answer in (("unfused", unfused_answer), ("fused", fused_answer)):
        httpd = stand_in(answer)
        server = load.Server(name, httpd.server_address[1], [], {}, tmp_path / f"{name}.log")
        server.startup_s = 1.0
        ref = load.reference(server, "model", prompts, args)
        traffic, wall = load.sustained(server, "model", prompts, args)
        results[name] = (server, ref, traffic, wall)
        httpd.shutdown()

    unfused_server, unfused_ref, unfused_load, wall = results["unfused"]
    unfused = load.summarize(unfused_server, unfused_load, wall, unfused_ref, None)
    assert unfused.errors == 0 and unfused.requests > 8
    assert unfused.mismatches_vs_own_reference == 0

    server, ref, traffic, wall = results["fused"]
    fused = load.summarize(server, traffic, wall, ref, unfused_ref)
    bad_prompts = {o.prompt for o in traffic + ref if not o.ok}
    assert bad_prompts == {1, 2}
    assert fused.errors == sum(1 for o in traffic + ref if o.prompt in (1, 2))
    assert any(e.startswith("HTTP 500") for e in fused.error_samples)
    assert "5 tokens instead of 6" in fused.error_samples
    # Every request of prompt 3 (reference and load) differs from the unfused reference.
    assert fused.mismatches_vs_unfused_reference == sum(
        1 for o in traffic + ref if o.prompt == 3)
    assert fused.mismatch_samples[0]["prompt"] == 3

    report = {"date": "2026-11-27", "card": "stand-in", "commit": "abc", "versions": {},
              "command": "sustained_load.py", "verdict": "FAIL",
              "args": {"model": "m", "concurrency": 4, "max_tokens": 6, "duration": 1.0,
                       "prompts": 8, "parallel": True},
              "servers": [vars(unfused), vars(fused)]}
    text = load.markdown(report)
    assert "| fused | 1.0 |" in text and "Verdict: **FAIL**" in text


def test_error_lines_of_the_server_log_are_found(load, tmp_path):
    log = tmp_path / "server.log"
    log.write_text("INFO 11-27 10:00:00 [api_server.py:1] ready\n"
                   "ERROR 11-27 10:00:01 [core.py:9] EngineCore failed\n"
                   "(EngineCore pid=7) ERROR 11-27 10:00:02 [core.py:9] boom\n"
                   "WARNING 11-27 10:00:03 [x.py:1] vllm_fusion: fuse_norm_quant (p) failed\n"
                   "ERROR 11-27 10:00:04 [launcher.py:1] shutdown noise\n")
    server = load.Server("fused", 0, [], {}, log)
    server.log_end = log.read_text().index("ERROR 11-27 10:00:04")
    findings = server.log_findings()
    assert [l.split("]")[1].strip() for l in findings["error_lines"]] == [
        "EngineCore failed", "boom"]
    assert len(findings["fusion_warnings"]) == 1
