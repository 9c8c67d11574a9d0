"""The demo's request mix and model/spec choice (the engine part runs in `circuitwatch demo`)."""

import json

from sidecar.demo import MONITORS, default_spec, demo_prompts, has_chat_template, monitor_prompts
from sidecar.discover.datasets import composed_benign, harmbench, tricky_benign
from sidecar.models.registry import REFERENCE_DIR, REFERENCE_SPEC, SMOLLM2_HARM_SPEC, SMOLLM2_SPEC


def test_repeated_prompts_hold_a_word_sequence_twice_in_both_modes():
    for chat in (False, True):
        prompts = demo_prompts(round_index=1, per_kind=3, chat=chat)
        assert [p.repeated for p in prompts] == [False, True] * 3
        for prompt in prompts:
            words = prompt.text.removeprefix("Repeat this text exactly: ").split()
            half = len(words) // 2
            assert (words[:half] == words[half:]) is prompt.repeated
            assert prompt.text.startswith("Repeat this") is (chat and prompt.repeated)
    assert demo_prompts(2, 3, chat=True) != demo_prompts(1, 3, chat=True)


def test_named_models_bring_their_spec_and_directories_need_one():
    assert default_spec("reference") == REFERENCE_SPEC
    assert default_spec("smollm2") == SMOLLM2_SPEC
    assert default_spec(str(REFERENCE_DIR)) is None


def test_chat_template_is_found_in_a_file_or_the_tokenizer_config(tmp_path):
    assert not has_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    assert has_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("{{ x }}")
    assert has_chat_template(tmp_path)
    assert not has_chat_template(REFERENCE_DIR)


def test_monitor_prompts_come_from_the_held_out_sets():
    prompts = monitor_prompts(round_index=0, per_kind=3)
    assert [p.kind for p in prompts] == ["harmful"] * 3 + ["benign"] * 3 + ["tricky"] * 2
    sets = {"harmful": harmbench(), "benign": composed_benign("test"), "tricky": tricky_benign()}
    for prompt in prompts:
        assert prompt.text in {e.content for e in sets[prompt.kind]}
    assert monitor_prompts(1, 3) != prompts
    assert MONITORS["harm"] == ("smollm2", SMOLLM2_HARM_SPEC)
