"""Typed configs: YAML -> dataclasses, --set overrides, and one-line errors that name the key."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from vilex.config import ConfigError, apply_overrides, cfg_field, from_dict, load_config, save_config, to_dict


@dataclass
class Optim:
    lr: float = cfg_field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class Data:
    root: Optional[Path] = cfg_field(None, must_exist=True)
    sizes: list[int] = field(default_factory=lambda: [32])
    batch_size: int = cfg_field(8, ge=1)


@dataclass
class Exp:
    name: str = "exp"
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)
    seed: int = 0
    ema: bool = False

    def validate(self):
        if self.ema and self.optim.schedule == "constant":
            raise ConfigError("ema requires the cosine schedule")


def test_load_yaml_with_overrides(tmp_path):
    f = tmp_path / "e.yaml"
    f.write_text("name: a\noptim:\n  lr: 3e-4\n  betas: [0.8, 0.9]\ndata:\n  sizes: [16, 32]\n")
    cfg = load_config(Exp, f, ["optim.lr=1e-3", "seed=5", "data.sizes=[8]", "ema=true"])
    assert cfg.name == "a" and cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.seed == 5 and cfg.data.sizes == [8] and cfg.ema is True
    assert isinstance(cfg.optim, Optim)


def test_defaults_when_no_file():
    cfg = load_config(Exp)
    assert cfg == Exp()


def test_unknown_key_names_key_and_nearest():
    with pytest.raises(ConfigError) as ei:
        from_dict(Exp, {"optim": {"lrr": 1}})
    assert "unknown key 'optim.lrr' (did you mean 'optim.lr'?)" in str(ei.value)
    with pytest.raises(ConfigError, match=r"unknown key 'sed' \(did you mean 'seed'\?\)"):
        load_config(Exp, None, ["sed=3"])


def test_wrong_type_out_of_range_and_choices():
    with pytest.raises(ConfigError, match=r"optim.lr: expected float, got 'abc' \(str\)"):
        from_dict(Exp, {"optim": {"lr": "abc"}})
    with pytest.raises(ConfigError, match=r"optim.lr: must be > 0, got -1.0"):
        from_dict(Exp, {"optim": {"lr": -1}})
    with pytest.raises(ConfigError, match=r"data.batch_size: must be >= 1, got 0"):
        from_dict(Exp, {"data": {"batch_size": 0}})
    with pytest.raises(ConfigError, match=r"optim.schedule: must be one of 'cosine', 'constant'; got 'cosin' \(did you mean 'cosine'\?\)"):
        from_dict(Exp, {"optim": {"schedule": "cosin"}})
    with pytest.raises(ConfigError, match=r"seed: expected int, got True \(bool\)"):
        from_dict(Exp, {"seed": True})
    with pytest.raises(ConfigError, match=r"data.sizes\[1\]: expected int, got 'x'"):
        from_dict(Exp, {"data": {"sizes": [1, "x"]}})


def test_missing_file_and_cross_field_validation(tmp_path):
    with pytest.raises(ConfigError, match=r"data.root: file or folder not found: .*nope"):
        from_dict(Exp, {"data": {"root": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Exp, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="ema requires the cosine schedule"):
        from_dict(Exp, {"ema": True, "optim": {"schedule": "constant"}})


def test_bad_yaml_and_bad_override(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match=r"invalid YAML \(line"):
        load_config(Exp, f)
    with pytest.raises(ConfigError, match="expects key=value"):
        apply_overrides({}, ["seed"])
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_round_trip_save(tmp_path):
    cfg = load_config(Exp, None, ["optim.lr=0.5", "data.sizes=[4,5]"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(Exp, tmp_path / "c.yaml")
    assert again == cfg and to_dict(again)["optim"]["betas"] == [0.9, 0.999]
