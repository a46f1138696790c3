"""Training and impact scores on two processes (torchrun, gloo, CPU) against one process.

Measured tolerances (tiny random model, LoRA, float32, 6 steps): the 2-process adapter differs
from the 1-process adapter with the same global batch by at most 8.0e-7 (values up to 0.14), and
a resumed 2-process run equals the uninterrupted one exactly (tolerance here: 5e-6 absolute). The
sharded impact scores differ from one process's by at most 2e-6 relative on the smoke config
(the gold gradient is summed in another order, batches are cut differently); tolerance 1e-5.
"""

import dataclasses
import os
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.test_training import LORA, settings, triaged_set
from trace_realign.core.config import TriageConfig, WeightsConfig
from trace_realign.core.distributed import Launch, RankFailed, failure, run_job
from trace_realign.core.errors import ConfigError, TraceError
from trace_realign.core.modeling import add_lora, load_model, save_adapter
from trace_realign.core.reference import ScoreRanks, run_reference_stage
from trace_realign.core.training import TrainJob, run_training

TIMEOUT_S = 240  # one launch takes 10 to 30 s on 2 busy cores


@pytest.fixture(scope="module")
def theta_ref(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """The initial adapter folder and the reference stage's samples (weights, reference log-probs)."""
    folder = tmp_path_factory.mktemp("theta_ref")
    model = add_lora(load_model(tiny_model_dir), LORA, seed=0)
    save_adapter(model, folder / "init")
    ref = run_reference_stage(model, tiny_tokenizer, triaged_set(), settings(), WeightsConfig(gold_size=6), TriageConfig())
    return folder / "init", ref


def adapter_weights(output) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(output.paths["adapter"], "adapter_model.safetensors"))


def test_two_processes_train_like_one_with_the_same_global_batch_and_resume(tiny_model_dir, theta_ref, tmp_path):
    init, ref = theta_ref

    def job(name, **kw):
        training = settings(max_steps=6, save_steps=3, **kw).model_dump(mode="json")
        return TrainJob(str(tiny_model_dir), training, str(tmp_path / name), adapter=str(init), progress=False)

    one = run_training(job("one", per_device_batch_size=4), ref.samples)
    two = job("two", per_device_batch_size=2, num_processes=2)
    with pytest.raises(RankFailed) as failed:
        run_training(dataclasses.replace(two, fail_at_step=3), ref.samples, timeout=TIMEOUT_S)
    message = str(failed.value)
    assert message.startswith("train: rank ") and "InjectedFailure: injected training failure at step 3" in message, message
    assert "\n" not in message
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (tmp_path / "two" / "final").exists()  # nothing half-written where the output goes

    resumed = run_training(dataclasses.replace(two, resume=True), ref.samples, timeout=TIMEOUT_S)
    assert resumed.result.global_step == 6
    expected, got = adapter_weights(one), adapter_weights(resumed)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=5e-6)
    init_weights = load_file(init / "adapter_model.safetensors")
    assert any(not torch.equal(got[n], init_weights[n]) for n in got)  # it trained
    # The metrics come back as in one process: the last logged loss and components, over both ranks.
    last = [h for h in resumed.result.log_history if "loss" in h][-1]
    last_one = [h for h in one.result.log_history if "loss" in h][-1]
    assert last["step"] == last_one["step"] == 6
    for key in ("loss", "prefer_margin", "retain_kl"):
        assert last[key] == pytest.approx(last_one[key], rel=1e-4, abs=1e-6), key


def test_impact_scores_shard_over_two_processes(tiny_model_dir, tiny_tokenizer, theta_ref, tmp_path):
    init, ref = theta_ref
    model = add_lora(load_model(tiny_model_dir), LORA, seed=0)
    ranks = ScoreRanks(str(tiny_model_dir), str(init), str(tmp_path / "launch"), timeout=TIMEOUT_S)
    two = run_reference_stage(
        model, tiny_tokenizer, triaged_set(), settings(num_processes=2), WeightsConfig(gold_size=6), TriageConfig(), ranks=ranks
    )
    parts = sorted(p.name for p in (tmp_path / "launch").glob("scores-rank*.pt"))
    assert parts == ["scores-rank0.pt", "scores-rank1.pt"]
    slices = [torch.load(tmp_path / "launch" / p)["index"] for p in parts]
    assert slices[0] and slices[1] and not set(slices[0]) & set(slices[1])  # each rank scored its own slice
    assert sorted(slices[0] + slices[1]) == list(range(len(ref.scores)))
    assert two.scores.keys() == ref.scores.keys() and len(ref.scores) >= 4
    for pair_id, score in ref.scores.items():
        assert two.scores[pair_id] == pytest.approx(score, rel=1e-5, abs=1e-9), pair_id
    assert [s.pair_id for s in two.samples] == [s.pair_id for s in ref.samples]
    for a, b in zip(two.samples, ref.samples):
        assert a.weight == pytest.approx(b.weight, rel=1e-5, abs=1e-9)
        assert a.ref_logps == pytest.approx(b.ref_logps, rel=1e-5)


def test_more_processes_without_ranks_is_refused(tiny_model_dir, tiny_tokenizer):
    model = add_lora(load_model(tiny_model_dir), LORA, seed=0)
    with pytest.raises(TraceError, match="num_processes > 1 needs ranks"):
        run_reference_stage(model, tiny_tokenizer, triaged_set(), settings(num_processes=2), WeightsConfig(gold_size=6), TriageConfig())


def test_a_missing_accelerate_config_is_named(tmp_path):
    training = settings(num_processes=2, launcher="accelerate", accelerate_config=str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"^training\.accelerate_config: file not found: .*nope\.yaml$"):
        Launch.of(training)
    shipped = Launch.of(settings(num_processes=2, launcher="accelerate"))
    assert shipped.accelerate_config.name == "ddp.yaml" and shipped.accelerate_config.is_file()
    assert (shipped.accelerate_config.parent / "fsdp.yaml").is_file()
    assert Launch.of(settings(num_processes=2, launcher="torchrun")).accelerate_config is None


def test_the_first_written_rank_error_is_the_one_reported(tmp_path):
    (tmp_path / "ranks.log").write_text("starting\nTraceback ...\nValueError: boom\n")
    (tmp_path / "rank-1.error").write_text("ValueError: boom\n")
    time.sleep(0.01)
    (tmp_path / "rank-0.error").write_text("DistBackendError: connection closed by peer\n")
    first_written = failure(tmp_path, "train", 1)
    assert (first_written.rank, first_written.error) == (1, "ValueError: boom")
    assert str(first_written).startswith("train: rank 1 failed: ValueError: boom (exit 1; log: ")
    for p in tmp_path.glob("rank-*.error"):
        p.unlink()
    from_log = failure(tmp_path, "reference", -9)
    assert from_log.rank is None and str(from_log).startswith("reference: the launcher failed with exit -9: ValueError: boom")


def test_a_job_past_its_timeout_is_stopped_with_its_ranks(tiny_model_dir, theta_ref, tmp_path):
    init, ref = theta_ref
    job = TrainJob(str(tiny_model_dir), settings(per_device_batch_size=2, num_processes=2).model_dump(mode="json"), str(tmp_path / "t"), adapter=str(init))
    folder = tmp_path / "launch"
    with pytest.raises(TraceError, match=r"^train: 2 processes did not finish within 2 s"):
        run_job("train", {"job": dataclasses.asdict(job)}, ref.samples, folder, Launch(2), stage="train", echo=False, timeout=2)
    left = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True, timeout=30).stdout.split()
    assert left == [], f"processes left running: {left}"
