"""Follow one sample through a run (`selfimprove trace RUN_DIR SAMPLE_ID`): where it came from and what became
of it. When a report's number looks wrong, the question is about particular samples: which weights, settings
and seed wrote this, what did every critic say, and did it end up in training?

What is shown, all read from the run directory through the stage manifests (report.collect) and the datasets
they list as outputs:
- the sample as its stage saved it: round, stage, prompt, weights (label, adapter folder, adapter hash),
  sampling settings and seed, completion (every attempt's, for a multi-attempt sample), and the task's grade
  where the stage graded it (evaluations);
- every verdict on it: the verdict rows of the same round that name its id (any critique stage);
- where it was used in that round: the training rows of a filter (`sample_ids`), the pairs that chose or
  rejected it (`chosen_sample_id` / `rejected_sample_id`), with the stages that trained on those datasets
  (a stage whose config's `data` names them); for an rl rollout, the step whose update it was sampled for, its
  rewards, and whether that update dropped it (`filter_groups` drops groups whose rewards are all equal).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from .artifacts import load_rows
from .report import collect

SAMPLING = ("temperature", "top_p", "max_tokens", "hint")
GRADE = ("correct", "correct_flexible", "extracted")


class UnknownSample(LookupError):
    """No stage of the run wrote a sample with this id; the message names some that exist."""


def trace(run_dir: str | Path, sample_id: str) -> dict:
    """The sample `sample_id` of the run, its verdicts and its uses (module docstring); UnknownSample if absent."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}: no config.yaml; is this a run directory?")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    data = _Data(run_dir, collect(run_dir))
    found = data.find(sample_id)
    if found is None:
        ids = data.some_ids()
        raise UnknownSample(f"no sample {sample_id!r} in {run_dir}; "
                            + (f"sample ids look like: {', '.join(ids)}" if ids else "it has no samples yet"))
    manifest, sample = found
    out = {
        "sample_id": sample_id, "round": manifest["round"], "stage": manifest["stage"], "type": manifest["type"],
        "problem_id": sample.get("problem_id"), "answer": sample.get("answer"), "prompt": sample["prompt"],
        "weights": sample.get("weights"), "sampling": {k: sample[k] for k in SAMPLING if k in sample},
        "seed": sample.get("seed"), "completion": sample["completion"], "finish_reason": sample.get("finish_reason"),
        "num_tokens": sample.get("num_tokens"),
    }
    if sample.get("attempts"):
        out["attempts"] = sample["attempts"]
    if any(k in sample for k in GRADE):
        out["grade"] = {k: sample[k] for k in GRADE if k in sample}
    out["verdicts"] = [{"stage": m["stage"], **{k: v[k] for k in ("critic", "score", "label", "rationale", "error")}}
                       for m, rows in data.round(manifest["round"]) for v in rows
                       if "critic" in v and v.get("sample_id") == sample_id]
    out["used_in"] = _uses(data, manifest, sample, config.get("stages", {}))
    return out


def _uses(data: "_Data", manifest: dict, sample: dict, stage_configs: dict) -> list[dict]:
    sample_id = sample["sample_id"]
    uses = []
    if "step" in sample and "rewards" in sample:  # an rl rollout: sampled for its step's update
        group = [r["rewards"] for r in data.rows(manifest)
                 if r.get("step") == sample["step"] and r["problem_id"] == sample["problem_id"]]
        dropped = bool(stage_configs.get(manifest["stage"], {}).get("filter_groups")) and \
            all(g == group[0] for g in group)
        uses.append({"stage": manifest["stage"], "how": "rl rollout", "step": sample["step"],
                     "scores": sample.get("scores"), "rewards": sample["rewards"], "in_update": not dropped})
    for m, rows in data.round(manifest["round"]):
        trained_by = [name for name, c in stage_configs.items() if isinstance(c, dict) and c.get("data") == m["stage"]]
        for i, row in enumerate(rows):
            how = [h for h, hit in (("training row", sample_id in (row.get("sample_ids") or [])),
                                    ("chosen in pair", row.get("chosen_sample_id") == sample_id),
                                    ("rejected in pair", row.get("rejected_sample_id") == sample_id)) if hit]
            uses += [{"stage": m["stage"], "how": h, "row": i, "trained_by": trained_by} for h in how]
    return uses


class _Data:
    """The run's datasets (`data` outputs of finished stages), each loaded once, on first use."""

    def __init__(self, run_dir: Path, rounds: dict[int, list[dict]]):
        self.run_dir, self.rounds, self._rows = run_dir, rounds, {}  # _rows: (round, stage) → its rows

    def rows(self, m: dict) -> list[dict]:
        key = (m["round"], m["stage"])
        if key not in self._rows:
            path = self.run_dir / f"round_{m['round']:03d}" / m["stage"] / "data"
            self._rows[key] = load_rows(path) if "data" in m.get("outputs", []) else []
        return self._rows[key]

    def round(self, round_index: int) -> list[tuple[dict, list[dict]]]:
        return [(m, self.rows(m)) for m in self.rounds.get(round_index, [])]

    def find(self, sample_id: str) -> tuple[dict, dict] | None:
        """The manifest and row of the stage that wrote the sample. Ids start `r<round>/<stage>/`, so that stage
        is read first; the others only if it is not there (a user's own stage may name its samples otherwise)."""
        parts = sample_id.split("/")
        guess = (int(parts[0][1:]), parts[1]) if len(parts) > 2 and parts[0][1:].isdigit() else None
        manifests = sorted((m for stages in self.rounds.values() for m in stages),
                           key=lambda m: (m["round"], m["stage"]) != guess)
        for m in manifests:
            for row in self.rows(m):
                if row.get("sample_id") == sample_id and "completion" in row:  # not a verdict row naming it
                    return m, row
        return None

    def some_ids(self, limit: int = 6) -> list[str]:
        """The first sample id of each stage that wrote samples, for the unknown-id message."""
        firsts = (next((r["sample_id"] for r in self.rows(m) if "sample_id" in r and "completion" in r), None)
                  for stages in self.rounds.values() for m in stages)
        return [first for first in firsts if first][:limit]


def render(t: dict) -> str:
    """The trace as text for a terminal."""
    w = t["weights"] or {}
    lines = [f"sample {t['sample_id']}",
             f"  round {t['round']}, stage {t['stage']} ({t['type']}), problem {t['problem_id']}"
             + (f", gold answer {t['answer']}" if t.get("answer") else ""),
             f"  weights: {w.get('label')} (adapter {w.get('adapter') or '-'}, hash {w.get('adapter_hash') or '-'}, "
             f"base {w.get('base')})",
             "  sampling: " + ", ".join(f"{k} {v}" for k, v in t["sampling"].items()) + f"; seed {t['seed']}"]
    attempts = t.get("attempts") or [{k: t[k] for k in ("prompt", "completion", "finish_reason", "num_tokens")}]
    for n, a in enumerate(attempts, start=1):
        label = f"attempt {n} " if len(attempts) > 1 else ""
        lines += [f"{label}prompt:", _indent(_prompt_text(a["prompt"])),
                  f"{label}completion ({a.get('finish_reason')}, {a.get('num_tokens')} tokens):",
                  _indent(a["completion"])]
        if "correct" in a:
            lines.append(f"  graded: {'correct' if a['correct'] else 'incorrect'} (extracted {a.get('extracted')!r})")
    if t.get("grade"):
        lines.append("grade: " + ", ".join(f"{k} {v!r}" for k, v in t["grade"].items()))
    lines.append("verdicts:" if t["verdicts"] else "verdicts: none (no critique stage of its round judged it)")
    for v in t["verdicts"]:
        label = "no label" if v["label"] is None else ("correct" if v["label"] else "incorrect")
        lines.append(f"  {v['stage']} / {v['critic']}: {label}, score {v['score']}"
                     + (f", error {v['error']}" if v["error"] else "")
                     + (f" — {v['rationale']}" if v["rationale"] else ""))
    lines.append("used in:" if t["used_in"] else f"used in: nothing (no selection of round {t['round']} took it)")
    for u in t["used_in"]:
        if u["how"] == "rl rollout":
            lines.append(f"  {u['stage']}: rollout of step {u['step']}, critic scores {u['scores']} → rewards "
                         f"{u['rewards']}, "
                         + ("in that step's update" if u["in_update"] else "dropped from that step's update "
                                                                            "(its group's rewards were all equal)"))
        else:
            by = f" (trained on by {', '.join(u['trained_by'])})" if u["trained_by"] else ""
            lines.append(f"  {u['stage']}: {u['how']} {u['row']}{by}")
    return "\n".join(lines)


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"[{m['role']}] {m['content'] if m['content'].strip() else json.dumps(m['content'])}"
                     for m in prompt)


def _indent(text: str) -> str:
    if not text.strip():  # newlines only: show them rather than a block of empty lines
        return f"  | {json.dumps(text)}"
    return "\n".join("  | " + line for line in text.splitlines())


def main(run_dir: str, sample_id: str) -> int:
    """`selfimprove trace RUN_DIR SAMPLE_ID`: print the trace; 2 (the reason on stderr) for an unknown sample id
    or a folder that is not a run."""
    try:
        print(render(trace(run_dir, sample_id)))
    except (UnknownSample, FileNotFoundError) as err:
        print(f"trace: {err.args[0]}", file=sys.stderr)
        return 2
    return 0
