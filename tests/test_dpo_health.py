"""The DPO recipe's NLL term and the training-health warnings, on the real trainer."""
import pytest

from core.backend import load_backend
from core.dpo import DPOSettings, loss_terms, train_dpo, training_health
from core.guards import TemplateGuard
from registry.models import profile_by_name
from tests.test_dpo_merge import RECORDS


def settings(**changes) -> DPOSettings:
    base = dict(learning_rate=1e-3, beta=0.1, epochs=1, batch_size=1, grad_accum=1,
                max_length=128, save_steps=100, lora_r=4, lora_alpha=8, lora_dropout=0.0, seed=0)
    return DPOSettings(**{**base, **changes})


def train(tiny_dir, tmp_path, **changes) -> dict:
    backend = load_backend(str(tiny_dir), profile_by_name("tiny-qwen2"))
    return train_dpo(backend, RECORDS, settings(**changes), tmp_path / "train",
                     tmp_path / "adapter", TemplateGuard(backend.tokenizer))


def test_a_run_that_learns_nothing_is_flagged(tiny_dir, tmp_path):
    metrics = train(tiny_dir, tmp_path, learning_rate=0.0)
    assert all(abs(s["loss"] - 0.6931) < 1e-3 for s in metrics["per_step"])
    assert any(w.startswith("nothing learned") for w in metrics["health"]["warnings"])


def test_the_nll_term_is_trained_and_a_learning_run_is_not_flagged(tiny_dir, tmp_path):
    metrics = train(tiny_dir, tmp_path, sft_weight=1.0, epochs=2)
    assert metrics["steps"] == 6
    # with the NLL term the logged loss is DPO + NLL on chosen, far above ln 2
    assert metrics["per_step"][0]["loss"] > 1.0
    assert not any(w.startswith("nothing learned") for w in metrics["health"]["warnings"])
    assert metrics["health"]["chosen_logratio_last"] is not None


def test_a_diverging_run_stops_with_the_step_and_the_last_good_checkpoint(tiny_dir, tmp_path):
    from core.dpo import TrainingDiverged

    with pytest.raises(TrainingDiverged) as error:
        train(tiny_dir, tmp_path, learning_rate=float("inf"), save_steps=1, epochs=3)
    message = str(error.value)
    assert "training diverged at step 2 (" in message and "nan" in message
    assert "checkpoint-" in message and "--set profile.learning_rate" in message
    assert error.value.exit_code == 1
    assert not (tmp_path / "adapter").exists()  # nothing saved from a diverged run


def test_loss_terms():
    assert loss_terms(0.0) == {"loss_type": ["sigmoid"]}
    assert loss_terms(0.5) == {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}


@pytest.mark.parametrize("steps, expected", [
    ([{"rewards/margins": 0.0}, {"rewards/margins": 0.004}], "nothing learned"),
    ([{"rewards/margins": 0.5}, {"rewards/margins": 35.0}], "margins exploded"),
    # beta 0.1: rewards/chosen -0.15 is 1.5 nats below the reference on the last batch
    ([{"rewards/margins": 0.5, "rewards/chosen": 0.0}, {"rewards/margins": 1.0, "rewards/chosen": -0.15}],
     "chosen responses became less likely"),
])
def test_health_warnings_on_hand_written_curves(steps, expected):
    warnings = training_health(steps, beta=0.1)["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith(expected)


def test_a_healthy_curve_has_no_warning():
    steps = [{"rewards/margins": 0.1, "rewards/chosen": 0.0, "rewards/rejected": 0.0,
              "logps/chosen": -20.0},
             {"rewards/margins": 0.8, "rewards/chosen": 0.05, "rewards/rejected": -0.3,
              "logps/chosen": -60.0}]  # raw log-probs of another batch: not compared
    health = training_health(steps, beta=0.1)
    assert health["warnings"] == []
    assert health["chosen_logratio_last"] == pytest.approx(0.5)
    assert health["rejected_logratio_last"] == pytest.approx(-3.0)
