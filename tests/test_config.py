"""Config: defaults equal transformers' (= the released checkpoint), unknown keys kept, aliases read."""
from __future__ import annotations

import json

import pytest

from kosmos2_ref.config import ConfigError, Kosmos2Config, TextConfig, VisionConfig


def test_defaults_equal_transformers():
    from transformers import Kosmos2Config as HFConfig

    hf = HFConfig()
    ours = Kosmos2Config()
    for f in ("vocab_size", "max_position_embeddings", "embed_dim", "layers", "ffn_dim", "attention_heads",
              "activation_function", "layer_norm_eps", "scale_embedding", "pad_token_id", "bos_token_id",
              "eos_token_id"):
        assert getattr(ours.text_config, f) == getattr(hf.text_config, f), f
    for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
              "image_size", "patch_size", "hidden_act", "layer_norm_eps"):
        assert getattr(ours.vision_config, f) == getattr(hf.vision_config, f), f
    assert ours.latent_query_num == hf.latent_query_num == 64


def test_round_trip_through_transformers_json(tmp_path):
    from transformers import Kosmos2Config as HFConfig

    HFConfig(text_config={"embed_dim": 64, "attention_heads": 4}, latent_query_num=9).save_pretrained(tmp_path)
    # 5.x drops generation keys when saving; the Hub config (written by 4.x) carries this one in text_config
    d = json.loads((tmp_path / "config.json").read_text())
    d["text_config"]["no_repeat_ngram_size"] = 3
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = Kosmos2Config.from_pretrained(tmp_path)
    assert cfg.text_config.embed_dim == 64 and cfg.text_config.head_dim == 16 and cfg.latent_query_num == 9
    assert cfg.text_config.extra.get("no_repeat_ngram_size") == 3      # unknown keys kept, not fatal
    # our dict is readable by transformers again
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    hf = HFConfig.from_pretrained(tmp_path)
    assert hf.text_config.embed_dim == 64 and hf.latent_query_num == 9


def test_aliases():
    t = TextConfig.from_dict({"hidden_size": 40, "num_hidden_layers": 3, "num_attention_heads": 5})
    assert (t.embed_dim, t.layers, t.attention_heads) == (40, 3, 5)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads) == (40, 3, 5)


@pytest.mark.parametrize("bad, msg", [
    ({"text_config": {"embed_dim": 0}}, r"text_config\.embed_dim must be a positive integer, got 0"),
    ({"vision_config": {"hidden_size": 30, "num_attention_heads": 4}}, r"hidden_size=30 is not divisible"),
    ({"vision_config": {"hidden_act": "relu"}}, r"hidden_act='relu'"),
    ({"latent_query_num": -1}, r"latent_query_num must be a positive integer"),
    ({"text_config": "nope"}, r"text_config: expected a JSON object"),
])
def test_bad_values(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        Kosmos2Config.from_dict(bad)


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Kosmos2Config.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"config\.json' does not exist"):
        Kosmos2Config.from_pretrained(tmp_path)


def test_vision_geometry():
    v = VisionConfig()
    assert v.num_patches == 256 and v.head_dim == 64
