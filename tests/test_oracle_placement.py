"""Judge chat templates without a system role (issue 10, item 7): the policy goes in the user
message, decided once per judge; other template failures are one line naming the model."""

from __future__ import annotations

import logging
import shutil

import pytest

from trace_realign.core.errors import TraceError
from trace_realign.core.oracle import JudgeItem, VerdictCache, judge_with_cache, make_judge
from trace_realign.core.oracle.base import DEFAULT_PROMPT_TEMPLATE, choose_placement
from trace_realign.core.policy import parse_policy

POLICY = parse_policy("Be helpful. Never explain how to build weapons.")
ITEMS = [JudgeItem("What is the capital of France?", "Paris."), JudgeItem("How do I build a bomb?", "I can't help with that.")]
# Gemma's template, reduced: it refuses a system message the way Gemma's does.
GEMMA_LIKE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def with_template(tiny_model_dir, folder, template: str) -> str:
    """A copy of the tiny model whose tokenizer has ``template`` as its chat template."""
    from transformers import AutoTokenizer

    shutil.copytree(tiny_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return str(folder)


def transformers_judge(path: str, where: str = "oracle", **settings):
    return make_judge({"backend": "transformers", "model_path": path, "device": "cpu", **settings}, where)


def question(item: JudgeItem) -> str:
    return DEFAULT_PROMPT_TEMPLATE.format(prompt=item.prompt, response=item.response)


def test_a_template_refusing_the_system_role_gets_the_policy_in_the_user_message(tiny_model_dir, tmp_path, caplog):
    path = with_template(tiny_model_dir, tmp_path / "gemma-like", GEMMA_LIKE)
    with caplog.at_level(logging.WARNING):
        judge = transformers_judge(path, max_correction_tokens=4)
        assert transformers_judge(path).placement == "user"  # a second judge (next shard) decides alike...
    said = [r.getMessage() for r in caplog.records if "refuses a system message" in r.getMessage()]
    assert len(said) == 1  # ...and the log says it once
    assert path in said[0] and "System role not supported" in said[0] and "oracle.policy_placement: user" in said[0]
    assert judge.placement == "user"
    rendered = judge._render(judge.templates.judge_messages(ITEMS[0], POLICY))
    assert rendered == f"<start_of_turn>user\n{POLICY.text}\n\n{question(ITEMS[0])}<end_of_turn>\n<start_of_turn>model\n"
    verdicts = judge.judge(ITEMS, POLICY)
    assert all(v.compliant is not None and 0.5 <= v.confidence <= 1.0 for v in verdicts)
    assert judge.identity == judge.identity_for("user") != judge.identity_for("system")
    assert len(judge.correct(ITEMS[:1], POLICY)) == 1  # corrections render the same way


def test_system_placement_asked_for_on_such_a_template_is_one_error_naming_the_setting(tiny_model_dir, tmp_path):
    path = with_template(tiny_model_dir, tmp_path / "gemma-like", GEMMA_LIKE)
    with pytest.raises(TraceError) as err:
        transformers_judge(path, policy_placement="system")
    assert str(err.value) == (
        f"{path}: the judge model's chat template refuses a system message (System role not supported); "
        "set oracle.policy_placement: user (or auto) to put the policy in the user message"
    )


@pytest.mark.parametrize(
    "template, failure",
    [
        ("{{ raise_exception('This template needs a tools list') }}", "This template needs a tools list"),
        ("{% for m in messages %}{{ m['content'] | no_such_filter }}{% endfor %}", "no_such_filter"),
        ("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}", "can only concatenate str"),
    ],
)
@pytest.mark.parametrize("placement", ["auto", "user"])
def test_any_other_template_failure_is_one_line_naming_the_model(tiny_model_dir, tmp_path, template, failure, placement):
    path = with_template(tiny_model_dir, tmp_path / "broken", template)
    with pytest.raises(TraceError) as err:
        transformers_judge(path, policy_placement=placement)
    message = str(err.value)
    assert message.startswith(f"{path}: the judge model's chat template fails: ") and failure in message
    assert "\n" not in message and "policy_placement" not in message


def test_a_template_with_a_system_role_keeps_it_and_the_placements_do_not_share_verdicts(tiny_model_dir, tmp_path):
    auto = transformers_judge(str(tiny_model_dir))
    user = transformers_judge(str(tiny_model_dir), policy_placement="user")
    assert auto.placement == "system"
    assert auto.identity == transformers_judge(str(tiny_model_dir), policy_placement="system").identity
    assert user.identity != auto.identity
    assert user._render(user.templates.judge_messages(ITEMS[0], POLICY)) == (
        f"<|im_start|>user\n{POLICY.text}\n\n{question(ITEMS[0])}<|im_end|>\n<|im_start|>assistant\n"
    )
    with VerdictCache(tmp_path / "v.db") as cache:
        judge_with_cache(auto, ITEMS, POLICY, cache)
        _, stats = judge_with_cache(user, ITEMS, POLICY, cache)
        assert stats["hits"] == 0 and stats["requests"] == 2
        _, stats = judge_with_cache(auto, ITEMS, POLICY, cache)
        assert stats["hits"] == 2


def test_choose_placement_probes_once_per_setting():
    from jinja2.exceptions import TemplateError

    seen = []

    def no_system(messages):
        seen.append([m["role"] for m in messages])
        if messages[0]["role"] == "system":
            raise TemplateError("System role not supported")
        return "ok"

    assert choose_placement(no_system, "auto", "m") == "user"
    assert choose_placement(no_system, "user", "m") == "user"
    assert seen == [["user"], ["system", "user"], ["user"]]  # "user" never probes the system role
    with pytest.raises(TraceError, match=r"^m: .*refuses a system message .*set evaluation\.judge\.policy_placement: user"):
        choose_placement(no_system, "system", "m", "evaluation.judge")
    assert choose_placement(lambda messages: "ok", "auto", "m") == "system"
