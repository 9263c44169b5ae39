import pytest
from pydantic import ValidationError

from sam3_engine.engine.config import ConfigError, load_config, run_config_model


def test_unknown_key_is_an_error_naming_the_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("input: x\ningest:\n  unit_sise: 4\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value) and "ingest.unit_sise: unknown key" in str(error.value)


def test_wrong_type_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ingest:\n  max_pixels: lots\n")
    with pytest.raises(ConfigError, match=r"ingest\.max_pixels: .*integer"):
        load_config(path)


def test_unknown_stage_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(None, {"stages": "ingest,dance"})
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_flags_override_the_file_and_paths_resolve_relative_to_their_origin(tmp_path, monkeypatch):
    path = tmp_path / "conf" / "job.yaml"
    path.parent.mkdir()
    path.write_text("input: images\nstages: [ingest]\ningest:\n  unit_size: 8\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(path, {"ingest.unit_size": 3, "model.name": "/models/sam3"})
    assert config.input == str(tmp_path / "conf" / "images")
    assert config.output == str(tmp_path / "runs" / "job")
    assert config.ingest.unit_size == 3 and config.model.name == "/models/sam3"
    assert load_config(path, {"input": "elsewhere"}).input == str(tmp_path / "elsewhere")
    assert load_config(None, {"input": "s3://bucket/photos/"}).input == "s3://bucket/photos/"


def test_configs_are_immutable_and_defaults_are_complete():
    config = run_config_model()()
    with pytest.raises(ValidationError, match="frozen"):
        config.ingest.unit_size = 5
    assert (
        config.stages == ("ingest", "mine", "embed", "dedup", "retrieve", "negatives", "propose", "verify", "verify_vlm", "splits")
        and config.ingest.max_pixels == 100_000_000
    )
