"""One source of configuration: train.py's flags are TrainConfig's fields, and every
front end offers the names of the registries."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
from absl import flags

from sr_tf import losses, models
from sr_tf.data import degrade, presets
from sr_tf.training import loop
from tests import ROOT

FIELDS = dataclasses.fields(loop.TrainConfig)
DEFAULTS = loop.TrainConfig()
# The flags whose default train.py works out from other flags (the sample set's short
# schedule, the model, --steps): they default to None.
RESOLVED = {"data", "run_dir", "steps", "max_minutes", "pretrain_steps", "learning_rate", "warmup_steps"}

# Imports train.py as a module (its flags, not its main) and reports them, then the
# configuration of each command line it is given.
TRAIN_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys
    from absl import flags
    import train

    report = {"resolved": sorted(train.RESOLVED), "flags": {}, "configs": []}
    for field in dataclasses.fields(train.loop.TrainConfig):
        flag = flags.FLAGS[field.name]
        report["flags"][field.name] = {"default": flag.default, "help": flag.help,
                                       "choices": getattr(flag.parser, "enum_values", None)}
    for argv in json.loads(sys.argv[1]):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train.py", *argv])
        report["configs"].append(dataclasses.asdict(train.config_from_flags()))
    print(json.dumps(report))
    """
)
COMMANDS = [
    [],
    ["--data=d"],
    ["--data=d", "--model=residual_cnn", "--scale=2", "--lr_schedule=step"],
    ["--data=d", "--model=srgan", "--init_from=first"],
    ["--steps=500", "--learning_rate=0.01"],
]


@pytest.fixture(scope="module")
def train_py():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, json.dumps(COMMANDS)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_field_is_a_flag_with_the_fields_default(train_py):
    assert set(train_py["resolved"]) == RESOLVED
    choices = loop.TrainConfig.choices()
    for field in FIELDS:
        flag = train_py["flags"][field.name]
        assert field.metadata["help"] in flag["help"], field.name
        if field.name in choices:
            assert flag["choices"] == [str(c) for c in choices[field.name]], field.name
        if field.name in RESOLVED:
            assert flag["default"] is None, field.name
        elif field.type is dict:
            assert json.loads(flag["default"]) == getattr(DEFAULTS, field.name)
        else:
            assert field.type(flag["default"]) == getattr(DEFAULTS, field.name), field.name


def test_train_py_resolves_the_short_schedule_and_leaves_the_rest_to_train_config(train_py):
    samples, data, residual, fine_tune, explicit = train_py["configs"]
    short = {"data": os.path.join("tfrecords", "samples"), "run_dir": os.path.join("runs", "swift_srgan_x4"),
             "steps": 1200, "learning_rate": 1e-3, "max_minutes": 9.0, "pretrain_steps": 1200, "warmup_steps": 60}
    assert samples == {**dataclasses.asdict(DEFAULTS), **short}
    assert data == {**dataclasses.asdict(DEFAULTS), "data": "d", "run_dir": short["run_dir"],
                    "pretrain_steps": DEFAULTS.steps // 5, "warmup_steps": DEFAULTS.steps // 20}
    assert (residual["scale"], residual["run_dir"]) == (2, os.path.join("runs", "residual_cnn_x2"))
    assert (residual["pretrain_steps"], residual["warmup_steps"]) == (0, 0)
    assert fine_tune["pretrain_steps"] == 0 and fine_tune["init_from"] == "first"
    # --steps leaves the sample set's short schedule: TrainConfig's time budget, the given rate.
    assert (explicit["steps"], explicit["learning_rate"], explicit["max_minutes"]) == (500, 0.01, 0.0)
    assert (explicit["pretrain_steps"], explicit["warmup_steps"]) == (100, 25)


def _other_value(field, choices):
    """A valid value of ``field`` other than its default."""
    default = getattr(DEFAULTS, field.name)
    if field.name in choices:
        return next(c for c in choices[field.name] if c != default)
    if field.type is dict:
        return {"filters": 8, "nested": {"a": [1, 2]}}
    return {bool: lambda: not default, int: lambda: default + 3, float: lambda: default + 0.25,
            str: lambda: default + "_other"}[field.type]()


def _command_line(config):
    args = []
    for name, value in dataclasses.asdict(config).items():
        if isinstance(value, bool):
            args.append(f"--{name}" if value else f"--no{name}")
        else:
            args.append(f"--{name}={json.dumps(value) if isinstance(value, dict) else value}")
    return args


def _parsed(argv, resolved=None):
    flag_values = flags.FlagValues()
    loop.TrainConfig.define_flags(flag_values, resolved=resolved)
    flag_values(["train.py", *argv])
    return flag_values


def test_flags_and_train_config_round_trip(tmp_path):
    assert loop.TrainConfig.from_flags(_parsed([])) == DEFAULTS
    choices = loop.TrainConfig.choices()
    config = loop.TrainConfig(**{field.name: _other_value(field, choices) for field in FIELDS})
    assert all(getattr(config, f.name) != getattr(DEFAULTS, f.name) for f in FIELDS)
    parsed = _parsed(_command_line(config))
    assert loop.TrainConfig.from_flags(parsed) == config
    # What a run writes as flags.txt and --flagfile reads back.
    flagfile = tmp_path / "flags.txt"
    flagfile.write_text(parsed.flags_into_string())
    assert loop.TrainConfig.from_flags(_parsed([f"--flagfile={flagfile}"])) == config


def test_a_resolved_flag_defaults_to_none_and_takes_the_front_ends_value():
    parsed = _parsed([], resolved={"steps": "what the front end says"})
    assert parsed["steps"].default is None and "Default: what the front end says." in parsed["steps"].help
    assert loop.TrainConfig.from_flags(parsed).steps == DEFAULTS.steps
    assert loop.TrainConfig.from_flags(parsed, steps=7).steps == 7
    given = _parsed(["--steps=9"], resolved={"steps": "what the front end says"})
    assert loop.TrainConfig.from_flags(given, steps=7).steps == 9


def test_option_flags_must_hold_a_json_object():
    assert loop.TrainConfig.from_flags(_parsed(['--model_options={"filters": 8}'])).model_options == {"filters": 8}
    for bad in ("{filters: 8}", "[8]"):
        with pytest.raises(flags.IllegalFlagValueError, match="must be a JSON object"):
            _parsed([f"--model_options={bad}"])


def test_a_registry_change_shows_in_the_flag_choices_and_the_check(monkeypatch):
    monkeypatch.setattr(models, "NAMES", (*models.NAMES, "new_model"))
    monkeypatch.setattr(degrade, "PRESETS", (*degrade.PRESETS, "new_preset"))
    monkeypatch.setattr(degrade, "SCALES", (*degrade.SCALES, 16))
    monkeypatch.setattr(losses, "BACKBONES", (*losses.BACKBONES, "new_backbone"))
    monkeypatch.setattr(losses.PixelLoss, "KINDS", (*losses.PixelLoss.KINDS, "new_loss"))
    monkeypatch.setattr(loop, "STRATEGIES", (*loop.STRATEGIES, "new_strategy"))
    parsed = _parsed([])
    for name, new in (("model", "new_model"), ("degradation", "new_preset"), ("scale", "16"),
                      ("perceptual", "new_backbone"), ("pixel_loss", "new_loss"), ("strategy", "new_strategy")):
        assert new in parsed[name].parser.enum_values, name
    monkeypatch.setattr(degrade, "PRESETS", ("bicubic",))
    with pytest.raises(ValueError, match="--degradation must be one of bicubic, got 'noisy'"):
        loop.TrainConfig(degradation="noisy").check()


def test_the_degradation_names_are_the_presets_module_and_need_no_tensorflow():
    assert degrade.PRESETS is presets.PRESETS and degrade.SCALES is presets.SCALES
    code = "import sys; import sr_tf.data.presets, sr_tf.records; print('tensorflow' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


@pytest.mark.parametrize("script", ["evaluate.py", "export.py"])
def test_front_ends_offer_the_registrys_degradations_before_importing_tensorflow(script):
    code = textwrap.dedent(
        f"""
        import json, runpy, sys
        from absl import flags
        sys.argv = [{script!r}, "--helpfull"]
        try:
            runpy.run_path({script!r}, run_name="__main__")
        except SystemExit:
            pass
        print(json.dumps({{"degradation": flags.FLAGS["degradation"].parser.enum_values,
                          "tensorflow": "tensorflow" in sys.modules}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"degradation": list(presets.PRESETS), "tensorflow": False}
