"""Export a training checkpoint as the shipped miniature: a normal Hugging Face folder (dev tool).

    python training/export_mini.py training/runs/main/ckpt.pt kosmos2_ref/assets/mini

Writes ``config.json`` and ``model.safetensors`` with transformers' ``save_pretrained`` (weights stored as
float16 when every weight fits its range, else float32; config dtype float32: both loaders compute in float32),
``generation_config.json``, and ``mini.json`` (what it is, how it was trained). The auxiliary heads of training are
not part of the model and are dropped. The tokenizer and
image-processor files already in the folder (``make_mini_tokenizer.py``) are kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_mini  # noqa: E402

GENERATION_CONFIG = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def recipe_stages(run: Path) -> list[dict]:
    """The training arguments of ``run`` and, when it started from another run's checkpoint (``--init-from``), of
    that run first: one dict per stage, oldest first, without the machine-local run folders and thread count."""
    path = run / "args.json"
    if not path.is_file():
        return []
    args = json.loads(path.read_text())
    earlier = recipe_stages(Path(args["init_from"]).parent) if args.get("init_from") else []
    return earlier + [{k: v for k, v in args.items() if k not in ("run", "threads", "init_from")}]


def export(ckpt_path: str, folder: str) -> Path:
    from transformers import AutoTokenizer

    out = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(train_mini.TOKENIZER_DIR)
    state = torch.load(ckpt_path, weights_only=False)
    run = Path(ckpt_path).parent
    stages = recipe_stages(run)
    args = stages[-1] if stages else {}
    model = train_mini.build_model(len(tokenizer), 0, args.get("size", "base"))
    model.load_state_dict(state["model"])
    largest = max(p.abs().max().item() for p in model.parameters())
    storage = "float16" if largest < 60000 else "float32"  # 2 bytes (11.5 MB) unless a weight would overflow
    model = model.to(getattr(torch, storage))
    model.save_pretrained(out, safe_serialization=True)
    # ...but computed in float32: transformers loads a checkpoint in its config's dtype, ours always widens
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    (out / "model.safetensors").chmod(0o644)
    info = {
        "what": "a miniature Kosmos-2 trained on synthetic shapes (kosmos2_ref.world), not on photos",
        "steps": state["step"],
        "training_minutes": round(state["elapsed"] / 60, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "storage": storage,
        "recipe": stages[0] if len(stages) == 1 else {"stages": stages},
    }
    (out / "mini.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"{out}: step {state['step']}, {info['parameters'] / 1e6:.2f} M parameters")
    return out


if __name__ == "__main__":
    export(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "kosmos2_ref/assets/mini")
