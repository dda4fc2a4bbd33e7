"""PEFT's generic test matrix for tuners (`tests/test_custom_models.py` of the installed PEFT's sdist) run against RaSA.

PEFT's test classes are subclassed here; the lists of cases their tests are parametrized with (`TEST_CASES`,
`MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`, `ALL_PEFT_CONFIG_CLASSES`) are replaced, in the imported module, by RaSA's
cases below, so every generic test runs on RaSA and on nothing else. Tests of PEFT's that are written for one
other method (LoRA's, VeRA's, ...) are not collected (set to None in the subclasses). What runs, what does not and
why, and the counts: `docs/peft_test_matrix.md`.

The toy models have at least two layers of one shape per group, so the pools are real (L >= 2).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from rasa_lora import RasaConfig

from .peft_upstream import import_upstream

upstream = import_upstream("test_custom_models")


class RasaStack(nn.Module):
    """Three residual blocks (lin0 10->16, lin1 16->10: two groups of L=3) and an output layer `head` (L=1).

    (Not named `out`: PEFT matches `modules_to_save` by bare suffix, so "out" would also match every adapter's
    `*_dropout` container, LoRA's as well.)"""

    def __init__(self, num_layers: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"lin0": nn.Linear(10, 16, bias=bias), "lin1": nn.Linear(16, 10, bias=bias)})
            for _ in range(num_layers)
        )
        self.head = nn.Linear(10, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype) / 90  # PEFT's inputs are arange(90): keep the activations of order one
        for block in self.layers:
            X = torch.tanh(X + block["lin1"](torch.relu(block["lin0"](X))))  # bounded: PEFT's tests train at lr 0.5
        return self.sm(self.head(X))


class RasaConv1DStack(nn.Module):
    """Embedding, then three blocks of transformers' `Conv1D` (c_fc 8->12, c_proj 12->8), as GPT-2 stores them."""

    def __init__(self, num_layers: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 8)
        self.h = nn.ModuleList(
            nn.ModuleDict({"c_fc": Conv1D(12, 8), "c_proj": Conv1D(8, 12)}) for _ in range(num_layers)
        )
        for block in self.h:  # Conv1D's own init (std 0.02) leaves too small a gradient for PEFT's 3-step checks
            for module in block.values():
                nn.init.normal_(module.weight, std=0.3)
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(80, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = self.emb(X)
        for block in self.h:
            X = torch.tanh(X + block["c_proj"](torch.relu(block["c_fc"](X))))
        return self.sm(self.lin0(self.flat(X)))


TOY_MODELS = {"RasaStack": RasaStack, "RasaConv1DStack": RasaConv1DStack}


class RasaMockTransformerWrapper(upstream.MockTransformerWrapper):
    """PEFT's stand-in for `from_pretrained`, knowing the RaSA toy models too."""

    @classmethod
    def from_pretrained(cls, model_id, dtype=None):
        if model_id in TOY_MODELS:
            torch.manual_seed(0)
            return TOY_MODELS[model_id]().to(dtype or torch.float32)
        return super().from_pretrained(model_id, dtype=dtype)


BOTH = ["lin0", "lin1"]
# No case with bias != "none": PEFT's matrix has none for any method (its tests assume the base model is left
# untouched and allow one adapter with a trained bias); `TestRasaFsdpStateDict`'s learnable-bias test runs every
# case with bias="all" and bias="rasa_only".
RASA_TEST_CASES = [
    ("RaSA r8 k1", "RasaStack", RasaConfig, {"target_modules": BOTH, "r": 8, "rasa_k": 1}),
    ("RaSA r4 k2", "RasaStack", RasaConfig, {"target_modules": BOTH, "r": 4, "rasa_k": 2}),
    ("RaSA k0", "RasaStack", RasaConfig, {"target_modules": BOTH, "r": 4, "rasa_k": 0}),
    ("RaSA k=r", "RasaStack", RasaConfig, {"target_modules": BOTH, "r": 4, "rasa_k": 4}),
    ("RaSA dropout", "RasaStack", RasaConfig,
     {"target_modules": BOTH, "r": 8, "rasa_k": 1, "rasa_dropout": 0.1}),
    ("RaSA output layer too", "RasaStack", RasaConfig, {"target_modules": [*BOTH, "head"], "r": 4, "rasa_k": 1}),
    ("RaSA layers_to_transform", "RasaStack", RasaConfig,
     {"target_modules": BOTH, "r": 4, "rasa_k": 1, "layers_to_transform": [0, 2], "layers_pattern": "layers"}),
    ("RaSA modules_to_save", "RasaStack", RasaConfig,
     {"target_modules": BOTH, "r": 4, "rasa_k": 1, "modules_to_save": ["head"]}),
    ("RaSA Conv1D", "RasaConv1DStack", RasaConfig, {"target_modules": ["c_fc", "c_proj"], "r": 4, "rasa_k": 1}),
    ("RaSA Vanilla MLP", "MLP", RasaConfig, {"target_modules": ["lin0", "lin1"], "r": 4, "rasa_k": 1}),
]

# alpha 32 (the authors' value for code): with init_weights=False (B ~ N(0, 0.02)) at alpha 8, one adapter on lin1
# moves RasaStack's output by less than the 1e-3 PEFT's tests require adapters to differ by.
RASA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    ("RaSA Same", "rasa", RasaConfig,
     {"target_modules": BOTH, "r": 4, "rasa_k": 1, "rasa_alpha": 32, "init_weights": False},
     {"target_modules": BOTH, "r": 8, "rasa_k": 2, "rasa_alpha": 32, "init_weights": False}),
    ("RaSA Different", "rasa", RasaConfig,
     {"target_modules": ["lin0"], "r": 4, "rasa_k": 1, "rasa_alpha": 32, "init_weights": False},
     {"target_modules": ["lin1"], "r": 4, "rasa_k": 2, "rasa_alpha": 32, "init_weights": False}),
]

def _replace_in_place(name: str, values: list) -> None:
    """Swap a parametrization list's contents in PEFT's module: the `parametrize` marks hold the list object."""
    getattr(upstream, name)[:] = values


# (name, config of adapter 0, config of adapter 1) on PEFT's MLP, for mixed adapter batches (`adapter_names=`)
RASA_MIXED_ADAPTER_TEST_CASES = [
    ("RaSA mixed adapter", RasaConfig(target_modules=["lin0"], r=4, rasa_k=1, init_weights=False),
     RasaConfig(target_modules=["lin0"], r=8, rasa_k=2, init_weights=False)),
    ("RaSA mixed adapter k0 and k=r", RasaConfig(target_modules=["lin0", "lin1"], r=4, rasa_k=0, init_weights=False),
     RasaConfig(target_modules=["lin0", "lin1"], r=4, rasa_k=4, init_weights=False)),
]

_replace_in_place("TEST_CASES", RASA_TEST_CASES)
_replace_in_place("MIXED_ADAPTER_TEST_CASES", RASA_MIXED_ADAPTER_TEST_CASES)
_replace_in_place("MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES", RASA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES)
_replace_in_place("ALL_PEFT_CONFIG_CLASSES", [RasaConfig])
_GENERIC = {id(upstream.TEST_CASES), id(upstream.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES),
            id(upstream.ALL_PEFT_CONFIG_CLASSES), id(upstream.MIXED_ADAPTER_TEST_CASES)}


def _rasa_only(cls: type) -> dict:
    """Hide (set to None) every test of `cls` that is not parametrized with one of the generic lists."""
    hidden = {}
    for name in dir(cls):
        if not name.startswith("test_"):
            continue
        marks = getattr(getattr(cls, name), "pytestmark", [])
        if not any(mark.name == "parametrize" and id(mark.args[1]) in _GENERIC for mark in marks):
            hidden[name] = None
    return hidden


class TestRasaCustomModel(upstream.TestPeftCustomModel):
    transformers_class = RasaMockTransformerWrapper
    locals().update(_rasa_only(upstream.TestPeftCustomModel))


class TestRasaMultipleActiveAdapters(upstream.TestMultipleActiveAdapters):
    locals().update(_rasa_only(upstream.TestMultipleActiveAdapters))

    def resolve_model_cls(self, tuner_method):
        return RasaStack()


def _rasa_params(adapter: str, layers: list[str], pools: list[str]) -> list[str]:
    names = [f"base_model.model.layers.{i}.{lin}.rasa_{m}.{adapter}" for i, lin in layers for m in "ABD"]
    return names + [f"base_model.rasa_shared_{m}.{adapter}.layers-*-{lin}" for lin in pools for m in "AB"]


class TestRasaRequiresGrad(upstream.TestRequiresGrad):
    """PEFT's generic requires-grad tests, plus RaSA's versions of its per-method ones (`..._same_targets`,
    `..._different_targets`, written for VeRA, LoRA, ... there) with the pools among the expected parameters."""

    locals().update(_rasa_only(upstream.TestRequiresGrad))

    @pytest.mark.parametrize("k", [1, 0])
    def test_requires_grad_rasa_different_targets(self, k):
        model = upstream.get_peft_model(RasaStack(), RasaConfig(target_modules=["lin0"], r=4, rasa_k=k))
        model.add_adapter("adapter1", RasaConfig(target_modules=["lin1"], r=4, rasa_k=k))
        pools = ["lin0"] if k else []
        default = _rasa_params("default", [(i, "lin0") for i in range(3)], pools)
        other = _rasa_params("adapter1", [(i, "lin1") for i in range(3)], ["lin1"] if k else [])
        self.check_requires_grad(model, *default)
        model.set_adapter("default")
        self.check_requires_grad(model, *default)
        model.set_adapter("adapter1")
        self.check_requires_grad(model, *other)
        with model.disable_adapter():
            self.check_requires_grad(model)
        self.check_requires_grad(model, *other)
        model.set_requires_grad("adapter1", requires_grad=False)
        self.check_requires_grad(model)
        model.set_requires_grad(["default", "adapter1"])
        self.check_requires_grad(model, *default, *other)

    def test_requires_grad_rasa_same_targets(self):
        model = upstream.get_peft_model(RasaStack(), RasaConfig(target_modules=BOTH, r=8, rasa_k=1))
        model.add_adapter("adapter1", RasaConfig(target_modules=BOTH, r=4, rasa_k=2))
        layers = [(i, lin) for i in range(3) for lin in BOTH]
        default, other = _rasa_params("default", layers, BOTH), _rasa_params("adapter1", layers, BOTH)
        self.check_requires_grad(model, *default)
        model.set_adapter("adapter1")
        self.check_requires_grad(model, *other)
        with model.disable_adapter():
            self.check_requires_grad(model)
        self.check_requires_grad(model, *other)
        model.delete_adapter("adapter1")
        model.set_adapter("default")
        self.check_requires_grad(model, *default)

    def test_requires_grad_rasa_k_r_has_no_private_factors(self):
        model = upstream.get_peft_model(RasaStack(), RasaConfig(target_modules=["lin0"], r=2, rasa_k=2))
        expected = [f"base_model.model.layers.{i}.lin0.rasa_D.default" for i in range(3)]
        self.check_requires_grad(model, *expected, "base_model.rasa_shared_A.default.layers-*-lin0",
                                 "base_model.rasa_shared_B.default.layers-*-lin0")


def _rasa(**kwargs) -> RasaConfig:
    return RasaConfig(r=4, rasa_k=1, init_weights=False, **kwargs)


class TestRasaMixedAdapterBatches(upstream.TestMixedAdapterBatches):
    """PEFT's generic mixed-batch tests, and the bodies of its tests parametrized inline with LoRA / RoAd / GLoRA
    configs, called with RaSA configs (their code runs unchanged, from PEFT's module)."""

    locals().update(_rasa_only(upstream.TestMixedAdapterBatches))
    _peft = upstream.TestMixedAdapterBatches

    def test_mixed_adapter_batches_rasa_different_target_layers(self):
        self._peft.test_mixed_adapter_batches_different_target_layers(
            self, "RaSA", _rasa(target_modules=["lin0"]), _rasa(target_modules=["lin1"]))

    def test_mixed_adapter_batches_rasa_partly_overlapping_target_layers(self):
        self._peft.test_mixed_adapter_batches_partly_overlapping_target_layers(
            self, "RaSA", _rasa(target_modules=["lin0"]), _rasa(target_modules=["lin0", "lin1"]))

    def test_mixed_adapter_batches_rasa_multiple_modules_to_save(self):
        self._peft.test_mixed_adapter_batches_multiple_modules_to_save(
            self, "RaSA", _rasa(target_modules=["lin0"], modules_to_save=["lin1"]),
            _rasa(target_modules=["lin0"], modules_to_save=["lin1"]))

    def test_mixed_adapter_batches_rasa_wrong_adapter_name_raises(self):
        config = _rasa(target_modules=["lin0"])
        self._peft.test_mixed_adapter_batches_lora_wrong_adapter_name_raises(self, "RaSA", config)


class TestRasaFsdpStateDict(upstream.TestPeftFsdpStateDict):
    """FSDP1 on one CPU process (gloo), as PEFT runs it."""

    transformers_class = RasaMockTransformerWrapper
    locals().update(_rasa_only(upstream.TestPeftFsdpStateDict))
