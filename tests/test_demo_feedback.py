"""`rasa-lora demo`'s feedback: its accuracy passes show a bar, and it prints no path of a folder it deletes."""

from __future__ import annotations

import pytest

from rasa_lora import demo


def test_the_accuracy_pass_shows_progress(smollm2, capsys):
    model, tokenizer = smollm2
    problems = demo.held_out_problems(3, [])
    accuracy, completions = demo.accuracy(model, tokenizer, problems[:3], desc="[demo] accuracy before")
    err = capsys.readouterr().err
    assert "[demo] accuracy before" in err and "batch" in err
    assert len(completions) == 3


@pytest.mark.slow
def test_the_merge_check_prints_no_temporary_path(smollm2, tmp_path, capsys):
    import peft

    import rasa_lora

    model, tokenizer = smollm2
    wrapped = peft.get_peft_model(model, rasa_lora.RasaConfig(r=2, target_modules=["q_proj"]))
    try:
        wrapped.save_pretrained(tmp_path / "adapter")
        work = tmp_path / "work"
        work.mkdir()
        difference = demo.merged_logits_match(tmp_path / "adapter", wrapped, tokenizer, work)
    finally:
        wrapped.unload()
    captured = capsys.readouterr()
    assert difference < 1e-3
    assert str(work) not in captured.out + captured.err  # was "merged model written to /tmp/..."
