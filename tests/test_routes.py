"""The transfer routes as config choices: classic heads, pooled training, L2-SP, the source
model as a prior, the source head kept; each through the commands and run folders."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tltool.config import TrainConfig
from tltool.engine.loop import Trainer, l2sp_penalty
from tltool.engine.plan import Round, TrainingData, TrainingPlan
from tltool.models import HeadSettings, build_model, model_spec
from tltool.task import Task
from tltool.tensors import Tensors

NEW_ROWS = Path(__file__).resolve().parents[1] / "configs" / "credit" / "new_applicants.csv"
RAW = {"backbone": "raw", "backbone_args": {}, "weights": "none"}


def _run(cli, tmp_path, *args) -> Path:
    res = cli(*args)
    assert res.code == 0, res.err
    return tmp_path / res.out.strip()


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.parametrize("head", ["logistic_regression", "gradient_boosting"])
def test_classic_reference_models_train_evaluate_and_predict(head, cli, write_config,
                                                              tmp_path):
    run = _run(cli, tmp_path, "freeze-finetune", write_config("t", {"model": {**RAW,
                                                                               "head": head}}))
    m = _metrics(run)
    assert m["route"]["head"] == head and m["epochs_run"] == 0 and m["test"]["n"] == 181
    assert 0.5 < m["test"]["auroc"] < 1
    ev = _metrics(_run(cli, tmp_path, "evaluate", str(run)))
    assert ev["test"]["auroc"] == pytest.approx(m["test"]["auroc"], abs=1e-12)
    out = tmp_path / "p.csv"
    _run(cli, tmp_path, "predict", str(run), str(NEW_ROWS), "--out", str(out))
    assert len(pd.read_csv(out)) == len(pd.read_csv(NEW_ROWS))
    # the checkpoint is plain tensors: weights_only loading, nothing pickled
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["spec"]["head"] == head and "head_shape" in ckpt["spec"]


def test_pooled_training_with_source_weight_zero_is_target_only(cli, write_config, tmp_path):
    """source_weight 0 means no source rows at all: the same metrics, byte for byte."""
    for extra in ({"backbone_args": {"hidden": [16, 8]}}, {**RAW, "head": "logistic_regression"}):
        a = _run(cli, tmp_path, "freeze-finetune", write_config("a", {"model": extra}))
        b = _run(cli, tmp_path, "freeze-finetune", write_config("b", {
            "model": extra, "train": {"source_weight": 0.0, "domain_offset": True}}))
        ma, mb = _metrics(a), _metrics(b)
        assert ma["val"] == mb["val"] and ma["test"] == mb["test"]


def test_pooled_training_uses_the_source_rows(cli, write_config, tmp_path):
    for extra in ({"backbone_args": {"hidden": [16, 8]}}, {**RAW, "head": "logistic_regression"}):
        run = _run(cli, tmp_path, "freeze-finetune", write_config("p", {
            "model": extra, "train": {"source_weight": 0.5}}))
        m = _metrics(run)
        assert m["route"]["pooled"]["source_rows"] == 2805
        assert m["route"]["pooled"]["source_weight"] == 0.5
        if extra.get("head") is None:  # the network keeps the source offset out of prediction
            state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["state_dict"]
            assert state["domain_bias"].abs().sum() > 0
            plan = (run / "freeze_plan.txt").read_text()
            assert "domain" in plan


@pytest.mark.parametrize("head", ["network", "logistic_regression"])
def test_the_domain_offset_keeps_the_source_rate_out_of_pooled_answers(head, cli, write_config,
                                                                      tmp_path):
    """Pooled training on fixed-job applicants (fewer bad ones) and part-time ones, the Job
    column dropped so that no input tells the two apart: with train.domain_offset the source
    rows get an offset of their own, and the answers on the target's test rows move towards
    the target's own rate of bad applicants."""
    model = ({"backbone_args": {"hidden": [16, 8]}} if head == "network"
             else {**RAW, "head": head})
    mean, rate = {}, None
    for offset in (False, True):
        run = _run(cli, tmp_path, "freeze-finetune", write_config(f"pool-{offset}", {
            "source": {"drop": ["Job"]}, "target": {"drop": ["Job"]}, "model": model,
            "train": {"lr": 0.03, "source_weight": 1.0, "domain_offset": offset}}))
        preds = _test_predictions(cli, tmp_path, str(run))
        mean[offset], rate = preds["p_bad"].mean(), (preds["label"] == "bad").mean()
    assert abs(mean[True] - rate) < abs(mean[False] - rate) - 0.02, (mean, rate)


def test_l2sp_penalty_equals_its_formula():
    torch.manual_seed(0)
    model = build_model(model_spec("mlp", {"hidden": [6, 4]}, 5, HeadSettings("linear", 8, 0.0), 2))
    anchor = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.backbone.blocks[0][0].weight.requires_grad_(False)  # frozen: no penalty
    alpha, beta = 0.3, 0.05
    expected = 0.0
    for name, p in model.backbone.named_parameters():
        if p.requires_grad:
            expected += alpha / 2 * float(((p - anchor[name]) ** 2).sum().detach())
    expected += beta / 2 * sum(float((p ** 2).sum().detach()) for p in model.head.parameters())
    got = float(l2sp_penalty(model, anchor, alpha, beta))
    assert got == pytest.approx(expected, rel=1e-6)


def test_l2sp_pulls_weights_towards_the_pretrained_ones():
    def train(alpha: float) -> float:
        torch.manual_seed(0)
        model = build_model(model_spec("mlp", {"hidden": [8]}, 6, HeadSettings("linear", 8, 0.0),
                                       2))
        start = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
        x, y = torch.randn(64, 6), torch.randint(0, 2, (64,))
        cfg = TrainConfig(epochs=5, batch_size=16, lr=0.05, l2sp={"alpha": alpha, "beta": 0.0})
        t = Trainer(model, TrainingData(Tensors(x, y), None),
                    TrainingPlan([Round(0, "full", 5, 0.05, 1.0)], cfg, 0, Task(), ["a", "b"]))
        t.start_round(1)
        for _ in range(5):
            t.run_epoch()
        return sum(float(((p - start[n]) ** 2).sum())
                   for n, p in model.backbone.named_parameters())

    assert train(10.0) < 0.5 * train(0.0)


def test_prior_offset_and_keep_head_routes(pretrained, cli, write_config, tmp_path):
    src = str(pretrained)
    only = _run(cli, tmp_path, "freeze-finetune", write_config("so", {"model": {
        "weights": src, "backbone_args": {}, "keep_head": True}, "train": {"epochs": 0}}))
    ev = _metrics(_run(cli, tmp_path, "evaluate", src, "--on", "target"))
    m = _metrics(only)
    assert m["route"]["source_only"] and m["test"]["auroc"] == pytest.approx(
        ev["test"]["auroc"], abs=1e-9)  # the source model as it is
    for head in ("logistic_regression", "linear"):
        changes = {"model": {**RAW, "head": head, "prior": "offset", "prior_weights": src}}
        if head == "linear":
            changes = {"model": {"weights": src, "backbone_args": {}, "prior": "offset"}}
        run = _run(cli, tmp_path, "freeze-finetune", write_config(f"pr-{head}", changes))
        m = _metrics(run)
        assert m["route"]["prior"]["mode"] == "offset"
        assert Path(m["route"]["prior"]["weights"][0]).resolve() == pretrained.resolve()
        again = _metrics(_run(cli, tmp_path, "evaluate", str(run)))
        assert again["test"]["auroc"] == pytest.approx(m["test"]["auroc"], abs=1e-6)
        _run(cli, tmp_path, "predict", str(run), str(NEW_ROWS))


def test_prior_input_feeds_the_head(pretrained, cli, write_config, tmp_path):
    run = _run(cli, tmp_path, "freeze-finetune", write_config("pi", {"model": {
        **RAW, "head": "gradient_boosting", "prior": "input", "prior_weights": str(pretrained)}}))
    spec = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["spec"]
    assert spec["prior"]["mode"] == "input" and spec["prior"]["binary"]
    raw_width = spec["in_features"]
    assert spec["head_shape"]["in_features"] == raw_width + 1  # the source's log-odds


@pytest.mark.parametrize("changes, message", [
    ({"model": {"keep_head": True}}, "model.keep_head: keeps the source model's head"),
    ({"model": {"prior": "offset"}}, "model.prior: 'offset' needs a source model"),
    ({"model": {**RAW, "head": "ridge"}}, "model.head: 'ridge' predicts numbers"),
    ({"model": {**RAW, "head": "gradient_boosting"}, "train": {"rounds": [{"epochs": 2}]}},
     "train.rounds: 'gradient_boosting' is fitted once"),
    ({"model": {"head": "logistic_regression", "head_args": {"C": -1}}},
     "model.head_args.C"),
    ({"train": {"l2sp": {"alpha": 0.1}}}, "train.l2sp.alpha: pulls the backbone towards its "
                                          "pretrained weights, but model.weights is none"),
    ({"model": {"weights": "source:net"}}, "names a source model that `tltool select` "
                                           "pretrains"),
    ({"model": {"head_args": {"C": 1}}}, "model.head_args: options of a classic head"),
])
def test_route_options_that_do_not_fit_are_refused(changes, message, cli, write_config,
                                                   tmp_path):
    res = cli("freeze-finetune", write_config("bad", changes))
    assert res.code == 2, res.out
    assert message in res.err and "Traceback" not in res.err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("run.json"))


def test_a_crafted_checkpoint_never_runs_code(cli, write_config, tmp_path):
    run = _run(cli, tmp_path, "freeze-finetune", write_config("c", {"model": {
        **RAW, "head": "gradient_boosting"}}))
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    best = run / "checkpoints" / "best.pt"
    payload = torch.load(best, weights_only=True)
    payload["spec"]["head_shape"] = Evil()
    with open(best, "wb") as fh:
        pickle.dump(payload, fh)
    res = cli("evaluate", str(run))
    assert res.code == 2 and not marker.exists()
    assert "Traceback" not in res.err
    # a tree whose child points outside it is refused, not followed
    payload = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    payload["state_dict"]["head.right"][0, 0] = 10**9
    torch.save(payload, best)
    res = cli("evaluate", str(run))
    assert res.code == 2 and "Traceback" not in res.err


def test_extract_honours_the_decision_rule(pretrained, cli, write_config, tmp_path):
    run = _run(cli, tmp_path, "extract", write_config("x", {
        "model": {"weights": str(pretrained), "backbone_args": {}},
        "extract": {"heads": ["logistic_regression"]},
        "decision": {"rule": "threshold", "optimize": "f1"}}))
    head = _metrics(run)["heads"]["logistic_regression"]
    assert head["threshold"] is not None and head["threshold"] != 0.5
    assert head["test"]["threshold"] == head["threshold"]


def test_extract_calibrates_its_heads_as_decision_calibrate_asks(pretrained, cli, write_config,
                                                                 tmp_path):
    """extract's heads are classic heads like any other: their decision rule, the temperature
    included, is chosen on the validation rows and applied to their reports."""
    heads = {}
    for calibrate in ("none", "temperature"):
        run = _run(cli, tmp_path, "extract", write_config(f"x-{calibrate}", {
            "model": {"weights": str(pretrained), "backbone_args": {}},
            "extract": {"heads": ["logistic_regression"]},
            "decision": {"rule": "threshold", "calibrate": calibrate}}))
        heads[calibrate] = _metrics(run)["heads"]["logistic_regression"]
    cal = heads["temperature"]["calibration"]
    assert "calibration" not in heads["none"] and cal["fitted_on"] == "validation"
    assert cal["temperature"] != 1.0 and cal["log_loss"]["after"] < cal["log_loss"]["before"]
    assert heads["temperature"]["val"]["log_loss"] == pytest.approx(cal["log_loss"]["after"],
                                                                    abs=1e-5)
    assert heads["none"]["val"]["log_loss"] == pytest.approx(cal["log_loss"]["before"],
                                                             abs=1e-5)


def test_sample_seed_draws_other_labelled_rows_only_when_asked(cli, write_config, tmp_path):
    runs = [_run(cli, tmp_path, "freeze-finetune", write_config(f"s{i}", {
        "seed": i, "model": {**RAW, "head": "logistic_regression"}})) for i in (0, 1)]
    digests = [_metrics(r)["data"]["splits"]["train"] for r in runs]
    assert digests[0] == digests[1]
    other = _run(cli, tmp_path, "freeze-finetune", write_config("s2", {
        "target": {"sample_seed": 7}, "model": {**RAW, "head": "logistic_regression"}}))
    assert _metrics(other)["data"]["splits"]["train"] != digests[0]
    assert np.isfinite(_metrics(other)["test"]["auroc"])


def test_a_prior_of_several_source_models_averages_their_log_probabilities(
        cli, write_config, tmp_path):
    """model.prior_weights as a list: the prior's signal is the mean of the models' own."""
    from tltool.checkpoint import Checkpoint
    from tltool.models.loading import load_trained

    lr = _run(cli, tmp_path, "pretrain", write_config("src-lr", {"model": {
        **RAW, "head": "logistic_regression"}}))
    gb = _run(cli, tmp_path, "pretrain", write_config("src-gb", {"model": {
        **RAW, "head": "gradient_boosting", "head_args": {"max_iter": 10}}}))
    run = _run(cli, tmp_path, "freeze-finetune", write_config("avg", {"model": {
        **RAW, "head": "logistic_regression", "prior": "offset",
        "prior_weights": [str(lr), str(gb)], "head_args": {"C": 1e-6}}}))
    model = load_trained(Checkpoint.load(run / "checkpoints" / "best.pt"))
    members = [load_trained(Checkpoint.load(r / "checkpoints" / "best.pt")) for r in (lr, gb)]
    x = torch.randn(9, model.spec["in_features"])
    with torch.no_grad():
        mean = torch.stack([torch.log_softmax(m(x), 1) for m in members]).mean(0)
        assert torch.allclose(model.prior(x), mean, atol=1e-6)
        # with an (almost) unpenalised intercept only, the ranking is the prior's own
        order = torch.argsort(model(x)[:, 1] - model(x)[:, 0])
        assert torch.equal(order, torch.argsort(mean[:, 1] - mean[:, 0]))
    cfg = (run / "config.yaml").read_text()
    assert str(lr.resolve()) in cfg and str(gb.resolve()) in cfg


def test_a_prior_of_another_kind_of_data_is_refused(cli, write_config, tmp_path):
    """An image model as the prior of a table model: one line, before any run folder."""
    img = _run(cli, tmp_path, "pretrain", write_config("img", {
        "source": {"kind": "builtin", "name": "digits", "where": {}, "n_train": 60,
                   "split": {"val": 0.2, "test": 0.2}},
        "model": {"backbone": "pixels", "backbone_args": {}, "head": "logistic_regression"},
        "decision": {"rule": "argmax"}}))
    res = cli("freeze-finetune", write_config("t", {"model": {
        **RAW, "head": "logistic_regression", "prior": "input", "prior_weights": str(img)}}))
    assert res.code == 2 and "model.prior_weights: the prior model takes images but target " \
                              "holds table rows" in res.err
    assert "Traceback" not in res.err


def test_a_tampered_classic_head_width_is_refused(cli, write_config, tmp_path):
    run = _run(cli, tmp_path, "freeze-finetune", write_config("w", {"model": {
        **RAW, "head": "gradient_boosting"}}))
    best = run / "checkpoints" / "best.pt"
    payload = torch.load(best, weights_only=True)
    payload["spec"]["head_shape"]["in_features"] -= 1
    torch.save(payload, best)
    for command in (["evaluate", str(run)], ["predict", str(run), str(NEW_ROWS)]):
        res = cli(*command)
        assert res.code == 2 and "head_shape.in_features" in res.err, res.err
        assert "Traceback" not in res.err


def test_a_label_column_with_no_value_is_refused(cli, write_config, tmp_path):
    frame = pd.DataFrame({"x": range(30), "y": [""] * 30})
    frame.to_csv(tmp_path / "blank.csv", index=False)
    res = cli("freeze-finetune", write_config("b", {"target": {
        "kind": "csv", "path": str(tmp_path / "blank.csv"), "label": "y", "where": {},
        "n_train": None}}))
    assert res.code == 2 and "label column 'y' is empty in all 30 selected rows" in res.err


def test_another_label_of_a_builtin_table_does_not_take_its_default_positive(
        cli, write_config, tmp_path):
    run = _run(cli, tmp_path, "freeze-finetune", write_config("home", {
        "target": {"label": "Home", "n_train": None}, "decision": {"rule": "argmax"},
        "model": {**RAW, "head": "logistic_regression"}}))
    assert len(_metrics(run)["classes"]) > 2


def _test_predictions(cli, tmp_path, *args: str) -> pd.DataFrame:
    return pd.read_csv(_run(cli, tmp_path, "evaluate", *args) / "test_predictions.csv")


def _backbone(run: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / name, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("backbone.")}


def test_l2sp_keeps_the_fine_tuned_backbone_near_the_source_weights(pretrained, cli,
                                                                     write_config, tmp_path):
    source = _backbone(pretrained, "best.pt")
    moved = {}
    for alpha in (0.0, 50.0):
        run = _run(cli, tmp_path, "freeze-finetune", write_config(f"l2sp{alpha}", {
            "model": {"weights": str(pretrained), "backbone_args": {}},
            "train": {"epochs": 4, "lr": 0.03, "l2sp": {"alpha": alpha}}}))
        moved[alpha] = sum(float(((w - source[k]) ** 2).sum())
                           for k, w in _backbone(run).items())
    assert moved[0.0] > 0 and moved[50.0] < 0.5 * moved[0.0], moved


def test_an_untrained_prior_offset_network_answers_as_its_prior(pretrained, cli, write_config,
                                                               tmp_path):
    """prior offset: the new head starts at zero, so before any epoch the model's answer is
    the source model's own, row for row."""
    run = _run(cli, tmp_path, "freeze-finetune", write_config("offset0", {"model": {
        "weights": str(pretrained), "backbone_args": {}, "prior": "offset"},
        "train": {"epochs": 0}}))
    assert _metrics(run)["route"]["prior"]["mode"] == "offset"
    mine = _test_predictions(cli, tmp_path, str(run))
    prior = _test_predictions(cli, tmp_path, str(pretrained), "--on", "target")
    assert (mine["id"] == prior["id"]).all()
    assert np.abs(mine["p_bad"] - prior["p_bad"]).max() < 1e-5
    assert prior["p_bad"].std() > 0.05  # a real answer, not a constant


def test_a_prior_offset_classic_head_corrects_its_prior(pretrained, cli, write_config,
                                                        tmp_path):
    """An (almost) intercept-only logistic head on top of the prior's log-odds: the prior's
    ranking of the rows, its base rate refitted on the target rows."""
    run = _run(cli, tmp_path, "freeze-finetune", write_config("offset-lr", {"model": {
        **RAW, "head": "logistic_regression", "prior": "offset",
        "prior_weights": str(pretrained), "head_args": {"C": 1e-6}}}))
    mine = _test_predictions(cli, tmp_path, str(run))
    prior = _test_predictions(cli, tmp_path, str(pretrained), "--on", "target")
    logit = np.log(mine["p_bad"]) - np.log(mine["p_good"])
    prior_logit = np.log(prior["p_bad"]) - np.log(prior["p_good"])
    shift = logit - prior_logit
    assert shift.std() < 1e-3  # one shift of the log-odds for every row: the prior's ranking
    # part-time applicants default more often than the fixed-job ones the prior learnt from:
    # the refitted shift is large and lowers the test log loss well below the prior's own
    prior_loss = _metrics(_run(cli, tmp_path, "evaluate", str(pretrained), "--on",
                               "target"))["test"]["log_loss"]
    assert shift.mean() > 1 and _metrics(run)["test"]["log_loss"] < prior_loss - 0.2


def test_a_prior_given_as_input_informs_the_heads_answers(pretrained, cli, write_config,
                                                          tmp_path):
    """prior input: the source model's log-odds as one more input of a classic head. Two source
    models that encode the rows alike (same data and seed) but answer differently (4 epochs
    and 1) give the same head different answers; and the source model's signal lowers the
    head's test log loss below that of the head on the rows alone."""
    other = _run(cli, tmp_path, "pretrain", write_config("src1", {"train": {"epochs": 1}}))
    answers, loss = [], {}
    for name, prior in (("src4", pretrained), ("src1", other), ("none", None)):
        model = {**RAW, "head": "logistic_regression"}
        if prior is not None:
            model |= {"prior": "input", "prior_weights": str(prior)}
        run = _run(cli, tmp_path, "freeze-finetune", write_config(f"in-{name}",
                                                                  {"model": model}))
        loss[name] = _metrics(run)["test"]["log_loss"]
        if prior is not None:
            answers.append(_test_predictions(cli, tmp_path, str(run))["p_bad"])
    assert (answers[0] - answers[1]).abs().max() > 0.01
    assert loss["src4"] < loss["none"] - 0.01, loss
