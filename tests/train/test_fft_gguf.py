"""Full fine-tuning of a base loaded from a GGUF file: the result saves as an ordinary model, and a model that could
not be saved whole is refused before training, not after it.

On the GPU (transformers 5.17) a 218-step fft run of `--base-model smollm2.gguf` failed in its final save with
"The model is quantized with QuantizationMethod.GGUF and is not serializable": transformers' GGUF loader unpacks every
tensor into float, but left the model marked as GGUF-quantized, and `save_pretrained` refuses marked models.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rasa_lora.train import trainer
from rasa_lora.train.cli import main as train_main
from rasa_lora.train.config import build_config
from rasa_lora.train.trainer import train
from tests.train.conftest import tiny_overrides


def _mark_as_gguf(model):
    """The marks transformers' legacy GGUF loader leaves on a model whose weights it de-quantized (5.17 to 5.25):
    `hf_quantizer`, `config.quantization_config`, `is_quantized`, `quantization_method`."""
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    config = GgufConfig(gguf_file="model.gguf")
    model.hf_quantizer = GgufHfQuantizer(config)
    model.config.quantization_config = config
    model.is_quantized, model.quantization_method = True, config.quant_method
    return model


def test_a_dequantized_gguf_model_saves_and_loads_back(tmp_path):
    from transformers import AutoModelForCausalLM

    from rasa_lora.models import plain_gguf_model, tiny_llama, unsaveable_reason

    marked = _mark_as_gguf(tiny_llama())
    assert unsaveable_reason(marked) is not None
    with pytest.raises(ValueError, match="not serializable"):  # the GPU run's failure, reproduced
        marked.save_pretrained(tmp_path / "refused")
    model = plain_gguf_model(marked)
    assert unsaveable_reason(model) is None and not model.is_quantized
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert "quantization_config" not in loaded.config.to_dict()
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)


def test_a_model_still_in_gguf_blocks_keeps_its_marks():
    from rasa_lora.models import plain_gguf_model, tiny_llama, unsaveable_reason

    model = _mark_as_gguf(tiny_llama())
    model.hf_quantizer.packed_modules = {"model.layers.0.self_attn.q_proj": object()}  # a packed GgufLinear
    assert plain_gguf_model(model).hf_quantizer is not None and unsaveable_reason(model)


def test_fft_of_an_unsaveable_base_is_refused_before_training(tiny_model_dir, tmp_path, monkeypatch):
    import rasa_lora.models
    from rasa_lora.errors import UserError

    original = rasa_lora.models.load_model
    monkeypatch.setattr(rasa_lora.models, "load_model", lambda *a, **k: _mark_as_gguf(original(*a, **k)))
    monkeypatch.setattr(trainer, "train_step", lambda *a, **k: pytest.fail("trained before refusing"))
    out = tmp_path / "run"
    with pytest.raises(UserError, match="--method fft: the trained model could not be saved.*--method lora"):
        train(build_config(tiny_overrides(tiny_model_dir, out, method="fft")))
    assert not out.exists()
    # adapters save only their own weights: the same base still trains with them
    monkeypatch.undo()
    monkeypatch.setattr(rasa_lora.models, "load_model", lambda *a, **k: _mark_as_gguf(original(*a, **k)))
    assert train(build_config(tiny_overrides(tiny_model_dir, tmp_path / "lora", method="lora",
                                             max_steps=1)))["steps"] == 1


def test_fft_with_an_nf4_base_is_refused_by_the_recipe(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="base_quantization=nf4 .* method=fft"):
        build_config(tiny_overrides(tiny_model_dir, tmp_path / "run", method="fft", base_quantization="nf4"))


def test_a_failed_final_save_is_checkpointed_and_resume_only_saves(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from rasa_lora.train import checkpoint

    out = tmp_path / "run"
    values = tiny_overrides(tiny_model_dir, out, method="fft", max_steps=3, save_steps=2)
    original = trainer.save_final

    def failing(run):
        raise ValueError("The model is quantized with QuantizationMethod.GGUF and is not serializable")

    monkeypatch.setattr(trainer, "save_final", failing)
    with pytest.raises(ValueError, match="not serializable"):
        train(build_config(values))
    assert [path.name for path in checkpoint.checkpoint_dirs(out)] == ["step-000002", "step-000003"]
    assert not (out / "model.safetensors").exists()
    trained = torch.load(out / "checkpoints" / "step-000003" / "state.pt", weights_only=False)["trainable"]

    monkeypatch.setattr(trainer, "save_final", original)
    monkeypatch.setattr(trainer, "train_step", lambda *a, **k: pytest.fail("a finished run trained again"))
    summary = train(build_config({**values, "resume": True}))
    assert summary["steps"] == 3
    saved = load_file(out / "model.safetensors")
    assert saved and all(torch.equal(saved[key], trained[key]) for key in saved)


def test_any_failed_final_save_leaves_a_resumable_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    # an adapter method, and a run without save_steps: the finished state is still kept for --resume
    from rasa_lora.train import checkpoint

    out = tmp_path / "run"
    monkeypatch.setattr(trainer, "save_final", lambda run: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        train(build_config(tiny_overrides(tiny_model_dir, out, method="lora", max_steps=2)))
    assert [path.name for path in checkpoint.checkpoint_dirs(out)] == ["step-000002"]


def test_analysis_reads_a_tied_weight_once_as_save_pretrained_writes_it(tmp_path, monkeypatch):
    """A GGUF base is read as a loaded model (its state_dict lists SmolLM2's tied lm_head.weight too); its full
    fine-tune is a safetensors folder, which holds the tied weight once: the two must list the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import rasa_lora.models
    from rasa_lora.analysis.sources import WeightSource, _check_same_architecture

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    assert "lm_head.weight" in model.state_dict()
    model.save_pretrained(tmp_path / "tuned")
    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"")  # resolved as a GGUF file; the patched loader below reads nothing
    monkeypatch.setattr(rasa_lora.models, "load_model", lambda *a, **k: model)
    base, tuned = WeightSource(gguf), WeightSource(tmp_path / "tuned")
    assert base.weights == tuned.weights and "lm_head.weight" not in base.weights
    _check_same_architecture(base, tuned)


def test_a_full_fine_tune_keeps_its_recipe_beside_the_model_config(tiny_model_dir, tmp_path, capsys):
    """`save_pretrained` writes the model's config.json over the run's recipe: the recipe is kept first, and what
    reads a run's recipe (--resume, replication's work list and report) finds it."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from rasa_lora.train.cli import with_saved
    from rasa_lora.train.config import MODEL_DIR_RECIPE_FILE, read_run_recipe

    replication = pytest.importorskip("benchmarks.replication")
    report = pytest.importorskip("benchmarks.replication_report")
    out = tmp_path / "fft-s0"
    values = tiny_overrides(tiny_model_dir, out, method="fft", max_steps=2, epochs=2)
    assert train_main([arg for key, value in values.items() for arg in (f"--{key}", str(value))]) == 0
    assert f"model: {out}" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
    recipe = json.loads((out / MODEL_DIR_RECIPE_FILE).read_text())
    assert recipe["method"] == "fft" and read_run_recipe(out) == recipe
    assert with_saved({"output_dir": str(out), "resume": True})["method"] == "fft"
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    assert replication.work_list(tmp_path, ["fft-s0"]) == [
        {"name": "fft-s0@2", "adapter": None, "model": str(out), "out": str(out / "eval" / "epoch-2")}]
    assert report.load_run(out)["config"]["method"] == "fft"


@pytest.fixture(scope="module")
def gguf_fft(tmp_path_factory):
    """(GGUF file, output folder, the trained model's state at the final save) of a 1-step fft run of the embedded
    SmolLM2 GGUF: the GPU run's case, small."""
    from rasa_lora.models import embedded_gguf_path

    try:
        gguf = embedded_gguf_path()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        pytest.skip(str(error))
    captured, original, original_build = {}, trainer.save_final, trainer.build_model

    def capture(run):
        captured.update({key: value.detach().clone() for key, value in run.model.state_dict().items()})
        original(run)

    def build(*args, **kwargs):  # the base's first q_proj, before training (the merge test's reference)
        model = original_build(*args, **kwargs)
        weight = model.model.layers[0].self_attn.q_proj.weight
        captured["base:model.layers.0.self_attn.q_proj.weight"] = weight.detach().clone()
        return model

    out = tmp_path_factory.mktemp("gguf-fft") / "fft"
    values = tiny_overrides(Path(gguf), out, method="fft", max_steps=1, num_examples=2, global_batch_size=2,
                            micro_batch_size=2, cutoff_len=64, learning_rate=1e-4)
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "save_final", capture)
        patch.setattr(trainer, "build_model", build)
        torch.set_num_threads(2)
        try:
            assert train(build_config(values))["steps"] == 1
        finally:
            torch.set_num_threads(threads)
    base = {key[5:]: captured.pop(key) for key in [key for key in captured if key.startswith("base:")]}
    return gguf, out, captured, base


@pytest.mark.slow
def test_fft_of_the_embedded_gguf_saves_as_a_plain_model(gguf_fft):
    from transformers import AutoModelForCausalLM

    _, out, trained, _ = gguf_fft
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert "quantization_config" not in loaded.config.to_dict() and loaded.dtype == torch.float32
    state = loaded.state_dict()
    assert state.keys() == trained.keys() and all(torch.equal(state[key], trained[key]) for key in state)


@pytest.mark.slow
def test_analyze_runs_on_the_gguf_and_its_full_fine_tune(gguf_fft, tmp_path):
    import json

    from rasa_lora.analysis.cli import analyze_main

    gguf, out, _, _ = gguf_fft
    assert analyze_main([str(gguf), str(out), "--targets", "q_proj", "--iters", "2", "--k-sweep", "none",
                         "--out", str(tmp_path / "analysis"), "--device", "cpu"]) == 0
    groups = json.loads((tmp_path / "analysis" / "analysis.json").read_text())["groups"]
    group = groups["model.layers.*.self_attn.q_proj"]
    assert group["num_layers"] == 30 and group["total_energy"] > 0  # the step moved every q_proj
    assert 0 < group["rasa_relative_error"] < 1 and 0 < group["lora_relative_error"] < 1


@pytest.mark.slow
def test_merge_onto_a_gguf_base_saves(gguf_fft, tmp_path):
    """`rasa-lora merge X.gguf ADAPTER OUT` failed the same way (the merged model kept the GGUF marks)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rasa_lora.merge import merge

    gguf, out, _, base = gguf_fft
    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(out),
                          LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    delta = lora.base_model.model.model.layers[0].self_attn.q_proj.get_delta_weight("default").detach()
    merged = AutoModelForCausalLM.from_pretrained(merge(str(gguf), tmp_path / "adapter", tmp_path / "merged"))
    assert "quantization_config" not in merged.config.to_dict()
    expected = base["model.layers.0.self_attn.q_proj.weight"] + delta
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight.detach(), expected)
