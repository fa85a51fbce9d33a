"""The config schema: defaults, inheritance, overrides and error messages."""

from __future__ import annotations

import pytest
import yaml

from tltool.config import ExperimentConfig, dump_config, load_config, schema_reference
from tltool.errors import ConfigError


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_round_trip_through_dump(tmp_path):
    cfg = load_config(_write(tmp_path, "c.yaml", "name: x\n"))
    assert cfg.model.backbone == "mlp" and cfg.train.epochs == 100
    again = load_config(_write(tmp_path, "d.yaml", dump_config(cfg)))
    assert again == cfg


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = _write(tmp_path, "c.yaml", "model: {frozen_layer: 1}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == (
        f"{path}: model.frozen_layer: unknown key; did you mean 'frozen_layers'? allowed: "
        "backbone, backbone_args, weights, frozen_layers, strategy, head, head_args, keep_head, "
        "prior, prior_weights, bn_policy, head_hidden, dropout")


def test_all_problems_of_a_file_in_one_message(tmp_path):
    path = _write(tmp_path, "c.yaml", (
        "modle: {}\n"
        "model: {strategy: freez}\n"
        "train: {epochs: ten, lr: -1, rounds: [{epochz: 3}]}\n"
        "source: {kind: builtin}\n"
        "target: {kind: csv, path: a.csv, split: {val: 0.5, test: 0.6}}\n"))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: 7 problems in the config")
    for line in [
        "modle: unknown key; did you mean 'model'?",
        "model.strategy: got 'freez'; allowed: 'freeze', 'bias_only', 'full' or 'linear_probe'",
        "train.epochs: input should be a valid integer, unable to parse string as an integer; "
        "got 'ten'",
        "train.lr: input should be greater than 0; got -1",
        "train.rounds.0.epochz: unknown key; did you mean 'epochs'?",
        "source: kind 'builtin' needs 'name' (see `tltool datasets`)",
        "target.split: val + test must be below 1 so rows remain for training, got 0.5 + 0.6",
    ]:
        assert line in msg


def test_extends_merges_key_by_key_and_child_wins(tmp_path):
    _write(tmp_path, "base.yaml", "seed: 3\ntrain: {epochs: 7, lr: 0.01}\nmodel: {head: mlp}\n")
    (tmp_path / "sub").mkdir()
    child = _write(tmp_path, "sub/child.yaml", "extends: ../base.yaml\ntrain: {epochs: 9}\n")
    cfg = load_config(child)
    assert (cfg.seed, cfg.train.epochs, cfg.train.lr, cfg.model.head) == (3, 9, 0.01, "mlp")


def test_an_empty_mapping_in_a_child_replaces_the_parents(tmp_path):
    _write(tmp_path, "base.yaml", "model: {backbone_args: {hidden: [64, 32]}}\n")
    child = _write(tmp_path, "child.yaml", "extends: base.yaml\nmodel: {backbone_args: {}}\n")
    assert load_config(child).model.backbone_args == {}  # inherit the source run's
    assert load_config(child, ["model.backbone_args={hidden: [8]}"]).model.backbone_args == \
        {"hidden": [8]}


def test_extends_cycle_is_reported(tmp_path):
    _write(tmp_path, "a.yaml", "extends: b.yaml\n")
    _write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="`extends` forms a cycle"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("item, key, value", [
    ("train.epochs=5", ("train", "epochs"), 5),
    ("train.lr=5e-4", ("train", "lr"), 5e-4),
    ("model.backbone_args={hidden: [8, 4]}", ("model", "backbone_args"), {"hidden": [8, 4]}),
    ("train.early_stopping.patience=null", ("train", "early_stopping", "patience"), None),
    ("source.split.stratify=false", ("source", "split", "stratify"), False),
])
def test_set_overrides_are_typed_as_yaml(tmp_path, item, key, value):
    path = _write(tmp_path, "c.yaml", "source: {name: credit_data}\n")
    node = load_config(path, [item])
    for part in key:
        node = getattr(node, part)
    assert node == value


def test_set_unknown_key_and_malformed_item(tmp_path):
    path = _write(tmp_path, "c.yaml", "name: x\n")
    with pytest.raises(ConfigError, match=r"train.epoch: unknown key; did you mean 'epochs'"):
        load_config(path, ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        load_config(path, ["train.epochs"])
    with pytest.raises(ConfigError, match=r"name is a value, not a section"):
        load_config(path, ["name.x=1"])


def test_set_reaches_list_items_and_merges_sections(tmp_path):
    path = _write(tmp_path, "c.yaml", "train:\n  weight_decay: 0.01\n  rounds:\n"
                                      "    - {frozen_layers: 1, epochs: 5}\n"
                                      "    - {frozen_layers: 0, epochs: 5}\n")
    cfg = load_config(path, ["train.rounds.1.epochs=2", "train={epochs: 7}",
                             "target.name=digits", "target.label_sep=|"])
    assert [r.epochs for r in cfg.train.rounds] == [5, 2]
    assert cfg.train.epochs == 7 and cfg.train.weight_decay == 0.01  # merged, not replaced
    assert cfg.target.label_sep == "|"  # YAML's block marker alone: taken as the text
    hashed = load_config(path, ["target.name=digits", "target.label_sep=#"])
    assert hashed.target.label_sep == "#"  # not a YAML comment
    with pytest.raises(ConfigError, match=r"train.rounds.2: no item '2' \(the list has 2"):
        load_config(path, ["train.rounds.2.epochs=2"])


@pytest.mark.parametrize("text, fragment", [
    ("", "the config file is empty"),
    ("train: {epochs: 3}\ntrain: {lr: 0.5}\n", "duplicate key 'train' (lines 1 and 2)"),
    ("train: {lr: .inf}\n", "train.lr: input should be a finite number"),
    ("name: a/b\n", "name: got 'a/b'; allowed: letters, digits"),
    ("- a\n- b\n", "a config must be a mapping of keys, got a list"),
    ("a: [1,\n", "(line 2, column 1): not valid YAML"),
    ("extends: 3\n", "`extends` must be a path"),
])
def test_unreadable_files(tmp_path, text, fragment):
    path = _write(tmp_path, "c.yaml", text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert fragment in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_field_is_documented():
    ref = schema_reference()
    for section in ("model.frozen_layers", "train.rounds[].epochs", "target.n_train",
                    "decision.optimize", "output.root"):
        assert f"`{section}`" in ref
    undocumented = [line for line in ref.splitlines()[2:] if line.rstrip().endswith("|  |")]
    assert not undocumented


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].glob("configs/**/*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        assert isinstance(load_config(path), ExperimentConfig), path
        yaml.safe_load(path.read_text())


def test_docs_config_reference_is_current():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "CONFIG.md").read_text()
    assert schema_reference() in doc, "run `make config-doc`"


def test_hostile_yaml_is_refused_quickly(tmp_path):
    """Alias bombs (anywhere in the file), self-referencing aliases, symbolic link loops, long
    `extends` chains and non-config files named by `extends`: one ConfigError each."""
    import time

    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    cases = {
        "bomb.yaml": "model:\n  backbone_args:\n" + "".join(
            "    " + line + "\n" for line in bomb.splitlines()),
        "self.yaml": "model:\n  backbone_args: &s {x: *s}\n",
    }
    for name, text in cases.items():
        path = _write(tmp_path, name, text)
        start = time.perf_counter()
        with pytest.raises(ConfigError) as exc:
            load_config(path)
        assert time.perf_counter() - start < 2, name
        assert str(exc.value).startswith(str(path)), exc.value
    inline = "{" + bomb.replace("\n", ", ")[:-2] + "}"
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(_write(tmp_path, "ok.yaml", "name: x\n"), ["model.backbone_args=" + inline])
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(tmp_path / "loop2.yaml")
    (tmp_path / "loop2.yaml").symlink_to(loop)
    with pytest.raises(ConfigError, match="symbolic link loop"):
        load_config(loop)
    with pytest.raises(ConfigError, match="symbolic link loop"):
        load_config(_write(tmp_path, "child.yaml", "extends: loop.yaml\nname: c\n"))
    for i in range(40):
        _write(tmp_path, f"c{i}.yaml", f"extends: c{i + 1}.yaml\n")
    _write(tmp_path, "c40.yaml", "name: end\n")
    with pytest.raises(ConfigError, match="`extends` chain longer than 32 files"):
        load_config(tmp_path / "c0.yaml")
    secret = _write(tmp_path, "secret.yaml", "root: s3cr3t-hash\ndaemon: other-s3cr3t\n")
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, "x.yaml", f"extends: {secret}\nname: x\n"))
    assert "not a tltool config" in str(exc.value) and "s3cr3t" not in str(exc.value)
