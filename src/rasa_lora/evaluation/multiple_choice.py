"""Multiple-choice scoring by log-likelihood, as lm-evaluation-harness computes it.

Each choice is a (context, continuation) pair; its score is the summed log-probability of the continuation's
tokens given the context. Tokenisation follows lm-eval's `_encode_pair`: trailing spaces of the context move to
the continuation, the pair is encoded whole, and the continuation's tokens are what follows the context's own
encoding. No BOS token is added unless the tokenizer adds one itself (lm-eval's default for causal models).

- `acc`: the choice with the highest summed log-likelihood is the prediction.
- `acc_norm`: the same after dividing each log-likelihood by the length in characters of the choice text
  (lm-eval divides by `len(choice)`, the choice without the leading space).
- WinoGrande uses partial scoring (see `tasks.winogrande_item`): the contexts differ, the continuation is shared,
  so `acc_norm` equals `acc` there and lm-eval reports only `acc`.

Requests are sorted by length (longest first) and scored in left-padded batches where only the continuation
positions go through the LM head; a context longer than the model's window is cut from the left, as lm-eval does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair into token ids."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=True)["input_ids"]
    return whole[:len(context_ids)], whole[len(context_ids):]


def score_choices(loglikelihoods: Sequence[float], choice_texts: Sequence[str], gold: int) -> dict[str, float]:
    """acc and acc_norm of one item from its choices' summed log-likelihoods."""
    if len(loglikelihoods) != len(choice_texts) or not 0 <= gold < len(choice_texts):
        raise ValueError(f"{len(loglikelihoods)} log-likelihoods, {len(choice_texts)} choices and gold={gold} "
                         "do not fit together; give one log-likelihood per choice and a gold index among them.")
    normalised = [ll / max(len(text), 1) for ll, text in zip(loglikelihoods, choice_texts)]
    predicted = max(range(len(loglikelihoods)), key=lambda i: loglikelihoods[i])
    predicted_norm = max(range(len(normalised)), key=lambda i: normalised[i])
    return {"acc": float(predicted == gold), "acc_norm": float(predicted_norm == gold),
            "prediction": predicted, "prediction_norm": predicted_norm}


def _batch_loglikelihoods(model, batch: list[tuple[list[int], list[int]]], max_length: int, pad_id: int):
    """Left-padded batch; only the last `max span` positions go through the LM head (`logits_to_keep`).

    Position ids restart at 0 after each row's padding, so a row scores as it would alone.
    """
    import torch

    rows = [(context_ids + continuation_ids)[-(max_length + 1):][:-1] for context_ids, continuation_ids in batch]
    spans = [len(continuation_ids) for _, continuation_ids in batch]
    width, keep = max(len(r) for r in rows), max(spans)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        attention[i, width - len(r):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                       position_ids=positions.to(device), logits_to_keep=keep).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # (batch, keep, vocab): position j predicts token width-keep+j+1
    results = []
    for i, ((_, continuation_ids), span) in enumerate(zip(batch, spans)):
        targets = torch.tensor(continuation_ids, device=logprobs.device)
        picked = logprobs[i, keep - span:].gather(-1, targets[:, None]).squeeze(-1)
        results.append(float(picked.sum()))
    return results


def loglikelihoods(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                   progress: Callable[[int], None] | None = None,
                   cache: dict[tuple[str, str], tuple[list[int], list[int]]] | None = None) -> list[float]:
    """Summed log-likelihood of each continuation given its context, in input order. `cache` (a dict kept by the
    caller for one tokenizer) keeps each pair's tokens, for a caller that scores the same items with many models."""
    def encode(pair: tuple[str, str]) -> tuple[list[int], list[int]]:
        if cache is None:
            return encode_pair(tokenizer, *pair)
        if pair not in cache:
            cache[pair] = encode_pair(tokenizer, *pair)
        return cache[pair]

    encoded = [encode((context, continuation)) for context, continuation in pairs]
    max_length = getattr(model.config, "max_position_embeddings", 2048)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]) - len(encoded[i][1]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for index, value in zip(chunk, _batch_loglikelihoods(model, [encoded[i] for i in chunk], max_length, pad_id)):
            out[index] = value
        if progress is not None:
            progress(len(chunk))
    return out
