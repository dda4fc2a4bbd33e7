"""Loading a RaSA adapter in a process that never imported `rasa_lora`, and through transformers' integration.

PEFT (checked on 0.21) has no hook that lets a process find a method it has not imported: `register_peft_method`
must run in that process, and there are no entry points. So `import rasa_lora` stays required (README, Known
limits); these tests pin what a user sees, and the first fails when PEFT starts finding RaSA by itself (then use
that hook). Transformers' `load_adapter` refuses tuners with shared state and its error names `get_peft_model`.
"""

import subprocess
import sys

import pytest
from peft.utils import register_peft_method

import rasa_lora  # noqa: F401  (registers RaSA in this process)
from rasa_lora.models import tiny_llama

from .helpers import rasa_model

FRESH_PROCESS = """
import sys
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
for attempt in ("without", "with"):
    if attempt == "with":
        import rasa_lora
    try:
        PeftModel.from_pretrained(LlamaForCausalLM(config), sys.argv[1])
        print(attempt, "LOADED")
    except KeyError as error:
        print(attempt, "KEYERROR", error)
"""


def test_peft_offers_no_entry_point_for_methods():
    import inspect

    import peft

    assert "entry_points" not in inspect.getsource(register_peft_method)
    assert "entry_points" not in inspect.getsource(peft.config)


@pytest.mark.slow
def test_a_process_that_never_imported_rasa_lora_cannot_load_until_it_does(tmp_path):
    rasa_model(r=4, k=1).save_pretrained(tmp_path)
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["without KEYERROR 'RASA'", "with LOADED"]


def test_transformers_load_adapter_names_the_fix(tmp_path):
    rasa_model(r=4, k=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="shared state.*get_peft_model"):
        tiny_llama().load_adapter(str(tmp_path))
