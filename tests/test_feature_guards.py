"""Which test fails when a feature is switched off: the table GUARDS below.

Every piece in it was disabled once by hand (the edit in its second column, made in tltool/
and reverted), the tests in its third column failed, and with the edit reverted they pass.
The guards live in the test files of their features and all run in the default `make test`.
The test below keeps the table honest: every test it names exists and is not marked slow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HERE = Path(__file__).parent

ALIGN = "test_adapt.py::test_each_alignment_loss_is_logged_and_changes_the_trained_weights"
THRESHOLD = "test_decision.py::test_a_threshold_chosen_on_validation_rows_beats_the_usual_half"
MULTILABEL = ("test_decision.py::"
              "test_multilabel_thresholds_are_chosen_per_label_and_decide_each_label")
ARGMAX = "test_decision.py::test_argmax_answers_the_most_probable_of_several_classes"
TEMPERATURE = ("test_calibration.py::"
               "test_temperature_scaling_lowers_the_validation_log_loss_and_rescales_every_answer")
OFFSET_NET = "test_routes.py::test_an_untrained_prior_offset_network_answers_as_its_prior"
OFFSET_LR = "test_routes.py::test_a_prior_offset_classic_head_corrects_its_prior"
PRIOR_INPUT = "test_routes.py::test_a_prior_given_as_input_informs_the_heads_answers"
DOMAIN = "test_routes.py::test_the_domain_offset_keeps_the_source_rate_out_of_pooled_answers"
L2SP = "test_routes.py::test_l2sp_keeps_the_fine_tuned_backbone_near_the_source_weights"
BIAS_ONLY = ("test_freeze.py::"
             "test_bias_only_fine_tuning_moves_the_backbones_biases_and_nothing_else")
CLASSIC = "test_routes.py::test_classic_reference_models_train_evaluate_and_predict"

# (piece, disabling edit made once by hand in tltool/, tests that failed: file::test[param])
GUARDS = [
    ("CORAL loss", "adapt.coral returns torch.zeros(())",
     ["test_adapt.py::test_alignment_losses_are_zero_for_one_domain_and_grow_with_the_shift",
      "test_adapt.py::test_coral_matches_its_definition",
      "test_adapt.py::test_adapted_training_narrows_the_domain_gap", f"{ALIGN}[coral-5.0]"]),
    ("CORAL loss", "Adaptation.loss multiplies coral's value by 0", [f"{ALIGN}[coral-5.0]"]),
    ("MMD loss", "adapt.mmd returns torch.zeros(())",
     ["test_adapt.py::test_alignment_losses_are_zero_for_one_domain_and_grow_with_the_shift",
      f"{ALIGN}[mmd-5.0]"]),
    ("DANN critic", "Adaptation.loss multiplies the critic's loss by 0",
     ["test_adapt.py::test_dann_reverses_the_gradient_into_the_features",
      f"{ALIGN}[dann-1.0]"]),
    ("DANN gradient reversal", "the reversal's backward returns the gradient unchanged",
     ["test_adapt.py::test_dann_reverses_the_gradient_into_the_features",
      f"{ALIGN}[dann-1.0]"]),
    ("alignment in the training step", "engine's adapted step back-propagates the labelled "
     "loss only", [f"{ALIGN}[coral-5.0]", f"{ALIGN}[mmd-5.0]", f"{ALIGN}[dann-1.0]"]),
    ("L2-SP", "engine.loop.l2sp_penalty returns zero",
     ["test_routes.py::test_l2sp_penalty_equals_its_formula",
      "test_routes.py::test_l2sp_pulls_weights_towards_the_pretrained_ones", L2SP]),
    ("L2-SP in the training loop", "the loop adds 0 x the penalty",
     ["test_routes.py::test_l2sp_pulls_weights_towards_the_pretrained_ones", L2SP]),
    ("prior offset", "TransferModel.from_features does not add the prior's signal",
     [OFFSET_NET, OFFSET_LR, "test_routes.py::"
      "test_a_prior_of_several_source_models_averages_their_log_probabilities",
      "test_select.py::test_prior_offset_starts_at_the_source_answer"]),
    ("prior offset: head starts at zero", "build_model skips _zero_last_linear",
     [OFFSET_NET, "test_select.py::test_prior_offset_starts_at_the_source_answer"]),
    ("prior offset: classic fit", "fit_classic passes offset=None to the classic head",
     [OFFSET_LR]),
    ("prior input", "prior_columns returns zeros", [PRIOR_INPUT]),
    ("prior input: forward", "from_features appends 0 x the prior columns", [PRIOR_INPUT]),
    ("prior input: classic fit", "fit_classic appends 0 x the prior columns", [PRIOR_INPUT]),
    ("keep_head", "routes.build ignores model.keep_head",
     ["test_routes.py::test_prior_offset_and_keep_head_routes"]),
    ("pooled domain offset (network)", "the source rows' domain_bias is not added",
     ["test_routes.py::test_pooled_training_uses_the_source_rows", f"{DOMAIN}[network]"]),
    ("pooled domain offset (classic)", "fit_classic passes domain=None",
     [f"{DOMAIN}[logistic_regression]"]),
    ("bias_only", "bias_only trains no backbone parameter",
     ["test_freeze.py::test_trainable_parameter_counts[bias_only-0-162]", BIAS_ONLY]),
    ("bias_only", "bias_only trains every backbone parameter",
     ["test_freeze.py::test_trainable_parameter_counts[bias_only-0-162]",
      "test_freeze.py::test_frozen_tensors_are_bit_identical_after_training[bias_only-1-mlp]",
      BIAS_ONLY]),
    ("logistic_regression head", "coefficients and intercepts set to 0 after the fit",
     [f"{CLASSIC}[logistic_regression]"]),
    ("ridge head", "coefficients and intercept set to 0 after the fit",
     ["test_regression.py::test_a_ridge_head_predicts_amounts_better_than_their_mean"]),
    ("gradient_boosting head", "the tree head answers zeros", [f"{CLASSIC}[gradient_boosting]"]),
    ("threshold rule", "choose_threshold always returns 0.5", [THRESHOLD, MULTILABEL]),
    ("threshold rule", "metrics.decide ignores the threshold (argmax)",
     ["test_decision.py::test_rule_kinds", THRESHOLD]),
    ("argmax rule", "metrics.decide answers class 0",
     ["test_decision.py::test_rule_kinds", ARGMAX]),
    ("multi-label thresholds", "decide_multilabel uses 0.5 for every label",
     ["test_decision.py::test_rule_kinds", MULTILABEL]),
    ("multi-label thresholds", "choose_decision saves 0.5 for every label", [MULTILABEL]),
    ("regression rule", "Decision.decide answers zeros", ["test_decision.py::test_rule_kinds"]),
    ("regression rule", "Decision.frame writes zeros as the predictions",
     ["test_regression.py::test_pretrain_finetune_evaluate_predict"]),
    ("temperature scaling", "fit_temperature returns 1",
     ["test_calibration.py::test_temperature_recovers_the_true_one",
      "test_calibration.py::test_multilabel_gets_one_temperature_per_label", TEMPERATURE]),
    ("temperature scaling", "calibration.scale returns its input",
     [TEMPERATURE, "test_decision.py::test_calibration_is_applied_before_the_rule"]),
    ("temperature scaling", "Decision.calibrated returns its input",
     ["test_calibration.py::test_calibration_changes_probabilities_not_ranking", TEMPERATURE,
      "test_decision.py::test_calibration_is_applied_before_the_rule"]),
]


def _slow_marks(func: ast.FunctionDef) -> tuple[bool, set[str]]:
    """Whether the test is marked slow, and the first values of its slow pytest.param cases."""
    marked, params = False, set()
    for deco in func.decorator_list:
        if "mark.slow" in ast.unparse(deco) and "parametrize" not in ast.unparse(deco):
            marked = True
        for call in ast.walk(deco):
            if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("param") and \
                    any("slow" in ast.unparse(k.value) for k in call.keywords) and call.args:
                try:
                    params.add(str(ast.literal_eval(call.args[0])))
                except ValueError:  # a case computed at collection: any case may be slow
                    params.add("")
    return marked, params


def _tests(path: Path) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text())
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("piece, edit, tests", GUARDS, ids=[f"{p}: {e}" for p, e, _ in GUARDS])
def test_every_guard_exists_and_runs_by_default(piece, edit, tests):
    assert tests, piece
    for name in tests:
        file, test = name.split("::")
        base, _, case = test.partition("[")
        func = _tests(HERE / file).get(base)
        assert func is not None, f"{piece}: {name} is not a test of {file}"
        marked, slow_cases = _slow_marks(func)
        assert not marked, f"{piece}: {name} is marked slow"
        assert not any(case.startswith(c) for c in slow_cases), f"{piece}: {name} is slow"
