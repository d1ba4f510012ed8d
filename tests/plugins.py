"""A user's own critics, judge backend and tracker, loaded by dotted path in the tests (the plugin mechanism under
test)."""

import json
from dataclasses import dataclass

from selfimprove.critics import Critic, Verdict
from selfimprove.critics.llm_judge import JudgeBackend
from selfimprove.engines.hf_engine import HFEngine
from selfimprove.trackers import Tracker


def accept_all(samples, score: float = 1.0):
    """Labels every non-empty sample correct: lets the tiny random model's samples reach the trainer."""
    return [Verdict(score=score, label=bool(s["completion"].strip()), rationale="accept_all") for s in samples]


def fails_on_marker(samples):
    """Raises on any batch containing a sample whose problem id ends in 0 (for error-handling tests)."""
    if any(s["problem_id"].endswith("0") for s in samples):
        raise RuntimeError("boom")
    return [1.0 for _ in samples]


def accept_even_problems(samples):
    """Labels a sample correct iff its problem id ends in an even digit: half the problems are 'solved', so
    STaR's rationalization has the other half to work on."""
    return [Verdict(score=float(ok), label=ok) for ok in (int(s["problem_id"][-1]) % 2 == 0 for s in samples)]


def length_score(samples):
    """Scores a sample by its length in characters (no label): gives best_worst pairs on random text."""
    return [Verdict(score=float(len(s["completion"]))) for s in samples]


def length_score_odd_problems(samples):
    """Length score on problems whose id ends in an odd digit, 0 on the others: even problems' groups carry no
    reward signal (for the rl stage's group filter)."""
    return [Verdict(score=float(len(s["completion"])) if int(s["problem_id"][-1]) % 2 else 0.0) for s in samples]


def reject_all(samples):
    """Labels every sample incorrect: a selection that keeps nothing."""
    return [Verdict(score=0.0, label=False) for _ in samples]


def no_samples_argument():
    """A plugin written without the samples parameter (refused at config load)."""
    return []


class CallableCritic(Critic):
    """A class critic that implemented __call__ instead of judge (refused at config load)."""

    def __call__(self, samples):
        return [1.0 for _ in samples]


class FixedScoreJudge(JudgeBackend):
    """A judge backend that replies "Score: <score>" to every conversation, and fails those that mention 'fail'."""

    @dataclass
    class Config:
        score: int = 7

    def replies(self, messages, sampling, seed):
        return [RuntimeError("refused") if "fail" in m[-1]["content"] else f"Score: {self.config.score}"
                for m in messages]


class RecordingTracker(Tracker):
    """A tracker that appends every call it receives to `recorded.jsonl` in the run directory."""

    def start(self, run_config):
        self.run_id = self.run_id or f"rec-{self.run_name}"
        self._write({"start": self.run_id, "name": run_config["name"]})

    def log(self, metrics, step):
        self._write({"step": step, **metrics})

    def finish(self):
        self._write({"finish": self.run_id})

    def _write(self, row):
        with (self.run_dir / "recorded.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


class ReleasableHFEngine(HFEngine):
    """The hf engine, releasable while a stage trains; every start and close is appended to `events`."""

    release_for_training = True
    events: list[str] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events.append("start")

    def close(self) -> None:
        self.events.append("close")
