"""Stop strings: the criterion built once per tokenizer stops generation exactly where transformers'
`generate(stop_strings=...)` (which builds it on every call) stops."""

from __future__ import annotations

import torch

from rasa_lora.evaluation.generation import generate_transformers, stop_string_criteria


def _tiny_with_smollm2_tokenizer():
    from rasa_lora.models import load_tokenizer, tiny_llama

    tokenizer = load_tokenizer(None)
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=40, num_layers=2, seed=3)
    # a random model rarely says EOS (checked below); with an EOS id a stopped row is padded from there on
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tokenizer.padding_side = "left"
    return model, tokenizer


def test_the_cached_criterion_stops_where_stop_strings_stop():
    model, tokenizer = _tiny_with_smollm2_tokenizer()
    prompts = ["Question: what is 3 + 4?\nAnswer:", "### Instruction:\nAdd 12 and 30.\n\n### Response:\n",
               "Natalia sold clips to 48 of her friends in April"]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    width = encoded["input_ids"].shape[1]
    common = {"max_new_tokens": 24, "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
              "pad_token_id": tokenizer.eos_token_id}
    with torch.no_grad():
        free = model.generate(**encoded, **common)
    texts = tokenizer.batch_decode(free[:, width:], skip_special_tokens=True)
    # stop strings the model does produce, some spanning a token boundary, plus the study's own (never produced)
    stops = [[texts[0][6:10]], [texts[1][3:5], texts[2][8:13]], ["### Instruction"]]
    stopped_early = 0
    for stop in stops:
        with torch.no_grad():
            reference = model.generate(**encoded, **common, stop_strings=stop, tokenizer=tokenizer)
            cached = model.generate(**encoded, **common, stopping_criteria=[stop_string_criteria(tokenizer, stop)])
        assert torch.equal(reference, cached), stop
        # a stopped row is padded from there on (the batch ends when every row has stopped)
        stopped_early += not torch.equal(reference, free[:, :reference.shape[1]])
    assert not (free[:, width:] == tokenizer.eos_token_id).any()
    assert stopped_early == 2  # the criteria fired (a comparison of runs that never stop would prove nothing)


def test_generate_transformers_builds_the_criterion_once(monkeypatch):
    import transformers

    model, tokenizer = _tiny_with_smollm2_tokenizer()
    built = []
    original = transformers.StopStringCriteria.__init__
    monkeypatch.setattr(transformers.StopStringCriteria, "__init__",
                        lambda self, *args, **kwargs: built.append(1) or original(self, *args, **kwargs))
    prompts = ["a b c", "Question: 2 + 2?", "Hello there", "x"]
    first = generate_transformers(model, tokenizer, prompts, 6, batch_size=2, stop=["<<never>>"])
    second = generate_transformers(model, tokenizer, prompts, 6, batch_size=2, stop=["<<never>>"])
    assert first == second and len(built) <= 1  # 0 when an earlier test built it for this tokenizer
    assert stop_string_criteria(tokenizer, ["<<never>>"]) is stop_string_criteria(tokenizer, ["<<never>>"])
