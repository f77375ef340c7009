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


def test_a_renamed_setting_is_read_under_its_former_name_in_a_file(tmp_path):
    from stages.teacher import TeacherConfig

    f, said = tmp_path / "t.json", []
    f.write_text('{"shift": 1, "epochs": 3}')
    cfg = config.load(TeacherConfig, f, {}, {"shift": "max_shift"}, warn=said.append)
    assert (cfg.max_shift, cfg.epochs) == (1, 3)
    assert len(said) == 1 and "'shift' is now 'max_shift'" in said[0]
    with pytest.raises(UsageError, match="unknown setting"):  # without the rename, the former key is unknown
        config.load(TeacherConfig, f, {})
    f.write_text('{"shift": 1, "max_shift": 2}')
    with pytest.raises(UsageError, match="both 'shift' and 'max_shift'"):
        config.load(TeacherConfig, f, {}, {"shift": "max_shift"})


@pytest.mark.parametrize("command, paths, former, now, settings", [
    (["teacher"], ["--prepared", "p.h5", "--out", "t.onnx"], "--shift", "--max-shift", "max_shift must lie in"),
    (["cache", "build"], ["--teacher", "t.onnx", "--transfer-set", "p.h5", "--out", "c.h5", "--views", "4"],
     "--view-shift", "--view-max-shift", "max_shift"),
])
def test_former_option_names_still_work_hidden_and_said(command, paths, former, now, settings):
    """The former option reaches the setting (an out-of-range value is refused in the setting's own words, exit
    2, before any file is read), is hidden from --help, and says on stderr that it was renamed."""
    from click.testing import CliRunner

    from commands.main import main

    runner = CliRunner()
    r = runner.invoke(main, [*command, *paths, former, "200"])
    assert r.exit_code == 2 and settings in r.stderr, r.stderr
    assert f"{former} is now {now}; the old name is accepted for one more release" in r.stderr
    r = runner.invoke(main, [*command, *paths, former, "1", now, "1"])
    assert r.exit_code == 2 and "same setting" in r.stderr, r.stderr
    helped = runner.invoke(main, [*command, "--help"]).output
    assert now in helped and f"{former} " not in helped
