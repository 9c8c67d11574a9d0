"""Shared parts of the live SmolLM2 tests: vLLM's OpenAI server with the plugin, chats through
the real ``openai`` client, the sidecar's records for them, and the bfloat16 tolerances.

Used by test_live_smollm2.py (every site kind, float32 and default dtype) and
test_monitor_live.py (the bundled harmful-request monitor's verdicts).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from test_openai_server import _free_port, _get, _wait_until

from sidecar.monitoring import stop_process
from sidecar.probe.config import ENV_ENDPOINT, ENV_SAMPLE, ENV_SPEC
from sidecar.server.records import CollectingSink, RequestRecord

ENGINE_START_S = 600  # ~140 s on an idle machine; several times that on a shared one
SERVED_NAME = "smollm2"
# bfloat16 engine against the float32 reference: every activation and weight is rounded to
# 8 mantissa bits and the error grows over 30 layers. In units of a circuit's scale (the
# standard deviation of its offline scores over all tokens sent), measured over 364 tokens of
# 7 requests: the median per-token deviation is at most 0.011, the 99th percentile 0.11, the
# worst 0.25 (hook_resid_post of layer 29 on the first token of a completion, where the
# residual stream is largest). What the tests exist to catch is O(1): the same scores one
# position off deviate by a median 0.5-1.0 on the residual and MLP directions, and a wrong
# head or column slice changes a value altogether. So: every token within 0.35, each
# circuit's median within 0.05, each prompt or generation mean within 0.15 (measured: 0.06).
BF16_TOKEN = 0.35
BF16_MEDIAN = 0.05
BF16_MEAN = 0.15


@contextmanager
def openai_server(
    model_dir: Path,
    spec_path: Path,
    listen: str,
    tmp: Path,
    *,
    dtype: str | None = None,
    prefix_caching: bool = False,
) -> Iterator[tuple[str, Path]]:
    """vLLM's OpenAI server (default compiled mode) with the plugin sending to ``listen``.

    Yields (base URL, log path); prints the log's tail when the body fails an assertion.
    ``dtype`` None: the engine's default (bfloat16 for SmolLM2's float32 checkpoint on CPU).
    """
    port = _free_port()
    env = dict(os.environ, **{ENV_SPEC: str(spec_path), ENV_ENDPOINT: listen, ENV_SAMPLE: "1.0"})
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(model_dir), "--served-model-name", SERVED_NAME,
               "--host", "127.0.0.1", "--port", str(port), "--gpu-memory-utilization", "0.2",
               "--max-model-len", "1024", "--max-num-seqs", "4", "--seed", "0"]  # fmt: skip
    command.append("--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching")
    if dtype is not None:
        command += ["--dtype", dtype]
    log_path = tmp / "vllm.log"
    log = open(log_path, "w")
    vllm = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}"
    try:
        _wait_until(lambda: _get(f"{api}/health") is not None, ENGINE_START_S, "vLLM", [vllm])
        yield api, log_path
    except AssertionError:
        log.flush()
        print(f"--- vLLM log ---\n{log_path.read_text()[-6000:]}")
        raise
    finally:
        stop_process(vllm, timeout=60)
        log.close()


def openai_client(api: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{api}/v1", api_key="unused", timeout=300)


@dataclass(frozen=True)
class Ran:
    """One request as the engine ran it."""

    request_id: str  # the engine's (external) request id
    prompt_ids: list[int]
    generated_ids: list[int]


def chat(client, tag: str, text: str, max_tokens: int) -> Ran:
    """One user turn through the chat API (the checkpoint's chat template), greedy, exactly
    ``max_tokens`` generated; the engine's tokens come back (``return_token_ids``)."""
    response = client.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
        extra_headers={"X-Request-Id": tag},
    )
    assert response.id == f"chatcmpl-{tag}"
    choice = response.choices[0]
    return Ran(response.id, response.prompt_token_ids, choice.token_ids)


def records_for(
    sink: CollectingSink, ran: Sequence[Ran], timeout: float = 60
) -> list[RequestRecord]:
    """The sidecar's record of each request, in ``ran``'s order (waits for them to finish)."""
    wanted = {r.request_id for r in ran}
    deadline = time.monotonic() + timeout
    got: dict[str, RequestRecord] = {}
    while time.monotonic() < deadline:
        got = {r.request_id: r for r in sink.records if r.request_id in wanted}
        if len(got) == len(wanted):
            return [got[r.request_id] for r in ran]
        time.sleep(0.1)
    seen = sorted(r.request_id for r in sink.records)
    raise AssertionError(f"sidecar scored {len(got)} of {len(wanted)} requests; it saw {seen}")
