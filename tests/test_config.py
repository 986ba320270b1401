"""Config: defaults equal transformers' (= the released checkpoint), unknown keys kept, aliases read."""

from __future__ import annotations

import json

import pytest

from kosmos2_ref.config import ConfigError, Kosmos2Config, TextConfig, VisionConfig


def test_defaults_equal_transformers():
    from transformers import Kosmos2Config as HFConfig

    hf = HFConfig()
    ours = Kosmos2Config()
    for f in (
        "vocab_size",
        "max_position_embeddings",
        "embed_dim",
        "layers",
        "ffn_dim",
        "attention_heads",
        "activation_function",
        "layer_norm_eps",
        "scale_embedding",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(ours.text_config, f) == getattr(hf.text_config, f), f
    for f in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_channels",
        "image_size",
        "patch_size",
        "hidden_act",
        "layer_norm_eps",
    ):
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
    assert cfg.text_config.extra.get("no_repeat_ngram_size") == 3  # unknown keys kept, not fatal
    # our dict is readable by transformers again
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    hf = HFConfig.from_pretrained(tmp_path)
    assert hf.text_config.embed_dim == 64 and hf.latent_query_num == 9


def test_aliases():
    t = TextConfig.from_dict({"hidden_size": 40, "num_hidden_layers": 3, "num_attention_heads": 5})
    assert (t.embed_dim, t.layers, t.attention_heads) == (40, 3, 5)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads) == (40, 3, 5)


@pytest.mark.parametrize(
    "bad, msg",
    [
        ({"text_config": {"embed_dim": 0}}, r"text_config\.embed_dim must be a positive integer, got 0"),
        ({"vision_config": {"hidden_size": 30, "num_attention_heads": 4}}, r"hidden_size=30 is not divisible"),
        ({"vision_config": {"hidden_act": "relu"}}, r"hidden_act='relu'"),
        ({"latent_query_num": -1}, r"latent_query_num must be a positive integer"),
        ({"text_config": "nope"}, r"text_config: expected a JSON object"),
    ],
)
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


# --------------------------------------------------------------------------------------------------------------
# Typed keys: what our code reads is checked at load, naming the key, the value and what is expected


@pytest.mark.parametrize(
    "section, key, value, msg",
    [
        ("text_config", "layer_norm_eps", "abc", r"text_config\.layer_norm_eps must be a positive finite number"),
        ("text_config", "layer_norm_eps", None, r"text_config\.layer_norm_eps must be .*, got None"),
        ("text_config", "layer_norm_eps", -1.0, r"text_config\.layer_norm_eps must be .*, got -1\.0"),
        ("text_config", "layer_norm_eps", 0, r"text_config\.layer_norm_eps must be .*, got 0"),
        ("text_config", "layer_norm_eps", float("nan"), r"text_config\.layer_norm_eps must be .*, got nan"),
        ("text_config", "layer_norm_eps", True, r"text_config\.layer_norm_eps must be .*, got True"),
        ("vision_config", "layer_norm_eps", "1e-5", r"vision_config\.layer_norm_eps must be a positive finite number"),
        (
            "text_config",
            "pad_token_id",
            999999,
            r"text_config\.pad_token_id must be a token id, an integer in "
            r"\[0, 65036\] \(below vocab_size\), got 999999",
        ),
        ("text_config", "pad_token_id", "1", r"text_config\.pad_token_id must be a token id.*, got '1'"),
        ("text_config", "pad_token_id", None, r"text_config\.pad_token_id must be a token id.*, got None"),
        ("text_config", "pad_token_id", -1, r"text_config\.pad_token_id must be a token id.*, got -1"),
        ("text_config", "pad_token_id", 1.0, r"text_config\.pad_token_id must be a token id.*, got 1\.0"),
        ("text_config", "bos_token_id", 65037, r"text_config\.bos_token_id must be a token id.* or null, got 65037"),
        ("text_config", "eos_token_id", "2", r"text_config\.eos_token_id must be a token id.* or null, got '2'"),
        ("text_config", "eos_token_id", [2, None], r"text_config\.eos_token_id must be a token id.*, got None"),
        (
            "text_config",
            "scale_embedding",
            "false",
            r"text_config\.scale_embedding must be true or false \(a JSON "
            r"boolean\), got 'false'",
        ),
        ("text_config", "tie_word_embeddings", 1, r"text_config\.tie_word_embeddings must be true or false"),
        ("text_config", "use_cache", None, r"text_config\.use_cache must be true or false"),
        ("text_config", "layers", 2.0, r"text_config\.layers must be a positive integer, got 2\.0"),
        ("text_config", "vocab_size", True, r"text_config\.vocab_size must be a positive integer, got True"),
    ],
)
def test_bad_typed_values(section, key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        Kosmos2Config.from_dict({section: {key: value}})


def test_bad_typed_value_in_a_file_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"layer_norm_eps": "abc"}}))
    with pytest.raises(ConfigError) as info:
        Kosmos2Config.from_pretrained(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'config.json'}: text_config.layer_norm_eps must be a positive finite "
        f"number (like 1e-05), got 'abc'"
    )


def test_what_real_configs_carry_is_accepted(tmp_path):
    """transformers' own config.json (5.x save_pretrained) and the keys a 4.x one adds (nulls, dropout rates, dtype
    names, generation settings) load; so do null bos/eos ids and a list of eos ids."""
    from transformers import Kosmos2Config as HFConfig

    HFConfig().save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["torch_dtype"] = "float32"
    d["text_config"].update(
        {
            "sep_token_id": None,
            "decoder_start_token_id": None,
            "torch_dtype": None,
            "layerdrop": 0.0,
            "dropout": 0.1,
            "no_repeat_ngram_size": 3,
            "max_length": 20,
        }
    )
    d["vision_config"].update(
        {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None, "dropout": 0.0, "initializer_factor": 1.0}
    )
    cfg = Kosmos2Config.from_dict(d)
    assert cfg == Kosmos2Config()
    assert cfg.text_config.extra["layerdrop"] == 0.0 and cfg.vision_config.extra["pad_token_id"] is None
    t = TextConfig.from_dict({"bos_token_id": None, "eos_token_id": [2, 18707], "layer_norm_eps": 1})
    assert t.bos_token_id is None and t.eos_token_id == [2, 18707]
    assert TextConfig.from_dict({"eos_token_id": None}).eos_token_id is None
