"""The shipped shape tables (``configs/skeletons.json``) against their reference, a
meta-device build of the diffusers network from the same config; and the fallback to that
build when the config in hand is not the one a table entry was computed from."""

from __future__ import annotations

import json

import pytest

from wadi_cli.backbones import BACKBONES, get_backbone
from wadi_cli.backbones.skeletons import (
    SKELETONS_FILE,
    build_skeleton,
    config_digest,
    shipped_skeleton,
    skeleton,
)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_shipped_table_equals_a_meta_build(name):
    b = get_backbone(name)
    config = b.denoiser_config()
    shipped = shipped_skeleton(b, config)
    assert shipped is not None, f"no current entry for {name}: run python -m wadi_cli.backbones.skeletons"
    shapes, total = build_skeleton(b.denoiser_class, config)
    assert list(shipped[0].items()) == list(shapes.items())  # names, shapes and module order
    assert shipped[1] == total


def test_a_changed_config_is_built_not_looked_up():
    b = get_backbone("tiny")
    config = {**b.denoiser_config(), "cross_attention_dim": 48}
    assert config_digest(config) != config_digest(b.denoiser_config())
    assert shipped_skeleton(b, config) is None
    shapes, _ = skeleton(b, config)
    attn2_k = [s for n, s in shapes.items() if n.endswith("attn2.to_k")]
    assert attn2_k and all(s[1] == 48 for s in attn2_k)


def test_digest_ignores_key_order_only():
    assert config_digest({"a": 1, "b": [2, 3]}) == config_digest({"b": [2, 3], "a": 1})
    assert config_digest({"a": 1}) != config_digest({"a": 2})


def test_the_table_names_its_source():
    table = json.loads(SKELETONS_FILE.read_text())
    assert set(table) == set(BACKBONES)
    for name, entry in table.items():
        assert entry["denoiser_class"] == get_backbone(name).denoiser_class
        assert entry["diffusers_version"]
