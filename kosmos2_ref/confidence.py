"""How sure was the model? Token probabilities of a generation run, and the confidence of each grounded phrase.

Kosmos-2 writes a box as two words, ``<patch_index_A><patch_index_B>``, so "how sure of this box" is "how
probable were those two words when they were chosen". From the scores of the run that produced them
(``kosmos2_ref.generate(model, ..., output_scores=True, return_dict_in_generate=True)``, or transformers'
``output_scores``):

* :func:`token_probabilities` -- p(token chosen at step t) = softmax(scores[t])[token[t]], each step's
  *processed* scores (after the logits processors, e.g. no-repeat-ngram), as transformers'
  ``compute_transition_scores(..., normalize_logits=True)`` reads them;
* :func:`find_groups` -- where each ``[<phrase> … </phrase>] <object> A B [</delimiter…/> A B …] </object>`` lies
  in the token ids, the same pattern ``post_process_generation`` finds in the text;
* :func:`entity_confidences` -- per entity: the mean probability of the phrase's tokens, the probability of
  ``<object>`` (the decision to ground it at all), and per box the two location tokens' probabilities and their
  product (the probability of that box). Tokens of the prompt were given, not generated: their probability is
  ``None``.

A box of a random-weight model is noise, and so is its confidence; the numbers mean something only for a trained
checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .backend import to_numpy
from .processing.grounding import patch_indices_to_box
from .processing.tokenizer import BOO_TOKEN, BOP_TOKEN, DOM_TOKEN, EOO_TOKEN, EOP_TOKEN, patch_index_token

# ----------------------------------------------------------------------------------------------------------------
# Token probabilities


def token_probabilities(scores: Sequence, tokens: Sequence[int]) -> np.ndarray:
    """p[t] = softmax(scores[t])[tokens[t]] for each generated step t: [steps] float64.

    ``scores`` holds one array per step, [V] or [1, V] (one sequence): our ``GenerateOutput.scores`` or
    transformers' ``output_scores`` as NumPy. Computed in float64 as exp(s[token] − logsumexp(s)); a token whose
    score is −inf (banned by a processor) gets 0.
    """
    tokens = [int(t) for t in tokens]
    if len(scores) != len(tokens):
        raise ValueError(f"scores has {len(scores)} steps but {len(tokens)} tokens were given; they must be equal")
    probs = np.empty(len(tokens), np.float64)
    for t, (step, token) in enumerate(zip(scores, tokens)):
        s = np.asarray(to_numpy(step), dtype=np.float64).reshape(-1)  # [V]
        if not 0 <= token < s.size:
            raise ValueError(f"token {token} at step {t} is outside the {s.size} scores of that step")
        top = s.max()
        if not np.isfinite(top):
            raise ValueError(f"step {t}: every score is -inf or NaN; no token had any probability")
        log_norm = top + np.log(np.exp(s - top).sum())
        probs[t] = np.exp(s[token] - log_norm)
    return probs


# ----------------------------------------------------------------------------------------------------------------
# Where the grounded phrases are in the ids


@dataclass(frozen=True)
class TagIds:
    """The ids of the grounding tags and the patch-index range of one tokenizer."""

    phrase: int
    end_phrase: int
    object: int
    end_object: int
    delimiter: int
    first_patch: int
    num_patches: int

    @classmethod
    def from_tokenizer(cls, tokenizer, num_patches: int = 1024) -> "TagIds":
        """Look the tags up in ``tokenizer`` (anything with ``token_to_id``); a missing tag is a ValueError."""

        def lookup(token: str) -> int:
            i = tokenizer.token_to_id(token)
            if i is None:
                raise ValueError(f"the tokenizer has no {token!r} token: it is not a Kosmos-2 tokenizer")
            return int(i)

        first = lookup(patch_index_token(0))
        if lookup(patch_index_token(num_patches - 1)) != first + num_patches - 1:
            raise ValueError("the tokenizer's patch-index tokens are not consecutive ids")
        return cls(
            lookup(BOP_TOKEN),
            lookup(EOP_TOKEN),
            lookup(BOO_TOKEN),
            lookup(EOO_TOKEN),
            lookup(DOM_TOKEN),
            first,
            num_patches,
        )

    def is_patch(self, i: int) -> bool:
        return self.first_patch <= i < self.first_patch + self.num_patches

    def is_tag(self, i: int) -> bool:
        return i in (self.phrase, self.end_phrase, self.object, self.end_object, self.delimiter) or self.is_patch(i)


@dataclass
class Group:
    """One ``[<phrase> … </phrase>] <object> … </object>`` in the ids (positions index the whole sequence)."""

    phrase_positions: list[int]  # the phrase's word tokens (empty: no phrase before <object>)
    object_position: int
    pair_positions: list[tuple[int, int]]  # each box's two location tokens
    pairs: list[tuple[int, int]]  # each box's (upper-left, lower-right) patch indices


def _phrase_before(ids: Sequence[int], obj: int, tags: TagIds) -> list[int]:
    """The word positions of ``<phrase> words </phrase>`` ending right before position ``obj``, or []."""
    if obj < 3 or ids[obj - 1] != tags.end_phrase:
        return []
    j = obj - 2
    while j >= 0 and not tags.is_tag(ids[j]):  # the words: anything but a tag (the regex's [^<]+)
        j -= 1
    if j < 0 or ids[j] != tags.phrase or j == obj - 2:
        return []
    return list(range(j + 1, obj - 1))


def _object_body(ids: Sequence[int], start: int, tags: TagIds):
    """Parse ``A B [DOM A B]… </object>`` from ``start``: (pair positions, closing position), or None."""
    positions = []
    i = start
    while True:
        if i + 1 >= len(ids) or not (tags.is_patch(ids[i]) and tags.is_patch(ids[i + 1])):
            return None
        positions.append((i, i + 1))
        i += 2
        if i < len(ids) and ids[i] == tags.end_object:
            return positions, i
        if i < len(ids) and ids[i] == tags.delimiter:
            i += 1
            continue
        return None


def find_groups(ids: Sequence[int], tags: TagIds) -> list[Group]:
    """Every well-formed grounded group of ``ids``, left to right (``post_process_generation``'s pattern)."""
    ids = [int(i) for i in ids]
    groups = []
    i = 0
    while i < len(ids):
        if ids[i] == tags.object:
            body = _object_body(ids, i + 1, tags)
            if body is not None:
                positions, close = body
                pairs = [(ids[a] - tags.first_patch, ids[b] - tags.first_patch) for a, b in positions]
                groups.append(Group(_phrase_before(ids, i, tags), i, positions, pairs))
                i = close + 1
                continue
        i += 1
    return groups


# ----------------------------------------------------------------------------------------------------------------
# Confidence of each entity


@dataclass
class BoxConfidence:
    """The probabilities of one box's two location tokens and their product (None where the prompt gave it)."""

    upper_left: float | None
    lower_right: float | None

    @property
    def probability(self) -> float | None:
        if self.upper_left is None or self.lower_right is None:
            return None
        return self.upper_left * self.lower_right

    def to_dict(self) -> dict:
        return {"probability": self.probability, "upper_left": self.upper_left, "lower_right": self.lower_right}


@dataclass
class EntityConfidence:
    """How probable the tokens of one entity were: the phrase's words (mean), ``<object>``, and each box."""

    phrase: float | None  # mean word probability; None if given or absent
    object: float | None  # p(<object>): the decision to ground the phrase
    boxes: list[BoxConfidence] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"phrase": self.phrase, "object": self.object, "boxes": [b.to_dict() for b in self.boxes]}


def _prob_at(probs: np.ndarray, prompt_length: int, position: int) -> float | None:
    """The probability of the token at ``position``; None for a prompt token (it was given, not chosen)."""
    step = position - prompt_length
    return float(probs[step]) if step >= 0 else None


def _group_confidence(group: Group, pairs_of_entity: Sequence[int], probs, prompt_length) -> EntityConfidence:
    words = [_prob_at(probs, prompt_length, p) for p in group.phrase_positions]
    phrase = float(np.mean(words)) if words and all(w is not None for w in words) else None
    boxes = [
        BoxConfidence(_prob_at(probs, prompt_length, a), _prob_at(probs, prompt_length, b))
        for a, b in (group.pair_positions[k] for k in pairs_of_entity)
    ]
    return EntityConfidence(phrase, _prob_at(probs, prompt_length, group.object_position), boxes)


def entity_confidences(
    ids: Sequence[int],
    prompt_length: int,
    probs: Sequence[float],
    tags: TagIds,
    entities=None,
    num_patches_per_side: int = 32,
) -> list[EntityConfidence | None]:
    """One :class:`EntityConfidence` per entity of ``post_process_generation``, in its order.

    ``ids``: the whole sequence (prompt + generated); ``probs``: :func:`token_probabilities` of the generated
    part (``ids[prompt_length:]``). A group with a phrase is one entity with all its boxes; a group without one is
    one entity per box, as post-processing names them. When ``entities`` (``(name, span, boxes)`` tuples or
    objects with ``.boxes``) is given, each group is checked against its entity's boxes; an entity the ids do not
    explain (text the tokens decode to differently) gets None rather than a wrong number.
    """
    probs = np.asarray(probs, dtype=np.float64)
    ids = [int(i) for i in ids]
    if len(probs) != len(ids) - prompt_length:
        raise ValueError(f"probs has {len(probs)} entries but {len(ids) - prompt_length} tokens were generated")
    found = []  # (boxes, confidence) in post-processing's order
    for group in find_groups(ids, tags):
        boxes = [patch_indices_to_box(a, b, num_patches_per_side) for a, b in group.pairs]
        if group.phrase_positions:
            found.append((boxes, _group_confidence(group, range(len(boxes)), probs, prompt_length)))
        else:
            found.extend(([box], _group_confidence(group, [k], probs, prompt_length)) for k, box in enumerate(boxes))
    if entities is None:
        return [conf for _, conf in found]
    out: list[EntityConfidence | None] = []
    for k, entity in enumerate(entities):
        boxes = entity[2] if isinstance(entity, tuple) else entity.boxes
        same = (
            k < len(found)
            and len(found[k][0]) == len(boxes)
            and all(np.allclose(a, b, atol=1e-9) for a, b in zip(found[k][0], boxes))
        )
        out.append(found[k][1] if same else None)
    return out


def row_confidences(
    sequences,
    scores: Sequence,
    row: int,
    prompt_length: int,
    tags: TagIds,
    entities,
    eos_token_ids: Sequence[int],
    num_patches_per_side: int = 32,
) -> list[EntityConfidence | None]:
    """:func:`entity_confidences` for row ``row`` of a batched run: ``sequences`` [B, T + n] and ``scores`` (one
    [B, V] array per step, ``output_scores=True``) of one ``generate`` call whose prompts, padded, have
    ``prompt_length`` tokens. The row's generated part ends at its first EOS (inclusive): the steps after it are
    padding, which the model did not choose."""
    ids = [int(i) for i in np.asarray(to_numpy(sequences[row]))]
    new = ids[prompt_length:]
    eos = set(int(e) for e in eos_token_ids)
    n = next((k + 1 for k, token in enumerate(new) if token in eos), len(new))
    probs = token_probabilities([step[row] for step in scores[:n]], new[:n])
    return entity_confidences(ids[: prompt_length + n], prompt_length, probs, tags, entities, num_patches_per_side)


def run_confidences(out, row: int, processor, eos_token_id, entities) -> list[EntityConfidence | None]:
    """:func:`row_confidences` of row ``row`` of ``generate``'s output (``output_scores=True,
    return_dict_in_generate=True``), with the tags and patch grid of ``processor``; ``eos_token_id`` an id or a
    list of them (the model config's)."""
    tags = TagIds.from_tokenizer(processor.tokenizer, processor.num_patches_per_side**2)
    eos = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    prompt_length = len(out.sequences[0]) - len(out.scores)
    return row_confidences(
        out.sequences, out.scores, row, prompt_length, tags, entities, eos, processor.num_patches_per_side
    )
