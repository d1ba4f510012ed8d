"""A served engine's failover reaches the stage's metrics, the run's metrics.jsonl, its console and its report."""

import json

from selfimprove.engines.base import Engine
from selfimprove.pipeline import Runner, load_pipeline
from selfimprove.records import Completion
from selfimprove.report import markdown_table


class LosesAServer(Engine):
    """Answers every prompt with "The answer is 0."; the first generate call 'loses a server' on the way, as the
    vllm_server engine counts it."""

    def __init__(self):
        self.failover = {"servers_lost": 0, "requests_moved": 0, "seconds_lost": 0.0}
        self.calls = 0

    def generate(self, prompts, sampling, weights, seed):
        self.calls += 1
        if self.calls == 1:
            self.failover.update(servers_lost=1, requests_moved=3, seconds_lost=12.5)
        return [[Completion("The answer is 0.", "stop", 5)] * sampling.n for _ in prompts]


def test_failover_is_counted_per_stage(tiny_model, tmp_path):
    data = {"name": "failover", "model": "tiny-random-llama", "rounds": 1, "evaluate_base": False, "task": {"name": "arithmetic"},
            "stages": {"generate": {"problems": {"num_problems": 4}, "sampling": {"n": 2, "temperature": 1.0, "max_tokens": 8}},
                       "evaluate": {"problems": {"num_problems": 4}, "sampling": {"max_tokens": 8}}}}
    lines = []
    Runner(load_pipeline(None, data=data), tmp_path / "run", engine=LosesAServer(), log=lines.append).run()
    rows = {row["stage"]: row for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    assert (rows["generate"]["failover_servers_lost"], rows["generate"]["failover_requests_moved"],
            rows["generate"]["failover_seconds_lost"]) == (1, 3, 12.5)
    assert not any(k.startswith("failover") for k in rows["evaluate"])  # nothing lost there: nothing said
    assert any("failover: 1 server(s) lost, 3 request(s) moved, 12.5s lost" in line for line in lines), lines
    table = markdown_table(tmp_path / "run")
    assert "failover (lost/moved/s)" in table and "generate=1/3/12" in table, table
