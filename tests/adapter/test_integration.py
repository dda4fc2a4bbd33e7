"""RaSA with the rest of the stack: half-precision bases, checkpointing, generate, Trainer, compile."""

import pytest
import torch
from peft import get_peft_model

import rasa_lora
from rasa_lora.models import tiny_llama

from .helpers import ALL_PROJ, randomize, rasa_layers, rasa_model, rel_err, tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_half_precision_base_keeps_fp32_adapter_and_trains(dtype):
    base = tiny_llama().to(dtype)
    model = get_peft_model(base, rasa_lora.RasaConfig(r=8, target_modules=ALL_PROJ))
    for name, param in model.named_parameters():
        if ".rasa_" in name:
            assert param.dtype == torch.float32, name
    x = tokens()
    loss = model(x, labels=x).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "rasa_shared_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_autocast_adapter_dtype_false_keeps_base_dtype():
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, rasa_lora.RasaConfig(r=8, target_modules=ALL_PROJ), autocast_adapter_dtype=False)
    dtypes = {p.dtype for n, p in model.named_parameters() if ".rasa_" in n}
    assert dtypes == {torch.bfloat16}


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    x = tokens()
    grads = []
    for checkpointing in (False, True):
        model = rasa_model(r=8, k=1)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert rel_err(grads[1][name], grads[0][name]) <= 1e-5, name


def test_generate_runs_and_matches_merged_model():
    model = rasa_model(r=8, k=1).eval()
    x = tokens(batch=1, length=4)
    out = model.generate(input_ids=x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    merged = model.merge_and_unload()
    out_merged = merged.generate(input_ids=x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)
    assert torch.equal(out, out_merged)


def test_device_map_placement_loads_on_cpu(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    rasa_model().save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert model.base_model.rasa_shared_A["default"]["model-layers-*-mlp-down_proj"].device.type == "cpu"
    assert torch.isfinite(model(tokens()).logits).all()


def test_hf_trainer_lowers_the_loss(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = rasa_model(r=8, k=1, random=False)
    pattern = torch.arange(12) % 5 + 3  # a learnable sequence
    data = [{"input_ids": pattern, "labels": pattern} for _ in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=4,
                             learning_rate=5e-2, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert losses[-1] < losses[0] - 0.1  # nats; a frozen adapter would leave the loss flat
    pool = model.base_model.rasa_shared_B["default"]["model-layers-*-mlp-down_proj"]
    assert pool.abs().sum() > 0  # the shared pool was trained


def test_torch_compile_smoke():
    model = rasa_model(r=8, k=1).eval()
    x = tokens()
    expected = model(x).logits
    compiled = torch.compile(model, backend="aot_eager")
    assert rel_err(compiled(x).logits, expected) <= 1e-5


def test_torch_compile_traces_the_fused_layer_with_gradients():
    """Under torch.compile the fused layer runs as registered operators (`rasa_lora.ops.registered`), its dropout
    seeded on the device: training-mode outputs and gradients, dropout included, equal the eager ones with the same
    device seed state (`RASA_LORA_DEVICE_SEED`; tests/ops/test_compile.py has the rest)."""
    from rasa_lora import settings
    from rasa_lora.ops import dropout, set_fused_backend, set_kernel_backend

    def run(compile_it):
        model = rasa_model(r=8, k=1, dropout=0.1)
        model.train()
        net = torch.compile(model, backend="aot_eager") if compile_it else model
        set_fused_backend(True)
        set_kernel_backend("torch")
        settings.DEVICE_SEED.force(not compile_it)
        dropout.set_states({"cpu": [4, 0]})
        try:
            loss = net(tokens()).logits.float().square().mean()
            loss.backward()
        finally:
            set_fused_backend(None)
            set_kernel_backend(None)
            settings.DEVICE_SEED.force(None)
        grads = [p.grad for n, p in model.named_parameters() if ".rasa_" in n]
        return loss.detach(), grads

    loss, grads = run(True)
    expected_loss, expected_grads = run(False)
    assert rel_err(loss, expected_loss) <= 1e-5
    assert grads and all(g is not None for g in grads)
    for got, expected in zip(grads, expected_grads, strict=True):
        assert rel_err(got, expected) <= 1e-4


def test_deepcopy_keeps_pool_sharing():
    import copy

    model = rasa_model()
    clone = copy.deepcopy(model)
    layer = rasa_layers(clone)["base_model.model.model.layers.2.mlp.down_proj"]
    pool = clone.base_model.rasa_shared_A["default"]["model-layers-*-mlp-down_proj"]
    assert layer.shared_factors("default")[0] is pool
    randomize(clone, seed=9)
    assert not torch.equal(clone(tokens()).logits, model(tokens()).logits)
