"""Multiple-choice scoring: acc / acc_norm by hand, lm-eval's token split, batching, WinoGrande partial scoring."""

from __future__ import annotations

import pytest
import torch

from rasa_lora.evaluation.multiple_choice import encode_pair, loglikelihoods, score_choices
from rasa_lora.evaluation.tasks import winogrande_item


class CharTokenizer:
    """One token per character (ids 1..127); enough to exercise lm-eval's pair encoding and padding."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [min(ord(ch), 127) for ch in text]}


def test_acc_and_acc_norm_by_hand():
    # log-likelihoods -10, -12, -9.5 -> acc picks choice 2; per character -10/1, -12/6 = -2, -9.5/2 = -4.75 -> 1
    scores = score_choices([-10.0, -12.0, -9.5], ["a", "bbbbbb", "cc"], gold=1)
    assert (scores["acc"], scores["acc_norm"], scores["prediction"], scores["prediction_norm"]) == (0.0, 1.0, 2, 1)


def test_acc_over_a_tiny_fixed_output():
    # item 0: acc picks 0 (-1 > -3), norm picks 1 (-1/1 < -3/4); item 1: acc picks 0, norm picks 1 (-4/2 < -6/12);
    # item 2: both pick 0.
    items = [([-1.0, -3.0], ["x", "yyyy"], 0), ([-4.0, -6.0], ["aa", "bbbbbbbbbbbb"], 1), ([-2.0, -5.0], ["q", "r"], 0)]
    results = [score_choices(*item) for item in items]
    assert [r["acc"] for r in results] == [1.0, 0.0, 1.0]
    assert [r["acc_norm"] for r in results] == [0.0, 1.0, 1.0]


def test_score_choices_rejects_a_gold_outside_the_choices():
    with pytest.raises(ValueError, match="gold=3"):
        score_choices([-1.0, -2.0], ["a", "b"], gold=3)


def test_encode_pair_moves_trailing_space_to_the_continuation():
    context_ids, continuation_ids = encode_pair(CharTokenizer(), "Answer: ", "yes")
    assert context_ids == [ord(c) for c in "Answer:"] and continuation_ids == [ord(c) for c in " yes"]


def test_winogrande_partial_scoring_layout():
    item = winogrande_item("q1", "The trophy does not fit in the case because _ is too big.", ["trophy", "case"], "1")
    assert item["contexts"] == ["The trophy does not fit in the case because trophy",
                                "The trophy does not fit in the case because case"]
    assert item["continuations"] == [" is too big."] * 2 and item["gold"] == 0


def test_batched_scores_equal_one_at_a_time_reference():
    from rasa_lora.models import tiny_llama

    model = tiny_llama()
    tokenizer = CharTokenizer()
    pairs = [("Question: sky?\nAnswer:", " blue"), ("Q", " a much longer continuation"), ("Hi there", " x")]
    batched = loglikelihoods(model, tokenizer, pairs, batch_size=3)
    reference = []
    for context, continuation in pairs:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        ids = torch.tensor([context_ids + continuation_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits.float(), -1)[0]
        reference.append(sum(float(logprobs[len(context_ids) - 1 + j, t]) for j, t in enumerate(continuation_ids)))
    # float32 on CPU, padded vs unpadded attention: agreement to ~1e-5 relative
    assert batched == pytest.approx(reference, rel=1e-4, abs=1e-4)


def test_a_kept_encoding_cache_gives_the_same_scores_and_skips_the_tokenizer():
    from rasa_lora.models import tiny_llama

    class CountingTokenizer(CharTokenizer):
        calls = 0

        def __call__(self, text, add_special_tokens=True):
            CountingTokenizer.calls += 1
            return super().__call__(text, add_special_tokens)

    model, tokenizer, cache = tiny_llama(), CountingTokenizer(), {}
    pairs = [("Question: sky?\nAnswer:", " blue"), ("Q ", "a b"), ("Hi there", " x")]
    plain = loglikelihoods(model, tokenizer, pairs, batch_size=2)
    first = loglikelihoods(model, tokenizer, pairs, batch_size=2, cache=cache)
    calls = CountingTokenizer.calls
    second = loglikelihoods(model, tokenizer, pairs, batch_size=2, cache=cache)
    assert plain == first == second and CountingTokenizer.calls == calls  # the second pass tokenized nothing
    assert cache[("Q ", "a b")] == encode_pair(tokenizer, "Q ", "a b")
