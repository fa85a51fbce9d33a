"""pretrain and freeze-finetune: prepare the route, create the run folder, train, write the
outputs (freeze plan, thresholds chosen on validation rows, metrics, plots). `tltool select`
pretrains its source models through the same `train_run`; `tltool resume` continues an
interrupted run through it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tltool.checkpoint import BEST, Checkpoint
from tltool.config import ExperimentConfig
from tltool.engine.drive import Resume
from tltool.engine.plan import Sink, TrainingData
from tltool.errors import ConfigError
from tltool.models.loading import load_state
from tltool.routes.route import InputCache, Route, prepare
from tltool.routes.training import build, check_built, train_route
from tltool.runs.files import write_json
from tltool.runs.folder import RunFolder, RunPlace, new_run, pinned_config
from tltool.runs.summary import Result
from tltool.runtime import Runtime, make_runtime
from tltool.tensors import concat_tensors
from tltool.tracking import tracking
from tltool.workflows.outputs import Scoring, Trained, checkpoint_saver, write_outputs

log = logging.getLogger("tltool")


@dataclass
class ResumeFrom:
    """An interrupted run to continue: its folder, its last.pt and its metrics.csv rows."""

    run: Path
    last: Checkpoint
    resume: Resume


@dataclass
class TrainRequest:
    """One training command: the config, the command (pretrain or freeze-finetune) and its
    command line. `cache`: loaded data shared with other routes (select); `resume`: the run it
    continues; `select_source`: a source model select pretrains inside its run folder (a
    fitted head learns from every source row; no TensorBoard)."""

    cfg: ExperimentConfig
    command: str
    argv: list[str] | None = None
    cache: InputCache | None = None
    resume: ResumeFrom | None = None
    select_source: bool = False


def pretrain(cfg: ExperimentConfig, argv: list[str] | None = None) -> Result:
    """Train backbone + head on the source data (optionally starting from weights)."""
    if cfg.source is None:
        raise ConfigError("source: pretrain needs a `source` data section")
    return train_run(TrainRequest(cfg, "pretrain", argv))


def freeze_finetune(cfg: ExperimentConfig, argv: list[str] | None = None) -> Result:
    """Transfer: source backbone + new head, freeze per the config, train on the target."""
    if cfg.target is None:
        raise ConfigError("target: freeze-finetune needs a `target` data section")
    return train_run(TrainRequest(cfg, "freeze-finetune", argv))


def train_run(req: TrainRequest) -> Result:
    """Prepare, build and train the request's route into a new run folder; returns the run
    folder and its summary."""
    cfg = req.cfg
    route = prepare(cfg, req.command, req.cache)
    model = build(route, cfg.seed)
    check_built(route, model)
    rt = make_runtime(cfg.train, route.spec.input == "image")
    resume = req.resume
    if resume is not None and (route.source_only or route.classic):
        resume = None  # nothing was trained by steps: it trains again
    if resume is not None:
        load_state(model, resume.last.state_dict, f"{resume.run} last.pt")
    if route.weights.path is not None:
        log.info("weights: %s", route.weights.path)
    note = {"resumed_from": str(req.resume.run)} if req.resume else None
    place = RunPlace(cfg.output.root, cfg.name, note)
    with new_run(place, req.command, req.argv, cfg.seed,
                 pinned_config(cfg, route.weights.path, route.prior_path)) as run:
        summary = _train_into(run, req, route, model, rt, resume)
    return Result(run.path, summary)


def _train_into(run: RunFolder, req: TrainRequest, route: Route, model, rt: Runtime,
                resume: ResumeFrom | None):
    save = checkpoint_saver(run, route, model, req.command)
    if resume is not None:  # the best weights so far stay the run's best.pt
        state = resume.resume.state
        run.save_checkpoint(BEST, resume.last.with_epoch(state.best["epoch"],
                                                              state.best_state))
    write_json(run.file("runtime.json"), rt.describe())
    inputs = route.inputs
    data, scoring = TrainingData(inputs.train, inputs.val), Scoring(inputs.val, inputs.test)
    if req.select_source:
        note = "the source training split"
        if route.classic:
            # A fitted head needs no validation rows: it learns from every source row (its
            # val/test scores below are then scores on rows it was fitted on).
            data = TrainingData(concat_tensors([inputs.train, inputs.val, inputs.test]), None)
            note = ("every source row (train, val and test splits); its val and test scores "
                    "are on rows it was fitted on")
        scoring.extra = {"fit_on": note}
    enabled = route.cfg.output.tensorboard and not req.select_source
    replay = None if resume is None else resume.resume.rows
    with tracking(run.file("tensorboard"), enabled, replay) as tracker:
        report = train_route(route, model, data, Sink(save, run.file("metrics.csv"), log.info),
                             rt, None if resume is None else resume.resume)
        write_json(run.file("runtime.json"), rt.describe())  # with what `auto` chose
        return write_outputs(run, route, Trained(model, report, rt), scoring, tracker=tracker)
