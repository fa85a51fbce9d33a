"""The experiment config's schema: one pydantic model per section, every field declared once
with its type, default and a one-line description. Unknown keys are errors (extra="forbid").
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tltool.config.scalars import Bool, Float, Int, OptionalFloat, OptionalInt

Scalar = str | int | float | bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class SplitConfig(_Strict):
    val: Float = Field(0.2, gt=0, lt=1, description="fraction of rows held out for validation")
    test: Float = Field(0.2, gt=0, lt=1, description="fraction of rows held out for testing")
    seed: Int = Field(0, ge=0, description="seed of the train/val/test partition (kept fixed "
                      "across experiment seeds so every run is tested on the same rows)")
    stratify: Bool = Field(True, description="keep class proportions equal in every split")

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> SplitConfig:
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must be below 1 so rows remain for training, "
                             f"got {self.val} + {self.test}")
        return self


class DataConfig(_Strict):
    kind: Literal["builtin", "csv", "image_folder", "image_csv"] = Field(
        "builtin", description="builtin: a named set (`tltool datasets`); csv: a table; "
        "image_folder: one sub-folder per class; image_csv: a CSV of image paths and labels")
    name: str | None = Field(None, description="built-in data set name (kind: builtin)")
    path: str | None = Field(None, description="CSV file or image folder path")
    options: dict[str, Any] = Field({}, description="options of a built-in data set "
                                    "(`tltool datasets` lists them)")
    image_column: str = Field("path", description="image_csv: column holding image paths")
    root: str | None = Field(None, description="image_csv: folder that relative image paths "
                             "start from (default: the CSV's folder)")
    label_sep: str | None = Field(None, description="multi-label: the label column holds "
                                  "several labels joined by this, e.g. '|' (empty = none)")
    image_size: OptionalInt = Field(None, gt=0, description="resize images to this square size "
                                   "(default: the backbone's input size)")
    augment: Literal["none", "flip", "light", "standard"] = Field(
        "none", description="training-only augmentation preset (never used at evaluation)")
    on_bad_image: Literal["error", "skip"] = Field(
        "error", description="an unreadable image: stop with its path, or skip and count it")
    decode_once_max_gb: Float = Field(
        2.0, gt=0, description="image files are decoded once into memory up to this size; "
        "beyond it they are decoded batch by batch (flat memory, slower epochs)")
    decode_cache: Bool = Field(
        True, description="image files: keep the decoded pixels on disk (memory-mapped, keyed "
        "by each file's path, size and modification time and the image size), so later "
        "commands on the same files skip decoding; any change decodes again. Location: "
        "$TLTOOL_CACHE_DIR/decoded or ~/.cache/tltool/decoded")
    workers: OptionalInt = Field(
        None, ge=1, le=256, description="image files: threads that decode and resize them "
        "(default: the CPU count, at most 8; decoding releases the interpreter lock)")
    label: str | None = Field(None, description="label column (default: the data set's own)")
    task: Literal["classification", "regression"] = Field(
        "classification", description="classification: the label holds classes; regression: "
        "the label is a number to predict (tables only; MSE on the standardised label, metrics "
        "RMSE / MAE / R²)")
    positive: Scalar | None = Field(None, description="positive class of a binary label")
    id_column: str | None = Field(None, description="column with row ids, kept out of features")
    features: list[str] | None = Field(None, description="feature columns (default: all others)")
    categorical: list[str] = Field([], description="columns forced to be categorical")
    drop: list[str] = Field([], description="columns to leave out of the features")
    where: dict[str, Scalar | list[Scalar]] = Field(
        {}, description="population filter: column -> value or list of allowed values")
    split: SplitConfig = Field(SplitConfig(), description="train/val/test partition")
    n_train: OptionalInt = Field(None, gt=0, description="sub-sample this many training rows "
                                "(null or all: every one)")
    n_val: OptionalInt = Field(None, gt=0, description="sub-sample this many validation rows "
                              "(null or all: every one)")
    sample_seed: OptionalInt = Field(
        None, ge=0, lt=2**32, description="seed of the n_train / n_val sub-samples (default: "
        "split.seed, so runs with other training seeds see the same labelled rows; set it, "
        "e.g. to the experiment seed, to draw other rows)")

    @field_validator("n_train", "n_val", mode="before")
    @classmethod
    def _all_is_every_row(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() == "all" else value

    @field_validator("where", "options", "categorical", "drop", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any, info) -> Any:
        """`where: null` (or ~) means no filter, as an empty mapping does."""
        if value is None:
            return [] if info.field_name in ("categorical", "drop") else {}
        return value

    @model_validator(mode="after")
    def _source_named(self) -> DataConfig:
        if self.kind == "builtin" and not self.name:
            raise ValueError("kind 'builtin' needs 'name' (see `tltool datasets`)")
        if self.kind != "builtin" and not self.path:
            raise ValueError(f"kind '{self.kind}' needs 'path'")
        if self.task == "regression":
            if self.kind in ("image_folder", "image_csv"):
                raise ValueError("task 'regression' is supported for tables (kind csv or a "
                                 "built-in table); image data sets hold classes")
            if self.label_sep or self.positive is not None:
                key = "label_sep" if self.label_sep else "positive"
                raise ValueError(f"'{key}' applies to class labels, not to task 'regression'")
        return self


class RoundConfig(_Strict):
    frozen_layers: OptionalInt = Field(None, ge=0, description="blocks frozen in this round")
    strategy: Literal["freeze", "bias_only", "full", "linear_probe"] | None = Field(
        None, description="freezing strategy of this round (default: model.strategy)")
    epochs: Int = Field(10, ge=1, description="maximum epochs of this round")
    lr: OptionalFloat = Field(None, gt=0, description="learning rate (default: train.lr)")
    backbone_lr_mult: OptionalFloat = Field(None, ge=0, description="backbone lr multiplier")


class ModelConfig(_Strict):
    backbone: str = Field("mlp", description="backbone name (see `tltool backbones`)")
    backbone_args: dict[str, Any] = Field({}, description="options of the backbone")
    weights: str = Field("none", description="none | a pretrain run folder (or .../latest) | "
                         "a checkpoint file")
    frozen_layers: Int = Field(0, ge=0, description="freeze the first N backbone blocks")
    strategy: Literal["freeze", "bias_only", "full", "linear_probe"] = Field(
        "freeze", description="freeze: first N blocks frozen; bias_only: only biases and head "
        "train; full: everything trains; linear_probe: only the head trains")
    head: Literal["linear", "mlp", "multilabel", "logistic_regression", "ridge",
                  "gradient_boosting"] = Field(
        "linear", description="linear | mlp (softmax over classes; on multi-label data a "
        "sigmoid per label, as multilabel) | multilabel (a sigmoid per label, binary "
        "cross-entropy, a threshold per label chosen on validation) | classic heads fitted by "
        "scikit-learn on the frozen backbone's features (backbone raw / pixels: on the inputs "
        "themselves), saved as plain tensors: logistic_regression, ridge (regression), "
        "gradient_boosting (histogram gradient boosting)")
    head_args: dict[str, Any] = Field({}, description="options of a classic head: "
                                      "logistic_regression: C, max_iter; ridge: alpha ('auto': "
                                      "chosen by cross-validation); gradient_boosting: "
                                      "learning_rate, max_iter, max_leaf_nodes, "
                                      "min_samples_leaf, l2_regularization, max_depth")
    keep_head: Bool = Field(False, description="keep the source model's head (its classes must "
                            "be the target's) instead of a new one; with train.epochs 0 the "
                            "source model is used as it is (source-only)")
    prior: Literal["none", "offset", "input"] = Field(
        "none", description="the source model as a prior: offset: its output (log-"
        "probabilities; regression: its prediction) is added to this model's, whose head starts "
        "at zero, so training learns a correction of the source's answer; input: its output is "
        "an extra input of the head")
    prior_weights: str | list[str] | None = Field(
        None, description="the run (or checkpoint) whose model is the prior (default: "
        "model.weights); a list of several: their signals are averaged (an ensemble of source "
        "models as one prior)")
    bn_policy: Literal["eval", "train"] = Field(
        "eval", description="BatchNorm in frozen blocks: eval (statistics fixed, inference mode "
        "even after model.train()) or train (statistics adapt to the target: AdaBN-style "
        "domain adaptation; weights stay frozen)")
    head_hidden: Int = Field(32, gt=0, description="hidden units of the mlp head")
    dropout: Float = Field(0.0, ge=0, lt=1, description="dropout before the head")


class L2SPConfig(_Strict):
    alpha: Float = Field(0.0, ge=0, description="weight of alpha/2 * ||w - w0||^2 over the "
                         "trainable transferred backbone weights (w0: the pretrained values)")
    beta: Float = Field(0.0, ge=0, description="weight of beta/2 * ||w||^2 over the new head")


class EarlyStopping(_Strict):
    patience: OptionalInt = Field(20, ge=1, description="epochs without improvement before "
                                 "stopping (null: never stop early)")
    monitor: Literal["val_loss", "val_auroc", "val_accuracy", "val_f1"] = Field(
        "val_loss", description="validation metric that selects the best epoch")


class TrainConfig(_Strict):
    epochs: Int = Field(100, ge=0, description="maximum epochs (when no rounds are given)")
    batch_size: Int = Field(64, ge=1, description="rows per optimisation step")
    lr: Float = Field(1e-3, gt=0, description="learning rate of the head and new layers")
    backbone_lr_mult: Float = Field(1.0, ge=0, description="learning-rate multiplier of the "
                                    "pretrained backbone blocks")
    layer_decay: OptionalFloat = Field(None, gt=0, le=1, description="per-block learning-rate "
                                      "decay: the last backbone block gets lr x backbone_lr_mult, "
                                      "each earlier one this factor less")
    weight_decay: Float = Field(0.0, ge=0, description="decoupled weight decay (AdamW)")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="optimiser")
    momentum: Float = Field(0.9, ge=0, lt=1, description="momentum (sgd only)")
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="balanced: weight the loss by inverse class frequency")
    early_stopping: EarlyStopping = Field(EarlyStopping(), description="early stopping")
    sync_batchnorm: Bool = Field(
        True, description="under torchrun on GPUs: BatchNorm layers in training mode normalise "
        "over the global batch (PyTorch's SyncBatchNorm), so N processes train like one; "
        "false: each rank normalises its own rows (faster, statistically equivalent). On CPUs "
        "PyTorch has no SyncBatchNorm: each rank's own rows, with a warning")
    cache: Literal["auto", "off"] = Field(
        "auto", description="auto: compute the frozen leading blocks once per round and train "
        "only the rest (skipped with random augmentation or bn_policy train)")
    cache_max_gb: Float = Field(4.0, gt=0, description="largest in-memory prefix cache")
    cache_views: Int = Field(0, ge=0, description="with random augmentation: cache this many "
                             "augmented views of the frozen prefix and cycle through them "
                             "(0: compute the prefix every epoch)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: a CUDA GPU when "
                                                   "one is visible, else the CPU")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32; bf16 autocast (CPU or GPU); fp16 with loss scaling (GPU); "
        "auto: bf16 on GPUs that have it, fp16 on older GPUs; on a CPU with native bf16, bf16 "
        "for image models only if timing the model on the first batch finds it at least 1.3x "
        "faster than fp32")
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="memory layout of image models: auto: NHWC or NCHW block by block, "
        "whichever a short timing on the first batch finds faster (NCHW only when at least "
        "1.2x faster); on: NHWC everywhere; off: NCHW everywhere")
    compile: Bool = Field(False, description="torch.compile the forward pass")
    rounds: list[RoundConfig] = Field([], description="gradual unfreezing: rounds run in order, "
                                      "each with its own frozen_layers / epochs / lr")
    source_weight: Float = Field(
        0.0, ge=0, description="pooled training: freeze-finetune also trains on the labelled "
        "source rows, each weighted by this against a target row's 1 (0: target rows only)")
    domain_offset: Bool = Field(
        True, description="pooled training: the source rows get their own learned output "
        "offset (classic heads: a domain-indicator input), so the intercept can differ "
        "between the populations; the saved model applies the target's")
    l2sp: L2SPConfig = Field(L2SPConfig(), description="L2-SP (Li et al., 2018): pull the "
                             "fine-tuned backbone towards its pretrained weights instead of "
                             "towards zero; set train.weight_decay 0 with it")


class DecisionConfig(_Strict):
    rule: Literal["argmax", "threshold"] = Field(
        "argmax", description="argmax (the design document's 'max') or a probability threshold "
        "swept on the validation split (the sweep of its 'avg'; `tltool ensemble` averages "
        "several runs first)")
    optimize: Literal["accuracy", "f1", "youden"] = Field(
        "accuracy", description="what the validation threshold maximises")
    calibrate: Literal["none", "temperature"] = Field(
        "none", description="temperature: divide the logits by one number (per label for "
        "multi-label) fitted on the validation rows (select: out-of-fold rows) by log loss, "
        "before the threshold is chosen; saved in thresholds.json and applied by evaluate, "
        "predict and ensemble. Changes no argmax and no AUROC; classification only")


class ExtractConfig(_Strict):
    blocks: OptionalInt = Field(None, ge=1, description="features after this many backbone blocks "
                               "(default: all)")
    heads: list[Literal["logistic_regression", "ridge", "random_forest", "svm"]] | None = Field(
        None, description="sklearn heads to fit (default: logistic_regression, random_forest, "
        "svm for classes; ridge, random_forest, svm for task regression)")
    fit_on: Literal["source", "target"] = Field("target", description="data the heads fit on")
    sections: Literal["auto", "both"] = Field(
        "auto", description="which data sections get features: auto: only fit_on's when heads "
        "are fitted (no decoding or forward passes for data no head uses), every section when "
        "heads is []; both: source and target whenever the config has them")


class AdaptConfig(_Strict):
    method: Literal["none", "coral", "mmd", "dann"] = Field(
        "none", description="domain adaptation when source and target differ: train so that "
        "the backbone's features of source and target rows look alike. coral: match their "
        "covariances; mmd: Gaussian-kernel maximum mean discrepancy; dann: a domain "
        "classifier trained through gradient reversal")
    weight: Float = Field(1.0, ge=0, description="weight of the alignment loss (dann: its "
                          "largest value, reached by the usual warm-up 2/(1+exp(-10p))-1)")
    source_weight: Float = Field(
        1.0, ge=0, description="freeze-finetune: weight of the cross-entropy on labelled "
        "source rows, trained alongside the target's (0: source rows only feed the alignment; "
        "needs the same classes in source and target when above 0)")
    unlabeled: Literal["pool", "labelled"] = Field(
        "pool", description="target rows aligned with the source: pool: every training-split "
        "row with its label unused (rows n_train leaves out and CSV rows with an empty label "
        "included; never val or test rows); labelled: only the n_train rows")


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class CandidateConfig(_Strict):
    name: str = Field(..., pattern=NAME_PATTERN, description="candidate name (leaderboard row)")
    set: dict[str, Any] = Field({}, description="config keys this candidate changes, as "
                                "--set takes them (train.lr: 0.01) or as nested mappings")
    complexity: OptionalInt = Field(None, ge=0, le=9, description="rank for the one-standard-"
                                   "error rule, lower = simpler (default: from the route)")


class SelectConfig(_Strict):
    candidates: list[CandidateConfig] | None = Field(
        None, description="routes to compare (default: a grid of transfer routes and reference "
        "models fitting the data, see README)")
    sources: dict[str, dict[str, Any]] | None = Field(
        None, description="source models select pretrains first on the source section, by "
        "name -> config keys; candidates name them as model.weights or model.prior_weights "
        "'source:NAME' (default: net (the config's model, unless model.weights names a run), "
        "lr (logistic regression / ridge) and gb (gradient boosting))")
    folds: Int = Field(5, ge=2, description="cross-validation folds on the labelled target rows")
    repeats: Int = Field(2, ge=1, description="repeats of the k-fold split (other shuffles)")
    seed: Int = Field(0, ge=0, lt=2**32, description="seed of the folds")
    metric: Literal["auto", "auroc", "accuracy", "balanced_accuracy", "f1", "log_loss", "map",
                    "rmse", "mae", "r2"] = Field(
        "auto", description="what cross-validation scores (auto: auroc for two classes, "
        "accuracy for more, map for multi-label, rmse for regression)")
    rule: Literal["ensemble", "one_se", "best"] = Field(
        "ensemble", description="ensemble: the average of the predictions of every candidate "
        "whose mean score is within `band` standard errors of the best (each refit on all "
        "labelled rows, kept under members/ in the run folder; one candidate in the band: it "
        "alone); one_se: the simplest candidate whose mean score is within one standard error "
        "of the best; best: the best mean")
    band: Float = Field(3.0, ge=0, le=100, description="rule ensemble: how many standard "
                        "errors (of the best candidate's mean) below the best a candidate may "
                        "be and still be averaged (0: ties only; large: every candidate)")
    research: Bool = Field(False, description="also refit every candidate on all labelled rows "
                           "and score it on the test split, written apart (research.json); "
                           "never used for the choice")
    criterion: Literal["ensv", "dev", "iwcv"] = Field(
        "ensv", description="no target labels: ensv: agreement with the candidates' averaged "
        "predictions on the unlabelled target rows (Hu et al., 2024); dev: deep embedded "
        "validation (You et al., 2019); iwcv: importance-weighted validation (Sugiyama et al., "
        "2007), both on the source validation rows")
    target_labels: Bool = Field(True, description="false: ignore the target's labels (pure "
                                "domain adaptation: adapt methods chosen by `criterion`)")
    share_work: Bool = Field(True, description="decode the data once and compute a frozen "
                             "prefix or features once for every candidate and fold that uses "
                             "them (false: recompute per candidate and fold; only to measure "
                             "what sharing saves)")


class OutputConfig(_Strict):
    root: str = Field("runs", description="run folders go to ROOT/NAME/TIMESTAMP-COMMAND "
                      "(~ is the home folder)")

    @field_validator("root")
    @classmethod
    def _home(cls, v: str) -> str:
        return os.path.expanduser(v)  # one meaning of `~` for every file the run writes
    tensorboard: Bool = Field(True, description="TensorBoard event files in RUN/tensorboard "
                              "(per-epoch scalars, hyper-parameters with the final metrics, PR "
                              "curves): tensorboard --logdir runs/")


class ExperimentConfig(_Strict):
    name: str = Field("experiment", pattern=NAME_PATTERN,
                      description="experiment name: the run folder's parent")
    seed: Int = Field(0, ge=0, lt=2**32, description="seed of sub-sampling, initialisation "
                      "and batching")
    source: DataConfig | None = Field(None, description="source data (pretrain)")
    target: DataConfig | None = Field(None, description="target data (freeze-finetune)")
    model: ModelConfig = Field(ModelConfig(), description="backbone, weights, freezing, head")
    train: TrainConfig = Field(TrainConfig(), description="training schedule")
    decision: DecisionConfig = Field(DecisionConfig(), description="probability -> decision")
    extract: ExtractConfig = Field(ExtractConfig(), description="feature extraction")
    adapt: AdaptConfig = Field(AdaptConfig(), description="domain adaptation (pretrain: "
                               "labelled source + unlabelled target rows; freeze-finetune: "
                               "labelled target + labelled source + unlabelled target rows)")
    select: SelectConfig = Field(SelectConfig(), description="`tltool select`: candidate "
                                 "routes scored by cross-validation on the target's labels")
    output: OutputConfig = Field(OutputConfig(), description="where runs are written")


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The config section model inside a field's annotation (e.g. DataConfig | None), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = model_in(arg)
        if found is not None:
            return found
    return None

