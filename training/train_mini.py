"""Train the miniature Kosmos-2 on the synthetic world (dev tool: torch + transformers, CPU, one thread).

The model is transformers' own ``Kosmos2ForConditionalGeneration`` at a small size; the inputs are made by
transformers' ``AutoProcessor`` from the miniature's tokenizer files, exactly as inference makes them; the loss is
ours, on its logits. See docs/miniature.md for the recipe and why.

    python training/train_mini.py --run training/runs/v7 --minutes 100 --schedule-minutes 100 --warmup 60 \
        --curriculum 600 --phases 300 --pos-scale 1.0 --slot-loc-scale 0.5      # the shipped run; resumes it

The learning-rate cosine runs over ``--schedule-minutes`` of training time rather than a step count: on a
shared machine the steps per minute vary threefold.

A second stage starts a new run folder from another run's checkpoint (``--init-from``: model, optimizer, step and
trained minutes carry over). Its cosine is read at the total trained time, so a longer ``--schedule-minutes``
restarts the learning rate warm, part-way down the new curve:

    python training/train_mini.py --run training/runs/v8 --init-from training/runs/v7/ckpt.pt --minutes 105 \
        --schedule-minutes 210 --lr 6e-4 --total-steps 20000 --task-weights 0.4,0.3,0.3 --warmup 60 \
        --curriculum 600 --phases 300 --pos-scale 1.0 --slot-loc-scale 0.5    # v8: v7 + 105 minutes

Every step draws fresh scenes from seeds ``step * batch + i`` (training seeds stay below EVAL_SEED_BASE), so a
resumed run sees exactly the data it would have seen. A checkpoint (model, optimizer, auxiliary head, step) is
written every ``--save-every`` seconds, atomically; ``log.jsonl`` holds the losses and the held-out IoU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kosmos2_ref import world  # noqa: E402

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "kosmos2_ref" / "assets" / "mini"
EVAL_SEED_BASE = 1_000_000_000  # held-out scenes: seeds from here on are never trained on
GRID = 32  # the 32 × 32 location cells of Kosmos-2's patch-index tokens
N_LOC = GRID * GRID

NO_DROPOUT = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0}
MODEL_SIZES = {
    "base": {
        "text_config": {
            "embed_dim": 256,
            "layers": 4,
            "ffn_dim": 1024,
            "attention_heads": 8,
            "max_position_embeddings": 512,
            **NO_DROPOUT,
        },
        "vision_config": {
            "hidden_size": 192,
            "intermediate_size": 768,
            "num_hidden_layers": 4,
            "num_attention_heads": 6,
            "image_size": 112,
            "patch_size": 14,
        },
        "latent_query_num": 64,
    },
    "small": {
        "text_config": {
            "embed_dim": 192,
            "layers": 4,
            "ffn_dim": 768,
            "attention_heads": 6,
            "max_position_embeddings": 512,
            **NO_DROPOUT,
        },
        "vision_config": {
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": 112,
            "patch_size": 14,
        },
        "latent_query_num": 64,
    },
}
PATCH_SIDE = 112 // 14  # the 8 x 8 patch grid of both sizes (= the 64 latent queries)


# ----------------------------------------------------------------------------------------------------------------
# Model and structured initialisation


def sinusoid_codes(n: int, dim: int) -> torch.Tensor:
    """[n, dim] sinusoids of positions 0..n-1, frequencies from a quarter turn over all n (the sine and cosine
    are then monotonic: near-linear and near-quadratic in the position) to half a turn per step."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]  # [n, 1]
    freqs = torch.exp(torch.linspace(math.log(0.25 / n), math.log(0.5), dim // 2))  # turns per step
    angles = 2 * math.pi * pos * freqs[None, :]  # [n, dim/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # [n, dim]


def grid_codes(rows: int, cols: int, dim: int) -> torch.Tensor:
    """[rows·cols, dim]: row code in the first half of the dims, column code in the second half."""
    r = sinusoid_codes(rows, dim // 2)[:, None, :].expand(rows, cols, dim // 2)
    c = sinusoid_codes(cols, dim - dim // 2)[None, :, :].expand(rows, cols, dim - dim // 2)
    return torch.cat([r, c], dim=-1).reshape(rows * cols, dim)


def build_model(vocab_size: int, seed: int, size: str = "base"):
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = json.loads(json.dumps(MODEL_SIZES[size]))
    cfg["text_config"]["vocab_size"] = vocab_size
    model = Kosmos2ForConditionalGeneration(Kosmos2Config(**cfg))
    return model


def init_structured(model, first_location_id: int, loc_scale: float, pos_scale: float) -> None:
    """Give position a shape the model need not discover:

    * the vision position embeddings of the patches are 2-D sinusoids (row code + column code), CLS's zero;
    * each of the 1024 location-token embeddings (tied with the LM head) is a row code + a column code, so a
      hidden state's logit for cell (r, c) starts as a(r) + b(c): reading a row and a column is linear.
    """
    with torch.no_grad():
        vis = model.vision_model.model.embeddings
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        pos = vis.position_embedding.weight  # [1 + side², D]
        pos[0].zero_()
        pos[1:] = pos_scale * grid_codes(side, side, pos.shape[1])
        emb = model.text_model.model.embed_tokens.weight  # [V, C]
        emb[first_location_id : first_location_id + N_LOC] = loc_scale * grid_codes(GRID, GRID, emb.shape[1])


@torch.no_grad()
def init_connector(model, processor, n: int = 16, sharpness: float = 4.0, out_norm: float = 10.0) -> tuple:
    """Start the connector as "latent query i looks at patch i, and passes it on, loud enough to be heard".

    At transformers' initialisation every latent query attends almost uniformly, so the 64 image embeddings
    are 64 copies of one average (cosine ~0.99 between them), and 100 times smaller than the decoder's
    position embeddings: the decoder cannot see where anything is, and a first trial spent its first few hundred
    steps learning just that. Here, from the vision tower's features of ``n`` scenes:

    * ``dense`` (vision width Dv -> C) maps into a Dv-dimensional subspace of the C dims; the latent queries live
      in its orthogonal complement (orthonormal vectors u_i, C - Dv >= 64 of them), so as keys they match no
      query (k_proj projects them out) and every slot's attention goes to the image;
    * each patch's mean feature minus the mean over patches is its position code p_j; q_proj maps u_i to
      a·p̂_i, with ``a`` giving slot i's scores over the patches a spread of std ``sharpness`` (peaked at patch i);
    * v_proj is the identity, out_proj a scale that gives image embeddings of norm ``out_norm``.
    Returns (a report, the slots' position codes [Q, C] in the decoder's space).
    """
    proj = model.image_to_text_projection
    att = proj.x_attn
    Q, C = proj.latent_query.shape
    Dv = proj.dense.in_features
    H = att.num_heads
    D = C // H
    assert C - Dv >= Q, "the latent queries need a complement of the dense map's range"
    pixels = image_batch(processor, [900_000_000 + i for i in range(n)])["pixel_values"]
    feats = model.vision_model.model.post_layernorm(model.vision_model(pixel_values=pixels)[0])
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(C, C, generator=g))  # [C, C] orthonormal columns
    image_space, latent_space = basis[:, :Dv], basis[:, Dv : Dv + Q]  # [C, Dv], [C, Q]
    proj.dense.weight.copy_(image_space * 3.0)  # unit features -> norm 3
    proj.dense.bias.zero_()
    h = proj.dense(F.normalize(feats, dim=-1))  # [n, 1 + P, C]
    pos = h[:, 1:].mean(0)
    pos = pos - pos.mean(0, keepdim=True)  # [P, C]
    p_hat = F.normalize(pos, dim=-1)
    proj.latent_query.copy_(latent_space.T)  # u_i: [Q, C]
    keep_image = image_space @ image_space.T  # projector onto the image space
    att.k_proj.weight.copy_(keep_image)
    att.v_proj.weight.copy_(torch.eye(C))
    for lin in (att.k_proj, att.v_proj, att.q_proj, att.out_proj):
        lin.bias.zero_()
    scores = torch.einsum("phd,nqhd->nhpq", p_hat.reshape(-1, H, D), h.reshape(n, -1, H, D)) / math.sqrt(D)
    a = sharpness / scores.std(-1).mean().item()
    att.q_proj.weight.copy_(a * p_hat.T @ latent_space.T)  # u_i -> a p̂_i
    att.out_proj.weight.copy_(torch.eye(C))
    embeds, _ = proj(F.normalize(feats, dim=-1))  # [n, Q, C]
    att.out_proj.weight.mul_(out_norm / embeds.norm(dim=-1).mean().item())
    embeds = embeds * (out_norm / embeds.norm(dim=-1).mean().item())
    # scores [n, H, Q, 1 + P]: slot i's best key, averaged over heads, should be patch i (key i + 1 after CLS)
    hits = (scores.mean(1).argmax(-1) == torch.arange(1, pos.shape[0] + 1)).float().mean().item()
    slots = F.normalize(embeds, dim=-1)
    codes = embeds.mean(0)
    codes = F.normalize(codes - codes.mean(0, keepdim=True), dim=-1)  # [Q, C]: what says "slot i"
    return {
        "slot_attends_own_patch": round(hits, 3),
        "q_scale": round(a, 1),
        "slot_cosine": round((slots @ slots.transpose(1, 2)).mean().item(), 3),
    }, codes


@torch.no_grad()
def init_locations_from_slots(model, first_location_id: int, slot_codes: torch.Tensor, scale: float) -> None:
    """Each location token's embedding (tied with the LM head) gains the code of the image slot whose patch holds
    its cell (the 32 × 32 cells, 4 × 4 to a patch of the 8 × 8 grid): a hidden state that carries a slot's code
    then scores that patch's cells highest, and a location token given in the prompt (describe) resembles the
    slot it points at."""
    emb = model.text_model.model.embed_tokens.weight
    r, c = torch.div(torch.arange(N_LOC), GRID, rounding_mode="floor"), torch.arange(N_LOC) % GRID
    per = GRID // PATCH_SIDE
    slot = (r // per) * PATCH_SIDE + (c // per)  # [1024] the patch of each cell
    emb[first_location_id : first_location_id + N_LOC] += scale * slot_codes[slot]


class AuxHead(torch.nn.Module):
    """Training only: from each patch's feature, predict what covers it (background or one of the 12
    colour-shape kinds) and that object's box. On the vision tower's patch features it teaches the tower to say
    where things are; on the connector's 64 outputs (slot i against patch i of the 8 × 8 grid) it teaches the
    connector to keep one patch per slot instead of averaging the image away."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        self.cls = torch.nn.Linear(width, classes)
        self.box = torch.nn.Linear(width, 4)
        self.cells = torch.nn.Linear(width, 4 * GRID)  # the box's x1, y1, x2, y2 as cells of the 32-grid

    def forward(self, feats):  # [B, P, D] -> [B, P, classes], [B, P, 4], [B, P, 4, 32]
        cells = self.cells(feats).reshape(*feats.shape[:-1], 4, GRID)
        return self.cls(feats), torch.sigmoid(self.box(feats)), cells


# ----------------------------------------------------------------------------------------------------------------
# Data

KINDS = [(c, s) for c in world.COLOURS for s in world.SHAPES]


def patch_targets(scene: world.Scene, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch of a side × side grid: the class (0 ground, 1 + kind) of the object whose box covers most of
    it (at least a quarter), and that object's box. -> [side²] int64, [side², 4] float32."""
    cls = np.zeros(side * side, dtype=np.int64)
    box = np.zeros((side * side, 4), dtype=np.float32)
    edges = np.arange(side + 1) / side
    for r in range(side):
        for c in range(side):
            cell = (edges[c], edges[r], edges[c + 1], edges[r + 1])
            best, best_cover = None, 0.25
            for obj in scene.objects:
                w = max(0.0, min(cell[2], obj.box[2]) - max(cell[0], obj.box[0]))
                h = max(0.0, min(cell[3], obj.box[3]) - max(cell[1], obj.box[1]))
                cover = w * h * side * side
                if cover > best_cover:
                    best, best_cover = obj, cover
            if best is not None:
                cls[r * side + c] = 1 + KINDS.index((best.colour, best.shape))
                box[r * side + c] = best.box
    return cls, box


def max_objects_at(step: int, curriculum: int, phases: int = 0) -> int:
    """Curriculum: with ``phases``, one object only for the first ``phases`` steps, then up to 2, 3, 4; else up to
    2 objects for the first ``curriculum`` steps, up to 3 for the next, then up to 4."""
    if phases > 0:
        return min(4, 1 + step // phases)
    if step < curriculum:
        return 2
    return 3 if step < 2 * curriculum else 4


def task_weights(step: int, curriculum: int, override: str = "") -> list[float]:
    """(caption, ground, describe) shares: referring first, captions grow in; ``override`` "c,g,d" fixes them."""
    if override:
        shares = [float(v) for v in override.split(",")]
        return [v / sum(shares) for v in shares]
    return [0.15, 0.7, 0.15] if step < curriculum else [0.45, 0.35, 0.2]


def example(seed: int, step: int, args) -> tuple[world.Scene, str, str]:
    """(scene, prompt, full text) of training example ``seed``."""
    rng = np.random.default_rng([seed, 7])
    n = int(rng.integers(1, max_objects_at(step, args.curriculum, args.phases) + 1))
    size = int(rng.choice([112, 112, 224]))
    scene = world.make_scene(seed, num_objects=n, image_size=size)
    task = rng.choice(3, p=task_weights(step, args.curriculum, args.task_weights))
    if task == 0:
        return scene, "<grounding> An image of", world.caption_text(scene)
    if task == 1:
        refs = world.referring_examples(scene)
        phrase, boxes = refs[int(rng.integers(len(refs)))]
        if len(boxes) == 1 and rng.random() < 0.3:
            phrase = "a " + phrase[len("the ") :]
        full = world.ground_text(phrase, boxes)
        return scene, full[: full.index("<object>")], full
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    full = world.describe_text(obj)
    return scene, full[: full.index("</object>") + len("</object>")], full


def make_batch(processor, seeds: list[int], step: int, args, eos_id: int, pad_id: int):
    """The processor's tensors for the full texts (+ </s>), the index where each target starts, aux targets."""
    items = [example(s, step, args) for s in seeds]
    images = [world.render(sc) for sc, _, _ in items]
    # Kosmos2Processor pads a batch of texts to its longest (on the right) whatever `padding` says: a row's own
    # length is its attention mask's sum, never len(row). (Reading len(row) trained every row's first target
    # tokens away in the runs up to v5: captions never learned their first <phrase>.)
    full = processor(text=[t for _, _, t in items], images=images)
    prompts = processor(text=[p for _, p, _ in items], images=images)
    prompt_lens = [int(sum(m)) for m in prompts["attention_mask"]]
    full_lens = [int(sum(m)) for m in full["attention_mask"]]
    rows = [list(r[:n]) + [eos_id] for r, n in zip(full["input_ids"], full_lens)]
    masks = [list(m[:n]) + [0] for m, n in zip(full["image_embeds_position_mask"], full_lens)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    img = torch.zeros((len(rows), T), dtype=torch.long)
    target = torch.zeros((len(rows), T), dtype=torch.bool)  # positions whose token is predicted
    for b, (r, m) in enumerate(zip(rows, masks)):
        ids[b, : len(r)] = torch.tensor(r)
        att[b, : len(r)] = 1
        img[b, : len(m)] = torch.tensor(m)
        target[b, prompt_lens[b] : len(r)] = True
    aux = [patch_targets(sc, PATCH_SIDE) for sc, _, _ in items]
    return {
        "pixel_values": torch.as_tensor(np.asarray(full["pixel_values"])),
        "input_ids": ids,
        "attention_mask": att,
        "image_embeds_position_mask": img,
        "target": target,
        "aux_cls": torch.from_numpy(np.stack([a[0] for a in aux])),
        "aux_box": torch.from_numpy(np.stack([a[1] for a in aux])),
    }


# ----------------------------------------------------------------------------------------------------------------
# Loss


def soft_location_table(sigma: float) -> torch.Tensor:
    """[1024, 1024]: row i is a 2-D Gaussian over the cells around cell i (sums to 1); sigma 0 = one-hot."""
    r, c = np.divmod(np.arange(N_LOC), GRID)
    d2 = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2
    if sigma <= 0:
        return torch.eye(N_LOC)
    w = np.exp(-d2 / (2 * sigma**2))
    return torch.from_numpy((w / w.sum(1, keepdims=True)).astype(np.float32))


def image_batch(processor, seeds: list[int]):
    """Stage 0 (images only): pixel values and the per-patch targets of fresh scenes of 1-4 objects."""
    scenes = [world.make_scene(s, image_size=int(np.random.default_rng([s, 7]).choice([112, 112, 224]))) for s in seeds]
    pixels = processor.image_processor([world.render(sc) for sc in scenes], return_tensors="pt")["pixel_values"]
    aux = [patch_targets(sc, PATCH_SIDE) for sc in scenes]
    return {
        "pixel_values": pixels,
        "aux_cls": torch.from_numpy(np.stack([a[0] for a in aux])),
        "aux_box": torch.from_numpy(np.stack([a[1] for a in aux])),
    }


def image_forward(model, aux_heads, batch):
    """Stage 0: the vision tower and the connector only, with their auxiliary heads."""
    vision = model.vision_model(pixel_values=batch["pixel_values"])
    feats = model.vision_model.model.post_layernorm(vision[0])  # [B, 1 + P, Dv]
    image_embeds, _ = model.image_to_text_projection(F.normalize(feats, dim=-1))  # [B, Q, C]
    vision_head, slot_head = aux_heads
    return vision_head(feats[:, 1:]), slot_head(image_embeds)


def corner_cells(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] normalised boxes -> [..., 4] the cells the patch-index tokens name: floor(x1·32), floor(y1·32),
    ceil(x2·32 − 1), ceil(y2·32 − 1)."""
    lo = torch.floor(boxes[..., :2] * GRID)
    hi = torch.ceil(boxes[..., 2:] * GRID - 1)
    return torch.cat([lo, hi], -1).clamp(0, GRID - 1).long()


def soft_1d(cells: torch.Tensor, sigma: float = 0.8) -> torch.Tensor:
    """[N] cells -> [N, 32] Gaussian targets around them."""
    d = torch.arange(GRID)[None, :] - cells[:, None]
    w = torch.exp(-(d.float() ** 2) / (2 * sigma**2))
    return w / w.sum(1, keepdim=True)


def aux_losses(aux, batch):
    """Cross-entropy of the patch classes, L1 of the boxes and soft cross-entropy of the boxes' corner cells (on
    patches with an object; the cell term counted in aux_box), summed over heads."""
    aux_cls, aux_box = 0.0, 0.0
    on = batch["aux_cls"] > 0  # [B, P] patches with an object
    target_cells = corner_cells(batch["aux_box"][on]).reshape(-1)  # [M * 4]
    q = soft_1d(target_cells)  # [M * 4, 32]
    for cls_logits, box_pred, cells in aux:  # [B, P, K], [B, P, 4], [B, P, 4, 32]
        aux_cls = aux_cls + F.cross_entropy(cls_logits.reshape(-1, cls_logits.shape[-1]), batch["aux_cls"].reshape(-1))
        if on.any():
            l1 = (box_pred[on] - batch["aux_box"][on]).abs().mean()
            ce = -(q * F.log_softmax(cells[on].reshape(-1, GRID), -1)).sum(1).mean()
            aux_box = aux_box + l1 + 0.2 * ce
    return aux_cls, aux_box


def forward(model, aux_heads, batch):
    """Logits [N, V] at the positions before each target token, and the auxiliary predictions; the vision
    tower runs once for both, the LM head only where a token is predicted."""
    vision = model.vision_model(pixel_values=batch["pixel_values"])
    feats = model.vision_model.model.post_layernorm(vision[0])  # [B, 1 + P, Dv]
    image_embeds, _ = model.image_to_text_projection(F.normalize(feats, dim=-1))  # [B, Q, C]
    hidden = model.text_model.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        image_embeds=image_embeds,
        image_embeds_position_mask=batch["image_embeds_position_mask"],
    )[0]  # [B, T, C]
    logits = model.text_model.lm_head(hidden[:, :-1][batch["target"][:, 1:]])  # [N, V]
    vision_head, slot_head = aux_heads
    return logits, (vision_head(feats[:, 1:]), slot_head(image_embeds))


def losses(logits, aux, batch, first_loc: int, soft_table, loc_weight: float):
    """Cross-entropy on the target tokens (soft 2-D targets for location tokens), and the auxiliary terms."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [N, V]
    labels = batch["input_ids"][:, 1:][batch["target"][:, 1:]]  # [N]
    is_loc = (labels >= first_loc) & (labels < first_loc + N_LOC)
    text_nll = -logp[~is_loc].gather(1, labels[~is_loc, None]).squeeze(1)
    q = soft_table[labels[is_loc] - first_loc]  # [M, 1024]
    loc_nll = -(q * logp[is_loc][:, first_loc : first_loc + N_LOC]).sum(1)
    loc_hard = -logp[is_loc].gather(1, labels[is_loc, None]).squeeze(1)
    lm = (text_nll.sum() + loc_weight * loc_nll.sum()) / (len(text_nll) + loc_weight * len(loc_nll))
    aux_cls, aux_box = aux_losses(aux, batch)
    return lm, aux_cls, aux_box, {"text": text_nll.mean().item(), "loc": loc_hard.mean().item()}


# ----------------------------------------------------------------------------------------------------------------
# Held-out check: greedy ground, two steps


@torch.no_grad()
def heldout_ground(model, processor, n: int, first_loc: int, num_objects: int | None = None) -> dict:
    """Greedy referring on ``n`` held-out scenes (one phrase each; scenes of ``num_objects`` objects, default
    1-4): the share with IoU >= 0.5, the mean IoU."""
    from kosmos2_ref.processing.grounding import patch_indices_to_box

    model.eval()
    scenes, prompts, truths = [], [], []
    for i in range(n):
        sc = world.make_scene(EVAL_SEED_BASE + i, num_objects=num_objects, image_size=224)
        refs = world.referring_examples(sc)
        phrase, boxes = refs[i % len(refs)]
        scenes.append(sc)
        prompts.append(f"<grounding><phrase> {phrase}</phrase><object>")
        truths.append(boxes[0])
    enc = processor(text=prompts, images=[world.render(s) for s in scenes], return_tensors="pt", padding=True)
    ids, att, img = enc["input_ids"], enc["attention_mask"], enc["image_embeds_position_mask"]
    # right padding: read each row's logits at its last real token
    picks = []
    for _ in range(2):
        logits = model(
            pixel_values=enc["pixel_values"], input_ids=ids, attention_mask=att, image_embeds_position_mask=img
        ).logits
        last = att.sum(1) - 1
        loc = logits[torch.arange(len(ids)), last, first_loc : first_loc + N_LOC].argmax(-1)
        picks.append(loc)
        ids = torch.cat([ids, torch.full((len(ids), 1), 1)], 1)
        att = torch.cat([att, torch.zeros((len(ids), 1), dtype=att.dtype)], 1)
        img = torch.cat([img, torch.zeros((len(ids), 1), dtype=img.dtype)], 1)
        rows = torch.arange(len(ids))
        ids[rows, last + 1] = loc + first_loc
        att[rows, last + 1] = 1
    model.train()
    ious = []
    for ul, lr, truth in zip(picks[0].tolist(), picks[1].tolist(), truths):
        ious.append(world.iou(patch_indices_to_box(ul, lr), truth) if lr >= ul else 0.0)
    ious = np.array(ious)
    return {"ground_acc": float((ious >= 0.5).mean()), "ground_miou": float(ious.mean())}


# ----------------------------------------------------------------------------------------------------------------
# The loop


def lr_at(step: int, args, elapsed: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine down to a tenth: over ``total_steps`` steps, or, with
    ``--schedule-minutes``, over that much training time (the machine is shared: steps per minute vary)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule_minutes > 0:
        t = min(1.0, elapsed / (60 * args.schedule_minutes))
    else:
        t = min(1.0, (step - args.warmup) / max(1, args.total_steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def param_groups(model, aux_head, args):
    """Connector (latent queries, cross-attention, dense) at ``connector_lr_mult`` × the learning rate."""
    connector, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if name.startswith("image_to_text_projection"):
            connector.append(p)
        elif p.ndim < 2 or "embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "mult": 1.0, "weight_decay": args.weight_decay},
        {"params": no_decay, "mult": 1.0, "weight_decay": 0.0},
        {"params": connector, "mult": args.connector_lr_mult, "weight_decay": 0.0},
        {"params": list(aux_head.parameters()), "mult": 1.0, "weight_decay": 0.0},
    ]


def training_state(model, aux_head, opt, step: int, elapsed: float) -> dict:
    """What a checkpoint holds: enough to resume exactly (the data follows from the step)."""
    return {
        "model": model.state_dict(),
        "aux_head": aux_head.state_dict(),
        "opt": opt.state_dict(),
        "step": step,
        "elapsed": elapsed,
    }


def ckpt_exists(args) -> bool:
    return (Path(args.run) / "ckpt.pt").is_file()


def save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder (resumed when it holds ckpt.pt)")
    p.add_argument("--init-from", default="", help="a new run starts from this checkpoint (a second stage)")
    p.add_argument("--minutes", type=float, default=60.0, help="stop after this much wall time (this launch)")
    p.add_argument("--total-steps", type=int, default=6000, help="the cosine schedule's length")
    p.add_argument(
        "--schedule-minutes",
        type=float,
        default=0.0,
        help="run the cosine over this many minutes of training instead of total-steps",
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--connector-lr-mult", type=float, default=3.0)
    p.add_argument("--loc-sigma", type=float, default=0.8, help="soft location target width, in cells")
    p.add_argument("--loc-weight", type=float, default=2.0)
    p.add_argument("--aux-weight", type=float, default=1.0, help="0 turns the auxiliary head off")
    p.add_argument("--loc-scale", type=float, default=0.05)
    p.add_argument("--pos-scale", type=float, default=0.3)
    p.add_argument("--structured", type=int, default=1, help="0: transformers' own random initialisation")
    p.add_argument("--curriculum", type=int, default=500)
    p.add_argument(
        "--image-steps",
        type=int,
        default=0,
        help="stage 0: this many first steps train only the vision tower, connector and aux heads",
    )
    p.add_argument("--image-batch", type=int, default=32)
    p.add_argument("--task-weights", default="", help='"c,g,d": fixed caption/ground/describe shares')
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-n", type=int, default=96)
    p.add_argument("--save-every", type=float, default=180.0, help="seconds between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=list(MODEL_SIZES), default="base")
    p.add_argument("--route-init", type=int, default=1, help="1: the connector starts as slot i = patch i")
    p.add_argument(
        "--slot-loc-scale",
        type=float,
        default=0.0,
        help="add this × the slot position codes to the location-token embeddings (0: off)",
    )
    p.add_argument(
        "--phases",
        type=int,
        default=0,
        help="> 0: scenes of 1, then up to 2, 3 and 4 objects, this many steps per phase",
    )
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    from transformers import AutoProcessor

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    processor = AutoProcessor.from_pretrained(TOKENIZER_DIR)
    tok = processor.tokenizer
    first_loc = tok.convert_tokens_to_ids("<patch_index_0000>")
    model = build_model(len(tok), args.seed, args.size)
    widths = MODEL_SIZES[args.size]
    aux_head = torch.nn.ModuleList(
        [
            AuxHead(widths["vision_config"]["hidden_size"], 1 + len(KINDS)),
            AuxHead(widths["text_config"]["embed_dim"], 1 + len(KINDS)),
        ]
    )
    if args.structured:
        init_structured(model, first_loc, args.loc_scale, args.pos_scale)
    if args.route_init and not ckpt_exists(args) and not args.init_from:
        report, slot_codes = init_connector(model, processor)
        print("connector initialised:", report, flush=True)
        if args.slot_loc_scale > 0:
            init_locations_from_slots(model, first_loc, slot_codes, args.slot_loc_scale)
    groups = param_groups(model, aux_head, args)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    step, elapsed = 0, 0.0
    ckpt = run / "ckpt.pt"
    source = ckpt if ckpt.is_file() else Path(args.init_from) if args.init_from else None
    if source != ckpt:  # a new run (from scratch or from another run's checkpoint): record how it was started
        (run / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    if source is not None:
        state = torch.load(source, weights_only=False)
        model.load_state_dict(state["model"])
        aux_head.load_state_dict(state["aux_head"], strict=False)  # heads added later start fresh
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed {source} at step {step} ({elapsed / 60:.1f} min trained)", flush=True)
    soft = soft_location_table(args.loc_sigma)
    model.train()
    log = open(run / "log.jsonl", "a")
    start = time.time()
    last_save = start
    base_elapsed = elapsed
    sums, count = {}, 0
    while time.time() - start < args.minutes * 60 and step < args.total_steps:
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args, elapsed) * g["mult"]
        if step < args.image_steps:  # stage 0: the image side learns what is where, cheaply
            seeds = [500_000_000 + step * args.image_batch + i for i in range(args.image_batch)]
            batch = image_batch(processor, seeds)
            aux_cls, aux_box = aux_losses(image_forward(model, aux_head, batch), batch)
            lm, parts = torch.zeros(()), {}
        else:
            seeds = [step * args.batch + i for i in range(args.batch)]
            batch = make_batch(processor, seeds, step - args.image_steps, args, tok.eos_token_id, tok.pad_token_id)
            logits, aux = forward(model, aux_head, batch)
            lm, aux_cls, aux_box, parts = losses(logits, aux, batch, first_loc, soft, args.loc_weight)
        loss = lm + args.aux_weight * (aux_cls + 5.0 * aux_box)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        scalars = {"loss": lm.item(), "aux_cls": float(aux_cls.detach()), "aux_box": float(aux_box.detach())}
        for k, v in {**scalars, **parts}.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        elapsed = base_elapsed + time.time() - start
        if step % 25 == 0:
            row = {
                "step": step,
                "minutes": round(elapsed / 60, 2),
                "lr": lr_at(step, args, elapsed),
                "s_per_step": round(time.time() - t0, 3),
                **{k: round(v / count, 4) for k, v in sums.items()},
            }
            sums, count = {}, 0
            if step % args.eval_every == 0 and step > args.image_steps:
                row.update(heldout_ground(model, processor, args.eval_n, first_loc))
                one = heldout_ground(model, processor, args.eval_n // 2, first_loc, num_objects=1)
                row.update({"ground1_acc": one["ground_acc"], "ground1_miou": one["ground_miou"]})
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
            log.flush()
        if time.time() - last_save > args.save_every:
            save(ckpt, training_state(model, aux_head, opt, step, elapsed))
            last_save = time.time()
    save(ckpt, training_state(model, aux_head, opt, step, elapsed))
    print(f"stopped at step {step} ({elapsed / 60:.1f} min trained)", flush=True)


if __name__ == "__main__":
    main()
