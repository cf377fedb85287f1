"""Settings from defaults, a TOML file, ANALYSIS_* variables and flags: supervisor.config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from supervisor import config
from supervisor.errors import ConfigError


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """An empty data folder, so no config.toml of the user's own is read."""
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


@pytest.fixture
def environ(data_dir) -> dict[str, str]:
    return {"ANALYSIS_DATA_DIR": str(data_dir)}


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# Defaults ----------------------------------------------------------------


def test_load_defaults_values(environ):
    settings = config.load(environ)

    for setting in config.SETTINGS:
        if setting.name == "data_dir":
            continue
        assert getattr(settings, setting.name) == setting.default, setting.name


def test_load_defaults_sources(environ):
    settings = config.load(environ)

    expected = {setting.name: "default" for setting in config.SETTINGS}
    expected["data_dir"] = "ANALYSIS_DATA_DIR"
    assert settings.sources == expected


def test_defaults_keep_heartbeat_within_lease():
    assert config.HEARTBEAT_SECONDS_DEFAULT * 2 <= config.LEASE_SECONDS_DEFAULT


def test_effective_dirs_follow_data_dir(environ, data_dir):
    settings = config.load(environ)

    assert settings.effective_data_dir == data_dir
    assert settings.effective_results_dir == data_dir / "results"


def test_effective_results_dir_override(environ, tmp_path):
    settings = config.load({**environ, "ANALYSIS_RESULTS_DIR": str(tmp_path / "elsewhere")})

    assert settings.effective_results_dir == tmp_path / "elsewhere"


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS uses ~/Library/Application Support")
def test_effective_data_dir_without_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))

    settings = config.load({})

    assert settings.data_dir is None
    assert settings.effective_data_dir == tmp_path / "xdg" / config.APP_NAME


def test_effective_workers_defaults_to_machine(environ):
    assert config.load(environ).effective_workers == config.default_workers()
    assert config.default_workers() >= 1


def test_unknown_attribute_raises(environ):
    settings = config.load(environ)

    with pytest.raises(AttributeError):
        _ = settings.no_such_setting


def test_env_name_uses_prefix():
    assert config.env_name("lease_seconds") == "ANALYSIS_LEASE_SECONDS"


# Environment ---------------------------------------------------------------


def test_env_overrides_default(environ):
    settings = config.load({**environ, "ANALYSIS_LEASE_SECONDS": "60", "ANALYSIS_WORKERS": "3"})

    assert settings.lease_seconds == 60.0
    assert settings.workers == 3
    assert settings.sources["lease_seconds"] == "ANALYSIS_LEASE_SECONDS"
    assert settings.sources["workers"] == "ANALYSIS_WORKERS"


def test_env_empty_value_is_ignored(environ):
    settings = config.load({**environ, "ANALYSIS_LEASE_SECONDS": ""})

    assert settings.lease_seconds == config.LEASE_SECONDS_DEFAULT
    assert settings.sources["lease_seconds"] == "default"


def test_env_converts_paths(environ, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))

    settings = config.load({**environ, "ANALYSIS_RESULTS_DIR": "~/results"})

    assert settings.results_dir == tmp_path / "results"


def test_load_reads_process_environment(monkeypatch, data_dir):
    monkeypatch.setenv("ANALYSIS_DATA_DIR", str(data_dir))
    monkeypatch.setenv("ANALYSIS_POLL_SECONDS", "2.5")

    settings = config.load()

    assert settings.poll_seconds == 2.5
    assert settings.sources["poll_seconds"] == "ANALYSIS_POLL_SECONDS"


# TOML file -----------------------------------------------------------------


def test_toml_in_data_dir_is_read(environ, data_dir):
    path = write_toml(data_dir / "config.toml", "lease_seconds = 40\nworkers = 2\n")

    settings = config.load(environ)

    assert settings.lease_seconds == 40.0
    assert settings.workers == 2
    assert settings.sources["lease_seconds"] == str(path)


def test_toml_from_analysis_config(environ, tmp_path):
    path = write_toml(tmp_path / "custom.toml", "poll_seconds = 0.25\n")

    settings = config.load({**environ, "ANALYSIS_CONFIG": str(path)})

    assert settings.poll_seconds == 0.25
    assert settings.sources["poll_seconds"] == str(path)


def test_toml_config_file_argument(environ, tmp_path):
    path = write_toml(tmp_path / "argument.toml", "max_params_bytes = 1024\n")
    write_toml(tmp_path / "ignored.toml", "max_params_bytes = 2048\n")

    settings = config.load({**environ, "ANALYSIS_CONFIG": str(tmp_path / "ignored.toml")}, config_file=path)

    assert settings.max_params_bytes == 1024
    assert settings.sources["max_params_bytes"] == str(path)


def test_toml_int_value_for_float_setting(environ, tmp_path):
    path = write_toml(tmp_path / "c.toml", "lease_seconds = 40\n")

    value = config.load(environ, config_file=path).lease_seconds

    assert value == 40.0
    assert isinstance(value, float)


def test_toml_missing_explicit_file_raises(environ, tmp_path):
    missing = tmp_path / "missing.toml"

    with pytest.raises(ConfigError) as caught:
        config.load({**environ, "ANALYSIS_CONFIG": str(missing)})

    assert str(missing) in caught.value.message
    assert "not found" in caught.value.message


def test_toml_missing_default_file_is_fine(environ, data_dir):
    assert not (data_dir / "config.toml").exists()

    assert config.load(environ).lease_seconds == config.LEASE_SECONDS_DEFAULT


def test_toml_invalid_syntax_raises(environ, tmp_path):
    path = write_toml(tmp_path / "broken.toml", "lease_seconds = = 3\n")

    with pytest.raises(ConfigError) as caught:
        config.load(environ, config_file=path)

    assert "not valid TOML" in caught.value.message
    assert str(path) in caught.value.message


def test_toml_unknown_keys_rejected(environ, tmp_path):
    path = write_toml(tmp_path / "c.toml", "lease_seconds = 40\nleese_seconds = 40\nzzz = 1\n")

    with pytest.raises(ConfigError) as caught:
        config.load(environ, config_file=path)

    assert "unknown setting(s) leese_seconds, zzz" in caught.value.message
    assert "lease_seconds" in caught.value.message.split("known:")[1]


def test_toml_tables_rejected(environ, tmp_path):
    path = write_toml(tmp_path / "c.toml", "[supervisor]\nlease_seconds = 40\n")

    with pytest.raises(ConfigError) as caught:
        config.load(environ, config_file=path)

    assert "supervisor" in caught.value.message


# Order of sources ----------------------------------------------------------


def test_env_beats_toml(environ, tmp_path):
    path = write_toml(tmp_path / "c.toml", "lease_seconds = 40\nworkers = 2\n")

    settings = config.load({**environ, "ANALYSIS_LEASE_SECONDS": "50"}, config_file=path)

    assert settings.lease_seconds == 50.0
    assert settings.sources["lease_seconds"] == "ANALYSIS_LEASE_SECONDS"
    assert settings.workers == 2
    assert settings.sources["workers"] == str(path)


def test_flag_beats_env_and_toml(environ, tmp_path):
    path = write_toml(tmp_path / "c.toml", "lease_seconds = 40\n")
    settings = config.load({**environ, "ANALYSIS_LEASE_SECONDS": "50"}, config_file=path)

    flagged = settings.replace(lease_seconds=60)

    assert flagged.lease_seconds == 60.0
    assert flagged.sources["lease_seconds"] == "flag"


def test_flag_none_means_unset(environ):
    settings = config.load({**environ, "ANALYSIS_WORKERS": "3"})

    flagged = settings.replace(workers=None, poll_seconds=None)

    assert flagged.workers == 3
    assert flagged.sources["workers"] == "ANALYSIS_WORKERS"
    assert flagged.sources["poll_seconds"] == "default"


def test_flag_converts_strings(environ):
    flagged = config.load(environ).replace(workers="4", lease_seconds="45")

    assert flagged.workers == 4
    assert flagged.lease_seconds == 45.0


def test_flag_leaves_original_unchanged(environ):
    settings = config.load(environ)

    settings.replace(lease_seconds=60)

    assert settings.lease_seconds == config.LEASE_SECONDS_DEFAULT
    assert settings.sources["lease_seconds"] == "default"


# Invalid values --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "reason"),
    [
        ("lease_seconds", "soon", "expected float"),
        ("workers", "2.0", "expected int"),
        ("workers", "many", "expected int"),
        ("max_params_bytes", "-1", "must be >= 0"),
        ("cancel_grace_seconds", "-0.5", "must be >= 0"),
    ],
)
def test_env_invalid_value_names_setting_and_source(environ, name, raw, reason):
    variable = config.env_name(name)

    with pytest.raises(ConfigError) as caught:
        config.load({**environ, variable: raw})

    message = caught.value.message
    assert name in message
    assert f"(from {variable})" in message
    assert repr(raw) in message
    assert reason in message


@pytest.mark.parametrize(
    ("line", "name", "reason"),
    [
        ("workers = 2.5", "workers", "expected int"),
        ("lease_seconds = -1", "lease_seconds", "must be >= 0"),
        ('lease_seconds = "soon"', "lease_seconds", "expected float"),
        ("data_dir = 5", "data_dir", "expected Path"),
    ],
)
def test_toml_invalid_value_names_setting_and_source(environ, tmp_path, line, name, reason):
    path = write_toml(tmp_path / "c.toml", line + "\n")

    with pytest.raises(ConfigError) as caught:
        config.load(environ, config_file=path)

    message = caught.value.message
    assert name in message
    assert f"(from {path})" in message
    assert reason in message


def test_flag_invalid_value_names_setting_and_source(environ):
    with pytest.raises(ConfigError) as caught:
        config.load(environ).replace(poll_seconds="often")

    assert "poll_seconds" in caught.value.message
    assert "(from flag)" in caught.value.message


def test_heartbeat_over_half_lease_rejected(environ):
    with pytest.raises(ConfigError) as caught:
        config.load({**environ, "ANALYSIS_LEASE_SECONDS": "10", "ANALYSIS_HEARTBEAT_SECONDS": "6"})

    assert "heartbeat_seconds = 6.0 (from ANALYSIS_HEARTBEAT_SECONDS)" in caught.value.message
    assert "lease_seconds = 10.0 (from ANALYSIS_LEASE_SECONDS)" in caught.value.message


def test_heartbeat_exactly_half_lease_accepted(environ):
    settings = config.load({**environ, "ANALYSIS_LEASE_SECONDS": "10", "ANALYSIS_HEARTBEAT_SECONDS": "5"})

    assert settings.heartbeat_seconds == 5.0


def test_heartbeat_check_applies_to_flags(environ):
    settings = config.load(environ)

    with pytest.raises(ConfigError):
        settings.replace(lease_seconds=8)


@pytest.mark.parametrize("name", ["lease_seconds", "heartbeat_seconds", "poll_seconds"])
def test_zero_interval_rejected(environ, name):
    overrides = {"ANALYSIS_LEASE_SECONDS": "30", "ANALYSIS_HEARTBEAT_SECONDS": "5", config.env_name(name): "0"}

    with pytest.raises(ConfigError) as caught:
        config.load({**environ, **overrides})

    assert name in caught.value.message


def test_zero_workers_rejected(environ):
    with pytest.raises(ConfigError) as caught:
        config.load({**environ, "ANALYSIS_WORKERS": "0"})

    assert "workers" in caught.value.message


def test_config_error_exit_code():
    assert ConfigError("x").exit_code == 2


def test_toml_empty_lease_raises_config_error(environ, tmp_path):
    path = write_toml(tmp_path / "c.toml", 'lease_seconds = ""\n')

    with pytest.raises(ConfigError):
        config.load(environ, config_file=path)


def test_env_nan_lease_rejected(environ):
    with pytest.raises(ConfigError):
        config.load({**environ, "ANALYSIS_LEASE_SECONDS": "nan"})


def test_toml_boolean_workers_rejected(environ, tmp_path):
    path = write_toml(tmp_path / "c.toml", "workers = true\n")

    with pytest.raises(ConfigError):
        config.load(environ, config_file=path)


def test_env_zero_workers_names_source(environ):
    with pytest.raises(ConfigError) as caught:
        config.load({**environ, "ANALYSIS_WORKERS": "0"})

    assert "ANALYSIS_WORKERS" in caught.value.message


def test_default_data_dir_for_other_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))

    folder = config.default_data_dir(home=tmp_path / "someone")

    assert folder.is_relative_to(tmp_path / "someone")
    assert folder.name == config.APP_NAME


# Database URL file -------------------------------------------------------------

SECRET_URL = "postgresql://analysis:hunter2@127.0.0.1:5432/analysis"


def write_url_file(path: Path, text: str = SECRET_URL + "\n", mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_url_file_is_read_and_stripped(environ, tmp_path):
    path = write_url_file(tmp_path / "url", f"  \n{SECRET_URL}\n\n")

    settings = config.load({**environ, "ANALYSIS_DATABASE_URL_FILE": str(path)})

    assert settings.database_url is None
    assert settings.database_url_file == path
    assert settings.sources["database_url_file"] == "ANALYSIS_DATABASE_URL_FILE"
    assert settings.effective_database_url == SECRET_URL


def test_url_file_from_toml(environ, tmp_path):
    path = write_url_file(tmp_path / "url")
    toml = write_toml(tmp_path / "c.toml", f'database_url_file = "{path}"\n')

    settings = config.load(environ, config_file=toml)

    assert settings.effective_database_url == SECRET_URL
    assert settings.sources["database_url_file"] == str(toml)


def test_url_file_from_flag(environ, tmp_path):
    path = write_url_file(tmp_path / "url")

    settings = config.load(environ).replace(database_url_file=str(path))

    assert settings.effective_database_url == SECRET_URL
    assert settings.sources["database_url_file"] == "flag"


def test_url_file_unset_means_embedded(environ):
    settings = config.load(environ)

    assert settings.database_url_file is None
    assert settings.effective_database_url is None


def test_url_file_hidden_from_repr(environ, tmp_path):
    path = write_url_file(tmp_path / "url")

    settings = config.load({**environ, "ANALYSIS_DATABASE_URL_FILE": str(path)})

    assert "hunter2" not in repr(settings)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o620])
def test_url_file_accessible_by_others_rejected(environ, tmp_path, mode):
    path = write_url_file(tmp_path / "url", mode=mode)

    with pytest.raises(ConfigError) as caught:
        config.load({**environ, "ANALYSIS_DATABASE_URL_FILE": str(path)})

    message = caught.value.message
    assert str(path) in message
    assert f"chmod 600 {path}" in message
    assert f"{mode:04o}" in message
    assert "hunter2" not in message


def test_url_file_missing_rejected(environ, tmp_path):
    path = tmp_path / "no-such-file"

    with pytest.raises(ConfigError) as caught:
        config.load({**environ, "ANALYSIS_DATABASE_URL_FILE": str(path)})

    assert str(path) in caught.value.message
    assert "not found" in caught.value.message
    assert "(from ANALYSIS_DATABASE_URL_FILE)" in caught.value.message


@pytest.mark.parametrize("text", ["", "  \n\t\n"])
def test_url_file_empty_rejected(environ, tmp_path, text):
    path = write_url_file(tmp_path / "url", text)

    with pytest.raises(ConfigError) as caught:
        config.load({**environ, "ANALYSIS_DATABASE_URL_FILE": str(path)})

    assert str(path) in caught.value.message
    assert "is empty" in caught.value.message


def test_url_file_two_lines_rejected(environ, tmp_path):
    path = write_url_file(tmp_path / "url", f"{SECRET_URL}\n{SECRET_URL}\n")

    with pytest.raises(ConfigError) as caught:
        config.load({**environ, "ANALYSIS_DATABASE_URL_FILE": str(path)})

    assert "more than one line" in caught.value.message
    assert "hunter2" not in caught.value.message


def test_url_file_directory_rejected(environ, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir(mode=0o700)

    with pytest.raises(ConfigError) as caught:
        config.load({**environ, "ANALYSIS_DATABASE_URL_FILE": str(folder)})

    assert "not a regular file" in caught.value.message


def test_url_and_url_file_both_set_rejected(environ, tmp_path):
    path = write_url_file(tmp_path / "url")

    with pytest.raises(ConfigError) as caught:
        config.load({**environ, "ANALYSIS_DATABASE_URL": SECRET_URL, "ANALYSIS_DATABASE_URL_FILE": str(path)})

    message = caught.value.message
    assert "database_url (from ANALYSIS_DATABASE_URL)" in message
    assert f"database_url_file = {path} (from ANALYSIS_DATABASE_URL_FILE)" in message
    assert "hunter2" not in message


def test_url_flag_with_url_file_env_rejected(environ, tmp_path):
    path = write_url_file(tmp_path / "url")
    settings = config.load({**environ, "ANALYSIS_DATABASE_URL_FILE": str(path)})

    with pytest.raises(ConfigError) as caught:
        settings.replace(database_url=SECRET_URL)

    assert "database_url (from flag)" in caught.value.message
    assert "hunter2" not in caught.value.message


def test_url_in_toml_with_url_file_env_rejected(environ, tmp_path):
    path = write_url_file(tmp_path / "url")
    toml = write_toml(tmp_path / "c.toml", f'database_url = "{SECRET_URL}"\n')

    with pytest.raises(ConfigError) as caught:
        config.load({**environ, "ANALYSIS_DATABASE_URL_FILE": str(path)}, config_file=toml)

    assert f"database_url (from {toml})" in caught.value.message
