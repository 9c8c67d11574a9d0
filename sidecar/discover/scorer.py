"""The offline reference scorer: component values and circuit scores from a plain HF forward pass.

This is the ground truth the live path (in-engine taps + sidecar scoring) is checked
against, so it is written for reading, not speed: the HF model in float32 on the CPU, one
forward pass per sequence, a loop over components, arithmetic in float64, and nothing shared
with the in-engine implementation but the spec. Semantics (common to every implementation):

    head h at blocks.L.attn.hook_z   c = z[:, cols] @ W_O[:, cols].T, cols = h*d_head..(h+1)*d_head
                                     value = ||c||, or c . u + bias with a direction u
    direction at a site, x           value = x . w + bias
    circuit                          score = sum_i weight_i * value_i + circuit bias

For a prompt of P tokens and G generated tokens the engine runs positions 0..P+G-2 (the last
generated token is never fed back); positions < P are the prompt phase, the rest generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from sidecar.discover.capture import Captures, capture
from sidecar.protocol.batch import GENERATED, PROMPT
from sidecar.spec.identity import read_model_shape
from sidecar.spec.load import check_model
from sidecar.spec.schema import PHASE_NAMES, CircuitSpec, Component, ComponentKind


@dataclass(frozen=True)
class PhaseAggregate:
    """One circuit's per-token scores over one phase of one sequence."""

    circuit: str
    phase: int  # PROMPT or GENERATED
    mean: float
    max: float
    count: int

    @property
    def phase_name(self) -> str:
        return PHASE_NAMES[self.phase]


@dataclass(frozen=True, eq=False)
class ScoredTokens:
    """Every token the engine would run for one request, with its values and scores."""

    component_names: tuple[str, ...]
    circuit_names: tuple[str, ...]
    token_ids: np.ndarray  # int64 [T], the tokens fed to the model
    positions: np.ndarray  # int32 [T]
    phases: np.ndarray  # uint8 [T], PROMPT or GENERATED
    values: np.ndarray  # float32 [T, k], one column per spec component
    scores: np.ndarray  # float32 [T, n_circuits]
    generated_ids: tuple[int, ...] = ()  # all generated tokens, including the last (not fed)

    def aggregate(self) -> tuple[PhaseAggregate, ...]:
        """Mean and max of each circuit's scores per phase; phases without tokens are left out."""
        aggregates = []
        for j, circuit in enumerate(self.circuit_names):
            for phase in (PROMPT, GENERATED):
                scores = self.scores[self.phases == phase, j].astype(np.float64)
                if scores.size:
                    aggregates.append(
                        PhaseAggregate(
                            circuit, phase, float(scores.mean()), float(scores.max()), scores.size
                        )
                    )
        return tuple(aggregates)


def component_value(
    component: Component, activation: torch.Tensor, o_proj_weight: torch.Tensor, d_head: int
) -> torch.Tensor:
    """One component's value per token, float64 [T], from its site's activation [T, width].

    ``o_proj_weight`` [d_model, n_heads * d_head] is the component's layer's W_O; only heads
    read it.
    """
    x = activation.double()
    if component.kind is ComponentKind.HEAD:
        columns = slice(component.head * d_head, (component.head + 1) * d_head)
        contribution = x[:, columns] @ o_proj_weight.double()[:, columns].T  # [T, d_model]
        if component.direction is None:
            return contribution.norm(dim=-1)
        return contribution @ torch.from_numpy(component.direction).double() + component.bias
    return x @ torch.from_numpy(component.direction).double() + component.bias


class ReferenceScorer:
    """Scores token sequences for ``spec`` with the HF model in ``model_dir`` (CPU, float32)."""

    def __init__(self, spec: CircuitSpec, model_dir: str | Path):
        check_model(spec, model_dir)
        self.spec = spec
        self.model_dir = Path(model_dir)
        self.model: nn.Module = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=torch.float32
        ).eval()
        self._d_head = read_model_shape(self.model_dir).d_head

    @cached_property
    def tokenizer(self):
        """The model directory's tokenizer, loaded on first use (scoring ids needs none)."""
        return AutoTokenizer.from_pretrained(self.model_dir)

    def score(self, prompt_ids: Sequence[int], generated_ids: Sequence[int] = ()) -> ScoredTokens:
        """Score the tokens the engine runs for this request: prompt + generated[:-1]."""
        prompt_ids, generated_ids = list(prompt_ids), list(generated_ids)
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: the engine never runs an empty prompt")
        fed = prompt_ids + generated_ids[:-1]
        positions = np.arange(len(fed), dtype=np.int32)
        captures = capture(self.model, torch.tensor(fed), self.spec.sites)
        values = self._values(captures)
        return ScoredTokens(
            component_names=tuple(c.name for c in self.spec.components),
            circuit_names=tuple(c.name for c in self.spec.circuits),
            token_ids=np.asarray(fed, dtype=np.int64),
            positions=positions,
            phases=np.where(positions < len(prompt_ids), PROMPT, GENERATED).astype(np.uint8),
            values=values.float().numpy(),
            scores=self._scores(values).float().numpy(),
            generated_ids=tuple(generated_ids),
        )

    def score_text(self, prompt: str) -> ScoredTokens:
        """Score a text prompt tokenized as vLLM does for a completion (special tokens added)."""
        return self.score(self.tokenizer.encode(prompt, add_special_tokens=True))

    def generate_and_score(self, prompt_ids: Sequence[int], max_new_tokens: int) -> ScoredTokens:
        """Greedy-generate with HF (stopping at EOS as configured), then score the request."""
        prompt = torch.tensor([list(prompt_ids)])
        eos = self.model.generation_config.eos_token_id
        with torch.no_grad():
            output = self.model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                # Nothing is padded (one sequence); naming a pad id only silences HF's warning.
                pad_token_id=eos[0] if isinstance(eos, list) else eos,
            )
        return self.score(prompt_ids, output[0, prompt.shape[1] :].tolist())

    def _values(self, captures: Captures) -> torch.Tensor:
        columns = []
        for component in self.spec.components:
            o_proj = self.model.model.layers[component.site.layer].self_attn.o_proj.weight
            columns.append(
                component_value(component, captures[component.site], o_proj.detach(), self._d_head)
            )
        return torch.stack(columns, dim=1)

    def _scores(self, values: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(values.shape[0], len(self.spec.circuits), dtype=torch.float64)
        for j, circuit in enumerate(self.spec.circuits):
            scores[:, j] = circuit.bias
            for i, weight in enumerate(circuit.weights):
                scores[:, j] += weight * values[:, i]
        return scores
