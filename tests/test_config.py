"""Config loading: every shipped YAML loads; bad input fails at load time naming file, key and fix."""

from pathlib import Path

import pytest

from selfimprove.config import ConfigError
from selfimprove.yamlio import apply_overrides, load_yaml
from selfimprove.models import load_spec, prepare_model
from selfimprove.pipeline import load_pipeline
from selfimprove.registry import MODELS
from selfimprove.shipped import root

REPO = Path(__file__).resolve().parents[1]
PIPELINES = sorted((root() / "pipelines").glob("*.yaml")) + sorted((REPO / "tests" / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_pipeline_loads(path):
    pipeline = load_pipeline(path)
    assert pipeline.stages, path


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_spec_loads(name):
    assert load_spec(name).name == name


@pytest.mark.parametrize("path", sorted((root() / "configs").glob("[!m]*/*.yaml")), ids=lambda p: p.name)
def test_every_component_config_loads(path, tmp_path):
    """configs/engines and configs/trainers files are components a pipeline includes, configs/accelerate files a
    train stage's launcher reads: use each one."""
    kind = path.parent.name
    base = load_yaml(REPO / "tests" / "pipelines" / "tiny_star.yaml")
    pipe = tmp_path / "p.yaml"
    import yaml

    if kind == "engines":
        base["engine"] = {"include": str(path)}
    elif kind == "trainers":
        base["stages"]["train"]["trainer"] = {"include": str(path)}
    elif kind == "accelerate":  # a train stage's launch.config (trainers/launch.py)
        base["stages"]["train"]["launch"] = {"config": str(path), "num_processes": 2}
        if path.stem in ("fsdp", "deepspeed_zero3"):  # parameter sharding: refused until saving gathers shards
            pipe.write_text(yaml.safe_dump(base, sort_keys=False))
            with pytest.raises(ConfigError, match="shards the parameters"):
                load_pipeline(pipe)
            return
    else:
        pytest.fail(f"no check for configs/{kind}")
    pipe.write_text(yaml.safe_dump(base, sort_keys=False))
    load_pipeline(pipe)


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(text)
    return path


BASE = """
name: t
model: tiny-random-llama
task: {name: arithmetic}
stages:
  generate: {sampling: {n: 2, temperature: 0.7}}
  critique: {samples: generate}
"""


def test_unknown_key_names_file_key_and_valid_keys(tmp_path):
    path = _write(tmp_path, BASE + "  evaluate: {sampling: {temprature: 0.5}}\n")
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    msg = str(err.value)
    assert str(path) in msg and "stages.evaluate.sampling.temprature" in msg and "temperature" in msg


def test_wrong_type_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"rounds: expected an integer, got 'three'"):
        load_pipeline(_write(tmp_path, BASE + "rounds: three\n"))


def test_unknown_task_lists_valid_names(tmp_path):
    with pytest.raises(ConfigError, match=r"task: unknown task 'gsm9k'; did you mean 'gsm8k'\? valid names: "
                                          r"arithmetic, dataset, gsm8k"):
        load_pipeline(_write(tmp_path, BASE.replace("arithmetic", "gsm9k")))


def test_unknown_stage_type_lists_valid_names(tmp_path):
    with pytest.raises(ConfigError, match=r"stages.critique: unknown stage 'critic'; did you mean 'critique'\? "
                                          r"valid names: "):
        load_pipeline(_write(tmp_path, BASE.replace("critique: {samples", "critique: {type: critic, samples")))


def test_reference_to_later_or_missing_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"stages.critique: refers to stage 'sample'.*earlier stages: generate"):
        load_pipeline(_write(tmp_path, BASE.replace("samples: generate", "samples: sample")))


def test_unknown_model(tmp_path):
    with pytest.raises(ConfigError, match=r"pipe.yaml: model: unknown model 'smollm2-135m'; did you mean "
                                          r"'smollm2-135m-instruct'\? valid names: gemma-3-270m, smollm2-135m-instruct, "
                                          r"tiny-random-llama \(or a model description .yaml file, or a model "
                                          r"folder\)"):
        load_pipeline(_write(tmp_path, BASE.replace("tiny-random-llama", "smollm2-135m")))


def test_a_model_of_your_own_is_a_yaml_file(tmp_path):
    """A model description outside the package is named by its path, checked when the pipeline loads (its name is
    its file's name; its source's fields are required) and prepared as a shipped one is."""
    folder = tmp_path / "weights"
    folder.mkdir()
    own = tmp_path / "my-model.yaml"
    own.write_text(f"name: my-model\nsource: local\npath: {folder}\n")
    assert load_pipeline(_write(tmp_path, BASE.replace("tiny-random-llama", str(own)))).config.model == str(own)
    assert prepare_model(str(own)) == folder.resolve()
    assert prepare_model(str(folder)) == folder.resolve()  # a folder is used as is
    renamed = tmp_path / "other.yaml"
    renamed.write_text(own.read_text())
    with pytest.raises(ConfigError, match=r"other.yaml: name: 'my-model' must equal the file name 'other'"):
        load_pipeline(_write(tmp_path, BASE.replace("tiny-random-llama", str(renamed))))
    own.write_text("name: my-model\nsource: local\n")
    with pytest.raises(ConfigError, match=r"my-model.yaml: <top>: source 'local' needs path"):
        load_pipeline(_write(tmp_path, BASE.replace("tiny-random-llama", str(own))))
    with pytest.raises(ConfigError, match=r"missing.yaml: no such config file"):
        load_pipeline(_write(tmp_path, BASE.replace("tiny-random-llama", str(tmp_path / "missing.yaml"))))


def test_invalid_value_combination(tmp_path):
    with pytest.raises(ConfigError, match=r"stages.generate.sampling: n=2 samples with temperature 0"):
        load_pipeline(_write(tmp_path, BASE.replace("temperature: 0.7", "temperature: 0")))


def test_bad_split_for_task(tmp_path):
    text = BASE.replace("{sampling: {n: 2", "{problems: {split: validation}, sampling: {n: 2")
    with pytest.raises(ConfigError, match=r"problems.split: 'validation'; task 'arithmetic' has splits train, test"):
        load_pipeline(_write(tmp_path, text))


def test_critic_dotted_path_errors(tmp_path):
    text = BASE.replace("critique: {samples: generate}", "critique: {samples: generate, critics: [{name: 'tests.plugins:nope'}]}")
    with pytest.raises(ConfigError, match=r"stages.critique.critics\[0\]: module 'tests.plugins' has no attribute 'nope'"):
        load_pipeline(_write(tmp_path, text))
    text = BASE.replace("critique: {samples: generate}",
                        "critique: {samples: generate, critics: [{name: 'tests.plugins:accept_al'}]}")
    with pytest.raises(ConfigError, match=r"no attribute 'accept_al' \(for critic 'tests.plugins:accept_al'\); did you "
                                          r"mean 'accept_all'\?"):
        load_pipeline(_write(tmp_path, text))
    text = BASE.replace("critique: {samples: generate}", "critique: {samples: generate, critics: [{name: 'nopkg.x:C'}]}")
    with pytest.raises(ConfigError, match=r"cannot import module 'nopkg.x'"):
        load_pipeline(_write(tmp_path, text))


def test_function_critic_parameters_are_checked(tmp_path):
    text = BASE.replace("critique: {samples: generate}",
                        "critique: {samples: generate, critics: [{name: 'tests.plugins:accept_all', scor: 2}]}")
    with pytest.raises(ConfigError, match=r"critics\[0\]: accept_all\(samples, score: float = 1.0\) cannot be called as "
                                          r"accept_all\(samples, scor=...\)"):
        load_pipeline(_write(tmp_path, text))
    # a parameter of the wrong type (the function's annotation says float)
    text = BASE.replace("critique: {samples: generate}",
                        "critique: {samples: generate, critics: [{name: 'tests.plugins:accept_all', score: one}]}")
    with pytest.raises(ConfigError, match=r"critics\[0\].score: expected a number, got 'one'"):
        load_pipeline(_write(tmp_path, text))
    # a function that cannot take the samples
    text = BASE.replace("critique: {samples: generate}",
                        "critique: {samples: generate, critics: [{name: 'tests.plugins:no_samples_argument'}]}")
    with pytest.raises(ConfigError, match=r"cannot be called as no_samples_argument\(samples\)"):
        load_pipeline(_write(tmp_path, text))


def test_class_critic_must_implement_judge(tmp_path):
    text = BASE.replace("critique: {samples: generate}",
                        "critique: {samples: generate, critics: [{name: 'tests.plugins:CallableCritic'}]}")
    with pytest.raises(ConfigError, match=r"critic class 'tests.plugins:CallableCritic' must implement "
                                          r"judge\(self, samples"):
        load_pipeline(_write(tmp_path, text))


def test_critic_ids_named_by_filter_pairs_and_unsolved_in_are_checked_at_load(tmp_path):
    two = BASE.replace("critique: {samples: generate}",
                       "critique: {samples: generate, critics: [{name: answer}, {name: majority}]}")
    with pytest.raises(ConfigError, match=r"stages.filter: critic 'anwser' is not run by stage 'critique'; "
                                          r"its critic ids: answer, majority"):
        load_pipeline(_write(tmp_path, two + "  filter: {critic: anwser}\n"))
    with pytest.raises(ConfigError, match=r"stages.filter: stage 'critique' runs critics answer, majority: set `critic:`"):
        load_pipeline(_write(tmp_path, two + "  filter: {}\n"))
    load_pipeline(_write(tmp_path, two + "  filter: {critic: majority}\n"))
    with pytest.raises(ConfigError, match=r"stages.pairs: critic 'x' is not run by stage 'critique'"):
        load_pipeline(_write(tmp_path, two + "  pairs: {critic: x}\n"))
    with pytest.raises(ConfigError, match=r"stages.again: stage 'generate' \(generate\) writes no verdicts"):
        load_pipeline(_write(tmp_path, two + "  again: {type: generate, unsolved_in: generate}\n"))
    load_pipeline(_write(tmp_path, two + "  again: {type: generate, unsolved_in: critique, critic: answer}\n"))


def test_trainer_config_checked_at_load(tmp_path):
    text = BASE + "  train: {data: critique, trainer: {name: sft, optim: {lr: 1}}}\n"
    with pytest.raises(ConfigError, match=r"stages.train.trainer.optim.lr: unknown key; valid keys of Optimization"):
        load_pipeline(_write(tmp_path, text))


def test_overrides_and_include(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    variant = _write(tmp_path, "include: base.yaml\nname: v\nstages:\n  generate: {sampling: {n: 4}}\n")
    pipe = load_pipeline(variant, ["rounds=3", "stages.generate.sampling.temperature=0.9"])
    assert pipe.config.name == "v" and pipe.config.rounds == 3
    gen = pipe.stages[0].config
    assert (gen.sampling.n, gen.sampling.temperature) == (4, 0.9)
    assert [s.name for s in pipe.stages] == ["generate", "critique"]  # order kept from the included file


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        apply_overrides({}, ["rounds"])


def test_overrides_set_dotted_keys_on_a_copy():
    data = {"rounds": 1, "stages": {"generate": {"sampling": {"n": 2, "temperature": 0.7}}}}
    out = apply_overrides(data, ["stages.generate.sampling.n=8", "stages.new.x=[1, {a: b}]", "name="])
    assert out == {"rounds": 1, "name": "", "stages": {"generate": {"sampling": {"n": 8, "temperature": 0.7}},
                                                        "new": {"x": [1, {"a": "b"}]}}}
    assert data == {"rounds": 1, "stages": {"generate": {"sampling": {"n": 2, "temperature": 0.7}}}}
    with pytest.raises(ConfigError, match=r"override 'rounds.x': rounds is not a mapping"):
        apply_overrides(data, ["rounds.x=1"])


def test_anchors_aliases_and_merge_keys(tmp_path):
    """What the README's example uses: an anchor, its alias, and a merge key with a key of its own over it."""
    path = _write(tmp_path, "base: &b {n: 2, temperature: 0.7}\nhot: {<<: *b, temperature: 1.0}\nboth: [*b, *b]\n")
    base = {"n": 2, "temperature": 0.7}
    assert load_yaml(path) == {"base": base, "hot": {"n": 2, "temperature": 1.0}, "both": [base, base]}


def test_online_trainer_in_train_stage_is_refused(tmp_path):
    text = BASE + "  train: {data: critique, trainer: {name: policy_gradient}}\n"
    with pytest.raises(ConfigError, match=r"stages.train: trainer 'policy_gradient' is an online RL trainer"):
        load_pipeline(_write(tmp_path, text))


# -- resuming with changed settings -------------------------------------------------------------------------------
class CannedEngine:
    """Answers every prompt with the same text, and counts its calls: a resume that regenerates would call it."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, sampling, weights, seed, progress=None):
        from selfimprove.records import Completion

        self.calls += 1
        return [[Completion("The answer is 7.", "stop", 5) for _ in range(sampling.n)] for _ in prompts]


RESUMED = """
name: t
model: tiny-random-llama
evaluate_base: false
task: {name: arithmetic, num_train: 40}
stages:
  generate: {problems: {num_problems: 20}, sampling: {n: 2, temperature: 0.7}}
  critique: {critics: [{name: "tests.plugins:fails_on_marker"}], calls: {max_error_rate: 0.0}}
"""


def test_a_run_stopped_by_its_error_budget_resumes_with_a_higher_one(tmp_path):
    """The critique stage trips `max_error_rate`; rerun with a higher budget, it finishes from the samples the
    first run wrote, which no engine call regenerates and nothing rewrites."""
    from selfimprove.pipeline import Runner, StageFailed

    pipe = _write(tmp_path, RESUMED)
    run_dir, engine = tmp_path / "run", CannedEngine()
    with pytest.raises(StageFailed, match="max_error_rate"):
        Runner(load_pipeline(pipe), run_dir, engine=engine, log=lambda *a: None).run()
    samples = run_dir / "round_001" / "generate"
    before = {p: p.read_bytes() for p in samples.rglob("*") if p.is_file()}
    assert engine.calls > 0 and before
    calls = engine.calls

    Runner(load_pipeline(pipe, ["stages.critique.calls.max_error_rate=1.0", "report_to=[]"]), run_dir,
           engine=engine, log=lambda *a: None).run()
    assert engine.calls == calls  # nothing was generated again
    assert {p: p.read_bytes() for p in samples.rglob("*") if p.is_file()} == before
    assert (run_dir / "round_001" / "critique" / "manifest.json").exists()

    # a setting that changes finished work is refused, naming the exact key and both values
    with pytest.raises(ConfigError, match=r"different config \(stages\.generate\.sampling\.temperature: 0\.7 -> "
                                          r"0\.9\).*Only these may change on resume: rounds, "):
        Runner(load_pipeline(pipe, ["stages.generate.sampling.temperature=0.9"]), run_dir,
               engine=engine, log=lambda *a: None).run()


def test_changed_settings_names_dotted_keys_and_lets_budgets_change():
    from selfimprove.pipeline import changed_settings

    old = {"rounds": 1, "seed": 0, "report_to": [], "stages": {"critique": {
        "calls": {"max_error_rate": 0.05, "timeout": 60.0}, "critics": [{"name": "answer", "mode": "strict"}]}}}
    new = {"rounds": 3, "seed": 0, "report_to": ["trackio"], "stages": {"critique": {
        "calls": {"max_error_rate": 0.5, "timeout": 5.0},
        "critics": [{"name": "answer", "mode": "flexible"}, {"name": "majority"}]}}}
    assert changed_settings(old, new) == ["stages.critique.critics[0].mode: 'strict' -> 'flexible'",
                                          "stages.critique.critics[1].name: (unset) -> 'majority'"]
    assert changed_settings(old, {**old, "seed": 1}) == ["seed: 0 -> 1"]
