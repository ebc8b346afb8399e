"""Hub resolution, offline (HF_HUB_OFFLINE=1 from conftest): errors are one HubError line;
a snapshot planted in a private cache folder is found without network."""

from __future__ import annotations

import pytest

from wadi_cli.errors import CheckpointError, HubError
from wadi_cli.io import fetch_file, resolve_model
from wadi_cli.io.hub import hub_offline, looks_like_repo_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_cache(cache, repo_id, files):
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    for rel, text in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).write_text(text)
    return snap


@pytest.mark.parametrize(
    ("value", "offline"),
    [("1", True), ("true", True), (" YES ", True), ("on", True), ("0", False), ("false", False),
     ("", False), ("maybe", False), (None, False)],
)  # fmt: skip
def test_offline_flag_is_read_from_the_environment_at_call_time(monkeypatch, value, offline):
    if value is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline


def test_local_paths_pass_through(tmp_path):
    (tmp_path / "unet").mkdir()
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path), subfolder="unet") == tmp_path / "unet"


def test_missing_local_path_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_model(tmp_path / "nope" / "deeper")


def test_offline_missing_repo_is_one_hub_error(tmp_path):
    with pytest.raises(HubError) as info:
        resolve_model("nobody-here/no-such-model", subfolder="unet", cache_dir=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    # io names no flag (its callers' flags differ: --model, --weights, a positional path)
    for needle in ("'nobody-here/no-such-model'", "'unet'", "unreachable", "pass the local folder or file"):
        assert needle in msg, msg
    assert info.value.exit_code == 3


def test_offline_fetch_file_is_one_hub_error(tmp_path):
    with pytest.raises(HubError) as info:
        fetch_file("nobody-here/no-such-model", "rotated_unet-sdv1-5.safetensors", cache_dir=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "'rotated_unet-sdv1-5.safetensors'" in msg and "pass the local" in msg


def test_cached_snapshot_is_found_offline(tmp_path):
    snap = _fake_cache(tmp_path, "org/model", {"model_index.json": "{}", "unet/config.json": "{}"})
    assert resolve_model("org/model", subfolder="unet", cache_dir=tmp_path) == snap / "unet"
    assert fetch_file("org/model", "unet/config.json", cache_dir=tmp_path) == snap / "unet" / "config.json"
    with pytest.raises(HubError, match="no 'transformer' folder"):
        resolve_model("org/model", subfolder="transformer", cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("text", "ok"),
    [("org/name", True), ("name", True), ("a.b/c-d_e", True), ("./x", False), ("a/b/c", False),
     ("/abs/path", False), ("~/x", False), ("../up", False)],
)  # fmt: skip
def test_repo_id_shape(text, ok):
    assert looks_like_repo_id(text) is ok


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE, no network: the download is asked for the local cache only (no
    retry loop against the network) and the miss is one HubError line."""
    import huggingface_hub

    from wadi_cli.errors import HubError
    from wadi_cli.io import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    seen = {}
    real = huggingface_hub.hf_hub_download

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    with pytest.raises(HubError, match="unreachable"):
        hub.fetch_file("some-org/some-repo", "weights.safetensors", cache_dir=tmp_path)
    assert seen["local_files_only"] is True
