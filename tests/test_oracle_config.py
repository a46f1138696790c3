"""Judge configuration: misspelt or invalid settings are rejected by name."""

import pytest

from trace_realign.core.errors import ConfigError
from trace_realign.core.oracle import OpenAIJudgeConfig, make_judge, parse_judge_config


@pytest.mark.parametrize(
    "config, message",
    [
        ({"backend": "openai", "model": "m", "max_concurency": 8}, "unknown setting 'judge.max_concurency'"),
        ({"backend": "openai"}, "setting 'judge.model' is required"),
        ({"backend": "openai", "model": "m", "max_concurrency": 0}, "'judge.max_concurrency'"),
        ({"backend": "openai", "model": "m", "structured_output": "regex"}, "'judge.structured_output'"),
        ({"backend": "gpt"}, "judge.backend: must be one of openai, vllm, transformers, annotations"),
        ({"model": "m"}, "judge.backend"),
        ({"backend": "annotations", "model": "m"}, "unknown setting 'judge.model'"),
        ({"backend": "transformers", "model_path": "x", "dtype": "fp8"}, "'judge.dtype'"),
        ("openai", "expected a mapping"),
    ],
)
def test_bad_settings_are_named(config, message):
    with pytest.raises(ConfigError) as err:
        parse_judge_config(config)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "setting, template, message",
    [
        ("prompt_template", "Q: {prompt}\nA: {answer}", "unknown placeholder(s) ['answer']"),
        ("prompt_template", "Q: {prompt}", "must contain {response}"),
        ("system_template", "You are a judge.", "must contain {policy}"),
        ("prompt_template", "Q: {prompt} {response} {", "not a valid template"),
    ],
)
def test_bad_templates_are_named(setting, template, message):
    with pytest.raises(ConfigError) as err:
        make_judge({"backend": "openai", "model": "m", "api_key_env": None, setting: template})
    assert setting in str(err.value) and message in str(err.value)


def test_a_config_model_is_accepted_and_defaults_follow_the_authors():
    cfg = OpenAIJudgeConfig(backend="openai", model="gpt-4o", api_key_env=None)
    judge = make_judge(cfg)
    assert judge.config is cfg
    assert cfg.max_answer_tokens == 1 and cfg.temperature == 0.3 and cfg.max_correction_tokens == 512
    assert "Is this response violating the policy? Answer with only 'Yes' or 'No'." in cfg.prompt_template


def test_unknown_and_placement_settings_have_defaults_and_are_checked_by_name():
    cfg = parse_judge_config({"backend": "openai", "model": "m"}, "oracle")
    assert (cfg.max_unknown_share, cfg.max_unknown_attempts, cfg.policy_placement) == (0.05, 3, "auto")
    assert "reasoning" in OpenAIJudgeConfig.model_fields["max_answer_tokens"].description
    assert parse_judge_config({"backend": "annotations", "max_unknown_share": 0.2}).max_unknown_share == 0.2
    for config, message in [
        ({"backend": "openai", "model": "m", "policy_placement": "assistant"}, "'oracle.policy_placement'"),
        ({"backend": "transformers", "model_path": "x", "max_unknown_share": 1.5}, "'oracle.max_unknown_share'"),
        ({"backend": "vllm", "model": "m", "max_unknown_attempts": 0}, "'oracle.max_unknown_attempts'"),
        ({"backend": "annotations", "max_unknown_attempts": 2}, "unknown setting 'oracle.max_unknown_attempts'"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_judge_config(config, "oracle")
        assert message in str(err.value)
