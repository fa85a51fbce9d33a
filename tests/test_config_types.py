"""Config values of the wrong kind are refused (a boolean is no number, a number no boolean, a
decimal number no whole number), what YAML users write on purpose is kept, and YAML's own
means of sharing values (aliases, merge keys, configs given through symbolic links) do what
they say."""

from __future__ import annotations

import pytest

from tltool.config import load_config
from tltool.errors import ConfigError


def _files(root) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("item, line", [
    ("train.epochs=true", "train.epochs: got true (a boolean); allowed: a whole number >= 0"),
    ("model.frozen_layers=true",
     "model.frozen_layers: got true (a boolean); allowed: a whole number >= 0"),
    ("train.lr=true", "train.lr: got true (a boolean); allowed: a number > 0"),
    ("train.lr=yes", "train.lr: got true (a boolean); allowed: a number > 0"),
    ("train.compile=1", "train.compile: got 1 (a number); allowed: true or false"),
    ("train.epochs=2.0", "train.epochs: got 2.0 (a decimal number); allowed: a whole number "
                         ">= 0"),
    ("train.early_stopping.patience=2.5", "train.early_stopping.patience: got 2.5 (a decimal "
                                          "number); allowed: a whole number >= 1 (or null)"),
    ("model.backbone_args={batch_norm: 1}",
     "model.backbone_args.batch_norm: got 1 (a number); allowed: true or false"),
])
def test_a_value_of_the_wrong_kind_is_refused_naming_key_value_and_what_is_allowed(
        cli, write_config, tmp_path, item, line):
    cfg = write_config("typed")
    before = _files(tmp_path)
    res = cli("pretrain", cfg, "--set", item)
    assert res.code == 2
    assert res.err.strip().splitlines()[-1].endswith(line), res.err
    assert "Traceback" not in res.err
    assert _files(tmp_path) == before  # no run folder started


def test_every_value_of_the_wrong_kind_in_a_file_is_reported_together(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: true, lr: on, compile: 0, rounds: [{frozen_layers: 1.0}]}\n"
                    "target: {name: credit_data, split: {stratify: 'yes please'}}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).splitlines() == [
        f"{path}: 5 problems in the config",
        "  - target.split.stratify: got 'yes please' (text); allowed: true or false",
        "  - train.epochs: got true (a boolean); allowed: a whole number >= 0",
        "  - train.lr: got true (a boolean); allowed: a number > 0",
        "  - train.compile: got 0 (a number); allowed: true or false",
        "  - train.rounds.0.frozen_layers: got 1.0 (a decimal number); allowed: a whole number "
        ">= 0 (or null)",
    ]


def test_numbers_and_booleans_as_yaml_users_write_them_are_kept(tmp_path):
    """A whole number for a float, `1e-3` (text to PyYAML), numbers in quotes, and YAML's
    boolean words (quoted or not) mean what they spell."""
    path = tmp_path / "c.yaml"
    path.write_text("seed: '7'\ntrain: {lr: 1e-3, cache_max_gb: 4, epochs: '12', "
                    "backbone_lr_mult: '0.5', compile: 'Yes', sync_batchnorm: off}\n"
                    "model: {dropout: 0}\n")
    cfg = load_config(path)
    assert (cfg.seed, cfg.train.lr, cfg.train.cache_max_gb, cfg.train.epochs) == \
        (7, 0.001, 4.0, 12)
    assert (cfg.train.backbone_lr_mult, cfg.train.compile, cfg.train.sync_batchnorm) == \
        (0.5, True, False)
    assert cfg.model.dropout == 0.0


def test_a_yaml_boolean_where_a_word_is_expected_says_to_quote_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {cache: off}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == (
        f"{path}: train.cache: got false (a boolean: YAML reads on/off/yes/no without quotes "
        "as true/false); allowed: 'auto' or 'off', in quotes")


def test_yaml_merge_keys_merge_and_the_mappings_own_keys_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("source: &data {kind: builtin, name: credit_data, split: {val: 0.25}}\n"
                    "target:\n  <<: *data\n  n_train: 50\n"
                    "train:\n  rounds:\n    - &r {epochs: 5, lr: 0.01, frozen_layers: 1}\n"
                    "    - <<: *r\n      frozen_layers: 0\n")
    cfg = load_config(path)
    assert (cfg.target.name, cfg.target.split.val, cfg.target.n_train) == ("credit_data", 0.25,
                                                                            50)
    assert [(r.epochs, r.lr, r.frozen_layers) for r in cfg.train.rounds] == \
        [(5, 0.01, 1), (5, 0.01, 0)]


@pytest.mark.parametrize("text, message", [
    ("target:\n  <<: 3\n", "(line 2, column 7): not valid YAML: expected a mapping or list of "
                           "mappings for merging, but found scalar"),
    ("source: &s {name: credit_data}\ntarget:\n  <<: *s\n  <<: *s\n",
     "(line 4, column 3): not valid YAML: duplicate key '<<' (lines 3 and 4); give each key "
     "once"),
])
def test_a_bad_merge_key_names_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == f"{path} {message}"


def test_set_changes_only_the_key_it_names_when_yaml_repeated_a_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("source: &data {kind: builtin, name: credit_data, split: {val: 0.2}}\n"
                    "target: *data\n")
    cfg = load_config(path, ["target.split.val=0.3"])
    assert (cfg.source.split.val, cfg.target.split.val) == (0.2, 0.3)


def test_extends_of_a_config_given_through_a_link_is_next_to_the_real_file(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text("seed: 5\n")
    (tmp_path / "mine" / "base.yaml").write_text("seed: 9\n")
    (tmp_path / "shared" / "child.yaml").write_text("extends: base.yaml\nname: c\n")
    link = tmp_path / "mine" / "link.yaml"
    link.symlink_to("../shared/child.yaml")
    assert load_config(link).seed == 5
    assert load_config(tmp_path / "mine" / "base.yaml").seed == 9
