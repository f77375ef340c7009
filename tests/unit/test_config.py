"""Settings dataclasses: unknown keys and wrong types are errors; --help comes from the fields."""
import dataclasses

import pytest

from pipeline import config
from pipeline.errors import UsageError
from stages.cache import CacheConfig
from stages.student import StudentConfig
from tests.conftest import run_cli


def test_from_dict_accepts_lossless_values():
    cfg = config.from_dict(CacheConfig, {"temperatures": "1, 2.5,4", "batch_size": "64"})
    assert cfg.temperatures == (1.0, 2.5, 4.0) and cfg.batch_size == 64
    assert config.from_dict(StudentConfig, {"alpha": 1}).alpha == 1.0


@pytest.mark.parametrize("values, fragment", [
    ({"temprature": 2}, "unknown setting"),
    ({"batch_size": 1.5}, "expected an integer"),
    ({"batch_size": "many"}, "expected an integer"),
    ({"alpha": "half"}, "expected a number"),
    ({"alpha": True}, "expected a number"),
    ({"temperatures": 3}, "expected a list"),
])
def test_from_dict_rejects_bad_values(values, fragment):
    cls = StudentConfig if "alpha" in values or "temprature" in values else CacheConfig
    with pytest.raises(UsageError, match=fragment):
        config.from_dict(cls, values)


@pytest.mark.parametrize("values", [{"temperature": 0.0}, {"temperature": -1.0}, {"alpha": 1.5}, {"alpha": -0.1}])
def test_student_ranges(values):
    with pytest.raises(UsageError):
        StudentConfig(**values)


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        StudentConfig().alpha = 0.3  # type: ignore[misc]


def test_config_file_and_override(tmp_path):
    f = tmp_path / "s.json"
    f.write_text('{"alpha": 0.2, "epochs": 3}')
    cfg = config.load(StudentConfig, f, {"epochs": 5, "arch": None})
    assert (cfg.alpha, cfg.epochs, cfg.arch) == (0.2, 5, StudentConfig().arch)
    f.write_text('{"alpha": 0.2, "colour": "red"}')
    with pytest.raises(UsageError, match="colour"):
        config.load(StudentConfig, f, {})


@pytest.mark.parametrize("stage", ["prepare", "teacher", "cache build", "student train", "export", "bench run",
                                   "bench pick"])
def test_every_stage_has_help_from_its_settings(stage):
    proc = run_cli(*stage.split(), "--help", check=True)
    assert "--config" in proc.stdout and "[default:" in proc.stdout
