"""Shared parts of the live SmolLM2 tests: the bfloat16 tolerances, and (from
``sidecar.discover.engine_runs``, which ``circuitwatch calibrate --engine`` uses too) vLLM's
OpenAI server with the plugin, chats through the real ``openai`` client and the sidecar's
records for them.

Used by test_live_smollm2.py (every site kind, float32 and default dtype) and
test_monitor_live.py (the bundled harmful-request monitor's verdicts).
"""

from __future__ import annotations

from sidecar.discover.engine_runs import (  # noqa: F401 (re-exported to the test modules)
    SERVED_NAME,
    Ran,
    chat,
    openai_client,
    openai_server,
    records_for,
)

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
