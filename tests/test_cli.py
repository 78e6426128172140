"""The CLI end to end on the tiny model: train, then export a folder that transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from sdft_ray.cli import main


@pytest.mark.slow
def test_train_then_export_loads_and_generates(ray_local, tiny_model_dir, tiny_data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model_dir)}, "data": {"path": str(tiny_data)},
        "rollout": {"max_new_tokens": 8}, "schedule": {"prompts_per_step": 4, "max_steps": 2},
        "placement": {r: {"num_cpus": 0.5} for r in ("rollout", "teacher", "learner")},
        "output": {"dir": str(tmp_path / "run"), "progress": "off",
                   "show_answers": {"trained": 2, "prior": 1, "prior_path": str(tiny_data), "max_new_tokens": 4}},
    }))
    assert main(["train", str(config), "--set", "learner.lr=1e-3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["steps"] == 2 and summary["checkpoint"].endswith("step-00000002")
    # the run ends with the answers before and after training: 2 trained questions + 1 other, 3 lines each
    start = next(i for i, line in enumerate(out) if line.startswith("Answers before -> after training"))
    assert [line.split("]")[0] for line in out[start + 1:start + 10:3]] == ["[trained", "[trained", "[prior"]
    assert len(json.loads((tmp_path / "run" / "answers.json").read_text())) == 3
    assert (tmp_path / "run" / "tensorboard").is_dir() and (tmp_path / "run" / "metrics.jsonl").is_file()

    for weights in ("student", "teacher"):
        out = tmp_path / f"export-{weights}"
        assert main(["export", str(tmp_path / "run"), str(out), "--weights", weights]) == 0
        model = AutoModelForCausalLM.from_pretrained(out)
        tok = AutoTokenizer.from_pretrained(out)
        ids = tok("What is the capital of Zorbia?", return_tensors="pt")
        generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
        assert generated.shape[1] == ids["input_ids"].shape[1] + 5 or tok.eos_token_id in generated[0].tolist()
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "export-student")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), base.state_dict().values()))
    assert changed, "the exported student must hold the trained weights"


def test_bad_config_exits_2_and_names_the_field(tmp_path, capsys):
    assert main(["train", "--set", "loss.alpha=7"]) == 2
    assert "loss.alpha" in capsys.readouterr().err


def test_bad_data_exits_2_before_any_actor(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "ok", "demonstration": "fine"}\n{"prompt": "", "demonstration": "x"}\n')
    code = main(["train", "--set", f"model.path={tiny_model_dir}", "--set", f"data.path={data}"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl line 2" in err and "prompt" in err
