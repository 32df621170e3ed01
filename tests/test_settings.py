"""The settings object: unknown names and unusable values stop start-up with one clear error; valid ones load."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import services.settings as settings_module
from clients.cli import main
from services.settings import (
    ENV_PREFIX,
    NOT_SETTINGS,
    PROJECT_ROOT,
    Settings,
    SettingsError,
    load_settings,
)
from services.triton.client import TritonModels
from services.triton.impression import ImpressionModel


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No MEDGATE_* variable from the shell that runs the tests; monkeypatch restores them afterwards."""
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    yield


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "medgate.toml"
    path.write_text(text)
    return path


def refused() -> str:
    """The message of the SettingsError that ``load_settings`` raises (the environment already set)."""
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message, "one line, so `medgate serve` prints it as one"
    return message


def all_env_names(settings: Any, path: tuple[str, ...] = ()) -> list[str]:
    names: list[str] = []
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if dataclasses.is_dataclass(value):
            names += all_env_names(value, (*path, item.name))
        else:
            names.append(ENV_PREFIX + "_".join((*path, item.name)).upper())
    return names


# --- what loads ---------------------------------------------------------------------------------


def test_defaults_load_with_no_file_and_no_variables() -> None:
    assert load_settings() == Settings()


def test_a_valid_file_and_environment_load_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(
        tmp_path,
        """
        [gateway]
        port = 50060
        max_prompts = 8
        default_deadline_s = 10          # an integer where a float is expected is fine
        [triton]
        shared_memory = "off"
        model_repository = "/srv/models"
        [review]
        enabled = false
        [ingest]
        max_pixels = 50_000_000
        [report]
        max_findings_chars = 4000
        stream_in_flight = 2
        [models]
        segmenter_box = ""
        """,
    )
    monkeypatch.setenv("MEDGATE_CONFIG", str(config))
    monkeypatch.setenv("MEDGATE_GATEWAY_PORT", "50061")
    monkeypatch.setenv("MEDGATE_TRITON_CONNECT_TIMEOUT_S", "7.5")
    monkeypatch.setenv("MEDGATE_INGEST_MAX_FRAMES", "12")
    settings = load_settings()
    assert settings.gateway.port == 50061  # the environment over the file
    assert settings.gateway.max_prompts == 8
    assert settings.gateway.default_deadline_s == 10.0 and isinstance(settings.gateway.default_deadline_s, float)
    assert settings.triton.shared_memory == "off"
    assert settings.triton.model_repository == Path("/srv/models")
    assert settings.triton.connect_timeout_s == 7.5
    assert settings.review.enabled is False
    assert (settings.ingest.max_pixels, settings.ingest.max_frames) == (50_000_000, 12)
    assert (settings.report.max_findings_chars, settings.report.stream_in_flight) == (4000, 2)
    assert settings.models.as_dict() == {
        "classifier": "classifier",
        "detector": "detector",
        "segmenter_text": "segmenter_text",
    }


def test_an_explicit_path_is_read_like_medgate_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[gateway]\nworkers = 3\n")
    assert load_settings(config).gateway.workers == 3


def test_the_allow_listed_variables_are_not_settings_and_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(NOT_SETTINGS) == {"MEDGATE_CONFIG", "MEDGATE_BENCH_VERBOSE", "MEDGATE_TOKEN"}
    monkeypatch.setenv("MEDGATE_CONFIG", str(write_config(tmp_path, "")))
    monkeypatch.setenv("MEDGATE_BENCH_VERBOSE", "1")
    assert load_settings() == Settings()


def test_every_setting_has_its_own_variable_and_none_is_allow_listed() -> None:
    names = all_env_names(Settings())
    assert len(names) == len(set(names))
    assert not set(names) & set(NOT_SETTINGS)


def test_every_medgate_variable_the_repository_sets_is_a_setting_or_allow_listed() -> None:
    """Tests, bench, CI, Makefile and README: nothing there may set a MEDGATE_* name start-up would refuse."""
    known = set(all_env_names(Settings())) | set(NOT_SETTINGS)
    files = [PROJECT_ROOT / "Makefile", PROJECT_ROOT / "README.md", PROJECT_ROOT / ".ci" / "run"]
    for folder in ("tests", "bench", "clients", "services", "training", "config"):
        files += [p for p in (PROJECT_ROOT / folder).rglob("*") if p.suffix in {".py", ".md", ".toml", ".sh"}]
    # Set (NAME=...) or named in code ("NAME", 'NAME'); not a pattern such as MEDGATE_TRITON_*_PORT, nor a
    # refused name quoted in prose, like the README's example of the error.
    mention = re.compile(r"""(?<=["'])MEDGATE_[A-Z0-9_]*[A-Z0-9](?=["'])|\bMEDGATE_[A-Z0-9_]*[A-Z0-9](?==)""")
    found = {
        (str(path.relative_to(PROJECT_ROOT)), name)
        for path in files
        if path.is_file() and path.name != Path(__file__).name
        for name in mention.findall(path.read_text(errors="replace"))
    }
    assert {("bench/bench_gateway.py", "MEDGATE_BENCH_VERBOSE"), ("README.md", "MEDGATE_TRITON_URL")} <= found
    assert not {(path, name) for path, name in found if name not in known}


# --- unknown names ---------------------------------------------------------------------------------


def test_an_unknown_variable_is_refused_with_the_nearest_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGATE_GATEWAY_MAX_PROMTPS", "32")
    assert refused() == "unknown setting MEDGATE_GATEWAY_MAX_PROMTPS (did you mean MEDGATE_GATEWAY_MAX_PROMPTS?)"


def test_a_variable_like_no_setting_is_refused_without_a_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGATE_QQQQ", "1")
    assert refused() == "unknown setting MEDGATE_QQQQ"


def test_nested_sections_are_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGATE_INGEST_MAX_PIXEL", "5")  # IngestLimits
    monkeypatch.setenv("MEDGATE_REPORT_MAX_FINDING_CHARS", "5")  # ReportLimits, inherited by ReportSettings
    message = refused()
    assert "unknown setting MEDGATE_INGEST_MAX_PIXEL (did you mean MEDGATE_INGEST_MAX_PIXELS?)" in message
    assert "MEDGATE_REPORT_MAX_FINDING_CHARS (did you mean MEDGATE_REPORT_MAX_FINDINGS_CHARS?)" in message


def test_an_unknown_key_in_the_file_is_refused_with_the_nearest_name(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[gateway]\nmax_promtps = 32\n")
    with pytest.raises(
        SettingsError,
        match=r"^unknown setting gateway\.max_promtps in .*medgate\.toml "
        r"\(did you mean gateway\.max_prompts\?\)$",
    ):
        load_settings(config)


def test_an_unknown_section_in_the_file_is_refused_with_the_nearest_name(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[gatway]\nport = 1\n")
    with pytest.raises(SettingsError, match=r"^unknown section \[gatway\] in .* \(did you mean \[gateway\]\?\)$"):
        load_settings(config)


def test_a_key_of_another_section_names_that_section(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[gateway]\nstore_path = '/tmp/x'\n")
    with pytest.raises(SettingsError, match=r"did you mean review\.store_path\?"):
        load_settings(config)


def test_every_problem_is_named_in_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path, "[triton]\ngrcp_port = 1\n[ingest]\nmax_frames = 0\n")
    monkeypatch.setenv("MEDGATE_CONFIG", str(config))
    monkeypatch.setenv("MEDGATE_GATEWAY_WORKER", "2")
    monkeypatch.setenv("MEDGATE_GATEWAY_PORT", "abc")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    problems = caught.value.problems
    assert len(problems) == 4, problems
    assert str(caught.value) == "; ".join(problems)
    assert any("triton.grcp_port" in p and "triton.grpc_port" in p for p in problems)
    assert any(p.startswith("[ingest] ") and "max_frames" in p for p in problems)  # the section's own check
    assert "unknown setting MEDGATE_GATEWAY_WORKER (did you mean MEDGATE_GATEWAY_WORKERS?)" in problems
    assert "MEDGATE_GATEWAY_PORT must be an integer, not 'abc'" in problems


# --- values -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" on ", True),
        ("0", False),
        ("False", False),
        ("no", False),
        ("off", False),
    ],
)
def test_bools_take_the_usual_words(text: str, value: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGATE_REVIEW_ENABLED", text)
    assert load_settings().review.enabled is value


@pytest.mark.parametrize("text", ["maybe", "", "2", "enabled", "t"])
def test_a_bool_refuses_anything_else(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGATE_REVIEW_ENABLED", text)
    assert refused().startswith("MEDGATE_REVIEW_ENABLED must be true or false")


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("MEDGATE_GATEWAY_MAX_PROMPTS", "abc", "must be an integer, not 'abc'"),
        ("MEDGATE_GATEWAY_MAX_PROMPTS", "1.5", "must be an integer, not '1.5'"),
        ("MEDGATE_GATEWAY_DEFAULT_DEADLINE_S", "soon", "must be a number, not 'soon'"),
        ("MEDGATE_GATEWAY_DEFAULT_DEADLINE_S", "nan", "must be a finite number"),
        ("MEDGATE_REVIEW_STORE_PATH", "", "must be a path, not empty"),
        ("MEDGATE_TRITON_SHARED_MEMORY", "sometimes", "triton.shared_memory must be auto, on or off, not 'sometimes'"),
    ],
)
def test_a_value_that_does_not_parse_names_the_setting(
    name: str, text: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, text)
    assert says in refused()


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ("[gateway]\nport = '50051'", "gateway.port in {path} must be an integer, not a string"),
        ("[gateway]\nworkers = true", "gateway.workers in {path} must be an integer, not a boolean"),
        ("[review]\nenabled = 'yes'", "review.enabled in {path} must be true or false, not a string"),
        ("[gateway]\nhost = 127", "gateway.host in {path} must be a string, not a number"),
        ("[triton]\nstartup_timeout_s = [1]", "triton.startup_timeout_s in {path} must be a number, not an array"),
        ("[gateway.port]\nx = 1", "gateway.port in {path} must be an integer, not a table"),
        ("gateway = 1", "gateway in {path} must be a table ([gateway]), not a number"),
        ("port = 1", "unknown setting port in {path} (did you mean gateway.port, review.port or dicom.port?)"),
    ],
)
def test_wrong_toml_types_are_refused(toml: str, says: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, toml + "\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(config)
    assert says.format(path=config) in str(caught.value)


def test_a_huge_value_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGATE_GATEWAY_MAX_PROMPTS", "x" * 100_000)
    monkeypatch.setenv("MEDGATE_TRITON_SHARED_MEMORY", "y" * 100_000)  # refused by the section's own check
    message = refused()
    assert len(message) < 400
    assert "(100000 characters)" in message


def test_a_file_that_cannot_be_used_is_one_settings_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="cannot be read"):
        load_settings(tmp_path / "missing.toml")
    with pytest.raises(SettingsError, match="is not valid TOML"):
        load_settings(write_config(tmp_path, "[gateway\n"))
    monkeypatch.setenv("MEDGATE_CONFIG", "")
    with pytest.raises(SettingsError, match="MEDGATE_CONFIG is set but empty"):
        load_settings()


# --- secrets, through a settings object with secret-looking fields ---------------------------------


@dataclass(frozen=True)
class _Retry:
    max_tries: int = 3


@dataclass(frozen=True)
class _Auth:
    api_token_ttl_s: float = 60.0
    signing_key_bytes: int = 32
    password_required: bool = True
    retry: _Retry = field(default_factory=_Retry)


@dataclass(frozen=True)
class _WithAuth(Settings):
    auth: _Auth = field(default_factory=_Auth)


@pytest.fixture
def with_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module, "Settings", _WithAuth)


@pytest.mark.usefixtures("with_auth")
@pytest.mark.parametrize(
    "name", ["MEDGATE_AUTH_API_TOKEN_TTL_S", "MEDGATE_AUTH_SIGNING_KEY_BYTES", "MEDGATE_AUTH_PASSWORD_REQUIRED"]
)
def test_a_secret_looking_value_is_never_quoted(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, "hunter2-s3cr3t")
    message = refused()
    assert message.startswith(f"{name} must be ")
    assert "hunter2" not in message
    assert "value not shown" in message


@pytest.mark.usefixtures("with_auth")
def test_a_secret_looking_value_in_the_file_is_never_quoted(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[auth]\nsigning_key_bytes = 'hunter2-s3cr3t'\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(config)
    assert "auth.signing_key_bytes" in str(caught.value) and "hunter2" not in str(caught.value)


@pytest.mark.usefixtures("with_auth")
def test_sections_nested_in_sections_are_read_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGATE_AUTH_RETRY_MAX_TRIES", "5")
    settings = load_settings(write_config(tmp_path, "[auth.retry]\nmax_tries = 4\n"))
    assert settings.auth.retry.max_tries == 5  # type: ignore[attr-defined]
    monkeypatch.setenv("MEDGATE_AUTH_RETRY_MAX_TRIE", "5")
    assert "did you mean MEDGATE_AUTH_RETRY_MAX_TRIES?" in refused()
    monkeypatch.delenv("MEDGATE_AUTH_RETRY_MAX_TRIE")
    with pytest.raises(SettingsError, match=r"auth\.retry\.max_trie .*did you mean auth\.retry\.max_tries\?"):
        load_settings(write_config(tmp_path, "[auth.retry]\nmax_trie = 4\n"))


# --- where the settings are used -----------------------------------------------------------------


def test_the_triton_clients_take_their_timeouts_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGATE_TRITON_CONNECT_TIMEOUT_S", "3")
    monkeypatch.setenv("MEDGATE_TRITON_READY_TIMEOUT_S", "0.5")
    monkeypatch.setenv("MEDGATE_TRITON_WARMUP_TIMEOUT_S", "9")
    settings = load_settings()
    models = TritonModels.from_settings("127.0.0.1:1", settings)  # no connection until the first call
    assert (models.connect_timeout_s, models.ready_timeout_s, models.warmup_timeout_s) == (3.0, 0.5, 9.0)
    report = ImpressionModel.from_settings("127.0.0.1:1", settings)
    assert (report.connect_timeout_s, report.ready_timeout_s) == (3.0, 0.5)


def test_medgate_serve_prints_a_settings_error_as_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEDGATE_GATEWAY_MAX_PROMTPS", "32")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown setting MEDGATE_GATEWAY_MAX_PROMTPS (did you mean MEDGATE_GATEWAY_MAX_PROMPTS?)\n"
